#!/usr/bin/env python3
"""Times img and qemu-img side by side on the same images, in one run.

Each case runs both tools alternately (A B A B ...) after a warm-up, and reports the median
wall time of each and the median of the per-pair ratios img/qemu-img (below 1 means img is
faster). Output files are deleted between runs so every run does the same work.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(os.environ.get("BENCH_RUNS", "5"))


def make_source(path, size, seed):
    """A sparse raw disk with a mix of random, text-like and zero-filled data extents."""
    rnd = os.urandom(1 << 20)
    text = (b"the quick brown fox jumps over the lazy dog %d\n" % seed) * 30000
    with open(path, "wb") as f:
        f.truncate(size)
        step = 3 << 20
        for i in range(size // step):
            f.seek(i * step)
            kind = i % 3
            if kind == 0:
                f.write(rnd)
            elif kind == 1:
                f.write(text[: 1 << 20])
            else:
                f.write(rnd[: 256 << 10] + bytes(512 << 10) + rnd[: 256 << 10])


def timed(cmd, cleanup):
    for p in cleanup:
        if os.path.exists(p):
            os.unlink(p)
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if r.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed: {r.stderr.decode()}")
    return dt


def case(name, img_cmd, qemu_cmd, cleanup=()):
    timed(img_cmd, cleanup)
    timed(qemu_cmd, cleanup)
    a, b, ratios = [], [], []
    for _ in range(RUNS):
        ta = timed(img_cmd, cleanup)
        tb = timed(qemu_cmd, cleanup)
        a.append(ta)
        b.append(tb)
        ratios.append(ta / tb)
    print(
        f"{name:44s} img {statistics.median(a):7.3f}s  qemu-img {statistics.median(b):7.3f}s"
        f"  img/qemu-img {statistics.median(ratios):5.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})"
    )


def main():
    img = os.environ.get("IMG_BIN") or os.path.join(
        os.path.dirname(__file__), "..", "target", "release", "img"
    )
    size = int(os.environ.get("BENCH_SIZE_MIB", "2048")) << 20
    work = tempfile.mkdtemp(prefix="img-bench-")
    try:
        src = os.path.join(work, "src.raw")
        make_source(src, size, 1)
        base = os.path.join(work, "base.qcow2")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", src, base], check=True)
        comp = os.path.join(work, "comp.qcow2")
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", src, comp], check=True)
        out = os.path.join(work, "out")
        print(f"source: {size >> 20} MiB raw, about a third allocated; {RUNS} pairs per case")
        for label, args in [
            ("convert raw -> qcow2", ["-f", "raw", "-O", "qcow2", src, out]),
            ("convert qcow2 -> raw", ["-f", "qcow2", "-O", "raw", base, out]),
            ("convert qcow2 -> qcow2 (cluster_size=4k)", ["-O", "qcow2", "-o", "cluster_size=4096", base, out]),
            ("convert -c raw -> qcow2 (zlib)", ["-c", "-O", "qcow2", src, out]),
            ("convert -c raw -> qcow2 (zstd)", ["-c", "-O", "qcow2", "-o", "compression_type=zstd", src, out]),
            ("convert compressed qcow2 -> raw", ["-O", "raw", comp, out]),
        ]:
            case(label, [img, "convert"] + args, ["qemu-img", "convert"] + args, [out])
        for label, args in [
            ("compare raw vs qcow2", ["compare", src, base]),
            ("compare raw vs compressed qcow2", ["compare", src, comp]),
            ("check qcow2", ["check", base]),
            ("info qcow2", ["info", base]),
        ]:
            case(label, [img] + args, ["qemu-img"] + args)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
