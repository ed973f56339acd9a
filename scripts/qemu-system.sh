#!/bin/sh
# Runs Debian's QEMU 7.2 system emulator, unpacked (never installed: installing
# qemu-system-x86 would remove qemu-utils 10, the oracle of the tests; see ../shared/LAB.md).
# The first run downloads and unpacks it under $IMG_LAB_DIR (default /var/cache/img-lab).
#   scripts/qemu-system.sh [qemu-system-x86_64 arguments...]
#   scripts/qemu-system.sh --prepare     (only make sure it is there)
set -eu
LAB=${IMG_LAB_DIR:-/var/cache/img-lab}
ROOT="$LAB/ROOT"
BIN="$ROOT/usr/bin/qemu-system-x86_64"
if [ ! -x "$BIN" ]; then
    mkdir -p "$LAB"
    cd "$LAB"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends libaio1 libasound2 libbpf1 libbrlapi0.8 \
        libcacard0 libcap-ng0 libcapstone4 libepoxy0 libfdt1 libfuse3-3 libgbm1 libglib2.0-0 \
        libgnutls30 libibverbs1 libjpeg62-turbo libnuma1 libpixman-1-0 libpmem1 libpng16-16 \
        librdmacm1 libsasl2-2 libseccomp2 libslirp0 libsndio7.0 libspice-server1 liburing2 \
        libusb-1.0-0 libusbredirparser1 libvdeplug2 >/dev/null
    apt-get download -qq qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu \
        >/dev/null
    for d in ./*.deb; do dpkg -x "$d" ROOT; done
    rm -f ./*.deb
    cd - >/dev/null
fi
[ "${1:-}" = "--prepare" ] && exit 0
QEMU_MODULE_DIR="$ROOT/usr/lib/x86_64-linux-gnu/qemu" exec "$BIN" -L "$ROOT/usr/share/qemu" "$@"
