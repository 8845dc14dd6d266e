#!/bin/bash
# floor.sh CODE_DIR: server CPU per request for GET /livez and for POST /classify (wrk c8, 8 s each)
CODE=$1; PORT=3956
export BENTOML_HOME=/tmp/serve-cost/bentoml SERVE_MODELS=${SERVE_MODELS:-digits}
cd $CODE
PYTHONPATH=$CODE setsid /work/main/.venv/bin/bentoml serve . --port $PORT > /tmp/serve-cost/floor.log 2>&1 &
S=$!
for i in $(seq 1 120); do curl -sf localhost:$PORT/readyz >/dev/null && break; sleep 0.5; done
cpu() { PYTHONPATH=/work/wt-serve-cost /work/main/.venv/bin/python /tmp/serve-cost/cpu_of.py $PORT; }
for what in livez classify; do
  args="http://127.0.0.1:$PORT/livez"; [ $what = classify ] && args="-s /tmp/serve-cost/classify.lua http://127.0.0.1:$PORT"
  wrk -t1 -c${C:-8} -d2s $args > /dev/null
  A=$(cpu); wrk -t1 -c${C:-8} -d8s $args > /tmp/serve-cost/floor_$what.txt; B=$(cpu)
  N=$(grep -Eo '^ +[0-9]+ requests in' /tmp/serve-cost/floor_$what.txt | grep -Eo '[0-9]+')
  echo "$what: $(grep Requests/sec /tmp/serve-cost/floor_$what.txt) server CPU ms/request $(echo "scale=3; 1000*($B - $A)/$N" | bc)"
done
cat /proc/loadavg
kill -- -$S; wait $S 2>/dev/null
