"""Independent check of a speed-up ratio, outside the project's code.

Each model is timed in a fresh process of its own with a plain ``onnxruntime.InferenceSession``
(default options, CPU provider) and ``time.perf_counter``: 100 warm-up calls, then N timed
batch-1 calls, median. Models alternate, several rounds. Done twice: with ORT's default
intra-op spinning, and with spinning off (as the project's interleaved benchmark runs them).

    python independent_check.py BASE.onnx OTHER.onnx [--rounds 3] [--calls 1500] \
        [--base-threads N] [--other-threads N] > check.json

``--base-threads`` / ``--other-threads`` set ``intra_op_num_threads`` for one model (0, the
default: ORT's own choice), to check a report that runs each model with its own thread count.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time


def child(path: str, calls: int, spinning: bool, threads: int = 0) -> None:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    shape = [1 if not isinstance(d, int) else d for d in session.get_inputs()[0].shape]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(100):
        session.run(None, {name: x})
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, {name: x})
        samples.append(time.perf_counter() - start)
    print(json.dumps({"median_ms": statistics.median(samples) * 1000}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("other")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--spinning", default="on")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--base-threads", type=int, default=0)
    parser.add_argument("--other-threads", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args.base, args.calls, args.spinning == "on", args.threads)
        return
    out = {"base": args.base, "other": args.other, "calls": args.calls, "rounds": args.rounds,
           "threads": {"base": args.base_threads, "other": args.other_threads}, "settings": {}}
    for spinning in ("on", "off"):
        times = {"base": [], "other": []}
        for _ in range(args.rounds):
            for key in ("base", "other"):
                path = getattr(args, key)
                result = subprocess.run([sys.executable, __file__, path, path, "--child", "--calls", str(args.calls),
                                         "--spinning", spinning, "--threads", str(getattr(args, f"{key}_threads"))],
                                        capture_output=True, text=True, check=True)
                times[key].append(json.loads(result.stdout)["median_ms"])
        base, other = statistics.mean(times["base"]), statistics.mean(times["other"])
        out["settings"][f"spinning_{spinning}"] = {"base_ms": times["base"], "other_ms": times["other"],
                                                   "ratio_of_means": base / other}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
