"""Host memory, bytes read and time to load a checkpoint on N CPU ranks, four ways.

    python scripts/bench_load.py                       # SmolLM2-135M fp32, N=1 and N=2
    python scripts/bench_load.py --model DIR --ranks 1 2 4

Ways (each in fresh processes, one per rank, gloo on 127.0.0.1):

- ``plain``: ``from_pretrained(path)`` on every rank (what DDP / FSDP wrapping start from).
- ``hf-rank0``: the same with Accelerate's FSDP "cpu_ram_efficient_loading" flags set
  (``ACCELERATE_USE_FSDP=1 FSDP_CPU_RAM_EFFICIENT_LOADING=1``), transformers' rank-0 style.
  In transformers 5.23 these flags only change how buffers are handled: every rank still
  reads the full checkpoint (the row shows it).
- ``hf-fsdp2``: transformers' own sharded loading,
  ``from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=N))`` (FSDP2 over
  DTensor, shard-on-read).
- ``lazy``: ``with accel_zero.lazy_init(): from_pretrained(path)``.

Per rank: ``base`` = VmRSS after imports and process-group set-up, ``peak`` = VmHWM after
the load and after touching every local parameter once (transformers leaves loaded tensors
as views of the mmap'd file, paged in on first use; the high-water mark counts those file
pages, ``anon/file`` splits the final RSS), ``req`` = bytes
materialised from the checkpoint through safetensors (counted by wrapping ``safe_open``),
``disk`` = ``/proc/self/io`` read_bytes during the load, with the checkpoint's pages dropped
from the page cache (fsync + POSIX_FADV_DONTNEED) before each run. ``disk`` includes kernel
readahead (``/sys/block/*/queue/read_ahead_kb``; 8 MB here), and at N>1 ranks share the page
cache, so a page one rank faults in is free for the other: read ``req`` as the per-rank
figure and ``disk`` as what the device delivered. ``cached`` = checkpoint bytes still in the
page cache after the drop (pages another process has mapped cannot be dropped; then ``disk``
is ~0). ``target`` (lazy rows) = base + model/N + largest tensor + 10%.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from accel_zero.launch import find_free_port

METHODS = ("plain", "hf-rank0", "hf-fsdp2", "lazy")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _drop_page_cache(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cached_bytes(folder: Path) -> int:
    """Bytes of the checkpoint files resident in the page cache (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    total = 0
    for file in folder.glob("*.safetensors"):
        size = file.stat().st_size
        fd = os.open(file, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        ok = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        if ok:
            total += sum(v & 1 for v in vec) * page
    return total


def _count_requested() -> list[int]:
    """Wrap transformers' safe_open so every tensor read from the files adds its bytes."""
    import transformers.modeling_utils as mu

    real = mu.safe_open
    total = [0]

    class Slice:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getitem__(self, index: Any) -> Any:
            t = self._inner[index]
            total[0] += t.numel() * t.element_size()
            return t

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    class File:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._inner = real(*args, **kwargs)

        def get_slice(self, key: str) -> Slice:
            return Slice(self._inner.get_slice(key))

        def __enter__(self) -> File:
            self._inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self._inner.__exit__(*exc)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    mu.safe_open = File  # benchmark instrumentation, this process only
    return total


def _rank(rank: int, world: int, port: int, method: str, model: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    if method == "hf-rank0":
        os.environ.update(ACCELERATE_USE_FSDP="1", FSDP_CPU_RAM_EFFICIENT_LOADING="1")
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import accel_zero

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    requested = _count_requested()
    dist.barrier()
    base = _status("VmRSS")
    io0, t0 = _read_bytes(), time.perf_counter()
    if method == "lazy":
        with accel_zero.lazy_init():
            m = AutoModelForCausalLM.from_pretrained(model)
    elif method == "hf-fsdp2":
        from transformers.distributed import DistributedConfig

        m = AutoModelForCausalLM.from_pretrained(
            model, distributed_config=DistributedConfig(fsdp_size=world)
        )
    else:
        m = AutoModelForCausalLM.from_pretrained(model)
    seconds = time.perf_counter() - t0
    disk = _read_bytes() - io0
    local = 0
    with torch.no_grad():
        for p in m.parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            local += t.numel() * t.element_size()
            t.sum()  # page in: loaded tensors may still be lazily mapped file pages
    result = dict(
        rank=rank,
        base=base,
        peak=_status("VmHWM"),
        anon=_status("RssAnon"),
        file=_status("RssFile"),
        requested=requested[0],
        disk=disk,
        seconds=seconds,
        local_param_bytes=local,
    )
    dist.barrier()
    dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(result))


def _run(method: str, world: int, model: Path) -> tuple[list[dict[str, Any]], int]:
    _drop_page_cache(model)
    cached = _cached_bytes(model)
    port = find_free_port()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        procs = [
            ctx.Process(target=_rank, args=(r, world, port, method, str(model), out))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(900)
        results = []
        for r in range(world):
            path = Path(out, f"{r}.json")
            if not path.exists():
                raise RuntimeError(f"{method} N={world}: rank {r} produced no result")
            results.append(json.loads(path.read_text()))
    return results, cached


def _model_facts(model: Path) -> tuple[int, int]:
    from safetensors import safe_open

    total = largest = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                size = numel * {"F32": 4, "BF16": 2, "F16": 2}.get(t.get_dtype(), 8)
                total += size
                largest = max(largest, size)
    return total, largest


def main(argv: list[str] | None = None) -> int:
    root = os.environ.get("ACCEL_ZERO_ASSETS") or str(Path.home() / ".cache/accel_zero/assets")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path(root) / "smollm2-135m-instruct")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--shared-files",
        action="store_true",
        help="read the checkpoint in place (default: a private copy, so that no other process "
        "holds its pages mapped and the page-cache drop before each run works)",
    )
    args = parser.parse_args(argv)
    if not (args.model / "config.json").exists():
        print(f"{args.model} not found: run scripts/prepare_assets.py first", file=sys.stderr)
        return 2
    if args.shared_files:
        return _bench(args)
    with tempfile.TemporaryDirectory(dir=args.model.parent, prefix=".bench_load-") as tmp:
        copy = Path(tmp) / args.model.name
        shutil.copytree(args.model, copy)
        args.model = copy
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    total, largest = _model_facts(args.model)
    mb = 1e6
    print(f"model {args.model.name}: {total / mb:.0f} MB of tensors, largest {largest / mb:.0f} MB")
    print(
        f"{'method':<9} {'N':>2} {'rank':>4} {'base MB':>8} {'peak MB':>8} {'peak-base':>9} "
        f"{'req MB':>7} {'disk MB':>8} {'time s':>7} {'target MB':>9} {'anon/file MB':>13} "
        f"{'cached MB':>9}"
    )
    for world in args.ranks:
        for method in args.methods:
            try:
                rows, cached = _run(method, world, args.model)
            except RuntimeError as exc:
                print(f"{method:<9} {world:>2}  failed: {exc}")
                continue
            for r in rows:
                target = ""
                if method == "lazy":
                    target = f"{(r['base'] + total / world + largest) * 1.1 / mb:9.0f}"
                print(
                    f"{method:<9} {world:>2} {r['rank']:>4} {r['base'] / mb:8.0f} "
                    f"{r['peak'] / mb:8.0f} {(r['peak'] - r['base']) / mb:9.0f} "
                    f"{r['requested'] / mb:7.0f} {r['disk'] / mb:8.0f} {r['seconds']:7.2f} "
                    f"{target:>9} {r['anon'] / mb:6.0f}/{r['file'] / mb:<6.0f} "
                    f"{cached / mb:9.0f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
