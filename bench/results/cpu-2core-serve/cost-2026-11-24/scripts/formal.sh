#!/bin/bash
# Under the lock: pause niced background jobs, run measure.sh rounds before/after alternately, resume.
PIDS=$(ps -eo pid=,ni= | awk '$2==19 {print $1}' | tr '\n' ' ')
echo "pausing niced pids: $PIDS at $(date +%T)"
[ -n "$PIDS" ] && kill -STOP $PIDS
trap '[ -n "$PIDS" ] && kill -CONT $PIDS; echo "resumed at $(date +%T)"' EXIT
sleep 5
for r in $(seq 1 ${ROUNDS:-3}); do
  for v in before after; do
    echo "== round $r $v $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /tmp/s11/measure.sh /tmp/s11/$v /tmp/s11/formal/$v-r$r both 2>&1 | grep -v "^$"
  done
done
