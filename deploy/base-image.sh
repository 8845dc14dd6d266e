#!/usr/bin/env bash
# deploy/base-image.sh [NAME]: `make base-image`. A Debian bookworm base image built from Debian
# packages alone, for hosts that cannot pull one from a registry: debootstrap (minbase: no
# compilers, no docs) with Python 3.11, pip and the CA certificates, brought up to date from
# bookworm-updates and the security archive, trimmed, then `docker import`. Needs root (debootstrap)
# and a Docker engine (deploy/docker-engine.sh starts one).
#
# The host's CA bundle replaces Debian's inside the image, and pip, uv and Python's ssl are
# pointed at it: BentoML's Dockerfile pip-installs uv into the system Python, then uv installs
# the Bento's requirements, both through whatever TLS interception the host's network does.
# PIP_BREAK_SYSTEM_PACKAGES=1 because Debian marks its Python externally managed (PEP 668) and
# BentoML's template installs uv there; everything else goes into the Bento's own venv.
set -euo pipefail

NAME=${1:-resnet-classifier-base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
CERT=/etc/ssl/certs/ca-certificates.crt

if [ "$(id -u)" != 0 ]; then
    echo "base-image: debootstrap needs root" >&2
    exit 1
fi
command -v debootstrap >/dev/null || {
    echo "base-image: installing debootstrap (Debian)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
"$(dirname "$0")/docker-engine.sh"

root=$(mktemp -d /tmp/resnet-base-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
chmod 755 "$root"  # it becomes the image's /: mktemp's 0700 would lock every other user out
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR"

cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -qq && apt-get upgrade -y -qq --no-install-recommends >/dev/null && apt-get clean'

cp "$CA_BUNDLE" "$root$CERT"
# what no container needs: package lists and caches, docs, man pages, other languages' messages
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* "$root"/tmp/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
: >"$root/etc/resolv.conf"

tar -C "$root" --numeric-owner -c . | /usr/bin/docker import \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV SSL_CERT_FILE=$CERT" \
    --change "ENV PIP_CERT=$CERT" \
    --change "ENV UV_SYSTEM_CERTS=1" \
    --change "ENV PIP_BREAK_SYSTEM_PACKAGES=1" \
    --change "ENV PIP_NO_CACHE_DIR=1" \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE (deploy/base-image.sh)" \
    - "$NAME" >/dev/null
echo "base-image: built $NAME ($(/usr/bin/docker image inspect --format '{{.Size}}' "$NAME" | awk '{printf "%.0f MB", $1 / 1e6}'))"
