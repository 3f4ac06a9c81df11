"""Sharded checkpoint save/load: time and peak RSS on N CPU ranks, against fio's write speed.

    python scripts/bench_checkpoint.py                          # bench model, storage layer, N=2
    python scripts/bench_checkpoint.py --model smollm2 --reps 3
    python scripts/bench_checkpoint.py --mode accelerator       # accelerator.save_state/load_state

Models: ``bench`` (the GPT-2 of scripts/bench_train.py, 23.24 M parameters) and ``smollm2``
(SmolLM2-135M-Instruct, from ``$ACCEL_ZERO_ASSETS``, see scripts/prepare_assets.py).

Modes (each rank a fresh process, gloo barrier on 127.0.0.1):

- ``format``: the storage layer alone (``accel_zero.checkpoint.begin_save`` / ``commit`` /
  ``open_checkpoint``). Each rank holds what a ZeRO rank holds between steps, its rows
  (``torch.chunk`` over N) of the fp32 master weights and of AdamW's two moments, and streams
  them as ``RowShard``s (``model/<fqn>``, ``optim/<fqn>/exp_avg|exp_avg_sq``, ``step``);
  then the checkpoint's pages are dropped from the page cache and every rank reads its rows
  back with ``read_rows``.
- ``accelerator``: the public API, ``accelerator.save_state(dir)`` / ``load_state(dir)`` on
  ``accel_zero.Accelerator`` (stage 3, AdamW, one training step first).

Columns: ``save s`` (slowest rank, from the start of the save to the published pointer,
fsync included), ``GB/s`` (bytes of all ranks' files / save s), ``vs fio`` (that rate over
fio's sequential write rate of the same byte count in the same folder: O_DIRECT ``bs=1M
qd=32``, and buffered with ``end_fsync=1``, the same path as ours), ``save peak`` (VmHWM
during the save minus the steady RSS before it, max over ranks; the issue's target is at
most one unit), ``load s`` and ``load peak`` likewise (peak over the RSS before the load;
the rows read are new memory, so about model/N is expected). Median and minimum over
``--reps`` rounds, fio interleaved with the saves.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accel_zero.launch import find_free_port

MiB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def peak() -> int:
    return _status_kib("VmHWM")


def build_meta_model(name: str) -> Any:
    """The model's parameter shapes, built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    if name == "bench":  # scripts/bench_train.py's defaults
        config: Any = GPT2Config(vocab_size=8192, n_positions=256, n_embd=512, n_layer=6, n_head=8)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from prepare_assets import smollm2_path

        config = AutoConfig.from_pretrained(smollm2_path())
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def drop_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ------------------------------------------------------------------ rank bodies
def format_rank(rank: int, world_size: int, model_name: str, folder: str) -> dict[str, Any]:
    """Storage layer only: hold this rank's ZeRO state, save it, read it back."""
    import torch
    import torch.distributed as dist

    from accel_zero.checkpoint import begin_save, open_checkpoint
    from accel_zero.comm import Comm
    from accel_zero.shards import RowShard, local_row_range

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    comm = Comm()
    shapes = {n: tuple(p.shape) for n, p in build_meta_model(model_name).named_parameters()}
    state: dict[str, tuple[tuple[int, ...], int, list[torch.Tensor]]] = {}
    largest_unit = 0
    for name, shape in shapes.items():
        start, end = local_row_range(shape[0], rank, world_size)
        rows = [torch.randn(end - start, *shape[1:]) for _ in range(3)]  # master, 2 moments
        state[name] = (shape, start, rows)
        largest_unit = max(largest_unit, 3 * rows[0].numel() * 4)

    def shards() -> Any:
        for name, (shape, start, (master, avg, avg_sq)) in state.items():
            yield RowShard(key=f"model/{name}", global_shape=shape, row_start=start, tensor=master)
            yield RowShard(
                key=f"optim/{name}/exp_avg", global_shape=shape, row_start=start, tensor=avg
            )
            yield RowShard(
                key=f"optim/{name}/exp_avg_sq", global_shape=shape, row_start=start, tensor=avg_sq
            )
            yield RowShard(
                key=f"optim/{name}/step", global_shape=(), row_start=0,
                tensor=torch.tensor(1.0), replicated=True,
            )  # fmt: skip

    from accel_zero import ops

    ops.AsyncIO()  # load the aio kernel now (seconds, once per process), not inside the save
    comm.barrier(what="bench start")
    steady = reset_peak()
    t0 = time.perf_counter()
    with begin_save(
        folder, rank=rank, world_size=world_size, barrier=lambda: comm.barrier(what="save")
    ) as save:
        save.write_shards(shards())
        version = save.commit({"bench": model_name})
    save_s = time.perf_counter() - t0
    save_peak = peak() - steady

    if rank == 0:
        drop_page_cache(Path(folder))
    comm.barrier(what="cache dropped")
    before = reset_peak()
    t0 = time.perf_counter()
    loaded = []
    with open_checkpoint(folder) as reader:
        for name, (_shape, start, rows) in state.items():
            for key in ("model/" + name, f"optim/{name}/exp_avg", f"optim/{name}/exp_avg_sq"):
                loaded.append(reader.read_rows(key, start, start + rows[0].shape[0]))
    comm.barrier(what="loaded")
    load_s = time.perf_counter() - t0
    load_peak = peak() - before
    ok = all(
        torch.equal(got, want)
        for got, want in zip(
            loaded, (t for _, _, rows in state.values() for t in rows), strict=True
        )
    )
    files = sum(p.stat().st_size for p in Path(version).rglob("*") if p.is_file())
    dist.destroy_process_group()
    return {
        "save_s": save_s,
        "save_peak": save_peak,
        "load_s": load_s,
        "load_peak": load_peak,
        "bytes": files,
        "unit": largest_unit,
        "steady": steady,
        "ok": ok,
    }


def accelerator_rank(rank: int, world_size: int, model_name: str, folder: str) -> dict[str, Any]:
    """The public API: accel_zero.Accelerator save_state / load_state after one step."""
    import torch
    from transformers import AutoModelForCausalLM

    from accel_zero import Accelerator, lazy_init

    accelerator = Accelerator(zero_config={"stage": 3})
    with lazy_init(accelerator):
        if model_name == "bench":
            model = AutoModelForCausalLM.from_config(build_meta_model("bench").config)
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from prepare_assets import smollm2_path

            model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(rank))
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    optimizer.zero_grad()
    accelerator.wait_for_everyone()
    steady = reset_peak()
    t0 = time.perf_counter()
    accelerator.save_state(folder)
    save_s = time.perf_counter() - t0
    save_peak = peak() - steady
    if accelerator.is_main_process:
        drop_page_cache(Path(folder))
    accelerator.wait_for_everyone()
    before = reset_peak()
    t0 = time.perf_counter()
    accelerator.load_state(folder)
    accelerator.wait_for_everyone()
    load_s = time.perf_counter() - t0
    files = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    result = {
        "save_s": save_s,
        "save_peak": save_peak,
        "load_s": load_s,
        "load_peak": peak() - before,
        "bytes": files,
        "unit": None,
        "steady": steady,
        "ok": True,
    }
    accelerator.end_training()
    return result


# ------------------------------------------------------- spawning and fio
def _child(
    fn: Callable[..., Any], rank: int, ws: int, args: tuple[Any, ...], env: dict[str, str], out: str
) -> None:
    os.environ.update(env)
    try:
        payload = ("ok", fn(rank, ws, *args))
    except BaseException:
        payload = ("error", traceback.format_exc())
    (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps(payload))


def spawn_ranks(fn: Callable[..., Any], world_size: int, args: tuple[Any, ...]) -> list[Any]:
    ctx = mp.get_context("spawn")
    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as out:
        procs = []
        for rank in range(world_size):
            env = {
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1",
            }  # fmt: skip
            proc = ctx.Process(target=_child, args=(fn, rank, world_size, args, env, out))
            proc.start()
            procs.append(proc)
        for proc in procs:
            proc.join()
        results = []
        for rank in range(world_size):
            path = Path(out) / f"rank{rank}.pkl"
            status, value = pickle.loads(path.read_bytes()) if path.exists() else ("error", "died")
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results


def fio_write(folder: Path, size: int, *, direct: bool) -> float:
    """fio's sequential write rate (bytes/s) of ``size`` bytes in ``folder``."""
    fio = shutil.which("fio")
    if fio is None:
        return float("nan")
    path = folder / "fio.bin"
    cmd = [
        fio, "--name=ckpt", f"--filename={path}", "--rw=write", "--bs=1M", f"--size={size}",
        "--ioengine=libaio", "--iodepth=32" if direct else "--iodepth=1",
        f"--direct={int(direct)}", "--end_fsync=1", "--output-format=json",
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        path.unlink(missing_ok=True)
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["write"]["bw_bytes"])


def _fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{statistics.median(values) / scale:.{digits}f} / {min(values) / scale:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("bench", "smollm2"), default="bench")
    parser.add_argument("--mode", choices=("format", "accelerator"), default="format")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)

    body = format_rank if args.mode == "format" else accelerator_rank
    work = Path(tempfile.mkdtemp(prefix="accel_zero_bench_ckpt_", dir=args.dir))
    rows: dict[str, list[float]] = {
        k: [] for k in ("save", "rate", "fio_d", "fio_b", "sp", "load", "lp")
    }
    result: list[dict[str, Any]] = []
    try:
        for rep in range(args.reps):
            folder = work / f"ckpt{rep}"
            try:
                result = spawn_ranks(body, args.ranks, (args.model, str(folder)))
            except RuntimeError as exc:
                if "NotImplementedError" in str(exc):
                    print(f"accelerator mode: save_state/load_state not implemented yet:\n{exc}")
                    return 1
                raise
            assert all(r["ok"] for r in result), "rows read back differ from those saved"
            total = result[0]["bytes"]
            save_s = max(r["save_s"] for r in result)
            rows["save"].append(save_s)
            rows["rate"].append(total / save_s)
            rows["sp"].append(max(r["save_peak"] for r in result))
            rows["load"].append(max(r["load_s"] for r in result))
            rows["lp"].append(max(r["load_peak"] for r in result))
            shutil.rmtree(folder, ignore_errors=True)
            rows["fio_d"].append(fio_write(work, total, direct=True))
            rows["fio_b"].append(fio_write(work, total, direct=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total, unit = result[0]["bytes"], result[0]["unit"]
    rate = statistics.median(rows["rate"])
    print(
        f"# {args.model}, {args.mode}, {args.ranks} ranks, {total / MiB:.0f} MiB of files, "
        f"{args.reps} reps (median / min); largest unit of one rank's state "
        f"{(unit or 0) / MiB:.1f} MiB; steady RSS rank 0 {result[0]['steady'] / MiB:.0f} MiB"
    )
    print(
        "| save s | GB/s | fio direct GB/s | fio buffered GB/s | vs fio (direct / buffered) "
        "| save peak MiB | load s | load peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    fio_d, fio_b = statistics.median(rows["fio_d"]), statistics.median(rows["fio_b"])
    print(
        f"| {_fmt(rows['save'])} | {rate / 1e9:.2f} | {fio_d / 1e9:.2f} | {fio_b / 1e9:.2f} | "
        f"{rate / fio_d:.2f} / {rate / fio_b:.2f} | {_fmt(rows['sp'], MiB, 1)} | "
        f"{_fmt(rows['load'])} | {_fmt(rows['lp'], MiB, 1)} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
