"""Swap throughput: SwapSpace write / read / pipelined step GB/s per record size, vs raw AsyncIO.

    python scripts/bench_swap.py [--dir /tmp] [--sizes-mib 4,32,128,512] [--total-mib 2048]
                                 [--buffer-count 4] [--aligns 4096] [--reps 3] [--fio]

Each configuration swaps ``--total-mib`` of optimizer-like records (three fp32
fields: master, exp_avg, exp_avg_sq) of one size:

- ``write``: acquire + write of every record, then flush (no fill: the swap alone);
- ``read``: prefetch every record ``buffer_count - 1`` ahead and get it (verified);
- ``step``: the optimizer pattern, get i (prefetched), prefetch i+1, write i: every
  byte is read and written once; GB/s counts both directions;
- ``raw aio``: the same bytes as one file per record through one AsyncIO handle,
  queued all at once then waited (no checksum, no pool): the ceiling.

Rounds interleave the configurations in a shuffled order (the disk is virtual and
shared); GB/s are given at the median and the best round. ``--fio`` adds fio's
sequential write and read of the same total (libaio, O_DIRECT, bs 1M, qd 32).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from accel_zero import ops
from accel_zero.offload import SwapSpace, validate_nvme_path

MiB = 1 << 20


def make_space(root: Path, size: int, count: int, buffers: int, align: int) -> SwapSpace:
    nvme = validate_nvme_path(root, key="--dir")
    space = SwapSpace(
        nvme, run_id=f"bench{random.getrandbits(32):08x}", rank=0, buffer_count=buffers, align=align
    )
    numel = size // 12  # three fp32 fields
    for i in range(count):
        space.register(f"opt/{i}", [(n, numel, torch.float32) for n in ("m", "a", "v")])
    return space


def run_write(space: SwapSpace, count: int, gen: int, fill: bool = False) -> None:
    for i in range(count):
        buf = space.acquire(f"opt/{i}")
        if fill:  # only when laying out: the timed writes measure the swap, not a fill
            for t in buf.fields.values():
                t.fill_(float(i))
        space.write(buf, generation=gen)
    space.flush()


def run_read(space: SwapSpace, count: int, gen: int, ahead: int) -> None:
    for i in range(min(ahead, count)):
        space.prefetch(f"opt/{i}", generation=gen)
    for i in range(count):
        buf = space.get(f"opt/{i}", generation=gen)
        if i + ahead < count:
            space.release(buf)
            space.prefetch(f"opt/{i + ahead}", generation=gen)
        else:
            space.release(buf)


def run_step(space: SwapSpace, count: int, gen: int) -> None:
    space.prefetch("opt/0", generation=gen)
    for i in range(count):
        buf = space.get(f"opt/{i}", generation=gen)
        if i + 1 < count:
            space.prefetch(f"opt/{i + 1}", generation=gen)
        space.write(buf, generation=gen + 1)
    space.flush()


def run_raw(aio: ops.AsyncIO, bufs: list[torch.Tensor], folder: Path, write: bool) -> None:
    for i, b in enumerate(bufs):
        (aio.write if write else aio.read)(b, folder / f"raw{i}.bin")
    aio.wait()


def fio_gbps(path: Path, size: int, write: bool) -> float:
    cmd = [
        "fio", "--name=az", f"--filename={path}", f"--rw={'write' if write else 'read'}",
        "--bs=1M", f"--size={size}", "--ioengine=libaio", "--iodepth=32", "--direct=1",
        "--output-format=json", "--thread",
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["write" if write else "read"]["bw_bytes"]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--sizes-mib", default="4,32,128,512")
    parser.add_argument("--total-mib", type=int, default=2048)
    parser.add_argument("--buffer-count", type=int, default=4)
    parser.add_argument("--aligns", default="4096", help="field alignments to compare (bytes)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fio", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    aligns = [int(a) for a in args.aligns.split(",")]
    root = Path(tempfile.mkdtemp(prefix="accel_zero_bench_swap_", dir=args.dir))
    total = args.total_mib * MiB

    runners: dict[str, Callable[[], dict[str, float]]] = {}
    spaces: list[SwapSpace] = []
    raw_mem = torch.empty(0, dtype=torch.uint8)  # one allocation shared by the raw runs
    for size in sizes:
        count = max(4, total // size)
        for align in aligns:
            space = make_space(root, size, count, args.buffer_count, align)
            spaces.append(space)
            run_write(space, count, 0, fill=True)  # lay the files out: later writes are overwrites
            gen = [0]

            def one(space: SwapSpace = space, count: int = count, gen: list[int] = gen) -> dict:
                out = {}
                for phase in ("write", "read", "step"):
                    s0, t0 = space.stats, time.perf_counter()
                    if phase == "write":
                        gen[0] += 1
                        run_write(space, count, gen[0])
                    elif phase == "read":
                        run_read(space, count, gen[0], max(1, space.buffer_count - 1))
                    else:
                        run_step(space, count, gen[0])
                        gen[0] += 1
                    wall, s1 = time.perf_counter() - t0, space.stats
                    moved = s1.bytes_read - s0.bytes_read + s1.bytes_written - s0.bytes_written
                    out[phase] = moved / wall / 1e9
                    out[phase + "_stall"] = s1.stall_seconds - s0.stall_seconds
                    out[phase + "_cks"] = s1.checksum_seconds - s0.checksum_seconds
                return out

            runners[f"swap {size // MiB:>4} MiB x{count:<4} align {align // 1024}K"] = one
        raw_dir = root / f"raw{size}"
        raw_dir.mkdir()
        if raw_mem.numel() < size * count:
            raw_mem = ops.aligned_empty(size * count, torch.uint8, pin=False).fill_(1)
        raw_bufs = [raw_mem[i * size : (i + 1) * size] for i in range(count)]
        aio = ops.AsyncIO(1 << 20, 32, 1)
        run_raw(aio, raw_bufs, raw_dir, True)

        def raw(aio: ops.AsyncIO = aio, bufs: list = raw_bufs, d: Path = raw_dir) -> dict:
            t0 = time.perf_counter()
            run_raw(aio, bufs, d, True)
            t1 = time.perf_counter()
            run_raw(aio, bufs, d, False)
            t2 = time.perf_counter()
            n = sum(b.numel() for b in bufs)
            return {"write": n / (t1 - t0) / 1e9, "read": n / (t2 - t1) / 1e9}

        runners[f"raw aio {size // MiB:>4} MiB x{count}"] = raw

    results: dict[str, list[dict[str, float]]] = {k: [] for k in runners}
    t_start = time.perf_counter()
    for rnd in range(args.reps):
        order = list(runners)
        random.Random(rnd).shuffle(order)
        for name in order:
            results[name].append(runners[name]())
    fio = {}
    if args.fio and shutil.which("fio"):
        fio = {w: fio_gbps(root / "fio.bin", total, w) for w in (True, False)}
    for space in spaces:
        space.close()
    shutil.rmtree(root)

    print(
        f"# {args.total_mib} MiB per configuration, {args.reps} interleaved rounds, dir "
        f"{args.dir}, buffer_count {args.buffer_count}, aio bs=1M qd=32 t=1 per buffer, "
        f"{time.perf_counter() - t_start:.0f} s"
    )
    header = (
        f"{'configuration':<34} {'write':>6} {'best':>6} {'read':>6} {'best':>6} "
        f"{'step':>6} {'best':>6}  {'stall s':>7} {'cks s':>6}"
    )
    print(header + "\n" + "-" * len(header))
    for name, rows in results.items():
        cells = []
        for phase in ("write", "read", "step"):
            vals = [r[phase] for r in rows if phase in r]
            cells.append(
                f"{statistics.median(vals):>6.2f} {max(vals):>6.2f}" if vals else f"{'':>13}"
            )
        stall = statistics.median(
            [sum(r.get(p + "_stall", 0.0) for p in ("write", "read", "step")) for r in rows]
        )
        cks = statistics.median(
            [sum(r.get(p + "_cks", 0.0) for p in ("write", "read", "step")) for r in rows]
        )
        print(f"{name:<34} {' '.join(cells)}  {stall:>7.2f} {cks:>6.2f}")
    print("(GB/s; step = read + write bytes over the wall time; stall/cks: seconds per round)")
    if fio:
        print(f"fio bs=1M qd=32: write {fio[True]:.2f} GB/s, read {fio[False]:.2f} GB/s")


if __name__ == "__main__":
    warnings.simplefilter("default")
    main()
