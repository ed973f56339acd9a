#!/bin/bash
# Boots Debian's kernel on our own VMM (target/release/vmm) against a real /dev/kvm, inside the
# nested KVM lab (scripts/kvm-lab.sh: an L1 Linux under QEMU TCG with kvm-amd), and checks:
#   poweroff  vmlinux through PVH, /init prints a nonce, `poweroff -f` ends vmm with status 0
#   smp2      the same with -smp 2: the guest sees 2 CPUs
#   bzimage   the compressed bzImage through the 64-bit boot protocol
#   reboot    `reboot -f` (ACPI reset register) with -no-reboot ends vmm with status 0
#   reset     without -no-reboot, a reset boots the guest again on a new machine: the first
#             boot marks a raw virtio-blk disk and reboots, the second finds the mark and
#             powers off (both boots on one console)
#   qemu      the poweroff case under QEMU 7.2 -accel kvm -cpu host, as the baseline
#   disk      a qcow2 disk (qemu-img create raw, mkfs.ext4, qemu-img convert -O qcow2) as
#             -drive if=virtio: /init loads virtio_mmio, virtio_blk and ext4 from the initramfs,
#             mounts /dev/vda, writes a file with the nonce and a 4 MiB random file, syncs,
#             reads them back, unmounts and powers off; on the host `qemu-img check` must be
#             clean and debugfs (on a raw conversion) must read both files back identical
#   iscsi     the disk case with the qcow2 image on an iSCSI LUN: tgtd (scripts/iscsi-lab.sh)
#             runs inside L1 on its loopback, serving a file that holds the qcow2 image, and
#             vmm opens -drive file=iscsi://127.0.0.1:PORT/IQN/1,format=qcow2; the host checks
#             the LUN's file as the disk case checks its image
#   qmp       a qcow2 virtio-blk disk (/dev/vda) and, on a virtio-scsi controller served by an
#             -object iothread, a qcow2 scsi-hd (/dev/sda) and a scsi-cd (/dev/sr0); the guest
#             writes and reads files on both disks and digests the CD; a QMP client
#             (scripts/qmp-lab-driver.py) checks query-block and query-status, changes the CD's
#             medium (DEVICE_TRAY_MOVED events; the guest reads the new medium), stops the
#             guest (its heartbeat on the console stops) and continues it, then presses the
#             power button (system_powerdown): the guest's watcher powers off and vmm exits 0.
#             The host then checks both images with qemu-img check and reads the files back
# Each case's wall time inside L1 is printed (one L1 boot, so the times compare). Exit 0 only if every case passed; 125 when the
# lab itself failed.
#
#   scripts/vmm-lab.sh          all cases
#   CASES="disk poweroff"       only these cases
#   KEEP=1                      keep the work dir (consoles) even on success
#   IMG_LAB_DIR                 cache dir (default /var/cache/img-lab)
#   KVM_LAB_SCRIPT              the nested lab (default scripts/kvm-lab.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD
LAB=${IMG_LAB_DIR:-/var/cache/img-lab}
log() { printf 'vmm-lab: %s\n' "$*" >&2; }
KVM_LAB_SCRIPT=${KVM_LAB_SCRIPT:-$TOP/scripts/kvm-lab.sh}
[ -x "$KVM_LAB_SCRIPT" ] || { log "needs $KVM_LAB_SCRIPT (the nested KVM lab)"; exit 125; }

"$TOP/scripts/guest-lab.sh" --prepare >&2 || { log "guest-lab.sh --prepare failed"; exit 125; }
KDIR=$(ls -d "$LAB"/guest/*/ | while read -r d; do [ -f "$d/vmlinux" ] && echo "${d%/}"; done | tail -1)
KVER=${KDIR##*/}
BZ="$KDIR/root/boot/vmlinuz-$KVER"
[ -f "$KDIR/vmlinux" ] && [ -f "$BZ" ] || { log "no kernel under $LAB/guest"; exit 125; }
BUSYBOX="$LAB/guest/busybox"
CASES=${CASES:-poweroff smp2 bzimage reboot reset qemu disk iscsi qmp}
want() { case " $CASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# add_modules (module lists with their dependencies, in load order) comes from lab-common.sh.
LAB_NAME=vmm-lab
# shellcheck source=scripts/lab-common.sh
. "$TOP/scripts/lab-common.sh"

cargo build --release -p vmm >&2
VMM="$TOP/target/release/vmm"

WORK=$(mktemp -d /var/tmp/vmm-lab.XXXXXX)
cleanup() { if [ "${KEEP:-}" = 1 ] || [ "${FAILED:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
NONCE=$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')

# initrd ACTION: busybox and an /init that reports the CPU count with the nonce, then ACTION.
initrd() {
    local action=$1 d="$WORK/rd-$1"
    mkdir -p "$d/bin" "$d/proc"
    cp "$BUSYBOX" "$d/bin/busybox"
    cat > "$d/init" <<INIT
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "VMM-LAB-$NONCE cpus=\$(/bin/busybox grep -c ^processor /proc/cpuinfo)"
/bin/busybox $action -f
INIT
    chmod +x "$d/init"
    pack_initramfs "$d" "$WORK/initrd-$action.cpio"
}
initrd poweroff
initrd reboot

# The random file the disk cases write and read back.
head -c 4M /dev/urandom > "$WORK/random.bin"
# modules_initrd DIR MODULE...: an initramfs tree with busybox, MODULEs (and what they depend
# on) and the random file, whose /init starts by mounting proc, sys and dev and loading the
# modules; each case appends the rest of its /init.
modules_initrd() {
    local d=$1
    shift
    initramfs_skeleton "$d"
    add_modules "$d" "$@"
    cp "$WORK/random.bin" "$d/random.bin"
    cat > "$d/init" <<'INIT'
#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules.order); do $B insmod /lib/modules/$m || $B echo "insmod $m failed"; done
INIT
}

# The reset case: a raw disk that remembers the first boot.
if want reset; then
    qemu-img create -q -f raw "$WORK/reset.raw" 1M
    d="$WORK/rd-reset"
    modules_initrd "$d" virtio_mmio virtio_blk
    cat >> "$d/init" <<INIT
i=0; while [ ! -b /dev/vda ] && [ \$i -lt 50 ]; do \$B sleep 0.1; i=\$((i + 1)); done
\$B echo "VMM-LAB-$NONCE cpus=\$(\$B grep -c ^processor /proc/cpuinfo)"
if [ "\$(\$B dd if=/dev/vda bs=6 count=1 2>/dev/null)" = BOOTED ]; then
    \$B echo "VMM-LAB-RESET-$NONCE second boot"
    \$B poweroff -f
fi
\$B echo -n BOOTED | \$B dd of=/dev/vda conv=fsync 2>/dev/null
\$B echo "VMM-LAB-RESET-$NONCE first boot"
\$B reboot -f
INIT
    chmod +x "$d/init"
    pack_initramfs "$d" "$WORK/initrd-reset.cpio"
fi

# The disk case: an ext4 made on a raw image, converted to qcow2 (what the guest mounts).
if want disk || want iscsi; then
    qemu-img create -q -f raw "$WORK/disk.raw" 64M
    mkfs.ext4 -q -F "$WORK/disk.raw"
    qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"
    rm "$WORK/disk.raw"
    # The iscsi case's LUN is a file holding the same qcow2 image (with room after it); the
    # lab script creates missing LUN files only, so tgtd serves this one.
    mkdir -p "$WORK/iscsi-lab"
    cp "$WORK/disk.qcow2" "$WORK/iscsi-lab/lun1.img"
    truncate -s 128M "$WORK/iscsi-lab/lun1.img"
    d="$WORK/rd-disk"
    modules_initrd "$d" virtio_mmio virtio_blk ext4
    cat >> "$d/init" <<INIT
i=0; while [ ! -b /dev/vda ] && [ \$i -lt 50 ]; do \$B sleep 0.1; i=\$((i + 1)); done
if \$B mount -t ext4 /dev/vda /mnt; then
    \$B echo "hello-$NONCE" > /mnt/hello.txt
    \$B mkdir /mnt/dir
    \$B cp /random.bin /mnt/dir/random.bin
    \$B sync
    \$B echo 3 > /proc/sys/vm/drop_caches
    [ "\$(\$B cat /mnt/hello.txt)" = "hello-$NONCE" ] && \
        [ "\$(\$B md5sum < /mnt/dir/random.bin)" = "\$(\$B md5sum < /random.bin)" ] && \
        \$B echo "VMM-LAB-DISK-$NONCE files read back"
    \$B umount /mnt && \$B echo "VMM-LAB-DISK-$NONCE unmounted"
fi
\$B echo "VMM-LAB-$NONCE cpus=\$(\$B grep -c ^processor /proc/cpuinfo)"
\$B poweroff -f
INIT
    chmod +x "$d/init"
    pack_initramfs "$d" "$WORK/initrd-disk.cpio"
fi

# The qmp case: two ext4 disks (virtio-blk and scsi-hd) and two CD media of random bytes.
if want qmp; then
    for disk in blk scsi; do
        qemu-img create -q -f raw "$WORK/$disk.raw" 64M
        mkfs.ext4 -q -F "$WORK/$disk.raw"
        qemu-img convert -f raw -O qcow2 "$WORK/$disk.raw" "$WORK/$disk.qcow2"
        rm "$WORK/$disk.raw"
    done
    head -c 1M /dev/urandom > "$WORK/cd-a.raw"
    head -c 2M /dev/urandom > "$WORK/cd-b.raw"
    CD_A=$(md5sum < "$WORK/cd-a.raw" | cut -d' ' -f1)
    CD_B=$(md5sum < "$WORK/cd-b.raw" | cut -d' ' -f1)
    d="$WORK/rd-qmp"
    modules_initrd "$d" virtio_mmio virtio_blk virtio_scsi sd_mod sr_mod ext4 button evdev
    cat >> "$d/init" <<INIT
wait_dev() { i=0; while [ ! -b \$1 ] && [ \$i -lt 100 ]; do \$B sleep 0.1; i=\$((i + 1)); done; }
say() { \$B echo "VMM-LAB-QMP-$NONCE \$*"; }
\$B echo "VMM-LAB-$NONCE cpus=\$(\$B grep -c ^processor /proc/cpuinfo)"
# disk DEV NAME: mounts DEV, writes a file with the nonce and the random file, syncs, drops the
# caches, reads both back and unmounts.
disk() {
    wait_dev \$1
    \$B mount -t ext4 \$1 /mnt || return 1
    \$B echo "\$2-$NONCE" > /mnt/hello.txt
    \$B cp /random.bin /mnt/random.bin
    \$B sync
    \$B echo 3 > /proc/sys/vm/drop_caches
    [ "\$(\$B cat /mnt/hello.txt)" = "\$2-$NONCE" ] || return 1
    [ "\$(\$B md5sum < /mnt/random.bin)" = "\$(\$B md5sum < /random.bin)" ] || return 1
    \$B umount /mnt
}
disk /dev/vda blk && say "blk ok"
disk /dev/sda scsi && say "scsi ok"
wait_dev /dev/sr0
say "cd \$(\$B md5sum < /dev/sr0 | \$B cut -d' ' -f1)"
# The power button's input device.
for e in /sys/class/input/event*; do
    [ "\$(\$B cat \$e/device/name 2>/dev/null)" = "Power Button" ] && PWR=/dev/input/\${e##*/}
done
say "power button \${PWR:-missing}"
say ready
# The host changes the medium: the first read after it fails (UNIT ATTENTION), then the new
# medium reads back.
i=0
while [ \$i -lt 150 ]; do
    d=\$(\$B md5sum < /dev/sr0 2>/dev/null | \$B cut -d' ' -f1)
    [ "\$d" = "$CD_B" ] && say "cd changed \$d" && break
    \$B sleep 0.2; i=\$((i + 1))
done
(n=0; while :; do say "heartbeat \$n"; n=\$((n + 1)); \$B sleep 0.2; done) &
# A press of the power button ends the guest, as acpid would.
[ -n "\$PWR" ] && \$B head -c 1 \$PWR > /dev/null && say "power button pressed"
\$B poweroff -f
INIT
    chmod +x "$d/init"
    pack_initramfs "$d" "$WORK/initrd-qmp.cpio"
fi

cat > "$WORK/run.sh" <<RUN
#!/bin/sh
# case NAME VMM-ARGS...: runs vmm, records its status and wall time.
run_case() {
    name=\$1; shift
    case " $CASES " in *" \$name "*) ;; *) return 0 ;; esac
    start=\$(date +%s%N)
    timeout 300 "\$VMM" -m 256 -append 'console=ttyS0 panic=-1' -serial "file:$WORK/console-\$name" "\$@"
    rc=\$?
    end=\$(date +%s%N)
    echo "\$name rc=\$rc ms=\$(( (end - start) / 1000000 ))" >> "$WORK/results"
}
VMM="$VMM"
run_case poweroff -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-poweroff.cpio"
run_case smp2 -smp 2 -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-poweroff.cpio"
run_case bzimage -kernel "$BZ" -initrd "$WORK/initrd-poweroff.cpio"
run_case reboot -no-reboot -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-reboot.cpio"
run_case reset -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-reset.cpio" -drive "file=$WORK/reset.raw,format=raw,if=virtio"
run_case disk -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-disk.cpio" -drive "file=$WORK/disk.qcow2,format=qcow2,if=virtio"
if case " $CASES " in *" iscsi "*) true ;; *) false ;; esac; then
    # L1 has its loopback down; tgtd listens on it. (The chroot starts with no PATH.)
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    ip link set lo up
    if url=\$(ISCSI_LAB_DIR="$WORK/iscsi-lab" "$TOP/scripts/iscsi-lab.sh" start --size 128M 2>>"$WORK/iscsi-lab.log"); then
        run_case iscsi -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-disk.cpio" -drive "file=\$url,format=qcow2,if=virtio"
        ISCSI_LAB_DIR="$WORK/iscsi-lab" "$TOP/scripts/iscsi-lab.sh" stop 2>>"$WORK/iscsi-lab.log"
    else
        echo "iscsi rc=lab ms=0" >> "$WORK/results"
    fi
fi
if case " $CASES " in *" qmp "*) true ;; *) false ;; esac; then
    start=\$(date +%s%N)
    timeout 300 "\$VMM" -m 256 -append 'console=ttyS0 panic=-1' -serial "file:$WORK/console-qmp" \
        -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-qmp.cpio" \
        -qmp "unix:/run/vmm-lab-qmp.sock,server=on,wait=off" \
        -drive "file=$WORK/blk.qcow2,format=qcow2,if=virtio,cache=none,l2-cache-size=1M" \
        -object iothread,id=io0 -device virtio-scsi-pci,id=scsi0,iothread=io0 \
        -drive "file=$WORK/scsi.qcow2,format=qcow2,if=none,id=disk1,discard=unmap" \
        -device scsi-hd,drive=disk1,bus=scsi0.0,id=hd1 \
        -drive "file=$WORK/cd-a.raw,format=raw,if=none,id=cd0,media=cdrom" \
        -device scsi-cd,drive=cd0,id=cd &
    vmm_pid=\$!
    /usr/bin/python3 "$TOP/scripts/qmp-lab-driver.py" /run/vmm-lab-qmp.sock "$WORK/console-qmp" \
        "VMM-LAB-QMP-$NONCE" "$WORK/cd-b.raw" "${CD_B:-}" > "$WORK/qmp-driver.log" 2>&1
    drc=\$?
    echo "qmp-driver rc=\$drc" >> "$WORK/results"
    # A driver that gave up leaves a guest waiting for its power button.
    [ \$drc = 0 ] || kill \$vmm_pid
    wait \$vmm_pid
    rc=\$?
    end=\$(date +%s%N)
    echo "qmp rc=\$rc ms=\$(( (end - start) / 1000000 ))" >> "$WORK/results"
fi
VMM="$TOP/scripts/qemu-system.sh"  # same options: -m, -append, -serial file:
run_case qemu -accel kvm -cpu host -display none -monitor none -no-reboot -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-poweroff.cpio"
RUN
chmod +x "$WORK/run.sh"

rc=0
"$KVM_LAB_SCRIPT" run --share "$WORK" -- "$WORK/run.sh" || rc=$?
if [ "$rc" != 0 ]; then
    FAILED=1
    log "the lab failed (status $rc)"
    exit 125
fi

fails=0
check() { # check CASE CPUS FINAL-LINE
    local name=$1 cpus=$2 final=$3 line
    want "$name" || return 0
    line=$(grep "^$name " "$WORK/results" || true)
    if [[ "$line" != *" rc=0 "* ]]; then
        log "FAIL $name: ${line:-did not run}"
    # The serial console ends lines with CR LF.
    elif ! tr -d '\r' < "$WORK/console-$name" | grep -q "^VMM-LAB-$NONCE cpus=$cpus\$"; then
        log "FAIL $name: /init's marker with cpus=$cpus is not on the console"
    elif ! grep -q "$final" "$WORK/console-$name"; then
        log "FAIL $name: '$final' is not on the console"
    else
        log "ok   $name (${line##* })"
        return 0
    fi
    tail -n 15 "$WORK/console-$name" >&2 2>/dev/null || true
    fails=$((fails + 1))
}
check poweroff 1 "reboot: Power down"
check smp2 2 "reboot: Power down"
check bzimage 1 "reboot: Power down"
check reboot 1 "reboot: Restarting system"
# check_reset: both boots on the one console, in order.
check_reset() {
    want reset || return 0
    check reset 1 "VMM-LAB-RESET-$NONCE second boot" || return 0
    if [ "$(grep -o "VMM-LAB-RESET-$NONCE [a-z]* boot" "$WORK/console-reset" | tr '\n' ,)" != \
        "VMM-LAB-RESET-$NONCE first boot,VMM-LAB-RESET-$NONCE second boot," ]; then
        log "FAIL reset: the console does not show a first boot, then a second"
        fails=$((fails + 1))
    fi
}
check_reset
check qemu 1 "reboot: Power down"
# check_disk CASE IMAGE: the guest's verdict, then the image as the host sees it.
check_disk() {
    local name=$1 image=$2
    want "$name" || return 0
    check "$name" 1 "VMM-LAB-DISK-$NONCE unmounted" || return 0
    if ! grep -q "VMM-LAB-DISK-$NONCE files read back" "$WORK/console-$name"; then
        log "FAIL $name: the guest did not read its files back"
    elif ! qemu-img check -f qcow2 "$image" >&2; then
        log "FAIL $name: qemu-img check"
    elif ! qemu-img convert -f qcow2 -O raw "$image" "$WORK/back.raw"; then
        log "FAIL $name: qemu-img convert"
    elif [ "$(debugfs -R 'cat /hello.txt' "$WORK/back.raw" 2>/dev/null)" != "hello-$NONCE" ]; then
        log "FAIL $name: debugfs does not read /hello.txt back"
    elif ! debugfs -R 'cat /dir/random.bin' "$WORK/back.raw" 2>/dev/null | cmp -s - "$WORK/random.bin"; then
        log "FAIL $name: debugfs does not read /dir/random.bin back identical"
    else
        log "ok   $name image: qemu-img check clean, debugfs reads both files back"
        return 0
    fi
    fails=$((fails + 1))
}
check_disk disk "$WORK/disk.qcow2"
# The LUN's file: the qcow2 image the guest wrote through vmm, libiscsi and tgtd.
check_disk iscsi "$WORK/iscsi-lab/lun1.img"
# check_qmp: the guest's and the QMP driver's verdicts, then both images as the host sees them.
check_qmp() {
    want qmp || return 0
    local c="$WORK/console-qmp" m="VMM-LAB-QMP-$NONCE" disk
    check qmp 1 "$m power button pressed" || { cat "$WORK/qmp-driver.log" >&2; return 0; }
    if ! grep -q "^qmp-driver rc=0" "$WORK/results"; then
        log "FAIL qmp: the QMP driver failed:"; cat "$WORK/qmp-driver.log" >&2
    elif ! grep -q "$m blk ok" "$c" || ! grep -q "$m scsi ok" "$c"; then
        log "FAIL qmp: the guest did not read its files back from both disks"
    elif ! grep -q "$m cd $CD_A" "$c"; then
        log "FAIL qmp: the guest's digest of the first CD medium is wrong"
    elif ! grep -q "$m cd changed $CD_B" "$c"; then
        log "FAIL qmp: the guest did not read the new CD medium"
    else
        for disk in blk scsi; do
            if ! qemu-img check "$WORK/$disk.qcow2" >&2; then
                log "FAIL qmp: qemu-img check $disk.qcow2"; fails=$((fails + 1)); return 0
            fi
            qemu-img convert -f qcow2 -O raw "$WORK/$disk.qcow2" "$WORK/$disk-back.raw"
            if [ "$(debugfs -R 'cat /hello.txt' "$WORK/$disk-back.raw" 2>/dev/null)" != "$disk-$NONCE" ] ||
                ! debugfs -R 'cat /random.bin' "$WORK/$disk-back.raw" 2>/dev/null | cmp -s - "$WORK/random.bin"; then
                log "FAIL qmp: debugfs does not read the files back from $disk.qcow2"; fails=$((fails + 1)); return 0
            fi
        done
        sed 's/^/    /' "$WORK/qmp-driver.log" >&2
        log "ok   qmp: both disks and the CD as the guest and the host see them, QMP"
        return 0
    fi
    fails=$((fails + 1))
}
check_qmp
if [ "$fails" != 0 ]; then
    FAILED=1
    exit 1
fi
log "all cases passed"
