#!/bin/bash
# Benchmarks our VMM (target/release/vmm) against QEMU 7.2 -accel kvm -cpu host, side by side in
# ONE boot of the nested KVM lab (scripts/kvm-lab.sh: an L1 Linux under QEMU TCG with kvm-amd),
# on the same kernel (Debian's 6.1 vmlinux, PVH entry for both), initramfs, vCPUs and RAM:
#
#   boot     launch to /init: the wall time (in L1) from starting the VMM process to the moment
#            /init's marker line arrives on the VMM's stdout (its serial console, -serial stdio
#            on both, read from a pipe, so no polling), and to the VMM's exit after /init's
#            `poweroff -f`; plus the guest kernel's own uptime at /init. BENCH_RUNS pairs,
#            interleaved (the side that goes first alternates), after one untimed warm-up
#            boot each. Ratio = qemu / vmm: above 1, our vmm boots faster.
#   disk     fio inside the guest on the raw disk (O_DIRECT, libaio): sequential write and read
#            of 1 MiB blocks at depth 16, random write and read of 4 KiB blocks at depth 32,
#            BENCH_SECS each after a 1 s ramp; the disk is a fresh qcow2 image made by
#            qemu-img (BENCH_IMG_MB, preallocation=BENCH_PREALLOC) before every boot, given with
#            identical -drive/-device options to both. BENCH_DISK_RUNS pairs per device set,
#            interleaved. Ratio = vmm / qemu: above 1, our vmm moves more data.
#
# Device sets (BENCH_DEVICES, space-separated, default "blk scsi"):
#   blk   -drive file=IMG,format=qcow2,if=virtio,cache=none
#         (QEMU: virtio-blk-pci; vmm: virtio-blk over virtio-mmio declared in ACPI); /dev/vda
#   scsi  -drive file=IMG,if=none,id=d0,format=qcow2,cache=none
#         -device virtio-scsi-pci,id=scsi0 -device scsi-hd,drive=d0; /dev/sda
#
#   scripts/vmm-bench.sh                          boot and disk (blk and scsi)
#   BENCH_ONLY=boot | BENCH_ONLY=disk             only one part
#
# Environment: BENCH_RUNS (boot pairs, default 5), BENCH_DISK_RUNS (disk pairs per device set,
# default 3), BENCH_DEVICES (default "blk scsi"), BENCH_SECS (seconds per fio job, default 4),
# BENCH_IMG_MB (default 1024), BENCH_PREALLOC (off|metadata|falloc|full, default metadata),
# BENCH_CACHE (the -drive cache= mode, default none), BENCH_VMM (the vmm binary to measure,
# default target/release/vmm, built first), BENCH_MEM (guest MiB, default 512), BENCH_SMP
# (guest vCPUs, default 1), KEEP=1 (keep the work dir with every console), IMG_LAB_DIR,
# KVM_LAB_SCRIPT, KVM_LAB_MEM (L1's MiB, default here 4096), KVM_LAB_TIMEOUT (default here
# 3000 s).
#
# What both sides run from, for a fair start (L1 reads the host's files over 9p, which would
# otherwise dominate and favour the smaller binary): the kernel, the initramfs images, both VMM
# binaries, QEMU's firmware and modules, and every shared library either VMM links (through
# LD_LIBRARY_PATH) are copied into L1's RAM (tmpfs) first. QEMU is started directly (the
# binary and options scripts/qemu-system.sh uses), not through that shell wrapper. The images
# live on an ext4 filesystem on a loop device over a tmpfs file in L1 (tmpfs in 6.1 has no
# O_DIRECT, which cache=none needs; 9p would measure 9p).
#
# Output: a table on stdout; per-run numbers on stderr. Exit 0 only if every run completed
# (boot: status 0 and the marker; disk: all four fio jobs reported); 1 otherwise; 125 when the
# lab itself failed. No timing assertions. Method, caveats and measured results:
# vmm/docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD
LAB_NAME=vmm-bench
# shellcheck source=scripts/lab-common.sh
. "$TOP/scripts/lab-common.sh"

BENCH_RUNS=${BENCH_RUNS:-5}
BENCH_DISK_RUNS=${BENCH_DISK_RUNS:-3}
BENCH_DEVICES=${BENCH_DEVICES:-blk scsi}
BENCH_SECS=${BENCH_SECS:-4}
BENCH_IMG_MB=${BENCH_IMG_MB:-1024}
BENCH_PREALLOC=${BENCH_PREALLOC:-metadata}
BENCH_CACHE=${BENCH_CACHE:-none}
BENCH_MEM=${BENCH_MEM:-512}
BENCH_SMP=${BENCH_SMP:-1}
BENCH_ONLY=${BENCH_ONLY:-}
export KVM_LAB_MEM=${KVM_LAB_MEM:-4096}
export KVM_LAB_TIMEOUT=${KVM_LAB_TIMEOUT:-3000}
KVM_LAB_SCRIPT=${KVM_LAB_SCRIPT:-$TOP/scripts/kvm-lab.sh}
LAB_FAILURE=125
[ -x "$KVM_LAB_SCRIPT" ] || {
    log "needs $KVM_LAB_SCRIPT (the nested KVM lab)"
    exit $LAB_FAILURE
}
for d in $BENCH_DEVICES; do
    case "$d" in blk | scsi) ;; *)
        log "BENCH_DEVICES: unknown device set '$d' (blk, scsi)"
        exit 2
        ;;
    esac
done
case "$BENCH_ONLY" in '' | boot | disk) ;; *)
    log "BENCH_ONLY must be boot or disk"
    exit 2
    ;;
esac

# The kernel, busybox, fio and QEMU 7.2 (guest-lab.sh's preparation, under the cache's lock).
"$TOP/scripts/guest-lab.sh" --prepare >&2 || {
    log "guest-lab.sh --prepare failed"
    exit $LAB_FAILURE
}
lab_lock
prepare_kernel
prepare_busybox
lab_unlock
QROOT="$LAB/ROOT"
[ -x "$QROOT/usr/bin/qemu-system-x86_64" ] || {
    log "no QEMU under $QROOT"
    exit $LAB_FAILURE
}
command -v fio >/dev/null || {
    log "no fio on the host (apt-get install fio)"
    exit $LAB_FAILURE
}

if [ -n "${BENCH_VMM:-}" ]; then
    VMM=$(realpath -e "$BENCH_VMM")
else
    cargo build --release -p vmm >&2
    VMM="$TOP/target/release/vmm"
fi

WORK=$(mktemp -d /var/tmp/vmm-bench.XXXXXX)
FAILED=0
cleanup() {
    if [ "${KEEP:-}" = 1 ] || [ "$FAILED" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
NONCE=$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')

# The boot initramfs: busybox and an /init that prints the marker first, then the kernel's
# uptime, and powers off.
d="$WORK/rd-boot"
initramfs_skeleton "$d"
cat >"$d/init" <<INIT
#!/bin/busybox sh
/bin/busybox echo "BENCH-INIT-$NONCE"
/bin/busybox mount -t proc proc /proc
read -r up _ </proc/uptime
/bin/busybox echo "BENCH-UPTIME \$up"
/bin/busybox poweroff -f
INIT
chmod 755 "$d/init"
pack_initramfs "$d" "$WORK/initrd-boot"
rm -rf "$d"

# The disk initramfs: the same for every side and device set: both transports' modules
# (virtio_pci finds nothing under vmm, virtio_mmio nothing under QEMU), virtio-blk and
# virtio-scsi with the SCSI disk driver, and the host's fio with its libraries.
d="$WORK/rd-disk"
initramfs_skeleton "$d"
add_modules "$d" virtio_pci virtio_mmio virtio_blk virtio_scsi sd_mod
add_host_binary "$d" fio
cat >"$d/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
DEV=vda
for w in $(cat /proc/cmdline); do
    case "$w" in bench.dev=*) DEV=${w#bench.dev=} ;; esac
done
echo "BENCH-STAGE init uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /modules.order); do
    insmod "/lib/modules/$m" 2>/dev/null || echo "BENCH-INFO insmod $m refused"
done
echo "BENCH-STAGE modules uptime=$(cut -d' ' -f1 /proc/uptime)"
i=0
while [ ! -b "/dev/$DEV" ]; do
    i=$((i + 1))
    if [ $i -gt 300 ]; then
        echo "BENCH-FAIL no /dev/$DEV after 30 s"
        poweroff -f
    fi
    usleep 100000
done
# Guest uptimes (the kernel's clock) split the boot from the fio jobs.
echo "BENCH-DEV $DEV sectors=$(cat /sys/block/$DEV/size) cpus=$(nproc) uptime=$(cut -d' ' -f1 /proc/uptime)"
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
for t in write:1M:16 read:1M:16 randwrite:4k:32 randread:4k:32; do
    rw=${t%%:*}
    r=${t#*:}
    bs=${r%%:*}
    qd=${r#*:}
    t0=$(cut -d' ' -f1 /proc/uptime)
    if out=$(fio --name=$rw --filename=/dev/$DEV --direct=1 --ioengine=libaio --rw=$rw --bs=$bs \
        --iodepth=$qd --runtime=@SECS@ --time_based --ramp_time=1 --numjobs=1 \
        --output-format=terse --terse-version=3 2>&1); then
        # terse v3: 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS
        echo "BENCH-FIO $rw $(echo "$out" | grep '^3;' | cut -d';' -f7,8,48,49)"
        echo "BENCH-TIME $rw $t0 $(cut -d' ' -f1 /proc/uptime)"
    else
        echo "BENCH-FAIL fio $rw: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
    fi
done
echo "BENCH-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
INIT
sed -i "s/@SECS@/$BENCH_SECS/" "$d/init"
chmod 755 "$d/init"
pack_initramfs "$d" "$WORK/initrd-disk"
rm -rf "$d"

# The L1 driver: launches and times every run, in the order it decides (interleaved), and
# leaves the numbers in $WORK/results and each console in $WORK/console-*.
cat >"$WORK/l1.py" <<'PY'
import os, select, subprocess, sys, time

E = os.environ
T, OUT, NONCE = E["B_T"], E["B_OUT"], E["B_NONCE"]
RUNS, DISK_RUNS = int(E["B_RUNS"]), int(E["B_DISK_RUNS"])
DEVICES = E["B_DEVICES"].split()
ONLY = E["B_ONLY"]
CACHE = E["B_CACHE"]
LAUNCH_TIMEOUT = 300
results = open(os.path.join(OUT, "results"), "a", buffering=1)
env = dict(E, LD_LIBRARY_PATH=f"{T}/lib", QEMU_MODULE_DIR=f"{T}/qemu/usr/lib/x86_64-linux-gnu/qemu")

def log(msg):
    print(f"vmm-bench(L1) {time.strftime('%T')}: {msg}", file=sys.stderr, flush=True)

def common(initrd, append, extra):
    # Options both accept with the same meaning (vmm ignores -no-reboot/-accel/-cpu/-display,
    # which describe what it always does).
    return ["-m", E["B_MEM"], "-smp", E["B_SMP"], "-no-reboot", "-accel", "kvm", "-cpu", "host",
            "-display", "none", "-serial", "stdio", "-kernel", f"{T}/vmlinux",
            "-initrd", initrd, "-append", append] + extra

def argv(side, initrd, append, extra=()):
    if side == "vmm":
        return [f"{T}/vmm"] + common(initrd, append, list(extra))
    # QEMU's own defaults off (NIC, VGA, monitor, config files): its leanest machine for the job.
    return [f"{T}/qemu/usr/bin/qemu-system-x86_64", "-L", f"{T}/qemu/usr/share/qemu",
            "-nodefaults", "-no-user-config", "-monitor", "none"] + common(initrd, append, list(extra))

def launch(cmd, name, marker):
    """Runs cmd with its stdout on a pipe; returns (status, seconds to marker or None, seconds
    to exit, console bytes). Times are from just before the fork."""
    err = open(os.path.join(OUT, f"console-{name}.stderr"), "wb")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env)
    fd = p.stdout.fileno()
    buf = bytearray()
    t_mark = None
    ram = None
    deadline = t0 + LAUNCH_TIMEOUT
    timed_out = False
    while True:
        left = deadline - time.monotonic()
        r = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
        if not r:
            timed_out = True
            p.kill()
            break
        chunk = os.read(fd, 65536)
        now = time.monotonic()
        if not chunk:
            break
        buf += chunk
        if t_mark is None and marker in buf:
            t_mark = now - t0
        if ram is None and b"BENCH-DEV" in buf:
            ram = guest_ram(p.pid)
    rc = p.wait()
    t_exit = time.monotonic() - t0
    p.stdout.close()
    err.close()
    with open(os.path.join(OUT, f"console-{name}"), "wb") as f:
        f.write(buf)
    if timed_out:
        rc = 124
    if ram:
        log(f"{name}: guest RAM mapping (largest VMA) {ram}")
    return rc, t_mark, t_exit, bytes(buf)

def guest_ram(pid):
    """The VMM's largest mapping (its guest RAM): whether it starts 2 MiB-aligned and how much
    of it is backed by transparent huge pages. KVM can map guest memory with 2 MiB pages in
    the nested page tables only where guest-physical and host-virtual addresses agree modulo
    2 MiB; fewer such pages mean more nested TLB misses, which TCG makes expensive."""
    best = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            cur = None
            for line in f:
                w = line.split()
                if "-" in w[0] and len(w) >= 5 and ":" not in w[0]:
                    a, b = (int(x, 16) for x in w[0].split("-"))
                    cur = {"start": a, "size": b - a, "thp": 0}
                    if best is None or cur["size"] > best["size"]:
                        best = cur
                elif w[0] == "AnonHugePages:" and cur is not None:
                    cur["thp"] = int(w[1])
    except OSError as e:
        return f"unreadable ({e})"
    if best is None:
        return "none"
    return (f"start {best['start']:#x} (mod 2 MiB: {best['start'] % (2 << 20):#x}), "
            f"{best['size'] >> 20} MiB, AnonHugePages {best['thp'] >> 10} MiB")

def boot(side, run):
    name = f"boot-{side}-{run}"
    marker = f"BENCH-INIT-{NONCE}".encode()
    rc, t_init, t_exit, out = launch(
        argv(side, f"{T}/initrd-boot", "console=ttyS0 panic=-1 quiet loglevel=0"), name, marker)
    up = "n/a"
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("BENCH-UPTIME "):
            up = line.split()[1].strip()
    ok = rc == 0 and t_init is not None
    init_ms = f"{t_init * 1000:.0f}" if t_init is not None else "n/a"
    log(f"{name}: status {rc}, launch->/init {init_ms} ms, launch->exit {t_exit * 1000:.0f} ms, guest uptime at /init {up} s")
    if run > 0:
        results.write(f"boot {side} {run} ok={int(ok)} init_ms={init_ms} exit_ms={t_exit * 1000:.0f} uptime_s={up}\n")
    return ok

def disk_args(dev, img):
    if dev == "blk":
        return ["-drive", f"file={img},format=qcow2,if=virtio,cache={CACHE}"], "vda"
    return ["-drive", f"file={img},if=none,id=d0,format=qcow2,cache={CACHE}",
            "-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,drive=d0"], "sda"

def disk(dev, side, run):
    name = f"disk-{dev}-{side}-{run}"
    img = f"{T}/img/disk.qcow2"
    if os.path.exists(img):
        os.unlink(img)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"preallocation={E['B_PREALLOC']}", img, f"{E['B_IMG_MB']}M"], check=True)
    subprocess.run(["sync"], check=True)
    extra, gdev = disk_args(dev, img)
    rc, _, t_exit, out = launch(
        argv(side, f"{T}/initrd-disk", f"console=ttyS0 panic=-1 quiet bench.dev={gdev}", extra),
        name, b"BENCH-DONE")
    jobs = 0
    dev_s = done_s = "n/a"
    for line in out.decode(errors="replace").replace("\r", "").splitlines():
        w = line.split()
        if w and w[0] in ("BENCH-DEV", "BENCH-DONE"):
            for word in w:
                if word.startswith("uptime="):
                    if w[0] == "BENCH-DEV":
                        dev_s = word[7:]
                    else:
                        done_s = word[7:]
        if len(w) == 3 and w[0] == "BENCH-FIO":
            vals = w[2].split(";")
            if len(vals) == 4:
                results.write(f"fio {dev} {side} {run} {w[1]} {' '.join(vals)}\n")
                jobs += 1
        elif line.startswith(("BENCH-FAIL", "BENCH-DEV", "BENCH-INFO", "BENCH-TIME", "BENCH-STAGE")):
            log(f"{name}: {line}")
    ok = rc == 0 and jobs == 4
    results.write(f"disk {dev} {side} {run} ok={int(ok)} exit_ms={t_exit * 1000:.0f} dev_s={dev_s} done_s={done_s}\n")
    log(f"{name}: status {rc}, {jobs} fio jobs reported, {t_exit:.1f} s")
    if not ok:
        tail = out.decode(errors="replace").replace("\r", "").splitlines()[-15:]
        log(f"{name}: console tail:\n  " + "\n  ".join(tail))
        try:
            log(f"{name}: stderr: " + open(os.path.join(OUT, f"console-{name}.stderr")).read()[-800:])
        except OSError:
            pass
    return ok

def pairs(n):
    # Interleaved, alternating which side goes first.
    for run in range(1, n + 1):
        yield run, ("vmm", "qemu") if run % 2 else ("qemu", "vmm")

all_ok = True
if ONLY in ("", "boot"):
    for side in ("vmm", "qemu"):
        boot(side, 0)  # warm-up, untimed: first-touch costs of the binaries and libraries
    for run, order in pairs(RUNS):
        for side in order:
            all_ok &= boot(side, run)
if ONLY in ("", "disk"):
    for dev in DEVICES:
        for run, order in pairs(DISK_RUNS):
            for side in order:
                all_ok &= disk(dev, side, run)
sys.exit(0 if all_ok else 1)
PY

# The command L1 runs: copies what the VMMs run from into tmpfs, makes the images'
# filesystem, runs the driver.
cat >"$WORK/run.sh" <<RUN
#!/bin/bash
set -eu
T=/tmp/bench
mkdir -p \$T/lib \$T/img \$T/qemu/usr/bin \$T/qemu/usr/share \$T/qemu/usr/lib/x86_64-linux-gnu
cp "$KDIR/vmlinux" "$WORK/initrd-boot" "$WORK/initrd-disk" \$T/
cp "$VMM" \$T/vmm
cp "$QROOT/usr/bin/qemu-system-x86_64" \$T/qemu/usr/bin/
# QEMU finds its firmware (seabios's bios-256k.bin, the PVH option ROM) relative to its binary.
cp -r "$QROOT/usr/share/qemu" "$QROOT/usr/share/seabios" \$T/qemu/usr/share/
cp -r "$QROOT/usr/lib/x86_64-linux-gnu/qemu" \$T/qemu/usr/lib/x86_64-linux-gnu/
[ -d "$QROOT/usr/lib/ipxe" ] && mkdir -p \$T/qemu/usr/lib && cp -r "$QROOT/usr/lib/ipxe" \$T/qemu/usr/lib/
for b in \$T/vmm \$T/qemu/usr/bin/qemu-system-x86_64; do
    for lib in \$(ldd "\$b" | awk '/=> \\// {print \$3}'); do cp -L "\$lib" \$T/lib/; done
done
# L1's kernel is the guests' (Debian's 6.1): its modules are in the cache.
for m in loop ext4; do modprobe -d "$KDIR/root" -S "$KVER" \$m; done
truncate -s $((BENCH_IMG_MB + 512))M \$T/fs.img
# No lazy initialisation: ext4lazyinit would zero inode tables in the background during the
# first runs.
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 \$T/fs.img
LOOP=\$(losetup -f --show \$T/fs.img)
mount -o discard "\$LOOP" \$T/img
# Touch L1's memory for the images once: L1's RAM is allocated by the outer QEMU as it is first
# touched, which otherwise slows whichever disk run comes first (always vmm's). Deleting the
# file on a discard mount gives the pages back to L1's free lists, still touched.
dd if=/dev/zero of=\$T/img/warm bs=1M count=$BENCH_IMG_MB 2>/dev/null
rm \$T/img/warm
sync
: >"$WORK/setup-ok"
echo "vmm-bench(L1): images on ext4 on \$LOOP (tmpfs file), \$(nproc) L1 CPU(s), \$(awk '/MemTotal/ {print \$2}' /proc/meminfo) KiB" >&2
rc=0
B_T=\$T B_OUT="$WORK" B_NONCE=$NONCE B_RUNS=$BENCH_RUNS B_DISK_RUNS=$BENCH_DISK_RUNS \\
    B_DEVICES="$BENCH_DEVICES" B_ONLY="$BENCH_ONLY" B_MEM=$BENCH_MEM B_SMP=$BENCH_SMP \\
    B_IMG_MB=$BENCH_IMG_MB B_CACHE=$BENCH_CACHE B_PREALLOC=$BENCH_PREALLOC python3 "$WORK/l1.py" || rc=\$?
umount \$T/img || true
losetup -d "\$LOOP" || true
# Never 125: that status is the lab's own failure.
[ \$rc = 0 ] || exit 1
RUN
chmod +x "$WORK/run.sh"

log "kernel $KVER; boot pairs $BENCH_RUNS; disk pairs $BENCH_DISK_RUNS x {$BENCH_DEVICES}; fio $BENCH_SECS s a job; guest ${BENCH_MEM} MiB, $BENCH_SMP vCPU(s)"
rc=0
"$KVM_LAB_SCRIPT" run --share "$WORK" -- "$WORK/run.sh" || rc=$?
if [ "$rc" = $LAB_FAILURE ] || [ ! -e "$WORK/setup-ok" ]; then
    FAILED=1
    log "the lab failed (status $rc$([ -e "$WORK/setup-ok" ] || echo ', L1 setup incomplete'))"
    exit $LAB_FAILURE
fi
touch "$WORK/results"
sed 's/^/vmm-bench: run: /' "$WORK/results" >&2

# ------------------------------------------------------------------------------------------
# The table.

field() { # field KEY: the values of KEY=VALUE words on stdin
    awk -v k="$1" '{for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) print substr($i, length(k) + 2)}'
}
med() { # the median of the numbers on stdin, nothing when there are none
    local v
    v=$(grep -v '^n/a$' || true)
    [ -z "$v" ] || printf '%s\n' "$v" | median
}
boot_median() { # boot_median SIDE KEY
    awk -v s="$1" '$1 == "boot" && $2 == s && / ok=1 /' "$WORK/results" | field "$2" | med
}
disk_median() { # disk_median DEV SIDE KEY
    awk -v d="$1" -v s="$2" '$1 == "disk" && $2 == d && $3 == s && / ok=1 /' "$WORK/results" | field "$3" | med
}
# fio lines: fio DEV SIDE RUN JOB read-KiB/s read-IOPS write-KiB/s write-IOPS
fio_median() { # fio_median DEV SIDE JOB MB/s|IOPS
    awk -v d="$1" -v s="$2" -v j="$3" -v u="$4" '
        $1 == "fio" && $2 == d && $3 == s && $5 == j {
            w = (j ~ /write/)
            if (u == "MB/s") print (w ? $8 : $6) * 1.024 / 1000
            else print (w ? $9 : $7)
        }' "$WORK/results" | med
}
fio_count() { awk -v d="$1" -v s="$2" -v j="$3" '$1 == "fio" && $2 == d && $3 == s && $5 == j' "$WORK/results" | wc -l; }
show() { # show VALUE UNIT
    if [ -z "$1" ]; then echo n/a; elif [ "$2" = MB/s ]; then printf '%.1f MB/s' "$1"; elif [ "$2" = IOPS ] || [ "$2" = ms ]; then printf '%.0f %s' "$1" "$2"; else printf '%s %s' "$1" "$2"; fi
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a > 0 && b > 0) printf "%.2f", a / b; else print "n/a"}'; }
echo
echo "vmm vs QEMU 7.2 -accel kvm -cpu host, in one boot of the nested KVM lab (L1: QEMU TCG -cpu EPYC,"
echo "${KVM_LAB_SMP:-1} vCPU, kvm-amd); guest: Debian $KVER vmlinux (PVH), $BENCH_MEM MiB, $BENCH_SMP vCPU(s); $(date -u +%F)."
printf '%-22s %16s %16s %8s  %s\n' metric vmm qemu ratio "(runs)"
if [ "$BENCH_ONLY" != disk ]; then
    nv=$(grep -c '^boot vmm .* ok=1 ' "$WORK/results" || true)
    nq=$(grep -c '^boot qemu .* ok=1 ' "$WORK/results" || true)
    for m in init_ms:boot-to-init:ms exit_ms:boot-to-exit:ms uptime_s:guest-uptime-at-init:s; do
        key=${m%%:*}
        rest=${m#*:}
        v=$(boot_median vmm "$key")
        q=$(boot_median qemu "$key")
        printf '%-22s %16s %16s %8s  %s\n' "${rest%:*}" "$(show "$v" "${rest#*:}")" "$(show "$q" "${rest#*:}")" \
            "$(ratio "${q:-0}" "${v:-0}")" "(median of $nv/$nq; ratio qemu/vmm)"
    done
fi
if [ "$BENCH_ONLY" != boot ]; then
    for dev in $BENCH_DEVICES; do
        for m in write:seq-write-1M:MB/s read:seq-read-1M:MB/s randwrite:randwrite-4k:IOPS randread:randread-4k:IOPS; do
            job=${m%%:*}
            rest=${m#*:}
            label=${rest%%:*}
            unit=${rest#*:}
            v=$(fio_median "$dev" vmm "$job" "$unit")
            q=$(fio_median "$dev" qemu "$job" "$unit")
            printf '%-22s %16s %16s %8s  %s\n' "$dev $label" "$(show "$v" "$unit")" "$(show "$q" "$unit")" \
                "$(ratio "${v:-0}" "${q:-0}")" "(median of $(fio_count "$dev" vmm "$job")/$(fio_count "$dev" qemu "$job"); ratio vmm/qemu)"
        done
        # The disk boots' guest uptime when the disk appeared (the big initramfs unpacked,
        # modules loaded) and after the four fio jobs: where the rest of a disk run's time goes.
        for m in dev_s:"$dev disk-ready" done_s:"$dev fio-done"; do
            v=$(disk_median "$dev" vmm "${m%%:*}")
            q=$(disk_median "$dev" qemu "${m%%:*}")
            printf '%-22s %16s %16s %8s  %s\n' "${m#*:}" "$(show "$v" s)" "$(show "$q" s)" \
                "$(ratio "${q:-0}" "${v:-0}")" "(guest uptime; ratio qemu/vmm)"
        done
    done
fi

if [ "$rc" != 0 ] || grep -q ' ok=0 ' "$WORK/results"; then
    FAILED=1
    log "not every run completed (L1 command status $rc); consoles kept in $WORK"
    exit 1
fi
