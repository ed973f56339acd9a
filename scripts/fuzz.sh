#!/usr/bin/env bash
# Fuzzing with cargo-fuzz (libFuzzer): seeds made by qemu-img and real NBD clients, and runs of a
# chosen length per target.
#
#   scripts/fuzz.sh seeds                  make fuzz/corpus/<target>/ from qemu-img, qemu-io and
#                                          qemu-nbd sessions (kept; fuzzing adds to it)
#   scripts/fuzz.sh run TARGET SECONDS     fuzz one target; prints "TARGET: N runs in S s"
#   scripts/fuzz.sh all SECONDS            every target in turn, SECONDS each
#   scripts/fuzz.sh targets                list the targets
#
# A crash leaves its input in fuzz/artifacts/TARGET/. Fixing it means copying the input to
# fuzz/regressions/TARGET/ (the test suite replays that directory: tests/tests/fuzz_inputs.rs)
# and changing the code until the replay passes.
#
# Limits a run enforces, so that unbounded memory or time counts as a finding, not just a crash:
# 2 GiB of RSS, 512 MiB in one allocation, 20 s per input.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGETS=(qcow2_image qcow2_write vmdk_image nbd_session)
# Where `seeds` writes (tests/tests/fuzz_inputs.rs makes its own copy elsewhere).
CORPUS=${FUZZ_CORPUS:-$ROOT/fuzz/corpus}

need_tools() {
    if ! rustup toolchain list | grep -q '^nightly'; then
        rustup toolchain install nightly --profile minimal
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        cargo install cargo-fuzz --locked
    fi
}

# Small images of every kind qemu-img writes: versions, cluster sizes, refcount widths,
# extended L2, compression, snapshots, bitmaps, backing names; VMDK subformats that hold their
# extents in one file, and descriptors.
image_seeds() {
    local q="$CORPUS/qcow2_image" v="$CORPUS/vmdk_image" w
    w=$(mktemp -d)
    mkdir -p "$q" "$v"
    local n=0
    qseed() { # name create-options [qemu-io commands...]
        local name=$1 opts=$2
        shift 2
        qemu-img create -q -f qcow2 -o "$opts" "$w/$name" 1M
        for c in "$@"; do qemu-io -f qcow2 -c "$c" "$w/$name" >/dev/null; done
        cp "$w/$name" "$q/$name"
        n=$((n + 1))
    }
    qseed v2-512 compat=0.10,cluster_size=512 'write -P 0x11 0 1536' 'write -z 4k 2k'
    qseed v3-512-rc1 cluster_size=512,refcount_bits=1 'write -P 0x22 512 3k'
    qseed v3-4k-rc64 cluster_size=4k,refcount_bits=64 'write -P 0x33 8k 12k' 'discard 12k 4k'
    qseed v3-4k-rc8-lazy cluster_size=4k,refcount_bits=8,lazy_refcounts=on 'write -P 0x44 0 8k'
    # img refuses extended L2 entries (not supported yet): the header and its refusal are fuzzed.
    qseed refused-extl2 cluster_size=16k,extended_l2=on 'write -P 0x55 1k 3k' 'write -z 6k 512'
    qseed v3-64k cluster_size=64k 'write -P 0x66 0 4k'
    qemu-img create -q -f qcow2 "$w/base.qcow2" 1M
    qseed v3-4k-backing cluster_size=4k,backing_file=base.qcow2,backing_fmt=qcow2 'write -P 0x77 4k 4k'
    # Compressed clusters, zlib and zstd.
    qemu-img create -q -f raw "$w/src.raw" 256k
    qemu-io -f raw -c 'write -P 0x5a 0 64k' -c 'write -P 0xa5 128k 32k' "$w/src.raw" >/dev/null
    for c in zlib zstd; do
        qemu-img convert -c -f raw -O qcow2 -o cluster_size=4k,compression_type=$c \
            "$w/src.raw" "$q/compressed-$c"
        n=$((n + 1))
    done
    # Internal snapshots (the snapshot table, shared clusters without OFLAG_COPIED).
    qemu-img create -q -f qcow2 -o cluster_size=1k "$w/snap" 512k
    qemu-io -f qcow2 -c 'write -P 0x01 0 4k' "$w/snap" >/dev/null
    qemu-img snapshot -c first "$w/snap"
    qemu-io -f qcow2 -c 'write -P 0x02 2k 4k' "$w/snap" >/dev/null
    qemu-img snapshot -c second "$w/snap"
    cp "$w/snap" "$q/snapshots"
    n=$((n + 1))
    # A persistent bitmap (the bitmaps extension and directory).
    qemu-img create -q -f qcow2 -o cluster_size=4k "$w/bitmap" 1M
    qemu-img bitmap --add "$w/bitmap" dirty
    qemu-io -f qcow2 -c 'write -P 0x0b 0 8k' "$w/bitmap" >/dev/null
    cp "$w/bitmap" "$q/bitmap"
    n=$((n + 1))
    for s in monolithicSparse streamOptimized; do
        qemu-img convert -f raw -O vmdk -o subformat=$s "$w/src.raw" "$v/$s"
    done
    qemu-img create -q -f vmdk -o subformat=monolithicSparse,zeroed_grain=on "$w/zg.vmdk" 1M
    qemu-io -f vmdk -c 'write -P 0x3c 0 64k' -c 'write -z 128k 64k' "$w/zg.vmdk" >/dev/null
    cp "$w/zg.vmdk" "$v/zeroed-grain"
    qemu-img create -q -f vmdk -o subformat=monolithicSparse,hwversion=6,adapter_type=lsilogic \
        "$w/hw6.vmdk" 2M
    qemu-io -f vmdk -c 'write -P 0x6e 1m 4k' "$w/hw6.vmdk" >/dev/null
    cp "$w/hw6.vmdk" "$v/hw6-lsilogic"
    # Descriptor files: the extents they name do not exist where the target opens them, so
    # these exercise the descriptor parser.
    for s in monolithicFlat twoGbMaxExtentSparse; do
        qemu-img create -q -f vmdk -o subformat=$s "$w/d-$s.vmdk" 1M
        cp "$w/d-$s.vmdk" "$v/descriptor-$s"
    done
    # The write target starts from the same images.
    mkdir -p "$CORPUS/qcow2_write"
    cp "$q"/* "$CORPUS/qcow2_write/"
    rm -rf "$w"
    echo "qcow2 seeds: $n; vmdk seeds: $(ls "$v" | wc -l)"
}

# What real clients send: each connection of qemu-img, qemu-io and qemu-nbd to `img nbd`,
# recorded client-to-server through a small proxy.
nbd_seeds() {
    local out="$CORPUS/nbd_session" w img=${IMG_BIN:-$ROOT/target/release/img}
    [ -x "$img" ] || cargo build --release -p img-cli
    w=$(mktemp -d)
    mkdir -p "$out"
    qemu-img create -q -f qcow2 -o cluster_size=4k "$w/served.qcow2" 4M
    "$img" nbd --fork -t -e 0 -k "$w/server.sock" -f qcow2 "$w/served.qcow2" \
        --pid-file "$w/server.pid" </dev/null >/dev/null 2>&1
    python3 - "$w/proxy.sock" "$w/server.sock" "$out" <<'PY' >/dev/null 2>&1 &
import os, socket, sys, threading
listen_path, server_path, out = sys.argv[1:4]
l = socket.socket(socket.AF_UNIX)
l.bind(listen_path)
l.listen(8)
count = 0
def pump(src, dst, record):
    while True:
        b = src.recv(65536)
        if not b:
            break
        if record is not None:
            record.write(b)
        dst.sendall(b)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
while True:
    c, _ = l.accept()
    s = socket.socket(socket.AF_UNIX)
    s.connect(server_path)
    count += 1
    f = open(os.path.join(out, "session-%02d" % count), "wb")
    def run(c=c, s=s, f=f):
        t = threading.Thread(target=pump, args=(s, c, None))
        t.start()
        pump(c, s, f)
        t.join()
        f.close()
        c.close()
        s.close()
    threading.Thread(target=run).start()
PY
    local proxy=$!
    # shellcheck disable=SC2064 # the values are meant to be taken now
    trap "kill $proxy \$(cat '$w/server.pid' 2>/dev/null) 2>/dev/null; rm -rf '$w'" EXIT
    for _ in $(seq 50); do [ -S "$w/proxy.sock" ] && break; sleep 0.1; done
    local url="nbd+unix:///?socket=$w/proxy.sock"
    qemu-img info "$url" >/dev/null
    qemu-img map --output=json "$url" >/dev/null
    qemu-io -f raw -c 'write -P 0x55 0 64k' -c 'read -P 0x55 0 64k' -c 'write -z 128k 64k' \
        -c 'write -z -u 256k 64k' -c 'discard 512k 64k' -c 'flush' -c 'write -P 0x66 -f 1m 4k' \
        "$url" >/dev/null
    qemu-io -r -f raw -c 'read 0 4k' -c 'readv 4k 512 512' "$url" >/dev/null
    qemu-nbd -L -k "$w/proxy.sock" >/dev/null
    qemu-img create -q -f raw "$w/src.raw" 4M
    qemu-io -f raw -c 'write -P 0x77 1m 1m' "$w/src.raw" >/dev/null
    qemu-img convert -n -f raw -O raw "$w/src.raw" "$url"
    qemu-img compare -f raw -F raw "$w/src.raw" "$url" >/dev/null
    sleep 0.5
    echo "nbd seeds: $(ls "$out" | wc -l)"
}

run_target() { # target seconds
    local t=$1 secs=$2 max_len=1048576
    [ "$t" = nbd_session ] && max_len=262144
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" fuzz/logs
    local log
    log="fuzz/logs/$t-$(date -u +%Y%m%dT%H%M%S).log"
    # One fuzzing process in fork mode: a crash, timeout or out-of-memory input is saved and
    # the run goes on, so one finding does not end the time given to the target.
    (cd fuzz && cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len="$max_len" -timeout=20 \
        -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
        -artifact_prefix="artifacts/$t/") >"$log" 2>&1 || true
    local last runs found time
    last=$(grep -E '^#[0-9]+: cov:' "$log" | tail -1)
    runs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$last")
    found=$(grep -oE 'oom/timeout/crash: [0-9/]+' <<<"$last" | cut -d' ' -f2)
    time=$(grep -oE 'time: [0-9]+s' <<<"$last" | grep -oE '[0-9]+')
    echo "$t: ${runs:-?} runs in ${time:-?} s, oom/timeout/crash ${found:-?}," \
        "$(ls "fuzz/corpus/$t" | wc -l) corpus entries (log $log)"
    [ "${found:-x}" = 0/0/0 ]
}

case "${1:-}" in
seeds)
    image_seeds
    nbd_seeds
    ;;
run)
    need_tools
    run_target "$2" "$3"
    ;;
all)
    need_tools
    status=0
    for t in "${TARGETS[@]}"; do run_target "$t" "$2" || status=1; done
    exit $status
    ;;
targets)
    printf '%s\n' "${TARGETS[@]}"
    ;;
*)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
