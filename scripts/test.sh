#!/bin/sh
# Runs every test: unit tests, and the integration tests that use qemu-img as the oracle.
set -eu
cd "$(dirname "$0")/.."

# The client libraries the workspace links (libiscsi, librbd/librados) and libclang for bindgen.
scripts/build-deps.sh

# qemu-img, qemu-io (the oracle) come from qemu-utils; install it only when missing, since a
# newer backport may already be there.
if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-utils
fi

# Btrfs tools for the nocow test, which makes its own Btrfs filesystem on a loop device.
if ! command -v mkfs.btrfs >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends btrfs-progs
fi

# FUSE (fusermount3, /dev/fuse use), mkfs.ext4/debugfs and sfdisk for the img mount and
# img partitions tests.
if ! command -v fusermount3 >/dev/null 2>&1 || ! command -v debugfs >/dev/null 2>&1 \
    || ! command -v sfdisk >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends fuse3 e2fsprogs fdisk
fi

# nbdinfo (libnbd-bin), a second NBD client for the nbd tests.
if ! command -v nbdinfo >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libnbd-bin
fi

# QEMU's system emulator (unpacked, never installed) for the tests that need a real QEMU, such
# as snapshots holding VM state saved by `savevm`.
scripts/qemu-system.sh --prepare
# The guest lab (tests/tests/guest_lab.rs): e2fsprogs, kmod, fio, a Debian kernel and busybox.
scripts/guest-lab.sh --prepare
# The KVM lab (tests/tests/kvm_lab.rs): the guest lab's kernel and busybox, and QEMU.
scripts/kvm-lab.sh --prepare

# Network storage (tests/tests/netstore.rs, blockdev's iscsi and rbd tests, guest and vmm labs):
# tgt and Ceph's daemons, installed here once (the lab scripts would install them too, but
# tests start labs in parallel and apt takes one install at a time); qemu-img 7.2 with its iscsi
# and rbd modules is the oracle there. The tests fail rather than skip when a server cannot run.
if ! command -v tgtd >/dev/null 2>&1 || ! command -v iscsi-ls >/dev/null 2>&1 \
    || ! command -v ceph-mon >/dev/null 2>&1 || ! command -v ceph-osd >/dev/null 2>&1 \
    || ! command -v rbd >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tgt libiscsi-bin \
        ceph-mon ceph-osd ceph-common
fi
scripts/qemu-img72.sh --prepare >/dev/null
export IMG_REQUIRE_ISCSI=1 IMG_REQUIRE_CEPH=1

# Release builds: the interop and property tests move hundreds of MiB through the engine.
cargo build --release --workspace --all-targets
export IMG_BIN="$PWD/target/release/img"
cargo test --release --workspace
