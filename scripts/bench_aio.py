"""Write then read 1 GiB with O_DIRECT: accel_zero AsyncIO vs fio vs a plain pread/pwrite loop.

    python scripts/bench_aio.py [--dir /tmp] [--size-mib 1024] [--reps 3] [--full]

One table. Every configuration writes then reads the same file once per round,
and rounds interleave all configurations in a shuffled order (the disk is
virtual and shared, so a slow minute or spent burst credits hit everyone
alike). GB/s are given at the median and at the best (minimum-time) round;
``vs fio`` compares medians with fio's best configuration of the same run.
The page cache is out of the way: everything uses O_DIRECT (fio
``--direct=1``). fio (Debian package) is installed with apt if missing.

Default grid (a couple of minutes): block 128 KiB / 1 MiB / 8 MiB x queue depth
1 / 8 / 32 / 64 at 1 thread, plus 2 and 4 threads at the usual sweet spots.
``--full`` runs block x depth x threads 1-4 completely.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from accel_zero import ops

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def ensure_fio() -> str | None:
    fio = shutil.which("fio")
    if fio is not None:
        return fio
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("# fio missing: apt-get install -y fio")
        subprocess.run(["apt-get", "install", "-y", "fio"], check=False, capture_output=True)
    return shutil.which("fio")


def fio_run(fio: str, path: Path, write: bool, size: int, bs: int, depth: int, jobs: int) -> float:
    """Seconds fio needed to move ``size`` bytes (bandwidth from its JSON report)."""
    per_job = size // jobs
    cmd = [
        fio, "--name=az", f"--filename={path}", f"--rw={'write' if write else 'read'}",
        f"--bs={bs}", f"--size={per_job}", f"--offset_increment={per_job}",
        f"--numjobs={jobs}", "--ioengine=libaio", f"--iodepth={depth}", "--direct=1",
        "--group_reporting", "--output-format=json", "--thread",
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    bw = job["write" if write else "read"]["bw_bytes"]
    return size / bw


def plain_loop(path: Path, write: bool, src: torch.Tensor, bs: int) -> float:
    """Single-thread O_DIRECT pwrite/pread loop over an aligned buffer."""
    size = src.numel()
    flags = (os.O_WRONLY | os.O_CREAT) if write else os.O_RDONLY
    fd = os.open(path, flags | os.O_DIRECT, 0o600)
    base = src.data_ptr()
    import ctypes

    views = [
        memoryview((ctypes.c_char * bs).from_address(base + off)).cast("B")
        for off in range(0, size, bs)
    ]
    t0 = time.perf_counter()
    try:
        for i, view in enumerate(views):
            n = os.pwrite(fd, view, i * bs) if write else os.preadv(fd, [view], i * bs)
            assert n == bs, n
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def aio_run(handle: ops.AsyncIO, path: Path, write: bool, buf: torch.Tensor) -> float:
    t0 = time.perf_counter()
    if write:
        handle.write(buf, path)
    else:
        handle.read(buf, path)
    handle.wait()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    size = args.size_mib * MiB

    fio = ensure_fio()
    workdir = Path(tempfile.mkdtemp(prefix="accel_zero_bench_aio_", dir=args.dir))
    path = workdir / "data.bin"
    buf = ops.aligned_empty(size, torch.uint8, pin=False)
    buf.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))
    probe = ops.AsyncIO()
    if probe.backend != "libaio":
        print("# WARNING: the aio kernel is not available; measuring the Python fallback")

    blocks = [128 * KiB, 1 * MiB, 8 * MiB]
    depths = [1, 8, 32, 64]
    if args.full:
        grid = list(itertools.product(blocks, depths, [1, 2, 4]))
    else:
        grid = [(b, d, 1) for b in blocks for d in depths]
        grid += [(1 * MiB, 32, 2), (1 * MiB, 32, 4), (8 * MiB, 8, 2), (8 * MiB, 8, 4)]
    runners: dict[str, Callable[[bool], float]] = {}
    for bs, depth, threads in grid:
        handle = ops.AsyncIO(block_size=bs, queue_depth=depth, threads=threads)
        name = f"accel_zero bs={bs // KiB}K qd={depth} t={threads}"
        runners[name] = lambda w, h=handle: aio_run(h, path, w, buf)
    runners["pwrite/pread loop bs=8M t=1"] = lambda w: plain_loop(path, w, buf, 8 * MiB)
    if fio is not None:
        for bs, depth, jobs in [(128 * KiB, 32, 1), (1 * MiB, 32, 1), (8 * MiB, 8, 2)]:
            name = f"fio libaio bs={bs // KiB}K qd={depth} jobs={jobs}"
            runners[name] = lambda w, b=bs, d=depth, j=jobs: fio_run(fio, path, w, size, b, d, j)

    # Lay the file out once so writes are overwrites for everyone.
    aio_run(probe, path, True, buf)
    times: dict[tuple[str, bool], list[float]] = {}
    t_start = time.perf_counter()
    for rnd in range(args.reps):
        # A fresh order each round: a virtual disk's burst credits or a neighbour's
        # job must not always land on the same engine.
        order = list(runners)
        random.Random(rnd).shuffle(order)
        for name in order:
            for write in (True, False):
                times.setdefault((name, write), []).append(runners[name](write))
    # fio writes its own bytes, so check correctness on a fresh write of ours.
    aio_run(probe, path, True, buf)
    check = torch.empty_like(buf)
    aio_run(probe, path, False, check)
    assert torch.equal(check, buf), "read-back mismatch"
    shutil.rmtree(workdir)

    def gbs(t: float) -> float:
        return size / t / 1e9

    med = {k: statistics.median(v) for k, v in times.items()}
    best_fio = {
        w: min((med[(n, w)] for n in runners if n.startswith("fio")), default=None)
        for w in (True, False)
    }
    print(
        f"# {size // MiB} MiB per run, O_DIRECT, {args.reps} interleaved rounds, dir {args.dir}, "
        f"aio backend {probe.backend}, {time.perf_counter() - t_start:.0f} s"
    )
    header = (
        f"{'engine / configuration':<40} {'write med':>9} {'best':>6} {'vs fio':>7}   "
        f"{'read med':>8} {'best':>6} {'vs fio':>7}"
    )
    print(header + "\n" + "-" * len(header))
    for name in runners:
        cells = []
        for write in (True, False):
            ts = times[(name, write)]
            ref = best_fio[write]
            ratio = f"{ref / med[(name, write)]:.2f}x" if ref else "n/a"
            cells.append(f"{gbs(med[(name, write)]):>8.2f} {gbs(min(ts)):>6.2f} {ratio:>7}")
        print(f"{name:<40} {cells[0]}   {cells[1]}")
    print("(GB/s; 'vs fio' = fio's best median / this median, same run)")
    for write in (True, False):
        ours = [n for n in runners if n.startswith("accel_zero")]
        top = min(ours, key=lambda n, w=write: med[(n, w)])
        ref = best_fio[write]
        verdict = f"{ref / med[(top, write)]:.2f}x fio's best" if ref else "fio n/a"
        kind = "write" if write else "read"
        print(f"best accel_zero {kind}: {top} at {gbs(med[(top, write)]):.2f} GB/s = {verdict}")


if __name__ == "__main__":
    sys.exit(main())
