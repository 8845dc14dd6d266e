#!/bin/bash
# measure.sh CODE_DIR OUT_DIR [wrk|bench|both|profile] : start `bentoml serve` from CODE_DIR, measure, stop.
# Runs under flock /tmp/cpu.lock (the caller wraps it). Extra env (SERVE_*) is inherited.
set -u
CODE=$1; OUT=$2; WHAT=${3:-both}; PORT=${PORT:-3951}
PY=/work/main/.venv/bin/python; BIN=/work/main/.venv/bin
TOOLS=/work/main
mkdir -p "$OUT"
export BENTOML_HOME=/tmp/serve-cost/bentoml SERVE_MODELS=${SERVE_MODELS:-digits}
cd "$CODE"
echo "code: $CODE $(git -C $CODE rev-parse --short HEAD) $(git -C $CODE status --short | wc -l) changed files" > "$OUT/session.txt"
env | grep ^SERVE_ | sort >> "$OUT/session.txt"
PYTHONPATH=$CODE setsid $BIN/bentoml serve . --port $PORT > "$OUT/server.log" 2>&1 &
SERVER=$!
for i in $(seq 1 120); do curl -sf localhost:$PORT/readyz >/dev/null && break; sleep 0.5; done
curl -sf localhost:$PORT/readyz >/dev/null || { echo "server not ready"; kill -- -$SERVER; exit 1; }
curl -s -F image=@/tmp/serve-cost/imgs/d00_0.jpg localhost:$PORT/classify > "$OUT/sample_answer.json"
cpu() { PYTHONPATH=$TOOLS $PY /tmp/serve-cost/cpu_of.py $PORT; }
if [ "$WHAT" = wrk ] || [ "$WHAT" = both ]; then
  for C in 1 8; do
    wrk -t1 -c$C -d3s -s /tmp/serve-cost/classify.lua http://127.0.0.1:$PORT > /dev/null 2>&1   # warm-up
    A=$(cpu); echo "loadavg before: $(cat /proc/loadavg)" > "$OUT/wrk_c$C.txt"
    wrk -t1 -c$C -d${WRK_SECONDS:-15}s --latency -s /tmp/serve-cost/classify.lua http://127.0.0.1:$PORT >> "$OUT/wrk_c$C.txt" 2>&1
    B=$(cpu); echo "server_cpu_s: $(echo "$B - $A" | bc)" >> "$OUT/wrk_c$C.txt"
    echo "loadavg after: $(cat /proc/loadavg)" >> "$OUT/wrk_c$C.txt"
    REQ=$(grep -Eo '^ +[0-9]+ requests in' "$OUT/wrk_c$C.txt" | grep -Eo '[0-9]+')
    echo "server_cpu_ms_per_request: $(echo "scale=3; 1000*($B - $A)/$REQ" | bc)" >> "$OUT/wrk_c$C.txt"
    grep -E "Requests/sec|non2xx|Non-2xx|server_cpu_ms|loadavg after" "$OUT/wrk_c$C.txt" | sed "s/^/c$C /"
  done
fi
if [ "$WHAT" = bench ] || [ "$WHAT" = both ]; then
  echo "loadavg before: $(cat /proc/loadavg)" > "$OUT/bench_loadavg.txt"
  PYTHONPATH=$TOOLS $BIN/bench serve http://127.0.0.1:$PORT --images /tmp/serve-cost/imgs --concurrency ${CONC:-1,8} \
     --requests ${REQUESTS:-4000} --duration ${DURATION:-15} --baseline /tmp/serve-cost/digits:3 --out "$OUT/bench-serve" > "$OUT/bench.txt" 2>&1
  echo "loadavg after: $(cat /proc/loadavg)" >> "$OUT/bench_loadavg.txt"
  $PY -c "
import json,sys; d=json.load(open('$OUT/bench-serve/results.json'))
b=d['baseline']['batches']; print('baseline', {k: round(v['images_per_s']) for k,v in b.items()}, 'mean batch', d['baseline']['service_mean_batch_size'])
for l in d['levels']: print('c%d ok/s %.0f frac %.3f cpu ms/req %.3f p50 %.2f ms errors %d' % (l['concurrency'], l['ok_per_s'], l['fraction_of_in_process_b1'], l['server_cpu_ms_per_request'], l['latency']['p50_ms'], l['errors']))
" || cat "$OUT/bench.txt"
fi
if [ "$WHAT" = profile ]; then
  WORKER=$(pgrep -P $(pgrep -f "bentoml serve . --port $PORT" | head -1) | head -1)
  WORKER=$(ps -eo pid,args | grep "_bentoml_impl.worker\|bentoml_impl" | grep -v grep | awk '{print $1}' | tail -1)
  for C in ${PROFILE_CONNS:-1 8}; do
    wrk -t1 -c$C -d25s -s /tmp/serve-cost/classify.lua http://127.0.0.1:$PORT > "$OUT/profile_wrk_c$C.txt" 2>&1 &
    W=$!; sleep 3
    $BIN/py-spy record -p $WORKER -d 18 -r 200 -f raw -o "$OUT/profile_c$C.txt" --nonblocking > /dev/null 2>&1
    wait $W
    grep Requests/sec "$OUT/profile_wrk_c$C.txt" | sed "s/^/profiled c$C /"
  done
fi
kill -- -$SERVER 2>/dev/null; wait $SERVER 2>/dev/null
echo "done: $(cat /proc/loadavg)"
