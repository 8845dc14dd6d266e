#!/bin/bash
PIDS=$(ps -eo pid=,ni= | awk '$2==19 {print $1}' | tr '\n' ' ')
[ -n "$PIDS" ] && kill -STOP $PIDS
trap '[ -n "$PIDS" ] && kill -CONT $PIDS' EXIT
sleep 3
for r in 1 2; do for v in before after; do echo "== $v r$r"; TARGETS="livez" /tmp/s11/prof.sh /tmp/s11/$v /tmp/s11/formal/floor-$v-r$r | grep livez; done; done
