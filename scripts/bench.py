#!/usr/bin/env python3
"""Times img and qemu-img side by side on the same images, in one run.

Each case runs both tools alternately (A B A B ...) after a warm-up and reports the median
wall time of each and the median of the per-pair ratios img/qemu-img (below 1: img is faster).
Output files are deleted between runs so every run does the same work.

Environment: IMG_BIN (default target/release/img), BENCH_SIZE_MIB (source size, default 4096),
BENCH_RUNS (pairs per case, default 3), BENCH_CHECK_GIB (size of the check image, default 32),
BENCH_ONLY (substrings separated by '|': run only the cases whose label contains one).
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


def timed(cmd, cleanup, prepare=None):
    for p in cleanup:
        if os.path.exists(p):
            os.unlink(p)
    if prepare:
        prepare()
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode()}")
    return dt


def case(name, img_cmd, qemu_cmd, cleanup=(), prepare=None):
    """`prepare` runs before every run, untimed (e.g. a fresh copy of an image to modify)."""
    if ONLY and not any(part in name for part in ONLY.split("|")):
        return
    timed(img_cmd, cleanup, prepare)
    timed(qemu_cmd, cleanup, prepare)
    a, b, ratios = [], [], []
    for _ in range(RUNS):
        ta = timed(img_cmd, cleanup, prepare)
        tb = timed(qemu_cmd, cleanup, prepare)
        a.append(ta)
        b.append(tb)
        ratios.append(ta / tb)
    print(
        f"| {name:58s} | {statistics.median(a):7.3f} | {statistics.median(b):7.3f} "
        f"| {statistics.median(ratios):5.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |",
        flush=True,
    )


def img_can(img, args):
    """Whether img runs `args` successfully (features still being written are skipped)."""
    return subprocess.run([img] + args, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def qemu_io(image, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [image], check=True, stdout=subprocess.DEVNULL)


def chain_cases(img, work, base, out):
    """Reads through deep backing chains, and safe rebase, on chains made by qemu-img."""
    virtual = int(subprocess.run(["qemu-img", "info", "--output=json", base], check=True,
                                 capture_output=True, text=True).stdout.split('"virtual-size": ')[1].split(",")[0])
    mib = 1 << 20
    # 100 overlays over the full image, each holding 64 KiB somewhere.
    prev = base
    for i in range(1, 101):
        layer = os.path.join(work, f"deep{i}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", os.path.basename(prev),
                        "-F", "qcow2", layer, str(virtual)], check=True)
        qemu_io(layer, f"write -P {i % 250} {(i * 37 * mib) % virtual} 64k")
        prev = layer
    case("convert a 100-deep chain (over the source) -> raw",
         [img, "convert", "-O", "raw", prev, out], ["qemu-img", "convert", "-O", "raw", prev, out], [out])
    case("map --output=json of the 100-deep chain", [img, "map", "--output=json", prev],
         ["qemu-img", "map", "--output=json", prev])
    # 750 small overlays: the cost of walking the chain for every request. (qemu-img 10.0.2
    # dies with a segmentation fault converting a 1000-deep chain: it recurses through the
    # chain on a coroutine stack; img reads such a chain, see tests/tests/deep_chain.rs.)
    small = os.path.join(work, "s0.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", small, "64M"], check=True)
    qemu_io(small, "write -P 1 0 64M")
    prev = small
    for i in range(1, 751):
        layer = os.path.join(work, f"s{i}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", os.path.basename(prev),
                        "-F", "qcow2", layer, "64M"], check=True)
        prev = layer
    qemu_io(prev, "write -P 9 1M 64k")
    case("convert a 750-deep chain of 64 MiB images -> raw",
         [img, "convert", "-O", "raw", prev, out], ["qemu-img", "convert", "-O", "raw", prev, out], [out])

    # Safe rebase: an overlay with scattered writes moved from one base to another that
    # differs in every 8th MiB.
    base2 = os.path.join(work, "base2.qcow2")
    shutil.copyfile(base, base2)
    qemu_io(base2, *[f"write -P 5 {o} 64k" for o in range(0, virtual, 8 * mib)])
    top0 = os.path.join(work, "top0.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(base), "-F", "qcow2",
                    top0], check=True)
    qemu_io(top0, *[f"write -P 6 {o} 4k" for o in range(3 * mib, virtual, 16 * mib)])
    top = os.path.join(work, "top.qcow2")

    def fresh_top():
        shutil.copyfile(top0, top)

    for label, args in [("rebase (safe) onto a base that differs in 1/8 of its MiBs",
                         ["rebase", "-b", os.path.basename(base2), "-F", "qcow2", top]),
                        ("rebase -b \"\" (flatten onto nothing)", ["rebase", "-b", "", top])]:
        case(label, [img] + args, ["qemu-img"] + args, (), fresh_top)


def nbd_cases(img, work, images, out):
    """NBD read throughput: one client (qemu-img convert, nbdcopy) reading every export from
    `img nbd` and from qemu-nbd, both serving the same image read-only at the same time."""
    labels = [f"nbd {fmt} export" for fmt, _ in images]
    if ONLY and not any(part in label or label.startswith(part) or "nbd" in part
                        for part in ONLY.split("|") for label in labels):
        return
    if not img_can(img, ["nbd", "--help"]):
        print(f"| {'nbd':58s} | (img cannot do this yet: skipped) |", flush=True)
        return
    for fmt, path in images:
        servers = {}
        try:
            for name, prog in (("img", [img, "nbd"]), ("qemu", ["qemu-nbd"])):
                sock = os.path.join(work, f"{name}-{fmt}.sock")
                pid = os.path.join(work, f"{name}-{fmt}.pid")
                subprocess.run(prog + ["--fork", "--pid-file", pid, "-t", "-r", "-e", "0",
                                       "-k", sock, "-f", fmt, path], check=True)
                with open(pid) as f:
                    servers[name] = (int(f.read().strip()), f"nbd+unix:///?socket={sock}")
            urls = {name: url for name, (_, url) in servers.items()}
            case(f"nbd {fmt} export: qemu-img convert -O raw (img nbd vs qemu-nbd)",
                 ["qemu-img", "convert", "-f", "raw", "-O", "raw", urls["img"], out],
                 ["qemu-img", "convert", "-f", "raw", "-O", "raw", urls["qemu"], out], [out])
            if shutil.which("nbdcopy"):
                # One connection each: qemu-nbd does not advertise multi-conn.
                case(f"nbd {fmt} export: nbdcopy -C 1 to null: (img nbd vs qemu-nbd)",
                     ["nbdcopy", "-C", "1", urls["img"], "null:"],
                     ["nbdcopy", "-C", "1", urls["qemu"], "null:"])
            # img's own client against qemu-nbd, against qemu-img's client: 2 MiB reads, 8 in
            # flight, over the whole export (the client alone), then a whole convert.
            count = str(max(1, os.path.getsize(path) // (2 << 20)))
            bench = ["bench", "-c", count, "-d", "8", "-s", "2M", "-S", "2M", "-f", "raw"]
            case(f"nbd {fmt} export (qemu-nbd): img vs qemu-img bench 2M reads",
                 [img] + bench + [urls["qemu"]], ["qemu-img"] + bench + [urls["qemu"]])
            case(f"nbd {fmt} export (qemu-nbd): img vs qemu-img convert -O raw",
                 [img, "convert", "-f", "raw", "-O", "raw", urls["qemu"], out],
                 ["qemu-img", "convert", "-f", "raw", "-O", "raw", urls["qemu"], out], [out])
        finally:
            for pid, _ in servers.values():
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


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
        # VMDK both ways: the default monolithicSparse, a flat one, and streamOptimized
        # (compressed grains, written by convert).
        vmdk = os.path.join(work, "base.vmdk")
        subprocess.run(["qemu-img", "convert", "-O", "vmdk", src, vmdk], check=True)
        tiny = os.path.join(work, "tiny.raw")
        probe_out = os.path.join(work, "probe")
        with open(tiny, "wb") as f:
            f.truncate(1 << 20)
        for label, args in [
            ("convert raw -> vmdk (monolithicSparse)", ["-O", "vmdk", src, out]),
            ("convert raw -> vmdk (monolithicFlat)",
             ["-O", "vmdk", "-o", "subformat=monolithicFlat", src, out]),
            ("convert raw -> vmdk (streamOptimized)",
             ["-O", "vmdk", "-o", "subformat=streamOptimized", src, out]),
            ("convert vmdk (monolithicSparse) -> raw", ["-O", "raw", vmdk, out]),
        ]:
            if not img_can(img, ["convert"] + args[:-2] + [tiny, probe_out]):
                print(f"| {label:58s} | (img cannot do this yet: skipped) |", flush=True)
                continue
            case(label, [img, "convert"] + args, ["qemu-img", "convert"] + args,
                 [out, out + "-flat.vmdk"])
        os.unlink(vmdk)
        for label, args in [
            ("compare raw vs qcow2", ["compare", src, base]),
            ("compare raw vs compressed qcow2", ["compare", src, comp]),
        ]:
            case(label, [img] + args, ["qemu-img"] + args)
        chain_cases(img, work, base, out)
        nbd_cases(img, work, [("qcow2", base), ("raw", src)], out)
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

        # Internal snapshots of the fully allocated image: every cluster gains (and loses) a
        # reference. The snapshot is removed (untimed) before each create, and made before
        # each delete.
        def no_snapshot():
            subprocess.run(["qemu-img", "snapshot", "-d", "bench", big],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def one_snapshot():
            no_snapshot()
            subprocess.run(["qemu-img", "snapshot", "-c", "bench", big], check=True)

        case(f"snapshot -c on a fully allocated {check_gib} GiB image",
             [img, "snapshot", "-c", "bench", big], ["qemu-img", "snapshot", "-c", "bench", big],
             (), no_snapshot)
        case(f"snapshot -d on a fully allocated {check_gib} GiB image",
             [img, "snapshot", "-d", "bench", big], ["qemu-img", "snapshot", "-d", "bench", big],
             (), one_snapshot)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
