#!/usr/bin/env python3
"""Times img and qemu-img side by side on the same images, in one run.

Each case runs both tools alternately (A B A B ...) after a warm-up and reports the median
wall time of each and the median of the per-pair ratios img/qemu-img (below 1: img is faster).
Output files are deleted between runs so every run does the same work.

Environment: IMG_BIN (default target/release/img), BENCH_SIZE_MIB (source size, default 4096),
BENCH_RUNS (pairs per case, default 3), BENCH_CHECK_GIB (size of the check image, default 32),
BENCH_ONLY (a substring: run only the cases whose label contains it).
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
ONLY = os.environ.get("BENCH_ONLY", "")


def make_source(path, size):
    """A raw disk: half random data, a quarter compressible text, a quarter zeros, mixed in
    1 MiB pieces so every region of the image has all three."""
    rnd = os.urandom(4 << 20)
    text = b"".join(b"line %08d: the quick brown fox jumps over the lazy dog\n" % i for i in range(20000))
    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // mib):
            f.seek(i * mib)
            kind = i % 4
            if kind in (0, 1):
                off = (i * 7919 * 4096) % (len(rnd) - mib)
                f.write(rnd[off : off + mib])
            elif kind == 2:
                f.write(text[(i * 4096) % (len(text) - mib) :][:mib])
            # kind 3: zeros, left as a hole


def timed(cmd, cleanup):
    for p in cleanup:
        if os.path.exists(p):
            os.unlink(p)
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode()}")
    return dt


def case(name, img_cmd, qemu_cmd, cleanup=()):
    if ONLY and ONLY not in name:
        return
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
        f"| {name:58s} | {statistics.median(a):7.3f} | {statistics.median(b):7.3f} "
        f"| {statistics.median(ratios):5.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |",
        flush=True,
    )


def main():
    img = os.environ.get("IMG_BIN") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "img"
    )
    size = int(os.environ.get("BENCH_SIZE_MIB", "4096")) << 20
    check_gib = int(os.environ.get("BENCH_CHECK_GIB", "32"))
    work = tempfile.mkdtemp(prefix="img-bench-", dir=os.environ.get("BENCH_DIR"))
    try:
        src = os.path.join(work, "src.raw")
        make_source(src, size)
        base = os.path.join(work, "base.qcow2")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", src, base], check=True)
        comp = os.path.join(work, "comp.qcow2")
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", src, comp], check=True)
        out = os.path.join(work, "out")
        print(f"source: {size >> 20} MiB raw (half random, a quarter text, a quarter zeros); "
              f"{RUNS} pairs per case; seconds are medians\n")
        print(f"| {'case':58s} | {'img s':>7s} | {'qemu s':>7s} | img/qemu-img (min-max) |")
        print(f"|{'-' * 60}|{'-' * 9}|{'-' * 9}|{'-' * 24}|")

        # img bench / qemu-img bench: 4 KiB requests scattered over the image (a step of 997
        # clusters visits them in a pseudo-random order), reads and in-place writes.
        for rw in ("read", "write"):
            for depth in (1, 32):
                for aio in ("threads", "io_uring"):
                    for cache in ("writeback", "none"):
                        count = 20000 if depth == 1 else 100000
                        args = ["bench", "-c", str(count), "-d", str(depth), "-s", "4096",
                                "-S", str(4096 * 997), "-t", cache, "-i", aio, "-f", "qcow2"]
                        target = base
                        if rw == "write":
                            # Writes go to a copy, so the compare rows below still compare
                            # equal images.
                            args += ["-w", "--pattern=7"]
                            target = os.path.join(work, "written.qcow2")
                            if not os.path.exists(target):
                                shutil.copyfile(base, target)
                        label = f"bench {rw} 4k depth {depth}, aio={aio}, cache={cache}"
                        case(label, [img] + args + [target], ["qemu-img"] + args + [target])
        # The L2 cache covering the whole working set (the default here) or 1/8 of it.
        clusters = size // 65536
        for label, l2 in (("L2 cache covers the image", clusters * 8),
                          ("L2 cache covers 1/8 of the image", clusters)):
            spec = f"driver=qcow2,file.filename={base},l2-cache-size={l2}"
            args = ["bench", "-c", "100000", "-d", "32", "-s", "4096", "-S", str(4096 * 997),
                    "--image-opts"]
            case(f"bench read 4k depth 32, {label}", [img] + args + [spec],
                 ["qemu-img"] + args + [spec])

        for label, args in [
            ("convert raw -> qcow2", ["-f", "raw", "-O", "qcow2", src, out]),
            ("convert qcow2 -> raw", ["-f", "qcow2", "-O", "raw", base, out]),
            ("convert raw -> qcow2 -m 8 -W", ["-m", "8", "-W", "-O", "qcow2", src, out]),
            ("convert -c raw -> qcow2 (zlib)", ["-c", "-O", "qcow2", src, out]),
            ("convert -c raw -> qcow2 (zstd)", ["-c", "-O", "qcow2", "-o", "compression_type=zstd", src, out]),
            ("convert compressed qcow2 -> raw", ["-O", "raw", comp, out]),
        ]:
            case(label, [img, "convert"] + args, ["qemu-img", "convert"] + args, [out])
        for label, args in [
            ("compare raw vs qcow2", ["compare", src, base]),
            ("compare raw vs compressed qcow2", ["compare", src, comp]),
        ]:
            case(label, [img] + args, ["qemu-img"] + args)
        os.unlink(src)
        os.unlink(comp)

        # check of a fully allocated image: every cluster allocated through metadata
        # preallocation, so the walk covers every L2 entry.
        big = os.path.join(work, "big.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
                        big, f"{check_gib}G"], check=True)
        case(f"check of a fully allocated {check_gib} GiB image", [img, "check", big],
             ["qemu-img", "check", big])
        case(f"info of a fully allocated {check_gib} GiB image", [img, "info", big],
             ["qemu-img", "info", big])
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
