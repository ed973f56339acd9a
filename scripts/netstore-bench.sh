#!/bin/bash
# Times `img convert` against Debian's qemu-img 7.2 (scripts/qemu-img72.sh, with its iscsi and
# rbd block modules) to and from network storage, side by side in ONE run, on labs of its own:
# an iSCSI target (tgtd on loopback, scripts/iscsi-lab.sh) and a single-node Ceph cluster
# (memstore OSD, scripts/ceph-lab.sh). Results are a markdown table on stdout.
#
# Cases (each: img, then qemu-img 7.2, alternating, with the same arguments):
#   raw -> iscsi     convert -n -O raw SRC.raw iscsi://.../1   (the LUN exists: -n)
#   iscsi -> raw     convert -O raw iscsi://.../2 OUT.raw      (LUN 2 holds SRC.raw)
#   raw -> rbd       convert -O raw SRC.raw rbd:rbd/IMAGE      (a new image each run)
#   rbd -> raw       convert -O raw rbd:rbd/SOURCE OUT.raw
#   qcow2 -> iscsi   convert -n -O raw SRC.qcow2 iscsi://.../1
#   qcow2 -> rbd     convert -O raw SRC.qcow2 rbd:rbd/IMAGE    (a new image each run)
# Untimed before every run: the output file or RBD image is removed (so every run does the same
# work and both tools create what they write). Timed: the whole convert process, wall clock.
# Each case runs BENCH_WARMUP untimed pairs, then BENCH_RUNS timed pairs; the side that goes
# first alternates. Reported: the median time of each tool and the median of the per-pair
# ratios qemu/img (above 1: img is faster), with each tool's fastest run (on a shared, noisy
# machine the minimum is the least disturbed figure). After the timed runs, one more run of each tool is
# checked against the source with qemu-img 7.2's compare (it reads iscsi:// and rbd: names).
#
# Sources (made once per run of this script, in BENCH_DIR): SRC.raw, BENCH_SIZE_MIB big, with
# random data, zeros written as data, and holes, in BENCH_PIECE_MIB pieces (data / data /
# zeros / hole pattern, so about half random data, a quarter written zeros, a quarter holes);
# SRC.qcow2 made from it by qemu-img convert -O qcow2.
#
# Environment: BENCH_SIZE_MIB (default 256), BENCH_PIECE_MIB (default 8), BENCH_RUNS (default
# 7), BENCH_WARMUP (default 1), BENCH_ONLY (substrings separated by '|': only the cases whose
# label contains one), BENCH_CACHE (if set, `-t BENCH_CACHE` is given to both tools, e.g.
# writeback to make both flush the target at the end; default: each tool's own default, which
# for qemu-img convert is unsafe), IMG_BIN (default target/release/img, built first),
# BENCH_DIR (work directory, default /tmp/img-netstore-bench), BENCH_KEEP_LABS=1 (leave the
# labs running). The labs: ISCSI_LAB_DIR (default $BENCH_DIR/iscsi), IMG_CEPH_DIR (default
# $BENCH_DIR/ceph), IMG_CEPH_PORT / IMG_CEPH_PORT_V1 (default 3410 / 6793), so that the labs
# of the tests (and anyone else's) are left alone.
#
#   scripts/netstore-bench.sh
#   BENCH_ONLY='iscsi' BENCH_RUNS=11 scripts/netstore-bench.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-256}
PIECE_MIB=${BENCH_PIECE_MIB:-8}
RUNS=${BENCH_RUNS:-7}
WARMUP=${BENCH_WARMUP:-1}
ONLY=${BENCH_ONLY:-}
WORK=${BENCH_DIR:-/tmp/img-netstore-bench}
export ISCSI_LAB_DIR=${ISCSI_LAB_DIR:-$WORK/iscsi}
export IMG_CEPH_DIR=${IMG_CEPH_DIR:-$WORK/ceph}
export IMG_CEPH_PORT=${IMG_CEPH_PORT:-3410}
export IMG_CEPH_PORT_V1=${IMG_CEPH_PORT_V1:-6793}
Q72="$ROOT/scripts/qemu-img72.sh"
CACHE_ARGS=()
[ -n "${BENCH_CACHE:-}" ] && CACHE_ARGS=(-t "$BENCH_CACHE")

say() { echo "netstore-bench: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

[ "$SIZE_MIB" -ge $((4 * PIECE_MIB)) ] || die "BENCH_SIZE_MIB must be at least 4 * BENCH_PIECE_MIB"

if [ -z "${IMG_BIN:-}" ]; then
    say "building img (release)"
    (cd "$ROOT" && cargo build --release -q -p img-cli) || die "cargo build failed"
    IMG_BIN="$ROOT/target/release/img"
fi
[ -x "$IMG_BIN" ] || die "no img binary at $IMG_BIN"
Q72_BIN=$("$Q72" --prepare) || die "scripts/qemu-img72.sh --prepare failed"
# What scripts/qemu-img72.sh sets before exec'ing it: qemu-img 7.2 is timed without the
# wrapper's shell in front.
export QEMU_MODULE_DIR
QEMU_MODULE_DIR=$(cd "$(dirname "$Q72_BIN")/../lib/x86_64-linux-gnu/qemu" && pwd)
say "img: $IMG_BIN; qemu-img: $("$Q72" --version | head -1)"

mkdir -p "$WORK"
stop_labs() {
    [ "${BENCH_KEEP_LABS:-0}" = 1 ] && return 0
    "$ROOT/scripts/iscsi-lab.sh" clean >/dev/null 2>&1 || true
    "$ROOT/scripts/ceph-lab.sh" stop >/dev/null 2>&1 || true
}
trap stop_labs EXIT

LUN_BYTES=$(((SIZE_MIB + 1) << 20))
# tgtd now and then exits at start on a busy machine (right after another tgtd went away):
# a few attempts.
for attempt in 1 2 3; do
    "$ROOT/scripts/iscsi-lab.sh" clean >/dev/null 2>&1 || true
    mapfile -t LUNS < <("$ROOT/scripts/iscsi-lab.sh" start --luns 2 --size "$LUN_BYTES" || true)
    [ "${#LUNS[@]}" -eq 2 ] && break
    say "iSCSI lab start attempt $attempt failed"
    sleep 2
done
[ "${#LUNS[@]}" -eq 2 ] || die "the iSCSI lab printed ${#LUNS[*]} URLs"
CONF=
for attempt in 1 2 3; do
    CONF=$("$ROOT/scripts/ceph-lab.sh" start) && break
    say "Ceph lab start attempt $attempt failed"
    "$ROOT/scripts/ceph-lab.sh" stop >/dev/null 2>&1 || true
    sleep 5
done
[ -n "$CONF" ] || die "the Ceph lab did not start"
say "iSCSI LUNs: ${LUNS[*]}; Ceph: $CONF"
rbdname() { echo "rbd:rbd/$1:conf=$CONF"; }
rbd_rm() { rbd -c "$CONF" rm --no-progress "rbd/$1" >/dev/null 2>&1 || true; }

# The sources.
SRC="$WORK/src.raw"
QSRC="$WORK/src.qcow2"
say "making a ${SIZE_MIB} MiB source (data, data, zeros, hole per ${PIECE_MIB} MiB pieces)"
rm -f "$SRC" "$QSRC"
truncate -s "${SIZE_MIB}M" "$SRC"
pieces=$((SIZE_MIB / PIECE_MIB))
for ((i = 0; i < pieces; i++)); do
    case $((i % 4)) in
    0 | 1) dd if=/dev/urandom of="$SRC" bs=1M seek=$((i * PIECE_MIB)) count="$PIECE_MIB" \
        conv=notrunc status=none ;;
    2) dd if=/dev/zero of="$SRC" bs=1M seek=$((i * PIECE_MIB)) count="$PIECE_MIB" \
        conv=notrunc status=none ;;
    3) ;; # left a hole
    esac
done
"$Q72" convert -f raw -O qcow2 "$SRC" "$QSRC"
# Sources on the network storage for the reading cases.
"$Q72" convert -n -f raw -O raw "$SRC" "${LUNS[1]}"
rbd_rm bench-src
"$Q72" convert -f raw -O raw "$SRC" "$(rbdname bench-src)"

# The timer: bash's own clock (microseconds, no process started to read it).
now_us() { echo "${EPOCHREALTIME/./}"; }
# run_timed TIME_VAR CMD...: runs CMD (output to the log), sets TIME_VAR to its seconds.
LOG="$WORK/commands.log"
: >"$LOG"
run_timed() {
    local var=$1
    shift
    local t0 t1
    t0=$(now_us)
    if ! "$@" >>"$LOG" 2>&1; then
        die "command failed (see $LOG): $*"
    fi
    t1=$(now_us)
    printf -v "$var" '%s' "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e6 }')"
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.4f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

ROWS=()
case_selected() {
    [ -z "$ONLY" ] && return 0
    local IFS='|' s
    for s in $ONLY; do
        [[ $1 == *"$s"* ]] && return 0
    done
    return 1
}

prep_none() { :; }
prep_file() { rm -f "$1"; }
prep_rbd() {
    local n=${1#rbd:rbd/}
    rbd_rm "${n%%:*}"
}

# bench LABEL PREP COMPARE_WITH IMG_TARGET QEMU_TARGET ARGS...
#   PREP: a function run (untimed) before every run, with the target as its argument.
#   ARGS: convert's arguments without the target; the target is appended.
bench() {
    local label=$1 prep=$2 cmp=$3 t_img=$4 t_q=$5
    shift 5
    case_selected "$label" || return 0
    say "case: $label"
    local i a b first
    local -a ti=() tq=() ratio=()
    for ((i = 0; i < WARMUP + RUNS; i++)); do
        # Alternate who goes first.
        for first in $((i % 2)) $((1 - i % 2)); do
            if [ "$first" = 0 ]; then
                "$prep" "$t_img"
                run_timed a "$IMG_BIN" convert "${CACHE_ARGS[@]}" "$@" "$t_img"
            else
                "$prep" "$t_q"
                run_timed b "$Q72_BIN" convert "${CACHE_ARGS[@]}" "$@" "$t_q"
            fi
        done
        [ "$i" -lt "$WARMUP" ] && continue
        ti+=("$a")
        tq+=("$b")
        ratio+=("$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", b / a }')")
    done
    # Check both tools' output.
    local ok=yes
    "$prep" "$t_img"
    "$IMG_BIN" convert "${CACHE_ARGS[@]}" "$@" "$t_img" >>"$LOG" 2>&1 || ok=no
    "$Q72" compare -q "$cmp" "$t_img" >>"$LOG" 2>&1 || ok=no
    "$prep" "$t_q"
    "$Q72_BIN" convert "${CACHE_ARGS[@]}" "$@" "$t_q" >>"$LOG" 2>&1 || ok=no
    "$Q72" compare -q "$cmp" "$t_q" >>"$LOG" 2>&1 || ok=no
    [ "$ok" = yes ] || say "VERIFY FAILED for $label (see $LOG)"
    local mi mq mr
    mi=$(printf '%s\n' "${ti[@]}" | median)
    mq=$(printf '%s\n' "${tq[@]}" | median)
    mr=$(printf '%s\n' "${ratio[@]}" | median)
    say "  img ${ti[*]}"
    say "  qemu-img ${tq[*]}"
    local ni nq rlo rhi
    ni=$(printf '%s\n' "${ti[@]}" | sort -g | head -1)
    nq=$(printf '%s\n' "${tq[@]}" | sort -g | head -1)
    rlo=$(printf '%s\n' "${ratio[@]}" | sort -g | head -1)
    rhi=$(printf '%s\n' "${ratio[@]}" | sort -g | tail -1)
    ROWS+=("| $label | $mi ($ni) | $mq ($nq) | $mr | $rlo-$rhi | $ok |")
}

OUT_I="$WORK/out-img.raw"
OUT_Q="$WORK/out-qemu.raw"
# The iSCSI target LUN is shared by both tools (one LUN each would do too; same files, same
# target): each run overwrites it whole.
bench "raw -> iscsi" prep_none "$SRC" "${LUNS[0]}" "${LUNS[0]}" -n -f raw -O raw "$SRC"
bench "iscsi -> raw" prep_file "$SRC" "$OUT_I" "$OUT_Q" -f raw -O raw "${LUNS[1]}"
bench "raw -> rbd" prep_rbd "$SRC" "$(rbdname bench-img)" "$(rbdname bench-qemu)" -f raw -O raw "$SRC"
bench "rbd -> raw" prep_file "$SRC" "$OUT_I" "$OUT_Q" -f raw -O raw "$(rbdname bench-src)"
bench "qcow2 -> iscsi" prep_none "$SRC" "${LUNS[0]}" "${LUNS[0]}" -n -f qcow2 -O raw "$QSRC"
bench "qcow2 -> rbd" prep_rbd "$SRC" "$(rbdname bench-img)" "$(rbdname bench-qemu)" -f qcow2 -O raw "$QSRC"
rbd_rm bench-img
rbd_rm bench-qemu
rbd_rm bench-src
rm -f "$OUT_I" "$OUT_Q"

echo
echo "Source: ${SIZE_MIB} MiB raw (random data / random data / written zeros / hole, ${PIECE_MIB} MiB pieces) and its qcow2; $RUNS timed pairs after $WARMUP warm-up; cache: ${BENCH_CACHE:-the default of each tool}."
echo
echo "| case | img s, median (min) | qemu-img 7.2 s, median (min) | qemu/img, median of pairs | pair range | verified |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
