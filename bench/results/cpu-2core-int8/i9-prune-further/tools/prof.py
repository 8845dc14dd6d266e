"""ORT profile of one model at batch 1: per op type and per node, us per run. argv: model threads [label]"""
import sys, json, collections, os, numpy as np, onnxruntime as ort
path = sys.argv[1]; threads = int(sys.argv[2]); calls = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
o = ort.SessionOptions(); o.enable_profiling = True; o.intra_op_num_threads = threads; o.log_severity_level = 3
o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
o.add_session_config_entry("session.intra_op.allow_spinning", "0"); o.profile_file_prefix = "/tmp/i9/prof"
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
shape = [1 if not isinstance(d, int) else d for d in s.get_inputs()[0].shape]
x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
n = s.get_inputs()[0].name
for _ in range(calls): s.run(None, {n: x})
f = s.end_profiling(); ev = json.load(open(f)); os.remove(f)
by = collections.Counter(); node = collections.Counter(); cnt = collections.Counter(); runs = 0; total = 0
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        by[e["args"]["op_name"]] += e["dur"]; node[e["name"][:-12]] += e["dur"]; cnt[e["args"]["op_name"]] += 1
    if e.get("cat") == "Session" and e["name"] == "model_run":
        runs += 1; total += e["dur"]
kern = sum(by.values()) / runs
print(f"{path} threads={threads}: model_run mean {total/runs:.1f} us over {runs}; kernels {kern:.1f} us; outside kernels {total/runs-kern:.1f} us")
for k, v in by.most_common(): print(f"  {k:24s} x{cnt[k]//runs:3d} {v/runs:7.1f} us/run")
print("  top nodes:")
for k, v in node.most_common(12): print(f"    {k:50s} {v/runs:7.1f}")
