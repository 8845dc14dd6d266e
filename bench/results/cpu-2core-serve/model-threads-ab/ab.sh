#!/bin/bash
# A/B of SERVE_MODEL_THREADS through HTTP: same model, same client, one after the other, twice.
set -u
cd /work/wt-serve-gpu-path
export PYTHONPATH=$PWD BENTOML_HOME=/tmp/gp/home SERVE_MODELS=digits
for round in 1 2; do
for mt in 1 2; do
  SERVE_MODEL_THREADS=$mt /work/main/.venv/bin/bentoml serve . --port 3961 > /tmp/gp/server-$mt.log 2>&1 &
  pid=$!
  for i in $(seq 60); do curl -sf localhost:3961/readyz >/dev/null && break; sleep 0.5; done
  echo "round $round model_threads=$mt load $(cat /proc/loadavg)"
  /work/main/.venv/bin/bench serve http://127.0.0.1:3961 --images /tmp/gp/imgs --concurrency 1,8,32 --requests 2000 --duration 12 \
     --baseline /work/main/runs/digits-int8:3 --out /tmp/gp/mt$mt-r$round 2>&1 | tail -1
  kill -INT $pid; wait $pid 2>/dev/null
done
done
