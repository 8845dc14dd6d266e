import time, os, sys
os.environ.setdefault("BENTOML_HOME", "/tmp/serve-cost/bentoml")
import numpy as np
from serve.runtime import Ensemble
for threads in (0, 1):
    ens = Ensemble.load(["digits"], provider="cpu", threads=threads)
    for b in (1, 2, 4, 8):
        rows = np.random.rand(b, ens.layout.width).astype(np.float32)
        for _ in range(20): ens.predict(rows)
        n = max(200, 2000 // b); c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n): ens.predict(rows)
        c, w = time.process_time() - c0, time.perf_counter() - t0
        print(f"threads={threads or 'default'} batch {b}: {1000*c/(n*b):.3f} ms CPU/image, {1000*w/n:.3f} ms wall/call, {n*b/w:.0f} img/s")
