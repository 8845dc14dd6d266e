"""Each model in a fresh process (plain ORT session, spinning off, given threads), batch 1, random input,
100 warm-up + N timed calls, median; models alternate for R rounds. argv: rounds calls label=path@threads ..."""
import json, statistics, subprocess, sys, time
if sys.argv[1] == "--child":
    import numpy as np, onnxruntime as ort
    path, threads, calls = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    o = ort.SessionOptions(); o.intra_op_num_threads = threads
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    shape = [1 if not isinstance(d, int) else d for d in s.get_inputs()[0].shape]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32); n = s.get_inputs()[0].name
    for _ in range(100): s.run(None, {n: x})
    t = []
    for _ in range(calls):
        a = time.perf_counter(); s.run(None, {n: x}); t.append(time.perf_counter() - a)
    print(statistics.median(t) * 1000); sys.exit()
rounds, calls = int(sys.argv[1]), int(sys.argv[2])
models = [a.split("=", 1) for a in sys.argv[3:]]
res = {k: [] for k, _ in models}
for _ in range(rounds):
    for k, spec in models:
        path, th = spec.rsplit("@", 1)
        out = subprocess.run([sys.executable, __file__, "--child", path, th, str(calls)], capture_output=True, text=True, check=True)
        res[k].append(float(out.stdout))
base = statistics.mean(res[models[0][0]])
out = {"rounds": rounds, "calls": calls, "models": dict(models), "ms": res,
       "ratio_of_means_vs_first": {k: round(base / statistics.mean(v), 3) for k, v in res.items()},
       "ratio_per_round_vs_first": {k: [round(b / o, 2) for b, o in zip(res[models[0][0]], v)] for k, v in res.items()}}
print(json.dumps(out, indent=1))
