#!/bin/bash
# The KVM lab: runs a host program against a real /dev/kvm.
#
# The host's own /dev/kvm is a software nested KVM on which Linux cannot boot (see
# ../shared/LAB.md), so this boots a Linux "L1" guest (Debian's kernel, a busybox initramfs)
# under Debian's QEMU 7.2 with TCG emulating an AMD CPU with SVM and nested paging
# (-cpu EPYC). L1 loads kvm-amd, which gives it a real /dev/kvm; the host's / is shared into
# L1 read-only over virtio-9p, plus a writable per-run work dir, and L1 chroots into the host's
# root to run the command. So any binary built on the host (target/release/img, a VMM) runs
# unchanged in L1 and can start "L2" guests under KVM.
#
#   scripts/kvm-lab.sh run [--share DIR]... [--] CMD [ARGS...]
#       Boots L1 and runs CMD (a path or command name as the host would resolve it; relative
#       paths are relative to the caller's working directory, which is also CMD's working
#       directory) chrooted into the host's root, with /dev (holding /dev/kvm), /proc, /sys,
#       a fresh tmpfs on /tmp and on /run, and stdin from /dev/null. The root filesystem is
#       read-only; CMD can write to /tmp (L1's memory, lost at power-off) and to $KVM_LAB_WORK,
#       the run's work dir, which is the same path on the host and in L1, and to every
#       --share DIR, a host directory shared writable at its own path (e.g. a test's temp dir
#       holding disk images; DIR is shared with its subdirectories; its path may hold only
#       letters, digits and . _ - /). The host's own /tmp is not visible in L1: share what CMD
#       needs from there (a working directory there is shared automatically). CMD's stdout and
#       stderr are written to files in the work dir and copied to this script's stdout and
#       stderr when CMD ends (not while it runs); then L1 powers off. Exits with CMD's exit
#       status.
#   scripts/kvm-lab.sh check
#       The lab's self-test: in L1, KVM_CREATE_VM and KVM_CREATE_VCPU on /dev/kvm (ioctls from
#       python3), then an L2 Linux guest (the same kernel, PVH entry, a tiny initramfs whose
#       /init prints a marker with a per-run nonce and powers off) booted by QEMU 7.2 with
#       -accel kvm -cpu host. Exit 0 only when both worked.
#   scripts/kvm-lab.sh bench-qemu-boot
#       The time QEMU -accel kvm in L1 takes to boot L2 to its /init and power it off,
#       KVM_LAB_RUNS times in one L1 boot; prints each run and the median (the baseline for
#       our own VMM).
#   scripts/kvm-lab.sh --prepare
#       Only fetch and build what the lab needs (QEMU 7.2, kernel, busybox) into the cache.
#
# Exit status: CMD's for `run`; 0 or 1 for check and bench-qemu-boot; 125 when the lab itself
# failed (bad arguments, preparation failed, L1 did not boot, found no /dev/kvm, could not
# mount the shares, or the run timed out) - the reason ("kvm-lab: error: ...") and the tail
# of L1's console are printed, which tells it from a CMD that itself exits with 125.
#
# Lab lines on stderr start with "kvm-lab:"; they give the timings: L1's boot to a usable
# /dev/kvm as the host saw it, the command's run time, L1's power-off and the total.
#
# Environment:
#   KVM_LAB_TIMEOUT  seconds the whole L1 run may take (default 900); on expiry L1 is stopped
#   KVM_LAB_MEM      L1's memory in MiB (default 2048; TCG allocates it only as it is touched)
#   KVM_LAB_SMP      L1's vCPUs (default 1)
#   KVM_LAB_L1_CPU   L1's CPU model (default EPYC: SVM with nested paging; a model without
#                    SVM, e.g. qemu64,-svm, gives an L1 without /dev/kvm, to see the lab fail)
#   KVM_LAB_ENV      names of host environment variables to pass to CMD (space-separated);
#                    CMD otherwise gets only PATH, HOME=/root, LANG=C.UTF-8, TERM=dumb,
#                    KVM_LAB=1 and KVM_LAB_WORK
#   KVM_LAB_RUNS     bench-qemu-boot's number of boots (default 5)
#   KVM_LAB_L2_QEMU_ARGS  more QEMU options for L2 in check and bench-qemu-boot (e.g.
#                    "-machine q35"; split on white space)
#   IMG_LAB_DIR      cache dir (default /var/cache/img-lab, shared with the other lab scripts)
#   KEEP=1           keep the work dir (console logs, CMD's output) even on success
#
# One L1 runs at a time (a lock in the cache dir; others wait for it): on this 2-core machine
# two TCG guests would only slow each other down and make the timings meaningless.
#
# Internal subcommands, run inside L1 by check and bench-qemu-boot: l1-check, l1-bench.
set -euo pipefail

CALLER_PWD=$PWD
cd "$(dirname "$0")/.."
TOP=$PWD
SELF="$TOP/scripts/kvm-lab.sh"
LAB_NAME=kvm-lab
# shellcheck source=scripts/lab-common.sh
. "$TOP/scripts/lab-common.sh"
KVM_LAB_TIMEOUT=${KVM_LAB_TIMEOUT:-900}
KVM_LAB_MEM=${KVM_LAB_MEM:-2048}
KVM_LAB_SMP=${KVM_LAB_SMP:-1}
KVM_LAB_L1_CPU=${KVM_LAB_L1_CPU:-EPYC}
SHARES=()
KVM_LAB_RUNS=${KVM_LAB_RUNS:-5}
KVMDIR="$LAB/kvm"
LAB_FAILURE=125

lab_fail() {
    log "error: $*"
    exit $LAB_FAILURE
}
# Whatever goes wrong before CMD runs is the lab's failure, never to be taken for CMD's status.
die() { lab_fail "$@"; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", b - a}'; }

# ---------------------------------------------------------------------------------------------
# Preparation (idempotent, under the cache's lock).

prepare() {
    lab_lock
    local missing=()
    command -v modprobe >/dev/null 2>&1 || missing+=(kmod)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    command -v flock >/dev/null 2>&1 || missing+=(util-linux)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt_install "${missing[@]}"
    fi
    "$TOP/scripts/qemu-system.sh" --prepare
    prepare_kernel
    prepare_busybox
    mkdir -p "$KVMDIR"
    lab_unlock
}

# L1's /init: loads the modules, mounts the shares, chroots into the host's root to run
# $WORK/cmd, leaves its exit status in $WORK/rc and powers off. Every line it prints on the
# console starts with KVM-LAB.
write_l1_init() {
    cat >"$1" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() {
    echo "KVM-LAB-FAIL: $*"
    poweroff -f
}
WORK=
for w in $(cat /proc/cmdline); do
    case "$w" in kvmlab.work=*) WORK=${w#kvmlab.work=} ;; esac
done
[ -n "$WORK" ] || fail "no kvmlab.work= on the kernel command line"
for m in $(cat /modules.order); do
    insmod "/lib/modules/$m" || echo "KVM-LAB-INFO: insmod $m failed"
done
P9=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /host
mount -t 9p -o "ro,$P9" hostroot /host || fail "cannot mount the host's root (9p hostroot)"
mount -t tmpfs -o mode=1777 tmp /host/tmp || fail "cannot mount a tmpfs on /tmp"
mount -t tmpfs -o mode=755 run /host/run || fail "cannot mount a tmpfs on /run"
mount -t devtmpfs dev /host/dev || fail "cannot mount /dev"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs -o mode=1777 shm /host/dev/shm
mount -t proc proc /host/proc || fail "cannot mount /proc"
mount -t sysfs sys /host/sys || fail "cannot mount /sys"
# The work dir at the path it has on the host (under /tmp it is in the new tmpfs).
mkdir -p "/host$WORK" 2>/dev/null
mount -t 9p -o "$P9" labwork "/host$WORK" || fail "cannot mount the work dir (9p labwork)"
for w in $(cat /proc/cmdline); do
    case "$w" in
    kvmlab.share*=*)
        tag=${w%%=*}
        tag=${tag#kvmlab.}
        dir=${w#*=}
        mkdir -p "/host$dir" 2>/dev/null
        mount -t 9p -o "$P9" "$tag" "/host$dir" || fail "cannot mount $dir (9p $tag)"
        ;;
    esac
done
[ -c /dev/kvm ] || fail "no /dev/kvm (kvm_amd: $(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null || echo not loaded))"
read -r up _ </proc/uptime
echo "uptime=$up npt=$(cat /sys/module/kvm_amd/parameters/npt) nested=$(cat /sys/module/kvm_amd/parameters/nested) cpu=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" >"/host$WORK/l1-ready"
chroot /host /usr/bin/env -i /bin/bash "$WORK/cmd" </dev/null >"/host$WORK/stdout" 2>"/host$WORK/stderr"
echo $? >"/host$WORK/rc.new"
mv "/host$WORK/rc.new" "/host$WORK/rc"
sync
umount "/host$WORK"
poweroff -f
EOF
    chmod 755 "$1"
}

# L2's /init: prints the marker with the nonce from the command line and L2's uptime (the
# kernel's boot time to init), then powers off. One line of console output: under nested KVM
# every character is an exit to L1's QEMU.
write_l2_init() {
    cat >"$1" <<'EOF'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read -r up _ </proc/uptime
nonce=none
for w in $(/bin/busybox cat /proc/cmdline); do
    case "$w" in kvmlab.nonce=*) nonce=${w#kvmlab.nonce=} ;; esac
done
# L2's wall clock comes from kvmclock, that is from L1's: L1 subtracts its own time at QEMU's
# start to get QEMU's start to L2's /init. (busybox date has no sub-second format.)
rt=$(/bin/busybox adjtimex | /bin/busybox awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {printf "%d.%06d", s, u}')
echo "KVM-LAB-L2-UP $nonce uptime=$up realtime=$rt"
/bin/busybox poweroff -f
EOF
    chmod 755 "$1"
}

build_initramfs() {
    local root="$WORK/l1-root"
    initramfs_skeleton "$root"
    mkdir -p "$root/host"
    write_l1_init "$root/init"
    # kvm_amd pulls in irqbypass, kvm and ccp; 9p pulls in 9pnet, netfs and fscache.
    add_modules "$root" virtio_pci 9pnet_virtio 9p kvm_amd
    pack_initramfs "$root" "$WORK/l1-initrd"
    rm -rf "$root"
    root="$WORK/l2-root"
    initramfs_skeleton "$root"
    write_l2_init "$root/init"
    pack_initramfs "$root" "$WORK/l2-initrd"
    rm -rf "$root"
}

# ---------------------------------------------------------------------------------------------
# One L1 boot.

QEMU_PID=

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    # QEMU_PID is timeout(1)'s, which passes SIGTERM on to QEMU.
    if [ -n "$QEMU_PID" ]; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
        if [ "${LAB_OK:-0}" = 1 ] && [ -z "${KEEP:-}" ]; then
            rm -rf "$WORK"
        else
            log "work dir kept: $WORK"
        fi
    fi
}

# setup: the cache, the run lock, the work dir and the initramfs images.
setup() {
    local t0
    t0=$(now)
    prepare
    # Opened for appending, so that a waiter does not erase the holder's note in the file.
    exec 8>>"$KVMDIR/.run.lock"
    if ! flock -n 8; then
        log "waiting for another kvm-lab run to finish ($(cat "$KVMDIR/.run.lock" 2>/dev/null))"
        flock -w "$KVM_LAB_TIMEOUT" 8 || lab_fail "another kvm-lab run held the lock for $KVM_LAB_TIMEOUT s"
    fi
    printf 'pid %s since %s: %s\n' "$$" "$(date +%T)" "$SELF $MODE_ARGS" >"$KVMDIR/.run.lock"
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvm-lab.XXXXXX")
    WORK=$(realpath "$WORK")
    export KVM_LAB_WORK=$WORK
    case "$WORK" in *[!A-Za-z0-9/._-]*) lab_fail "the work dir $WORK holds characters the kernel command line cannot carry" ;; esac
    LAB_OK=0
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    build_initramfs
    log "prepared in $(elapsed "$t0" "$(now)") s (kernel $KVER)"
}

# console_tail: L1's console and QEMU's messages, for a post-mortem.
console_tail() {
    log "---- L1 console (tail) ----"
    tr -d '\r' <"$WORK/l1-console" 2>/dev/null | tail -n 30 >&2 || true
    if [ -s "$WORK/qemu.log" ]; then
        log "---- QEMU (L1) messages ----"
        grep -v "doesn't support requested feature" "$WORK/qemu.log" | tail -n 20 >&2 || true
    fi
}

# boot_l1 CMD [ARGS...]: runs CMD in L1; sets CMD_RC and the timings T_READY, T_CMD, T_OFF
# (seconds, as the host measured them). Fails the script (status 125) when the lab failed.
boot_l1() {
    local v t0 t_ready='' t_done='' rc=0 i append shares=()
    append="console=ttyS0 panic=-1 quiet loglevel=1 kvmlab.work=$WORK"
    for i in "${!SHARES[@]}"; do
        shares+=(-virtfs "local,path=${SHARES[$i]},mount_tag=share$i,security_model=none")
        append+=" kvmlab.share$i=${SHARES[$i]}"
    done
    {
        printf 'export PATH=%q\n' "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        printf 'export HOME=/root LANG=C.UTF-8 TERM=dumb KVM_LAB=1 KVM_LAB_WORK=%q\n' "$WORK"
        for v in ${KVM_LAB_ENV:-} KVM_LAB_L2_QEMU_ARGS; do
            if [ -n "${!v+set}" ]; then printf 'export %s=%q\n' "$v" "${!v}"; fi
        done
        printf 'cd %q 2>/dev/null || { : >%q; exit 125; }\n' "$CALLER_PWD" "$WORK/no-cwd"
        printf 'exec'
        printf ' %q' "$@"
        printf '\n'
    } >"$WORK/cmd"
    t0=$(now)
    timeout -k 10 "$KVM_LAB_TIMEOUT" "$TOP/scripts/qemu-system.sh" \
        -accel tcg -cpu "$KVM_LAB_L1_CPU" -m "$KVM_LAB_MEM" -smp "$KVM_LAB_SMP" \
        -nodefaults -no-user-config -display none -monitor none -no-reboot \
        -serial "file:$WORK/l1-console" \
        -kernel "$KDIR/vmlinux" -initrd "$WORK/l1-initrd" \
        -append "$append" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
        -virtfs "local,path=$WORK,mount_tag=labwork,security_model=none" "${shares[@]}" \
        </dev/null >"$WORK/qemu.log" 2>&1 &
    QEMU_PID=$!
    # Poll (cheaply) for the milestones L1 leaves in the work dir, for the timings.
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if [ -z "$t_ready" ] && [ -e "$WORK/l1-ready" ]; then
            t_ready=$(now)
            log "L1 up with /dev/kvm after $(elapsed "$t0" "$t_ready") s ($(cat "$WORK/l1-ready"))"
        fi
        if [ -z "$t_done" ] && [ -e "$WORK/rc" ]; then t_done=$(now); fi
        sleep 0.1
    done
    wait "$QEMU_PID" || rc=$?
    QEMU_PID=
    local t_end
    t_end=$(now)
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        console_tail
        lab_fail "L1 did not finish within KVM_LAB_TIMEOUT=$KVM_LAB_TIMEOUT s ($([ -n "$t_ready" ] && echo "it booted; the command was still running" || echo "it never got to run the command"))"
    fi
    if [ $rc -ne 0 ]; then
        console_tail
        lab_fail "QEMU (L1) exited with status $rc"
    fi
    if [ ! -e "$WORK/rc" ]; then
        console_tail
        local why
        why=$(tr -d '\r' <"$WORK/l1-console" | grep -m1 '^KVM-LAB-FAIL' || true)
        lab_fail "L1 powered off without running the command${why:+: $why}"
    fi
    [ -n "$t_ready" ] || t_ready=$t0
    [ -n "$t_done" ] || t_done=$t_end
    CMD_RC=$(cat "$WORK/rc")
    if [ -e "$WORK/no-cwd" ]; then
        lab_fail "the working directory $CALLER_PWD is not visible in L1 (under the host's /tmp? --share it)"
    fi
    T_READY=$(elapsed "$t0" "$t_ready")
    T_CMD=$(elapsed "$t_ready" "$t_done")
    T_OFF=$(elapsed "$t_done" "$t_end")
    T_TOTAL=$(elapsed "$t0" "$t_end")
    log "L1 boot to /dev/kvm $T_READY s, command $T_CMD s (status $CMD_RC), power-off $T_OFF s, total $T_TOTAL s"
}

# ---------------------------------------------------------------------------------------------
# Inside L1 (chrooted into the host's root).

# l2_boot VMLINUX INITRD NONCE CONSOLE: one L2 boot under QEMU -accel kvm; sets L2_WALL (QEMU's
# start to its exit), L2_INIT (QEMU's start to L2's /init) and L2_UPTIME (L2's kernel to /init),
# or fails. Where the time goes (strace in L1, about 10 s in all): 2-3 s for QEMU's start (its
# libraries over 9p, under TCG), about 4 s of QEMU loading the 65 MB vmlinux (copies, which TCG
# runs slowly), then 2-3 s of L2 running: the kernel's boot to /init and the power-off.
l2_boot() {
    local t0 t1 rc=0
    local extra=()
    # shellcheck disable=SC2206 # a list of options, split on purpose
    extra=(${KVM_LAB_L2_QEMU_ARGS:-})
    t0=$(now)
    timeout -k 5 120 "$TOP/scripts/qemu-system.sh" \
        -accel kvm -cpu host -m 256 -smp 1 "${extra[@]}" \
        -nodefaults -no-user-config -display none -monitor none -no-reboot \
        -serial "file:$4" \
        -kernel "$1" -initrd "$2" \
        -append "console=ttyS0 panic=-1 quiet loglevel=0 kvmlab.nonce=$3" \
        </dev/null >"$4.qemu" 2>&1 || rc=$?
    t1=$(now)
    if [ $rc -ne 0 ]; then
        echo "L2: QEMU -accel kvm exited with status $rc$([ $rc = 124 ] && echo ' (timed out after 120 s)'):" >&2
        cat "$4.qemu" >&2
        tr -d '\r' <"$4" | tail -n 20 >&2
        return 1
    fi
    if ! tr -d '\r' <"$4" | grep -q "^KVM-LAB-L2-UP $3 "; then
        echo "L2: no marker with nonce $3 on L2's console:" >&2
        tr -d '\r' <"$4" | tail -n 20 >&2
        cat "$4.qemu" >&2
        return 1
    fi
    local marker rt
    marker=$(tr -d '\r' <"$4" | grep -m1 "^KVM-LAB-L2-UP $3 ")
    L2_UPTIME=$(echo "$marker" | sed -n 's/.* uptime=\([0-9.]*\).*/\1/p')
    rt=$(echo "$marker" | sed -n 's/.* realtime=\([0-9.]*\).*/\1/p')
    L2_WALL=$(elapsed "$t0" "$t1")
    # QEMU's start to L2's /init, on L2's clock against L1's; only if it is plausible.
    L2_INIT=$(awk -v a="$t0" -v b="${rt:-0}" -v w="$L2_WALL" \
        'BEGIN {d = b - a; if (d > 0 && d <= w + 0.05) printf "%.1f", d; else print "n/a"}')
}

kvm_ioctl_check() {
    python3 - <<'EOF'
import fcntl, os
KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_GET_VCPU_MMAP_SIZE, KVM_CREATE_VCPU = 0xAE00, 0xAE01, 0xAE04, 0xAE41
kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
api = fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0)
if api != 12:
    raise SystemExit(f"KVM_GET_API_VERSION returned {api}, not 12")
vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
print(f"KVM_GET_API_VERSION={api} KVM_CREATE_VM fd={vm} KVM_CREATE_VCPU fd={vcpu} vcpu mmap size={size}")
EOF
}

l1_check() {
    local vmlinux=$1 initrd=$2 nonce=$3 out
    [ -c /dev/kvm ] || {
        echo "no /dev/kvm" >&2
        return 1
    }
    out=$(kvm_ioctl_check) || {
        echo "the KVM ioctls failed" >&2
        return 1
    }
    echo "KVM-LAB-IOCTLS $out"
    l2_boot "$vmlinux" "$initrd" "$nonce" /tmp/l2-console || return 1
    echo "KVM-LAB-L2 booted: $L2_INIT s from QEMU's start to L2's /init (L2's kernel: $L2_UPTIME s), $L2_WALL s to L2's power-off and QEMU's exit"
}

l1_bench() {
    local vmlinux=$1 initrd=$2 runs=$3 i walls=() ups=() inits=()
    printf '%-8s %14s %14s %14s\n' "" "QEMU->/init s" "L2 kernel s" "QEMU->exit s"
    for i in $(seq 1 "$runs"); do
        l2_boot "$vmlinux" "$initrd" "run$i" /tmp/l2-console || return 1
        printf '%-8s %14s %14s %14s\n' "run $i" "$L2_INIT" "$L2_UPTIME" "$L2_WALL"
        walls+=("$L2_WALL")
        ups+=("$L2_UPTIME")
        inits+=("$L2_INIT")
    done
    printf '%-8s %14s %14s %14s\n' median "$(printf '%s\n' "${inits[@]}" | grep -v n/a | median)" \
        "$(printf '%s\n' "${ups[@]}" | median)" "$(printf '%s\n' "${walls[@]}" | median)"
}

# ---------------------------------------------------------------------------------------------

usage() {
    sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//' >&2
    exit $LAB_FAILURE
}

# share_hidden_cwd: L1 mounts fresh tmpfs on /tmp, /run and /dev/shm, so a checkout or a
# caller's working directory there (a clone under /tmp, as on CI) would not be found; share
# the project (this script runs from it in L1) and the working directory writable at their
# own paths, unless a --share already covers them.
share_hidden_cwd() {
    local d s covered
    for d in "$TOP" "$CALLER_PWD"; do
        case "$d/" in
        /tmp/* | /run/* | /dev/shm/*) ;;
        *) continue ;;
        esac
        covered=
        for s in "${SHARES[@]}"; do
            case "$d/" in "$s"/*) covered=1 ;; esac
        done
        case "$d" in
        *[!A-Za-z0-9/._-]*) covered=1 ;; # cannot be carried on L1's command line: reported later
        esac
        [ -n "$covered" ] || SHARES+=("$d")
    done
}

main() {
    local mode=${1:-}
    MODE_ARGS="$*"
    [ $# -gt 0 ] && shift
    case "$mode" in
    --prepare)
        prepare
        ;;
    run)
        local dir
        while [ $# -gt 0 ]; do
            case "$1" in
            --share)
                [ $# -ge 2 ] || usage
                dir=$(realpath -e "$2") || die "--share $2: no such directory"
                [ -d "$dir" ] || die "--share $2: not a directory"
                case "$dir" in
                / | *[!A-Za-z0-9/._-]*) die "--share $2: $dir cannot be shared (the root, or characters the kernel command line cannot carry)" ;;
                esac
                SHARES+=("$dir")
                shift 2
                ;;
            --)
                shift
                break
                ;;
            -*) usage ;;
            *) break ;;
            esac
        done
        [ $# -gt 0 ] || usage
        share_hidden_cwd
        setup
        boot_l1 "$@"
        LAB_OK=1
        cat "$WORK/stdout"
        cat "$WORK/stderr" >&2
        return "$CMD_RC"
        ;;
    check)
        local t0 nonce
        t0=$(now)
        setup
        nonce=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
        share_hidden_cwd
        boot_l1 bash "$SELF" l1-check "$KDIR/vmlinux" "$WORK/l2-initrd" "$nonce"
        cat "$WORK/stdout"
        cat "$WORK/stderr" >&2
        if [ "$CMD_RC" != 0 ] || ! grep -q '^KVM-LAB-IOCTLS ' "$WORK/stdout" ||
            ! grep -q '^KVM-LAB-L2 booted' "$WORK/stdout"; then
            log "check FAILED (status $CMD_RC in L1)"
            return 1
        fi
        LAB_OK=1
        log "check passed: L1 boot to /dev/kvm $T_READY s; L2 $(sed -n 's/^KVM-LAB-L2 booted: //p' "$WORK/stdout"); total $(elapsed "$t0" "$(now)") s"
        ;;
    bench-qemu-boot)
        setup
        boot_l1 bash "$SELF" l1-bench "$KDIR/vmlinux" "$WORK/l2-initrd" "$KVM_LAB_RUNS"
        cat "$WORK/stderr" >&2
        echo "L2 boot under QEMU 7.2 -accel kvm -cpu host (256 MiB, 1 vCPU, PVH vmlinux $KVER, busybox"
        echo "initramfs whose /init powers off) inside L1 (QEMU TCG, -cpu EPYC, $KVM_LAB_SMP vCPU):"
        echo "QEMU->/init: QEMU's start to L2's /init (L2's kvmclock time against L1's); L2 kernel:"
        echo "L2's uptime at /init; QEMU->exit: QEMU's start to its exit after L2's power-off."
        cat "$WORK/stdout"
        [ "$CMD_RC" = 0 ] || return 1
        LAB_OK=1
        ;;
    l1-check) l1_check "$@" ;;
    l1-bench) l1_bench "$@" ;;
    *) usage ;;
    esac
}

main "$@"
