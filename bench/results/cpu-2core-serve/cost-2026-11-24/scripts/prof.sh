#!/bin/bash
# prof.sh CODE OUT [paths...]: serve, wrk c8 per target with CPU/request, py-spy of the worker
CODE=$1; OUT=$2; PORT=${PORT:-3957}; mkdir -p $OUT
export BENTOML_HOME=/tmp/serve-cost/bentoml SERVE_MODELS=${SERVE_MODELS:-digits}
cd $CODE
PYTHONPATH=$CODE setsid /work/main/.venv/bin/bentoml serve . --port $PORT > $OUT/server.log 2>&1 &
S=$!
for i in $(seq 1 120); do curl -sf localhost:$PORT/readyz >/dev/null && break; sleep 0.5; done
cpu() { PYTHONPATH=/work/main /work/main/.venv/bin/python /tmp/serve-cost/cpu_of.py $PORT; }
WORKER=$(ps -eo pid,args | grep "_bentoml_impl.worker" | grep -v grep | awk '{print $1}' | tail -1)
for what in ${TARGETS:-livez classify}; do
  args="http://127.0.0.1:$PORT/livez"; [ $what = classify ] && args="-s /tmp/serve-cost/classify.lua http://127.0.0.1:$PORT"
  wrk -t1 -c${C:-8} -d2s $args > /dev/null
  A=$(cpu); wrk -t1 -c${C:-8} -d${SECS:-8}s $args > $OUT/wrk_$what.txt; B=$(cpu)
  N=$(grep -Eo '^ +[0-9]+ requests in' $OUT/wrk_$what.txt | grep -Eo '[0-9]+')
  echo "$what: $(grep Requests/sec $OUT/wrk_$what.txt) server CPU ms/request $(echo "scale=3; 1000*($B - $A)/$N" | bc)"
  if [ -n "$PROFILE" ]; then
    wrk -t1 -c${C:-8} -d14s $args > /dev/null & W=$!; sleep 2
    /work/main/.venv/bin/py-spy record -p $WORKER -d 10 -r 250 -f raw -o $OUT/prof_$what.txt --nonblocking >/dev/null 2>&1
    wait $W
  fi
done
cat /proc/loadavg
kill -- -$S; wait $S 2>/dev/null
