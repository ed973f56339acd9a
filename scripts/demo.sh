#!/bin/sh
# Builds img and runs it on a small example: a raw disk with some data is converted to qcow2
# (plain and compressed), inspected, checked, compared with the source, and converted back.
set -eu
cd "$(dirname "$0")/.."
scripts/build-deps.sh
cargo build --release -q -p img-cli
IMG="$PWD/target/release/img"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

"$IMG" create -f raw disk.raw 64M
# Some content: a few MiB of text-like data at different offsets.
python3 - <<'PY'
with open("disk.raw", "r+b") as f:
    for i, off in enumerate((0, 5 << 20, 40 << 20)):
        f.seek(off)
        f.write((b"img demo block %d " % i) * 40000)
PY
"$IMG" convert -f raw -O qcow2 disk.raw disk.qcow2
"$IMG" convert -c -f raw -O qcow2 -o compression_type=zstd disk.raw disk-zstd.qcow2
"$IMG" info disk.qcow2
"$IMG" check disk.qcow2
"$IMG" compare disk.raw disk.qcow2
"$IMG" compare disk.raw disk-zstd.qcow2
"$IMG" convert -O raw disk-zstd.qcow2 back.raw
cmp disk.raw back.raw && echo "round trip through compressed qcow2: identical"
ls -ls disk.raw disk.qcow2 disk-zstd.qcow2

# A derived image over disk.qcow2: writes land in the overlay, reads fall through.
"$IMG" create -f qcow2 -b disk.qcow2 -F qcow2 overlay.qcow2
# One write into the overlay (qemu-io, from qemu-utils, is the writer at hand).
if command -v qemu-io >/dev/null; then
    qemu-io -f qcow2 -c "write -P 0x61 1M 64k" overlay.qcow2 >/dev/null
fi
"$IMG" info --backing-chain overlay.qcow2
"$IMG" map overlay.qcow2
"$IMG" rebase -b "" overlay.qcow2
"$IMG" map --output=json overlay.qcow2
"$IMG" check overlay.qcow2
