# shellcheck shell=bash
# Shared by the lab scripts (scripts/guest-lab.sh, scripts/kvm-lab.sh): the cache, Debian's
# kernel (vmlinux for QEMU's PVH entry, its modules with depmod data), busybox-static, and
# initramfs building. Source it after setting LAB_NAME (the prefix of log lines); it sets
# LAB (the cache dir, IMG_LAB_DIR or /var/cache/img-lab), GUEST and BUSYBOX, and
# prepare_kernel sets KVER and KDIR.

LAB=${IMG_LAB_DIR:-/var/cache/img-lab}
export IMG_LAB_DIR=$LAB
GUEST="$LAB/guest"
BUSYBOX="$GUEST/busybox"

log() { printf '%s: %s\n' "${LAB_NAME:-lab}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# lab_lock / lab_unlock: the cache is shared by concurrent runs of every lab script; whoever
# prepares holds this lock (file descriptor 9) so nothing is fetched or built twice.
lab_lock() {
    mkdir -p "$GUEST"
    exec 9>"$GUEST/.lock"
    if ! flock -n 9; then
        log "waiting for another lab script to finish preparing the cache ($GUEST/.lock)"
        flock 9
    fi
}
lab_unlock() {
    flock -u 9
    exec 9>&-
}

# Debian's kernel: the image package that linux-image-amd64 names, unpacked, with its modules'
# dependency data (depmod), and vmlinux pulled out of the bzImage for QEMU's fast PVH boot.
prepare_kernel() {
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq >/dev/null
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || die "apt-cache depends linux-image-amd64 names no kernel package"
    KVER=${pkg#linux-image-}
    KDIR="$GUEST/$KVER"
    if [ ! -f "$KDIR/vmlinux" ]; then
        log "preparing kernel $KVER"
        local tmp="$GUEST/tmp.$$"
        rm -rf "$GUEST"/tmp.*
        mkdir -p "$tmp"
        (cd "$tmp" && apt-get download -qq "$pkg" 2>/dev/null) || die "apt-get download $pkg failed"
        dpkg -x "$tmp"/*.deb "$tmp/root"
        rm -f "$tmp"/*.deb
        depmod -b "$tmp/root" "$KVER"
        python3 - "$tmp/root/boot/vmlinuz-$KVER" "$tmp/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
# The bzImage carries the kernel as one xz stream; decompressing it gives the ELF vmlinux, whose
# PVH note lets QEMU start it directly, skipping the BIOS and the in-guest decompressor.
at = data.find(b"\xfd7zXZ\x00")
if at < 0:
    sys.exit("no xz stream in " + sys.argv[1])
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
if elf[:4] != b"\x7fELF":
    sys.exit("the xz stream is not an ELF kernel")
open(sys.argv[2], "wb").write(elf)
PY
        rm -rf "$KDIR"
        mv "$tmp" "$KDIR"
    fi
}

prepare_busybox() {
    if [ ! -x "$BUSYBOX" ]; then
        log "preparing busybox-static"
        local tmp="$GUEST/bb.$$"
        rm -rf "$GUEST"/bb.*
        mkdir -p "$tmp"
        (cd "$tmp" && apt-get download -qq busybox-static 2>/dev/null) ||
            die "apt-get download busybox-static failed"
        dpkg -x "$tmp"/*.deb "$tmp/root"
        cp "$tmp/root/bin/busybox" "$BUSYBOX.new"
        mv "$BUSYBOX.new" "$BUSYBOX"
        rm -rf "$tmp"
    fi
}

# initramfs_skeleton ROOT: an empty initramfs tree with busybox in it.
initramfs_skeleton() {
    local root=$1
    rm -rf "$root"
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,mnt,lib/modules}
    cp "$BUSYBOX" "$root/bin/busybox"
}

# add_modules ROOT MODULE...: copies the .ko files of the modules and everything they depend on
# into ROOT/lib/modules as NN-name.ko, in the order modprobe would load them (dependencies
# first, each once), and lists them in ROOT/modules.order for /init to insmod one by one.
add_modules() {
    local root=$1 line ko base n m
    shift
    touch "$root/modules.order"
    n=$(wc -l <"$root/modules.order")
    while read -r line; do
        case "$line" in
        insmod\ *)
            ko=$(echo "$line" | awk '{print $2}')
            base=$(basename "$ko")
            grep -q -- "^[0-9]*-$base\$" "$root/modules.order" && continue
            n=$((n + 1))
            cp "$ko" "$root/lib/modules/$(printf '%02d-%s' "$n" "$base")"
            printf '%02d-%s\n' "$n" "$base" >>"$root/modules.order"
            ;;
        esac
    done < <(for m in "$@"; do
        # One module a call: modprobe takes any further words as module parameters.
        modprobe -d "$KDIR/root" -S "$KVER" --show-depends "$m"
    done)
}

# pack_initramfs ROOT OUT: the tree as a newc cpio archive (uncompressed: the kernel unpacks
# it faster than it would decompress it under TCG).
pack_initramfs() {
    (cd "$1" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null) >"$2"
}

# median: the median of the numbers on stdin, one a line.
median() { sort -g | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# add_host_binary ROOT BIN [NAME]: copies the host's program BIN (a path or a command name) into
# ROOT/bin as NAME (default its own name), with every shared library ldd names for it at the
# path it has on the host, so that it runs in a guest whose /init sets
# LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu (fio for guest benchmarks).
add_host_binary() {
    local root=$1 bin lib
    bin=$(command -v "$2") || die "no $2 on the host"
    cp "$bin" "$root/bin/${3:-$(basename "$bin")}"
    for lib in $(ldd "$bin" | awk '/=> \// {print $3} /^\t\// {print $1}'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
