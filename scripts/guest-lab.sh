#!/bin/bash
# The guest lab: boots a real Linux guest (Debian's kernel, a busybox initramfs) under Debian's
# QEMU 7.2 (TCG, unpacked by scripts/qemu-system.sh) with its disk served over vhost-user-blk,
# and checks from both sides that what the guest wrote is what lands in the image.
#
#   scripts/guest-lab.sh [check]     every case (rw, rw-mq, rw-raw, rw-direct, chain, ro,
#                                    verify, trim); exit 0 only if all pass
#   scripts/guest-lab.sh CASE...     only these cases; rw-iscsi and rw-rbd (not in check:
#                                    img only) serve a qcow2 image on an iSCSI LUN or on RBD;
#                                    kill (not in check) kills the server with SIGKILL while
#                                    the guest writes and flushes; enospc (not in check)
#                                    fills the image's filesystem under the guest
#   scripts/guest-lab.sh bench       the same guest workload (fio inside the guest) against
#                                    `img serve` and qemu-storage-daemon, alternating
#   scripts/guest-lab.sh --prepare   only fetch and build what the lab needs
#
# Environment:
#   SERVER=img|qsd     the vhost-user-blk server for the cases (default img)
#   IMG_BIN            the img binary (default target/release/img, built if missing)
#   SERVE_OPTS         more options for `img serve` (e.g. "-t none --aio threads")
#   IMG_LAB_DIR        cache dir (default /var/cache/img-lab, shared with scripts/qemu-system.sh)
#   BOOT_TIMEOUT       seconds one guest boot may take (default 180)
#   KEEP=1             keep the work dir even on success
#   BENCH_RUNS=3, BENCH_SECS=5, BENCH_SIZE_MB=256, BENCH_QUEUES=1   the benchmark's shape
#                      (BENCH_QUEUES: vCPUs, virtqueues and fio jobs)
#   LAB_FAULT=corrupt  case rw corrupts a file in the image after the guest ran (the lab must
#                      then fail: a check of the checks)
#   LAB_FAULT=kill-server  the server is killed 1 s into each boot (the lab must fail at once)
set -euo pipefail

cd "$(dirname "$0")/.."
TOP=$PWD
LAB_NAME=guest-lab
# shellcheck source=scripts/lab-common.sh
. "$TOP/scripts/lab-common.sh"
SERVER=${SERVER:-img}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-180}
BENCH_RUNS=${BENCH_RUNS:-3}
BENCH_SECS=${BENCH_SECS:-5}
BENCH_SIZE_MB=${BENCH_SIZE_MB:-256}
BENCH_QUEUES=${BENCH_QUEUES:-1}

# ---------------------------------------------------------------------------------------------
# Preparation (idempotent; a lock keeps concurrent runs from building the same thing twice).

prepare_tools() {
    local missing=()
    command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
    command -v debugfs >/dev/null 2>&1 || missing+=(e2fsprogs)
    command -v depmod >/dev/null 2>&1 || missing+=(kmod)
    command -v modprobe >/dev/null 2>&1 || missing+=(kmod)
    command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
    command -v qemu-storage-daemon >/dev/null 2>&1 || missing+=(qemu-utils)
    command -v fio >/dev/null 2>&1 || missing+=(fio)
    if [ ${#missing[@]} -gt 0 ]; then
        local pkgs
        mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
        log "installing ${pkgs[*]}"
        apt_install "${pkgs[@]}"
    fi
}

prepare_img() {
    if [ -z "${IMG_BIN:-}" ]; then
        IMG_BIN="$TOP/target/release/img"
        if [ ! -x "$IMG_BIN" ]; then
            log "building img (release)"
            cargo build --release -q -p img-cli
        fi
    fi
    [ -x "$IMG_BIN" ] || die "no img binary at $IMG_BIN"
    export IMG_BIN
}

# prepare [bench]: everything but the img binary, under a lock (apt and the cache are shared by
# concurrent runs).
prepare() {
    lab_lock
    prepare_tools "${1:-}"
    "$TOP/scripts/qemu-system.sh" --prepare
    prepare_kernel
    prepare_busybox
    lab_unlock
}

# ---------------------------------------------------------------------------------------------
# The guest: /init is a busybox shell script that does the job named by lab.job= on the kernel
# command line and reports on the serial console with LAB-* lines only.

write_init() {
    cat >"$1" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
JOB=none
for w in $(cat /proc/cmdline); do
    case "$w" in lab.job=*) JOB=${w#lab.job=} ;; esac
done

say() { echo "$*"; }
fail() {
    say "LAB-FAIL $JOB: $*"
    umount /mnt 2>/dev/null
    poweroff -f
}
sum() { # sum FILE NAME: prints the digest line the host compares with its own
    s=$(sha256sum "$1" | cut -d' ' -f1) || fail "cannot read $1"
    say "LAB-SUM $2 $s"
}

queue_report() {
    # Whether each virtqueue carried requests: the interrupts of its MSI-X vector (virtioN-req.Q)
    # count its completions.
    grep -- '-req\.[0-9]*$' /proc/interrupts | while read -r line; do
        q=${line##* }
        n=$(echo "$line" | awk '{for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i} END {print n + 0}')
        say "LAB-QUEUE ${q#*-} interrupts=$n"
    done
}

for m in $(cat /modules.order); do
    # CPU-specific variants (crc32c-intel without SSE4.2) may refuse; their generic twin loads.
    insmod "/lib/modules/$m" 2>/dev/null || say "LAB-INFO insmod $m refused"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "no /dev/vda after 10 s"
    usleep 100000
done
say "LAB-INFO job=$JOB queues=$(ls -d /sys/block/vda/mq/* | wc -l) ro=$(cat /sys/block/vda/ro) sectors=$(cat /sys/block/vda/size) cpus=$(nproc)"
mkdir -p /mnt

# Files the host put into the filesystem (mkfs.ext4 -d): read.bin is only read, overwrite.bin is
# partly overwritten by rw jobs.
case "$JOB" in
rw)
    mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda"
    sum /mnt/seed/read.bin seed/read.bin
    mkdir -p /mnt/lab/small || fail "mkdir"
    echo "written by the guest" >/mnt/lab/hello.txt || fail "write hello.txt"
    dd if=/dev/urandom of=/tmp/random.bin bs=1M count=6 2>/dev/null || fail "urandom"
    src=$(sha256sum /tmp/random.bin | cut -d' ' -f1)
    # Two writers at once, pinned to different CPUs when there are two, so that a multi-queue
    # device sees requests on both queues.
    taskset -c 0 cp /tmp/random.bin /mnt/lab/random.bin &
    p1=$!
    cpu1=$(($(nproc) - 1))
    taskset -c $cpu1 dd if=/dev/zero of=/mnt/lab/zeros.bin bs=1M count=2 2>/dev/null &
    p2=$!
    wait $p1 || fail "copy random.bin"
    wait $p2 || fail "write zeros.bin"
    n=0
    while [ $n -lt 24 ]; do
        dd if=/dev/urandom of=/mnt/lab/small/f$n bs=$((300 + n * 397)) count=1 2>/dev/null ||
            fail "write small/f$n"
        n=$((n + 1))
    done
    dd if=/dev/urandom of=/mnt/seed/overwrite.bin bs=64K seek=4 count=3 conv=notrunc 2>/dev/null ||
        fail "overwrite"
    # Direct I/O from each CPU in turn: blk-mq submits it on the caller's CPU, so with one queue
    # a CPU every queue carries reads and writes.
    c=0
    while [ $c -lt "$(nproc)" ]; do
        taskset -c $c dd if=/tmp/random.bin of=/mnt/lab/direct$c bs=64k count=8 oflag=direct \
            2>/tmp/err || fail "direct write on cpu $c: $(cat /tmp/err)"
        taskset -c $c dd if=/dev/vda of=/dev/null bs=64k count=32 skip=$((c * 64)) iflag=direct \
            2>/tmp/err || fail "direct read on cpu $c: $(cat /tmp/err)"
        c=$((c + 1))
    done
    sync || fail "sync"
    echo 3 >/proc/sys/vm/drop_caches
    back=$(sha256sum /mnt/lab/random.bin | cut -d' ' -f1)
    [ "$back" = "$src" ] || fail "random.bin read back as $back, written as $src"
    for f in /mnt/lab/hello.txt /mnt/lab/random.bin /mnt/lab/zeros.bin /mnt/seed/overwrite.bin \
        /mnt/lab/direct*; do
        sum "$f" "${f#/mnt/}"
    done
    n=0
    while [ $n -lt 24 ]; do
        sum /mnt/lab/small/f$n lab/small/f$n
        n=$((n + 1))
    done
    umount /mnt || fail "umount"
    queue_report
    ;;
ro)
    if err=$(dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>&1); then
        fail "dd to the read-only disk succeeded"
    fi
    say "LAB-RO dd-write-refused: $(echo "$err" | head -n 1)"
    if err=$(mount -t ext4 -o rw /dev/vda /mnt 2>&1); then
        if grep -q '^/dev/vda /mnt ext4 rw' /proc/mounts; then
            fail "mounted the read-only disk read-write"
        fi
        say "LAB-RO mount-rw: mounted read-only instead: $(grep '^/dev/vda ' /proc/mounts)"
    else
        say "LAB-RO mount-rw-refused: $(echo "$err" | head -n 1)"
        mount -t ext4 -o ro /dev/vda /mnt || fail "mount -o ro"
    fi
    if err=$( (echo x >/mnt/new.txt) 2>&1); then
        fail "created a file on the read-only filesystem"
    fi
    say "LAB-RO file-write-refused: $(echo "$err" | head -n 1)"
    sum /mnt/seed/read.bin seed/read.bin
    sum /mnt/seed/overwrite.bin seed/overwrite.bin
    umount /mnt || fail "umount"
    echo 3 >/proc/sys/vm/drop_caches
    sum /dev/vda disk
    ;;
verify)
    # Concurrent writes of mixed sizes, each fio job (one a CPU, so one a queue) in a region of
    # its own, read back and checked by fio; then the whole disk's digest for the host.
    export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
    out=$(fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
        --bsrange=4k-64k --iodepth=16 --numjobs="$(nproc)" --size=24M --offset_increment=24M \
        --verify=crc32c --verify_fatal=1 --group_reporting --output-format=terse \
        --terse-version=3 2>&1) || fail "fio verify: $out"
    say "LAB-INFO fio: $(echo "$out" | grep '^3;' | cut -d';' -f7,8,48,49)"
    queue_report
    echo 3 >/proc/sys/vm/drop_caches
    sum /dev/vda disk
    ;;
trim)
    # Discard the first 16 MiB, zero the next 8 MiB (WRITE_ZEROES), leave the rest; the host
    # then finds the discarded and zeroed ranges deallocated and the rest intact.
    export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
    say "LAB-INFO discard_max=$(cat /sys/block/vda/queue/discard_max_bytes) write_zeroes_max=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
    [ "$(cat /sys/block/vda/queue/discard_max_bytes)" != 0 ] || fail "the disk offers no discard"
    [ "$(cat /sys/block/vda/queue/write_zeroes_max_bytes)" != 0 ] || fail "the disk offers no write zeroes"
    err=$(blkdiscard -o 0 -l 16777216 /dev/vda 2>&1) || fail "discard: $err"
    err=$(blkdiscard.host -z -o 16777216 -l 8388608 /dev/vda 2>&1) || fail "write zeroes: $err"
    echo 3 >/proc/sys/vm/drop_caches
    z=$(dd if=/dev/zero bs=1M count=24 2>/dev/null | sha256sum | cut -d' ' -f1)
    got=$(dd if=/dev/vda bs=1M count=24 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$got" = "$z" ] || fail "the discarded and zeroed 24 MiB do not read as zeros"
    sum /dev/vda disk
    ;;
enospc)
    # The image's filesystem fills up under the guest: a direct write must fail with an I/O
    # error (the device's IOERR status), not succeed or hang; what was written before reads
    # back.
    yes "enospc-lab" | head -c 1048576 >/tmp/mark
    dd if=/tmp/mark of=/dev/vda bs=1M count=1 oflag=direct conv=fsync 2>/dev/null ||
        fail "the first MiB could not be written"
    if err=$(dd if=/dev/urandom of=/dev/vda bs=1M seek=1 count=40 oflag=direct conv=fsync 2>&1); then
        fail "40 MiB went onto a 16 MiB filesystem without an error"
    fi
    say "LAB-IOERR $(echo "$err" | grep -i error | head -n 1)"
    echo 3 >/proc/sys/vm/drop_caches
    sum_mark=$(dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$sum_mark" = "$(sha256sum </tmp/mark | cut -d' ' -f1)" ] || fail "the first MiB changed"
    ;;
kill)
    # Blocks of 64 KiB written one after another with O_DIRECT and fsync, each reported once
    # the device acknowledged its flush; between them, buffered writes to the upper half that
    # may or may not reach the disk. The host kills the server somewhere in this loop.
    n=0
    while [ $n -lt 512 ]; do
        yes "$(printf 'block%07d' $n)" | head -c 65536 >/tmp/b
        dd if=/tmp/b of=/dev/vda bs=64k seek=$n count=1 oflag=direct conv=fsync 2>/dev/null ||
            fail "synced write of block $n"
        say "LAB-SYNCED $n"
        dd if=/tmp/b of=/dev/vda bs=64k seek=$((512 + n % 256)) count=1 2>/dev/null ||
            fail "buffered write of block $n"
        n=$((n + 1))
    done
    ;;
bench)
    export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
    for t in read:1M:4 write:1M:4 randread:4k:16 randwrite:4k:16; do
        rw=${t%%:*}
        r=${t#*:}
        bs=${r%%:*}
        qd=${r#*:}
        out=$(fio --name=$rw --filename=/dev/vda --direct=1 --ioengine=libaio --rw=$rw --bs=$bs \
            --iodepth=$qd --runtime=@SECS@ --time_based --ramp_time=1 --size=@SIZE@M \
            --numjobs="$(nproc)" --group_reporting \
            --output-format=terse --terse-version=3 2>&1) || fail "fio $rw: $out"
        say "LAB-FIO $rw $(echo "$out" | grep '^3;' | cut -d';' -f7,8,48,49)"
    done
    ;;
*)
    fail "unknown job"
    ;;
esac
say "LAB-OK $JOB"
poweroff -f
EOF
    sed -i "s/@SECS@/$BENCH_SECS/; s/@SIZE@/$BENCH_SIZE_MB/" "$1"
    chmod 755 "$1"
}

# build_initramfs OUT [fio]: busybox, the modules in load order, /init; with "fio", the host's
# fio and every shared library ldd names for it, at the same paths.
build_initramfs() {
    local out=$1 root="$WORK/initramfs"
    initramfs_skeleton "$root"
    write_init "$root/init"
    add_modules "$root" virtio_pci virtio_blk ext4
    if [ "${2:-}" = fio ]; then
        # util-linux's blkdiscard too: busybox's cannot zero (-z, the BLKZEROOUT ioctl that
        # becomes virtio-blk WRITE_ZEROES).
        local bin lib
        for bin in fio blkdiscard; do
            bin=$(command -v "$bin")
            cp "$bin" "$root/bin/$(basename "$bin").host"
            for lib in $(ldd "$bin" | awk '/=> \// {print $3} /^\t\// {print $1}'); do
                mkdir -p "$root$(dirname "$lib")"
                cp -L "$lib" "$root$lib"
            done
        done
        mv "$root/bin/fio.host" "$root/bin/fio"
    fi
    pack_initramfs "$root" "$out"
}

# ---------------------------------------------------------------------------------------------
# Servers and boots.

SERVER_PID=
QEMU_PID=

# start_server NAME IMAGE FORMAT SOCK LOG [readonly] [queues] [direct]
# With "direct", the image is named by options (img serve --image-opts) that open it with
# O_DIRECT and the thread-pool engine.
start_server() {
    local name=$1 image=$2 fmt=$3 sock=$4 slog=$5 ro=${6:-} queues=${7:-1} direct=${8:-}
    rm -f "$sock"
    case "$name" in
    img)
        local args=(serve --vhost-user-blk "$sock" --num-queues "$queues")
        [ -n "$ro" ] && args+=(--readonly)
        # shellcheck disable=SC2206 # SERVE_OPTS is a list of options, split on purpose
        args+=(${SERVE_OPTS:-})
        if [ -n "$direct" ]; then
            args+=(--image-opts "driver=$fmt,file.driver=file,file.filename=$image,cache.direct=on,file.aio=threads")
        elif [[ " ${SERVE_OPTS:-} " == *" --image-opts "* ]]; then
            args+=("$image")
        else
            args+=(-f "$fmt" "$image")
        fi
        echo "+ img ${args[*]}" >"$slog"
        "$IMG_BIN" "${args[@]}" >>"$slog" 2>&1 &
        ;;
    qsd)
        local fro=off writable=on fileopts=
        [ -n "$ro" ] && fro=on writable=off
        [ -n "$direct" ] && fileopts=,cache.direct=on,aio=threads
        local fmtopts=
        [ -n "${QSD_DISCARD:-}" ] && fileopts+=,discard=$QSD_DISCARD fmtopts=,discard=$QSD_DISCARD
        local args=(
            --blockdev "driver=file,node-name=file,filename=$image,read-only=$fro$fileopts"
            --blockdev "driver=$fmt,node-name=fmt,file=file,read-only=$fro$fmtopts"
            --export "type=vhost-user-blk,id=exp,node-name=fmt,addr.type=unix,addr.path=$sock,writable=$writable,num-queues=$queues"
        )
        echo "+ qemu-storage-daemon ${args[*]}" >"$slog"
        qemu-storage-daemon "${args[@]}" >>"$slog" 2>&1 &
        ;;
    *) die "SERVER must be img or qsd, not $name" ;;
    esac
    SERVER_PID=$!
    local i=0
    while [ ! -S "$sock" ]; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID" || true
            SERVER_PID=
            log "$name server exited before listening:"
            cat "$slog" >&2
            return 1
        fi
        i=$((i + 1))
        if [ $i -gt 300 ]; then
            log "$name server did not create $sock in 30 s"
            return 1
        fi
        sleep 0.1
    done
}

# stop_server: SIGTERM (unless it already left on the front end's disconnect), then wait; the
# server must exit 0, having flushed.
stop_server() {
    local pid=$SERVER_PID rc=0 i=0
    SERVER_PID=
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt 300 ]; then
            log "server $pid ignored SIGTERM for 30 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 1
        fi
        sleep 0.1
    done
    wait "$pid" || rc=$?
    if [ $rc -ne 0 ]; then
        log "server exited with status $rc"
        return 1
    fi
}

# start_guest JOB SOCK CONSOLE INITRD [queues] [mem_mb]: starts one guest boot against the
# served socket (QEMU_PID).
start_guest() {
    local job=$1 sock=$2 console=$3 initrd=$4 queues=${5:-1} mem=${6:-512}
    local smp=$queues
    timeout -k 5 "$BOOT_TIMEOUT" "$TOP/scripts/qemu-system.sh" \
        -accel tcg -m "$mem" -smp "$smp" -nodefaults -no-user-config -display none \
        -serial stdio -monitor none -no-reboot \
        -kernel "$KDIR/vmlinux" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 quiet loglevel=1 lab.job=$job" \
        -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem \
        -chardev "socket,path=$sock,id=c" \
        -device "vhost-user-blk-pci,chardev=c,num-queues=$queues" \
        </dev/null >"$console" 2>&1 &
    QEMU_PID=$!
}

# boot JOB SOCK CONSOLE INITRD [queues] [mem_mb]: one guest boot against the served socket,
# to its end.
boot() {
    local job=$1 console=$3 rc=0
    start_guest "$@"
    if [ "${LAB_FAULT:-}" = kill-server ]; then
        (sleep 1 && kill -KILL "$SERVER_PID") &
    fi
    # A server that dies leaves the guest waiting on its disk until the timeout: watch it.
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
            local src=0
            wait "$SERVER_PID" || src=$?
            SERVER_PID=
            log "the server exited (status $src) while the guest ran"
            kill -TERM "$QEMU_PID" 2>/dev/null || true
            wait "$QEMU_PID" || true
            QEMU_PID=
            tr -d '\r' <"$console" >"$console.txt"
            return 1
        fi
        sleep 0.2
    done
    wait "$QEMU_PID" || rc=$?
    QEMU_PID=
    tr -d '\r' <"$console" >"$console.txt"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        log "guest ($job) timed out after $BOOT_TIMEOUT s"
        return 1
    fi
    if [ $rc -ne 0 ]; then
        log "qemu exited with status $rc"
        return 1
    fi
    if grep -q '^LAB-FAIL' "$console.txt"; then
        grep '^LAB-FAIL' "$console.txt" >&2
        return 1
    fi
    grep -q "^LAB-OK $job\$" "$console.txt" || {
        log "guest ($job) did not report LAB-OK"
        return 1
    }
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    # QEMU_PID is timeout(1), which passes SIGTERM on to QEMU (a SIGKILL would orphan QEMU).
    [ -n "$QEMU_PID" ] && kill -TERM "$QEMU_PID" 2>/dev/null
    [ -n "$SERVER_PID" ] && kill -KILL "$SERVER_PID" 2>/dev/null
    wait 2>/dev/null
    if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
        # A failure that LAB_FAULT provoked needs no post-mortem.
        if { [ "${FAILED:-1}" = 0 ] || [ -n "${LAB_FAULT:-}" ]; } && [ -z "${KEEP:-}" ]; then
            rm -rf "$WORK"
        else
            log "work dir kept: $WORK"
        fi
    fi
}

# ---------------------------------------------------------------------------------------------
# The cases.

# make_fs RAW: a 64 MiB ext4 filesystem holding the seed files the guest reads.
make_fs() {
    local raw=$1 seed="$WORK/seed-tree"
    if [ ! -d "$seed" ]; then
        mkdir -p "$seed/seed"
        head -c 1048576 /dev/urandom >"$seed/seed/read.bin" || return 1
        head -c 1048576 /dev/urandom >"$seed/seed/overwrite.bin" || return 1
    fi
    rm -f "$raw"
    truncate -s 64M "$raw" || return 1
    mkfs.ext4 -q -F -d "$seed" "$raw" >/dev/null || return 1
}

# host_file IMAGE FMT PATH: the file's sha256 as the host reads it from a raw copy of the image.
host_sums() {
    local image=$1 fmt=$2 console=$3 raw="$WORK/readback.raw" bad=0 name want got
    rm -f "$raw"
    qemu-img convert -f "$fmt" -O raw "$image" "$raw" || return 1
    if ! e2fsck -fn "$raw" >"$WORK/e2fsck.log" 2>&1; then
        log "e2fsck finds the filesystem damaged:"
        cat "$WORK/e2fsck.log" >&2
        bad=1
    fi
    local count=0
    while read -r _ name want; do
        count=$((count + 1))
        got=$(debugfs -R "cat /$name" "$raw" 2>/dev/null | sha256sum | cut -d' ' -f1)
        if [ "$got" != "$want" ]; then
            log "$name: the guest read $want, the image holds $got"
            bad=1
        fi
    done < <(grep '^LAB-SUM ' "$console")
    [ "$count" -ge 28 ] || {
        log "the guest reported only $count checksums"
        bad=1
    }
    # What the host seeded and the guest only read must be what the guest saw.
    want=$(sha256sum <"$WORK/seed-tree/seed/read.bin" | cut -d' ' -f1)
    grep -q "^LAB-SUM seed/read.bin $want\$" "$console" || {
        log "the guest read seed/read.bin wrong"
        bad=1
    }
    rm -f "$raw"
    return $bad
}

# check_queues CONSOLE N: the guest saw N queues and every one carried requests.
check_queues() {
    grep -q "^LAB-INFO .*queues=$2 " "$1" || {
        log "the guest did not see $2 queue(s): $(grep LAB-INFO "$1")"
        return 1
    }
    [ "$(grep -c '^LAB-QUEUE req\.[0-9]* interrupts=[1-9]' "$1")" = "$2" ] || {
        log "not every queue carried requests: $(grep LAB-QUEUE "$1" | tr '\n' ' ')"
        return 1
    }
    if [ "$2" -gt 1 ]; then grep '^LAB-QUEUE' "$1" | sed 's/^/    guest: /' >&2; fi
}

check_clean() {
    local out
    if ! out=$(qemu-img check -f qcow2 "$1" 2>&1) || ! echo "$out" | grep -q 'No errors were found'; then
        log "qemu-img check $1 is not clean:"
        echo "$out" >&2
        return 1
    fi
}

report_failure() { # case console server-log
    log "---- $1: guest console (tail) ----"
    tail -n 40 "$2" >&2 || true
    log "---- $1: server log ($SERVER) ----"
    tail -n 40 "$3" >&2 || true
}

# case_rw NAME QUEUES [FORMAT] [direct]: ext4 in a qcow2 (or raw) image that img convert made
# from mkfs.ext4's raw.
case_rw() {
    local name=$1 queues=$2 fmt=${3:-qcow2} direct=${4:-} d="$WORK/$1"
    local disk="$d/disk.$fmt"
    mkdir -p "$d"
    make_fs "$d/fs.raw" || return 1
    "$IMG_BIN" convert -f raw -O "$fmt" "$d/fs.raw" "$disk" || return 1
    start_server "$SERVER" "$disk" "$fmt" "$d/sock" "$d/server.log" "" "$queues" "$direct" ||
        return 1
    # While it is served, a qcow2 image is locked as QEMU locks it: no other writer may open it.
    # (A raw one may be: like qemu-storage-daemon's exports, the server shares write access.)
    local out
    if [ "$fmt" = qcow2 ] && { out=$(qemu-io -f qcow2 -c 'read 0 512' "$disk" 2>&1) ||
        ! echo "$out" | grep -q 'lock'; }; then
        log "a second writer could open the served image: $out"
        return 1
    fi
    boot rw "$d/sock" "$d/console" "$WORK/initrd" "$queues" || return 1
    stop_server || return 1
    check_queues "$d/console.txt" "$queues" || return 1
    if [ "${LAB_FAULT:-}" = corrupt ]; then
        corrupt_file "$disk" "$fmt" lab/random.bin || return 1
    fi
    if [ "$fmt" = qcow2 ]; then
        check_clean "$disk" || return 1
    fi
    host_sums "$disk" "$fmt" "$d/console.txt" || return 1
}

# case_net NAME iscsi|rbd: case rw on a qcow2 image that lives on network storage (a LUN of
# scripts/iscsi-lab.sh's tgtd, or an image in scripts/ceph-lab.sh's cluster), made by img
# convert and served by img serve. The host checks it with qemu-img 7.2 (scripts/qemu-img72.sh),
# which has the iscsi and rbd drivers the installed qemu-img lacks. img only: qemu-storage-daemon
# 10 has no iscsi or rbd driver either.
case_net() {
    local name=$1 proto=$2 d="$WORK/$1" disk conf rc=0
    local q72="$TOP/scripts/qemu-img72.sh"
    mkdir -p "$d"
    case "$proto" in
    iscsi)
        disk=$(ISCSI_LAB_DIR="$d/iscsi-lab" "$TOP/scripts/iscsi-lab.sh" start --size 128M) ||
            return 1
        ;;
    rbd)
        conf=$("$TOP/scripts/ceph-lab.sh" start) || return 1
        rbd -c "$conf" rm "rbd/guest-lab-$$" >/dev/null 2>&1 || true
        disk="rbd:rbd/guest-lab-$$:conf=$conf"
        ;;
    *) die "case_net: unknown protocol $proto" ;;
    esac
    {
        make_fs "$d/fs.raw" &&
            "$IMG_BIN" convert -f raw -O qcow2 "$d/fs.raw" "$disk" &&
            start_server img "$disk" qcow2 "$d/sock" "$d/server.log" "" 1 &&
            boot rw "$d/sock" "$d/console" "$WORK/initrd" 1 &&
            stop_server &&
            check_queues "$d/console.txt" 1 &&
            "$q72" check "$disk" >"$d/check.log" 2>&1 &&
            grep -q 'No errors were found' "$d/check.log" &&
            "$q72" convert -O qcow2 "$disk" "$d/back.qcow2" &&
            host_sums "$d/back.qcow2" qcow2 "$d/console.txt"
    } || rc=1
    [ $rc -eq 0 ] || [ ! -s "$d/check.log" ] || cat "$d/check.log" >&2
    case "$proto" in
    iscsi) ISCSI_LAB_DIR="$d/iscsi-lab" "$TOP/scripts/iscsi-lab.sh" clean >/dev/null 2>&1 ;;
    rbd) rbd -c "$conf" rm "rbd/guest-lab-$$" >/dev/null 2>&1 ;;
    esac
    return $rc
}

# corrupt_file IMAGE FORMAT PATH: overwrites the first block of a file in the image behind the guest's
# back; LAB_FAULT=corrupt uses it to show that the lab notices data that differs from what the
# guest read.
corrupt_file() {
    local image=$1 fmt=$2 path=$3 raw="$WORK/corrupt.raw" bs blk
    qemu-img convert -f "$fmt" -O raw "$image" "$raw" || return 1
    bs=$(dumpe2fs -h "$raw" 2>/dev/null | awk -F: '/^Block size/ {print $2 + 0}')
    blk=$(debugfs -R "bmap /$path 0" "$raw" 2>/dev/null)
    rm -f "$raw"
    [ -n "$bs" ] && [ -n "$blk" ] || return 1
    log "LAB_FAULT=corrupt: overwriting /$path's first block (block $blk of $bs bytes)"
    qemu-io -f "$fmt" -c "write -P 0xa5 $((blk * bs)) $bs" "$image" >/dev/null
}

# chain: the filesystem in a qcow2 base, the guest's writes into a qcow2 overlay over it.
case_chain() {
    local d="$WORK/chain" before after
    mkdir -p "$d"
    make_fs "$d/fs.raw" || return 1
    "$IMG_BIN" convert -f raw -O qcow2 "$d/fs.raw" "$d/base.qcow2" || return 1
    qemu-img create -q -f qcow2 -b "$d/base.qcow2" -F qcow2 "$d/overlay.qcow2" || return 1
    before=$(sha256sum <"$d/base.qcow2")
    start_server "$SERVER" "$d/overlay.qcow2" qcow2 "$d/sock" "$d/server.log" || return 1
    boot rw "$d/sock" "$d/console" "$WORK/initrd" || return 1
    stop_server || return 1
    after=$(sha256sum <"$d/base.qcow2")
    [ "$before" = "$after" ] || {
        log "the base image changed"
        return 1
    }
    check_clean "$d/base.qcow2" || return 1
    check_clean "$d/overlay.qcow2" || return 1
    # The writes are in the overlay: it maps data of its own (depth 0).
    qemu-img map --output=json -f qcow2 "$d/overlay.qcow2" |
        grep -q '"depth": 0,.*"data": true' || {
        log "the overlay holds no data of its own"
        return 1
    }
    host_sums "$d/overlay.qcow2" qcow2 "$d/console.txt" || return 1
}

# ro: served read-only; the guest's writes fail, its reads (the whole disk) match the image.
case_ro() {
    local d="$WORK/ro" before after want
    mkdir -p "$d"
    make_fs "$d/fs.raw" || return 1
    "$IMG_BIN" convert -f raw -O qcow2 "$d/fs.raw" "$d/disk.qcow2" || return 1
    before=$(sha256sum <"$d/disk.qcow2")
    start_server "$SERVER" "$d/disk.qcow2" qcow2 "$d/sock" "$d/server.log" readonly || return 1
    boot ro "$d/sock" "$d/console" "$WORK/initrd" || return 1
    stop_server || return 1
    after=$(sha256sum <"$d/disk.qcow2")
    [ "$before" = "$after" ] || {
        log "the read-only image changed"
        return 1
    }
    grep '^LAB-RO ' "$d/console.txt" | sed 's/^/    guest: /' >&2
    [ "$(grep -c '^LAB-RO .*refused' "$d/console.txt")" -ge 2 ] || {
        log "the guest did not see its writes refused"
        return 1
    }
    grep -q '^LAB-INFO .* ro=1 ' "$d/console.txt" || log "note: the guest's disk is not flagged read-only"
    want=$(sha256sum <"$d/fs.raw" | cut -d' ' -f1)
    grep -q "^LAB-SUM disk $want\$" "$d/console.txt" || {
        log "the guest read the disk differently from the image"
        return 1
    }
    want=$(sha256sum <"$WORK/seed-tree/seed/read.bin" | cut -d' ' -f1)
    grep -q "^LAB-SUM seed/read.bin $want\$" "$d/console.txt" || {
        log "the guest read seed/read.bin wrong"
        return 1
    }
    check_clean "$d/disk.qcow2" || return 1
}

# verify: fio's verified concurrent writes into a fresh (unallocated) qcow2 image over two
# queues: cluster allocation under concurrent requests; the image must then be clean and read
# as the guest last read the disk.
case_verify() {
    local d="$WORK/verify" want
    mkdir -p "$d"
    "$IMG_BIN" create -q -f qcow2 "$d/disk.qcow2" 64M >/dev/null || return 1
    start_server "$SERVER" "$d/disk.qcow2" qcow2 "$d/sock" "$d/server.log" "" 2 || return 1
    boot verify "$d/sock" "$d/console" "$WORK/initrd-fio" 2 || return 1
    stop_server || return 1
    check_queues "$d/console.txt" 2 || return 1
    check_clean "$d/disk.qcow2" || return 1
    qemu-img convert -f qcow2 -O raw "$d/disk.qcow2" "$d/disk.raw" || return 1
    want=$(sha256sum <"$d/disk.raw" | cut -d' ' -f1)
    rm -f "$d/disk.raw"
    grep -q "^LAB-SUM disk $want\$" "$d/console.txt" || {
        log "the guest read the disk differently from the image (image $want)"
        return 1
    }
}

# trim: the guest discards and zeroes ranges of a qcow2 image full of data, served with
# discard=unmap: the clusters are freed (qemu-img map), the image is clean, the rest intact.
case_trim() {
    local d="$WORK/trim" want img_opts
    mkdir -p "$d"
    head -c 64M /dev/urandom >"$d/data.raw" || return 1
    "$IMG_BIN" convert -f raw -O qcow2 "$d/data.raw" "$d/disk.qcow2" || return 1
    if [ "$SERVER" = img ]; then
        img_opts="driver=qcow2,discard=unmap,file.driver=file,file.filename=$d/disk.qcow2"
        SERVE_OPTS="${SERVE_OPTS:-} --image-opts" start_server img "$img_opts" qcow2 \
            "$d/sock" "$d/server.log" || return 1
    else
        QSD_DISCARD=unmap start_server qsd "$d/disk.qcow2" qcow2 "$d/sock" "$d/server.log" ||
            return 1
    fi
    boot trim "$d/sock" "$d/console" "$WORK/initrd-fio" || return 1
    stop_server || return 1
    grep '^LAB-INFO discard' "$d/console.txt" | sed 's/^/    guest: /' >&2
    check_clean "$d/disk.qcow2" || return 1
    # The discarded 16 MiB are deallocated; the zeroed 8 MiB read as zeros without data (the
    # guest's BLKZEROOUT asks to keep the allocation, so the clusters may stay, flagged zero);
    # everything after them is still data.
    local map
    map=$(qemu-img map --output=json -f qcow2 "$d/disk.qcow2")
    if ! { echo "$map" | grep -q '"start": 0, "length": 16777216,.*"zero": true, "data": false' &&
        echo "$map" | grep -q '"start": 16777216, "length": 8388608,.*"zero": true, "data": false' &&
        echo "$map" | grep -q '"start": 25165824, "length": 41943040,.*"data": true'; }; then
        log "the discarded and zeroed ranges are not mapped as expected:"
        echo "$map" >&2
        return 1
    fi
    dd if=/dev/zero of="$d/data.raw" bs=1M count=24 conv=notrunc 2>/dev/null
    want=$(sha256sum <"$d/data.raw" | cut -d' ' -f1)
    grep -q "^LAB-SUM disk $want\$" "$d/console.txt" || {
        log "the guest read the disk differently from the expected content"
        return 1
    }
    qemu-img compare -f raw -F qcow2 "$d/data.raw" "$d/disk.qcow2" >/dev/null || {
        log "the image differs from the expected content"
        return 1
    }
}

# block N as the guest's kill job writes it.
kill_block() { yes "$(printf 'block%07d' "$1")" | head -c 65536; }

# case_kill: the server killed with SIGKILL while a guest writes and flushes, at three moments
# (after 2, 15 and 60 blocks the guest saw flushed). Each time: no corruption by qemu-img check
# (leaks allowed), `img check -r leaks` leaves the image clean, and every block the guest saw
# flushed reads back from the image.
case_kill() {
    local d="$WORK/kill" moment i synced n bad=0
    mkdir -p "$d"
    for moment in 2 15 60; do
        rm -f "$d/disk.qcow2"
        qemu-img create -q -f qcow2 "$d/disk.qcow2" 64M
        start_server "$SERVER" "$d/disk.qcow2" qcow2 "$d/sock" "$d/server.log" || return 1
        start_guest kill "$d/sock" "$d/console" "$WORK/initrd"
        i=0
        until tr -d '\r' 2>/dev/null <"$d/console" | grep -q "^LAB-SYNCED $moment\$"; do
            i=$((i + 1))
            if [ $i -gt $((BOOT_TIMEOUT * 10)) ] || ! kill -0 "$QEMU_PID" 2>/dev/null; then
                log "the guest did not reach block $moment"
                tr -d '\r' <"$d/console" >"$d/console.txt"
                return 1
            fi
            sleep 0.1
        done
        kill -0 "$SERVER_PID" 2>/dev/null || {
            log "the server was gone before the kill"
            return 1
        }
        kill -KILL "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
        QEMU_PID=
        tr -d '\r' <"$d/console" >"$d/console.txt"
        cp "$d/console.txt" "$d/console-$moment.txt"
        # The killed server's image lock goes with its last reference to the file, which an
        # io_uring instance torn down after the process may hold a little longer.
        i=0
        until qemu-img info "$d/disk.qcow2" >/dev/null 2>&1; do
            i=$((i + 1))
            if [ $i -gt 300 ]; then
                log "the image is still locked 30 s after the server was killed"
                qemu-img info "$d/disk.qcow2" >&2
                return 1
            fi
            sleep 0.1
        done
        synced=$(grep '^LAB-SYNCED ' "$d/console.txt" | tail -n 1 | cut -d' ' -f2)
        local out code=0
        out=$(qemu-img check -f qcow2 "$d/disk.qcow2" 2>&1) || code=$?
        if { [ $code -ne 0 ] && [ $code -ne 3 ]; } || echo "$out" | grep -q ERROR; then
            log "killed after block $synced: qemu-img check finds corruption (exit $code):"
            echo "$out" >&2
            return 1
        fi
        "$IMG_BIN" check -q -r leaks -f qcow2 "$d/disk.qcow2" >/dev/null 2>&1 || true
        check_clean "$d/disk.qcow2" || return 1
        qemu-img convert -f qcow2 -O raw "$d/disk.qcow2" "$d/back.raw"
        for n in $(seq 0 "$synced"); do
            if ! cmp -s <(kill_block "$n") \
                <(dd if="$d/back.raw" bs=64k skip="$n" count=1 2>/dev/null); then
                log "killed after block $synced: flushed block $n does not read back"
                bad=1
            fi
        done
        [ $bad -eq 0 ] || return 1
        log "killed after $((synced + 1)) flushed blocks ($(echo "$out" | grep -c 'Leaked cluster') leaked clusters): none lost, no corruption"
    done
}

# case_enospc: the image lives on a 16 MiB tmpfs and the guest writes 40 MiB: the guest sees
# an I/O error (LAB-IOERR), the server keeps serving and exits cleanly, and the image left on
# the full filesystem has no corruption and no leak (as qemu-img leaves one).
case_enospc() {
    local d="$WORK/enospc" rc=0
    mkdir -p "$d/fs"
    mount -t tmpfs -o size=16m tmpfs "$d/fs" || return 1
    qemu-img create -q -f qcow2 "$d/fs/disk.qcow2" 64M
    if start_server "$SERVER" "$d/fs/disk.qcow2" qcow2 "$d/sock" "$d/server.log"; then
        boot enospc "$d/sock" "$d/console" "$WORK/initrd" || rc=1
        stop_server || rc=1
    else
        rc=1
    fi
    if [ $rc -eq 0 ]; then
        grep '^LAB-IOERR' "$d/console.txt" | sed 's/^/    guest: /' >&2
        grep -q '^LAB-IOERR .*[Ee]rror' "$d/console.txt" || {
            log "the guest saw no I/O error"
            rc=1
        }
        check_clean "$d/fs/disk.qcow2" || rc=1
    fi
    umount "$d/fs" || rc=1
    return $rc
}

run_case() {
    local name=$1 t0 rc=0
    t0=$(date +%s)
    case "$name" in
    rw) case_rw rw 1 || rc=$? ;;
    rw-mq) case_rw rw-mq 2 || rc=$? ;;
    rw-raw) case_rw rw-raw 1 raw || rc=$? ;;
    rw-direct) case_rw rw-direct 1 qcow2 direct || rc=$? ;;
    chain) case_chain || rc=$? ;;
    ro) case_ro || rc=$? ;;
    verify) case_verify || rc=$? ;;
    trim) case_trim || rc=$? ;;
    rw-iscsi) case_net rw-iscsi iscsi || rc=$? ;;
    rw-rbd) case_net rw-rbd rbd || rc=$? ;;
    kill) case_kill || rc=$? ;;
    enospc) case_enospc || rc=$? ;;
    *) die "unknown case $name" ;;
    esac
    if [ -n "$QEMU_PID" ]; then kill -TERM "$QEMU_PID" 2>/dev/null || true; fi
    if [ -n "$SERVER_PID" ]; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
    if [ $rc -eq 0 ]; then
        log "PASS $name (SERVER=$SERVER, $(($(date +%s) - t0)) s)"
    else
        log "FAIL $name (SERVER=$SERVER)"
        report_failure "$name" "$WORK/$name/console.txt" "$WORK/$name/server.log"
    fi
    return $rc
}

# ---------------------------------------------------------------------------------------------
# The benchmark: fio inside the guest on the raw disk, alternating servers over fresh copies.

bench() {
    local d="$WORK/bench" run srv
    mkdir -p "$d"
    build_initramfs "$WORK/initrd-fio" fio
    # A fully allocated qcow2 image: reads read data, writes overwrite allocated clusters, so
    # both servers do the same work every run.
    qemu-img create -q -f qcow2 "$d/master.qcow2" "${BENCH_SIZE_MB}M"
    qemu-io -f qcow2 -c "write -P 0x5a 0 ${BENCH_SIZE_MB}M" "$d/master.qcow2" >/dev/null
    : >"$d/results"
    for run in $(seq 1 "$BENCH_RUNS"); do
        for srv in img qsd; do
            cp "$d/master.qcow2" "$d/disk.qcow2"
            start_server "$srv" "$d/disk.qcow2" qcow2 "$d/sock" "$d/server-$srv.log" "" \
                "$BENCH_QUEUES" || return 1
            if ! boot bench "$d/sock" "$d/console-$srv-$run" "$WORK/initrd-fio" "$BENCH_QUEUES" 1024; then
                report_failure "bench $srv" "$d/console-$srv-$run.txt" "$d/server-$srv.log"
                return 1
            fi
            stop_server || return 1
            # LAB-FIO job read-KiB/s;read-IOPS;write-KiB/s;write-IOPS
            grep '^LAB-FIO ' "$d/console-$srv-$run.txt" | while read -r _ job vals; do
                IFS=';' read -r rbw riops wbw wiops <<<"$vals"
                case "$job" in
                read) echo "$srv seq-read-MiB/s $(awk "BEGIN {print $rbw / 1024}")" ;;
                write) echo "$srv seq-write-MiB/s $(awk "BEGIN {print $wbw / 1024}")" ;;
                randread) echo "$srv randread-4k-IOPS $riops" ;;
                randwrite) echo "$srv randwrite-4k-IOPS $wiops" ;;
                esac
            done >>"$d/results"
            log "bench run $run $srv: $(grep "^$srv " "$d/results" | tail -n 4 | cut -d' ' -f2- | tr '\n' ' ')"
        done
    done
    echo
    echo "guest benchmark: fio in a $KVER guest (QEMU 7.2 TCG; $BENCH_QUEUES vCPU(s), virtqueue(s) and fio"
    echo "job(s)), direct I/O on /dev/vda (libaio; 1M blocks at depth 4, 4k at depth 16), a fully"
    echo "allocated ${BENCH_SIZE_MB} MiB qcow2 image (a fresh copy each boot); ${BENCH_SECS} s per job, median of"
    echo "$BENCH_RUNS runs, img and qsd alternating. Servers at their defaults: img serve (writeback,"
    echo "io_uring${SERVE_OPTS:+, $SERVE_OPTS}), qemu-storage-daemon (writeback, aio=threads)."
    echo "ratio = img / qsd: above 1 means img serve is faster than qemu-storage-daemon."
    printf '%-20s %12s %12s %8s\n' metric img qsd ratio
    local m i q
    for m in seq-read-MiB/s seq-write-MiB/s randread-4k-IOPS randwrite-4k-IOPS; do
        i=$(awk -v m="$m" '$1 == "img" && $2 == m {print $3}' "$d/results" | median)
        q=$(awk -v m="$m" '$1 == "qsd" && $2 == m {print $3}' "$d/results" | median)
        printf '%-20s %12.1f %12.1f %8.2f\n' "$m" "$i" "$q" "$(awk "BEGIN {print ($q > 0) ? $i / $q : 0}")"
    done
}

# ---------------------------------------------------------------------------------------------

main() {
    local mode=${1:-check}
    if [ "$mode" = --prepare ]; then
        prepare
        exit 0
    fi
    if [ "$mode" = bench ]; then
        prepare bench
    else
        prepare
    fi
    prepare_img
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/guest-lab.XXXXXX")
    FAILED=1
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    if [ "$mode" = bench ]; then
        bench
        FAILED=0
        return 0
    fi
    build_initramfs "$WORK/initrd"
    local cases=("$@") c failed=()
    if [ "$mode" = check ]; then cases=(rw rw-mq rw-raw rw-direct chain ro verify trim); fi
    case " ${cases[*]} " in *" verify "* | *" trim "*) build_initramfs "$WORK/initrd-fio" fio ;; esac
    log "SERVER=$SERVER img=$IMG_BIN kernel=$KVER cases: ${cases[*]}"
    for c in "${cases[@]}"; do
        run_case "$c" || failed+=("$c")
    done
    if [ ${#failed[@]} -gt 0 ]; then
        log "FAILED: ${failed[*]}"
        return 1
    fi
    log "all cases passed (SERVER=$SERVER)"
    FAILED=0
}

main "$@"; exit $?
