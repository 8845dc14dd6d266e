#!/usr/bin/env bash
# deploy/docker-engine.sh: make sure a Docker engine answers, for `make base-image`, `make image`
# and the container tests. Nothing happens when one already answers. Otherwise (root only) it
# installs Debian's docker.io when dockerd is absent and starts dockerd in the background the
# way this kind of host allows: the vfs storage driver (no overlay mounts inside a container),
# no iptables and no bridge (so builds and containers use --network host). Waits until it answers.
set -euo pipefail

LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
WAIT_S=${DOCKERD_WAIT_S:-60}

if /usr/bin/docker info >/dev/null 2>&1 || docker info >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "docker-engine: no Docker engine answers and only root can start one here" >&2
    exit 1
fi
if ! command -v dockerd >/dev/null || [ ! -x /usr/bin/docker ]; then
    echo "docker-engine: installing docker.io (Debian)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io >/dev/null
fi
echo "docker-engine: starting dockerd (log: $LOG)" >&2
setsid nohup dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
    >"$LOG" 2>&1 </dev/null &
for _ in $(seq "$WAIT_S"); do
    if /usr/bin/docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 1
done
echo "docker-engine: dockerd did not answer within ${WAIT_S} s; last lines of $LOG:" >&2
tail -n 20 "$LOG" >&2
exit 1
