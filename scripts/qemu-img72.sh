#!/bin/sh
# Runs Debian's qemu-img 7.2 with its block modules (iscsi, rbd), unpacked, never installed: the
# installed qemu-img 10 (the tests' oracle) has no iscsi or rbd driver, and installing Debian's
# qemu-utils would replace it. The network-storage tests cross-check against it and the
# benchmarks time it beside img. The first run downloads and unpacks qemu-utils and
# qemu-block-extra under $IMG_LAB_DIR/qemu-img72 (default /var/cache/img-lab).
#   scripts/qemu-img72.sh [qemu-img arguments...]
#   scripts/qemu-img72.sh --prepare     (only make sure it is there; prints the qemu-img path)
#   QEMU_TOOL=qemu-io scripts/qemu-img72.sh ...   (qemu-io or qemu-nbd of the same version)
set -eu
LAB=${IMG_LAB_DIR:-/var/cache/img-lab}
DIR="$LAB/qemu-img72"
ROOT="$DIR/ROOT"
MODULES="$ROOT/usr/lib/x86_64-linux-gnu/qemu"
if [ ! -x "$ROOT/usr/bin/qemu-img" ] || [ ! -f "$MODULES/block-rbd.so" ]; then
    mkdir -p "$DIR"
    (
        exec 9>"$DIR/.lock"
        flock 9
        [ -f "$MODULES/block-rbd.so" ] && exit 0
        cd "$DIR"
        rm -rf ROOT ./*.deb
        export DEBIAN_FRONTEND=noninteractive
        # The modules' libraries; the client libraries come with the build dependencies.
        apt-get install -y -qq --no-install-recommends libiscsi7 librbd1 librados2 liburing2 \
            libaio1 libglib2.0-0 libgnutls30 libnuma1 libfuse3-3 >/dev/null 2>&1 || {
            apt-get update -qq >/dev/null
            apt-get install -y -qq --no-install-recommends libiscsi7 librbd1 librados2 liburing2 \
                libaio1 libglib2.0-0 libgnutls30 libnuma1 libfuse3-3 >/dev/null
        }
        # The candidate may be a newer backport (the installed oracle): ask for Debian 12's 7.2.
        version() { apt-cache madison "$1" | awk -F' [|] ' '$2 ~ /^1:7\.2/ {print $2; exit}'; }
        v=$(version qemu-utils)
        if [ -z "$v" ]; then
            apt-get update -qq >/dev/null
            v=$(version qemu-utils)
        fi
        [ -n "$v" ] || { echo "qemu-img72: apt knows no qemu-utils 7.2" >&2; exit 1; }
        apt-get download -qq "qemu-utils=$v" "qemu-block-extra=$v" >/dev/null 2>&1 ||
            apt-get download "qemu-utils=$v" "qemu-block-extra=$v"
        for d in ./*.deb; do dpkg -x "$d" ROOT; done
        rm -f ./*.deb
    )
fi
if [ "${1:-}" = "--prepare" ]; then
    echo "$ROOT/usr/bin/qemu-img"
    exit 0
fi
QEMU_MODULE_DIR="$MODULES" exec "$ROOT/usr/bin/${QEMU_TOOL:-qemu-img}" "$@"
