#!/bin/bash
# Boots Debian's kernel on our own VMM (target/release/vmm) against a real /dev/kvm, inside the
# nested KVM lab (scripts/kvm-lab.sh: an L1 Linux under QEMU TCG with kvm-amd), and checks:
#   poweroff  vmlinux through PVH, /init prints a nonce, `poweroff -f` ends vmm with status 0
#   smp2      the same with -smp 2: the guest sees 2 CPUs
#   bzimage   the compressed bzImage through the 64-bit boot protocol
#   reboot    `reboot -f` (ACPI reset register) ends vmm with status 0
#   qemu      the poweroff case under QEMU 7.2 -accel kvm -cpu host, as the baseline
#   disk      a qcow2 disk (qemu-img create raw, mkfs.ext4, qemu-img convert -O qcow2) as
#             -drive if=virtio: /init loads virtio_mmio, virtio_blk and ext4 from the initramfs,
#             mounts /dev/vda, writes a file with the nonce and a 4 MiB random file, syncs,
#             reads them back, unmounts and powers off; on the host `qemu-img check` must be
#             clean and debugfs (on a raw conversion) must read both files back identical
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
CASES=${CASES:-poweroff smp2 bzimage reboot qemu disk}
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
    (cd "$d" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) > "$WORK/initrd-$action.gz"
}
initrd poweroff
initrd reboot

# The disk case: an ext4 made on a raw image, converted to qcow2 (what the guest mounts).
if want disk; then
    qemu-img create -q -f raw "$WORK/disk.raw" 64M
    mkfs.ext4 -q -F "$WORK/disk.raw"
    qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"
    rm "$WORK/disk.raw"
    head -c 4M /dev/urandom > "$WORK/random.bin"
    d="$WORK/rd-disk"
    initramfs_skeleton "$d"
    add_modules "$d" virtio_mmio virtio_blk ext4
    cp "$WORK/random.bin" "$d/random.bin"
    cat > "$d/init" <<INIT
#!/bin/busybox sh
B=/bin/busybox
\$B mount -t proc proc /proc
\$B mount -t sysfs sys /sys
\$B mount -t devtmpfs dev /dev
for m in \$(\$B cat /modules.order); do \$B insmod /lib/modules/\$m || \$B echo "insmod \$m failed"; done
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
    (cd "$d" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) > "$WORK/initrd-disk.gz"
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
run_case poweroff -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-poweroff.gz"
run_case smp2 -smp 2 -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-poweroff.gz"
run_case bzimage -kernel "$BZ" -initrd "$WORK/initrd-poweroff.gz"
run_case reboot -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-reboot.gz"
run_case disk -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-disk.gz" -drive "file=$WORK/disk.qcow2,format=qcow2,if=virtio"
VMM="$TOP/scripts/qemu-system.sh"  # same options: -m, -append, -serial file:
run_case qemu -accel kvm -cpu host -display none -monitor none -no-reboot -kernel "$KDIR/vmlinux" -initrd "$WORK/initrd-poweroff.gz"
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
check qemu 1 "reboot: Power down"
# check_disk: the guest's verdict, then the image as the host sees it.
check_disk() {
    want disk || return 0
    check disk 1 "VMM-LAB-DISK-$NONCE unmounted" || return 0
    if ! grep -q "VMM-LAB-DISK-$NONCE files read back" "$WORK/console-disk"; then
        log "FAIL disk: the guest did not read its files back"
    elif ! qemu-img check "$WORK/disk.qcow2" >&2; then
        log "FAIL disk: qemu-img check"
    elif ! qemu-img convert -f qcow2 -O raw "$WORK/disk.qcow2" "$WORK/back.raw"; then
        log "FAIL disk: qemu-img convert"
    elif [ "$(debugfs -R 'cat /hello.txt' "$WORK/back.raw" 2>/dev/null)" != "hello-$NONCE" ]; then
        log "FAIL disk: debugfs does not read /hello.txt back"
    elif ! debugfs -R 'cat /dir/random.bin' "$WORK/back.raw" 2>/dev/null | cmp -s - "$WORK/random.bin"; then
        log "FAIL disk: debugfs does not read /dir/random.bin back identical"
    else
        log "ok   disk image: qemu-img check clean, debugfs reads both files back"
        return 0
    fi
    fails=$((fails + 1))
}
check_disk
if [ "$fails" != 0 ]; then
    FAILED=1
    exit 1
fi
log "all cases passed"
