"""ZeRO-3 offload on CPU: accel_zero (and DeepSpeed) with optimizer state and parameters moved out.

The benchmark model of scripts/bench_train.py (GPT-2 style, 6 layers x 512, vocab
8192, seq 256: 23.24 M parameters; fp32 AdamW, micro-batch 4 per rank, 2 gloo
ranks), trained by ZeRO-3 with four offload settings:

- ``none``: everything in memory (bench_train's ``z3``);
- ``cpu``: ``offload_optimizer: {device: cpu}`` (on a CPU machine: the CPU Adam kernel);
- ``nvme``: ``offload_optimizer: {device: nvme}``: masters, moments and gradient shards
  in swap files;
- ``nvme+param``: the same plus ``offload_param: {device: nvme}``.

Each by accel_zero, and by DeepSpeed ZeRO-3 with the same settings when
``--deepspeed-python`` names an interpreter that has DeepSpeed (a separate virtual
environment: installing DeepSpeed could move the pinned packages of this one).
DeepSpeed runs with torch AdamW without offload and DeepSpeedCPUAdam with it (what
its config's ``"type": "AdamW"`` gives), accel_zero's default bucket sizes, the same
``sub_group_size``, ``buffer_count`` and ``aio`` settings, and pipelined optimizer
swapping. Every run is a fresh 2-rank spawn (so peak RSS is its own) on the same
seed and data; runs are interleaved over ``--repeats`` (the order rotates each
repeat), and each repeat also runs fio on the swap folder, so a slow minute on a
shared machine or disk hits all of them alike. Swap files go under ``--nvme-path``
(default /work/bench-swap; each run's folder is removed after it).

The full table (about 12 minutes on an idle 2-core machine, DeepSpeed's JIT-built
ops already in ~/.cache/torch_extensions; without ``--deepspeed-python`` about 6)::

    python scripts/bench_offload.py --deepspeed-python /work/venv-ds/bin/python

    python scripts/bench_offload.py --steps 3 --warmup 1 --repeats 1   # smoke run
    python scripts/bench_offload.py --configs az-none,az-nvme --sub-group-size 2M

DeepSpeed's environment (torch stays the installed one)::

    python -m venv --system-site-packages /work/venv-ds
    /work/venv-ds/bin/pip install -c <(echo torch==2.13.0) deepspeed

Printed per configuration:

- step time: median and minimum (seconds, the slower rank of each step), the ratio of
  the median to the same engine's no-offload median, seconds per step the ranks were
  blocked on the disk (``zero_stats()['swap_stall_seconds']``, the slower rank), the
  final loss (mean over ranks);
- memory per rank: peak RSS (VmHWM) and steady RSS (VmRSS after the last step),
  model state in RAM (accel_zero: ``memory_report()['per_device']['cpu']`` params +
  grads + optimizer_state after ``optimizer.step()``; DeepSpeed: the unique CPU
  storages reachable from its parameters and optimizer, flat buffers included, after
  ``engine.step()``), its ratio to no offload, the swap buffer pools (host memory that
  ``memory_report()`` does not count; DeepSpeed: its optimizer's and parameter
  swapper's pools), and model state on NVMe;
- disk per rank: MB read and written per step in forward+backward and in the optimizer
  step (``/proc/self/io``, both engines), and accel_zero's GB/s while the disk was busy
  (``zero_stats()``: ``swap_bytes_read/written`` over ``swap_read/write_seconds``)
  against fio on the same folder with the same block size and queue depth (1 job, and
  one job per rank: the ranks share the disk). DeepSpeed has no such counters.

Targets (issue 9): step time with optimizer state on NVMe at most 1.05x no offload;
model-state RAM per rank at most 0.35x no offload.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as ``python scripts/bench_offload.py``: scripts/ is sys.path[0], and spawned
# ranks inherit that path, so the model, data and spawner are bench_train's own.
from bench_train import (
    BenchArgs,
    _first_line,
    add_run_arguments,
    batch_for,
    bench_args,
    build_model,
    spawn_ranks,
    torchrun_env,
)

MiB = 2**20
OFFLOADS = ("none", "cpu", "nvme", "nvme+param")
ENGINES = {"az": "accel_zero", "ds": "DeepSpeed"}
OFFLOAD_LABELS = {
    "none": "ZeRO-3",
    "cpu": "ZeRO-3, optimizer cpu",
    "nvme": "ZeRO-3, optimizer nvme",
    "nvme+param": "ZeRO-3, optimizer+params nvme",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadArgs:
    """The swap settings every NVMe configuration of both engines gets."""

    nvme_path: str
    sub_group_size: int
    buffer_count: int
    block_size: int
    queue_depth: int
    threads: int


def config_names(with_deepspeed: bool) -> list[str]:
    engines = ["az", "ds"] if with_deepspeed else ["az"]
    return [f"{e}-{o}" for e in engines for o in OFFLOADS]


def split_name(name: str) -> tuple[str, str]:
    engine, _, offload = name.partition("-")
    return engine, offload


def label(name: str) -> str:
    engine, offload = split_name(name)
    return f"{ENGINES[engine]} {OFFLOAD_LABELS[offload]}"


# --- what both engines' ranks measure ----------------------------------------------


def proc_status() -> tuple[int, int]:
    """(VmHWM, VmRSS) of this process in bytes."""
    values = {"VmHWM": 0, "VmRSS": 0}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in values:
            values[key] = int(line.split()[1]) * 1024
    return values["VmHWM"], values["VmRSS"]


def proc_io() -> tuple[int, int]:
    """Bytes this process (all its threads) read from and wrote to storage: O_DIRECT
    and libaio included, the page cache not."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankEngine:
    """What the training loop needs of one engine on one rank."""

    forward_backward: Callable[[Any], Any]
    """Forward and backward of one micro-batch; returns the loss."""
    step: Callable[[], None]
    """The optimizer step."""
    zero_grad: Callable[[], None]
    state: Callable[[], dict[str, Any]]
    """Model-state bytes, taken after the last step (gradients still held), not timed."""
    counters: Callable[[], dict[str, float]]
    """Cumulative swap counters (``swap_*`` of ``zero_stats()``), or {}."""


PHASES = ("forward_backward", "step", "stall_forward_backward", "stall_step")
IO_PHASES = ("read_forward_backward", "written_forward_backward", "read_step", "written_step")
"""Bytes from /proc/self/io in each phase of the timed steps (both engines)."""


def train_loop(a: BenchArgs, rank: int, world_size: int, e: RankEngine) -> dict[str, Any]:
    """Warm-up + timed steps; per timed step: its time, and the seconds of forward+backward,
    of the optimizer step and stalled on the disk in each (each the slower rank's)."""
    import torch
    import torch.distributed as dist

    total = a.warmup + a.steps
    times: list[float] = []
    phases: list[list[float]] = []
    losses: list[float] = []
    state: dict[str, Any] = {}
    swap0: dict[str, float] = {}
    io0 = (0, 0)
    io_phase = [0, 0, 0, 0]  # read and written in forward+backward, read and written in step
    dist.barrier()
    for step in range(total):
        if step == a.warmup:
            swap0, io0 = e.counters(), proc_io()
        x = batch_for(a, step, rank, world_size)
        stall0, r0 = e.counters().get("swap_stall_seconds", 0.0), proc_io()
        t0 = time.perf_counter()
        loss = e.forward_backward(x)
        t1 = time.perf_counter()
        stall1, r1 = e.counters().get("swap_stall_seconds", 0.0), proc_io()
        t1b = time.perf_counter()  # reading the counters is not part of the step
        e.step()
        t2 = time.perf_counter()
        stall2, r2 = e.counters().get("swap_stall_seconds", 0.0), proc_io()
        if step >= a.warmup:
            for i, (before, after) in enumerate(((r0, r1), (r1, r2))):
                io_phase[2 * i] += after[0] - before[0]
                io_phase[2 * i + 1] += after[1] - before[1]
        if step == total - 1:  # gradients still held: the step's model-state high point
            state = e.state()
        t3 = time.perf_counter()
        e.zero_grad()
        t4 = time.perf_counter()
        times.append((t1 - t0) + (t2 - t1b) + (t4 - t3))
        phases.append([t1 - t0, t2 - t1b + t4 - t3, stall1 - stall0, stall2 - stall1])
        losses.append(float(loss.detach()))
    swap1, io1 = e.counters(), proc_io()
    timed = torch.tensor(times[a.warmup :], dtype=torch.float64)
    dist.all_reduce(timed, op=dist.ReduceOp.MAX)  # a step takes as long as its slowest rank
    split = torch.tensor(phases[a.warmup :], dtype=torch.float64)
    dist.all_reduce(split, op=dist.ReduceOp.MAX)
    last = torch.tensor([losses[-1]], dtype=torch.float64)
    dist.all_reduce(last)
    hwm, rss = proc_status()
    return {
        "rank": rank,
        "step_times": timed.tolist(),
        "phases": {name: split[:, i].tolist() for i, name in enumerate(PHASES)},
        "final_loss": float(last.item()) / world_size,
        "losses": losses,
        "vm_hwm": hwm,
        "vm_rss": rss,
        "io_read": io1[0] - io0[0],
        "io_written": io1[1] - io0[1],
        "io_phases": dict(zip(IO_PHASES, io_phase, strict=True)),
        # Cumulative counters only (the GB/s are recomputed from bytes and seconds).
        "swap": {k: swap1[k] - swap0.get(k, 0.0) for k in swap1 if not k.endswith("_gbps")},
        **state,
    }


def az_zero_config(offload: str, o: OffloadArgs) -> dict[str, Any]:
    config: dict[str, Any] = {"stage": 3}  # everything else: bench_train's z3 (defaults)
    if offload == "cpu":
        config["offload_optimizer"] = {"device": "cpu"}
    elif offload.startswith("nvme"):
        nvme = {"device": "nvme", "nvme_path": o.nvme_path, "buffer_count": o.buffer_count}
        config["offload_optimizer"] = nvme
        if offload == "nvme+param":
            config["offload_param"] = nvme
        config["sub_group_size"] = o.sub_group_size
        config["aio"] = {
            "block_size": o.block_size,
            "queue_depth": o.queue_depth,
            "threads": o.threads,
        }
    return config


def az_rank_body(
    rank: int, world_size: int, offload: str, a: BenchArgs, o: OffloadArgs
) -> dict[str, Any]:
    """One accel_zero rank."""
    import torch

    from accel_zero import Accelerator

    torch.set_num_threads(a.threads)
    model = build_model(a)
    accelerator = Accelerator(zero_config=az_zero_config(offload, o))
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr)
    model, optimizer = accelerator.prepare(model, optimizer)

    def forward_backward(x: Any) -> Any:
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        return loss

    def state() -> dict[str, Any]:
        report = accelerator.memory_report()
        per_device: dict[str, dict[str, int]] = report["per_device"]  # type: ignore[assignment]
        kinds = ("params", "grads", "optimizer_state")

        def on(device: str) -> int:
            return sum(per_device.get(device, {}).get(k, 0) for k in kinds)

        return {
            "state_ram": on("cpu"),
            "state_nvme": on("nvme"),
            "swap_buffers": az_swap_buffer_bytes(accelerator),
            "report": report if rank == 0 else None,
        }

    def counters() -> dict[str, float]:
        stats = accelerator.zero_stats()
        return {k: float(v) for k, v in stats.items() if k.startswith("swap_")}  # type: ignore[arg-type]

    result = train_loop(
        a,
        rank,
        world_size,
        RankEngine(
            forward_backward=forward_backward,
            step=optimizer.step,
            zero_grad=lambda: optimizer.zero_grad(set_to_none=True),
            state=state,
            counters=counters,
        ),
    )
    # end_training closes the engines (their swap files go) and frees the process group
    # after letting gloo's workers finish (see bench_train.rank_body's teardown note).
    accelerator.end_training()
    return result


def az_swap_buffer_bytes(accelerator: Any) -> int:
    """Host memory of the engines' swap buffer pools: model-state-sized, yet not in
    ``memory_report()``, so read from the engines (private; a benchmark may)."""
    total = 0
    for engine in getattr(accelerator, "_zero_engines", {}).values():
        offload = getattr(engine, "offload", None)
        for space in getattr(offload, "spaces", []):
            total += int(space.buffer_bytes)
    return total


# --- DeepSpeed, through another interpreter ------------------------------------------


def ds_config(offload: str, a: BenchArgs, o: OffloadArgs, world_size: int, folder: str) -> Any:
    """DeepSpeed's JSON for one configuration: accel_zero's default bucket sizes (the ones
    bench_train measured), the same swap settings."""
    from accel_zero.config import ZeroConfig

    d = ZeroConfig()
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": d.reduce_bucket_size,
        "stage3_prefetch_bucket_size": d.prefetch_bucket_size,
        "stage3_param_persistence_threshold": d.param_persistence_threshold,
        "stage3_max_live_parameters": d.max_live_parameters,
        "stage3_max_reuse_distance": d.max_reuse_distance,
    }
    optimizer_params: dict[str, Any] = {
        "lr": a.lr,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.01,  # torch AdamW's default, what accel_zero's runs use
    }
    if offload == "none":
        optimizer_params["torch_adam"] = True  # as accel_zero without offload: torch AdamW
    elif offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    else:
        zero["offload_optimizer"] = {
            "device": "nvme",
            "nvme_path": folder,
            # DeepSpeed's buffers hold one tensor each (master, exp_avg, exp_avg_sq, grad),
            # accel_zero's one sub-group record (3 tensors) plus a gradient record: the same
            # host memory is 4 x buffer_count of DeepSpeed's (4 fails: it needs 2 sets to
            # pipeline).
            "buffer_count": 4 * o.buffer_count,
            "pin_memory": False,
            "pipeline_read": True,
            "pipeline_write": True,
        }
        zero["sub_group_size"] = o.sub_group_size
        if offload == "nvme+param":
            zero["offload_param"] = {
                "device": "nvme",
                "nvme_path": folder,
                "buffer_count": max(5, o.buffer_count),  # per tensor; DeepSpeed's default 5
                # Elements per buffer: the largest parameter (the embedding) must fit.
                "buffer_size": a.vocab * a.hidden,
                "pin_memory": False,
            }
    return {
        "train_micro_batch_size_per_gpu": a.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": a.micro_batch * world_size,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "aio": {
            "block_size": o.block_size,
            "queue_depth": o.queue_depth,
            "intra_op_parallelism": o.threads,
            "single_submit": False,
            "overlap_events": True,
        },
    }


def ds_state_bytes(engine: Any) -> tuple[int, int]:
    """(model state, swap buffers): bytes of the unique CPU storages behind DeepSpeed's
    parameter shards, gradients, optimizer state and the flat buffers its ZeRO-3 optimizer
    holds (one attribute level deep: tensors, and lists/tuples/dicts of tensors; a swapped
    out tensor is empty), less its swap buffer pools, which are the second figure."""
    import torch

    def storage(t: Any) -> tuple[int, int] | None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return None
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes()) if s.nbytes() else None

    pools: dict[int, int] = {}
    opt = engine.optimizer
    swapper = getattr(opt, "optimizer_swapper", None)
    manager = getattr(swapper, "swap_buffer_manager", None)
    param_swappers = {
        id(sw): sw
        for p in engine.module.parameters()
        if (sw := getattr(p, "nvme_swapper", None)) is not None
    }
    for t in [
        *getattr(manager, "all_buffers", []),
        *(getattr(sw, "buffers", None) for sw in param_swappers.values()),
    ]:
        if (found := storage(t)) is not None:
            pools[found[0]] = found[1]

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        found = storage(t)
        if found is not None and found[0] not in pools:
            seen[found[0]] = max(seen.get(found[0], 0), found[1])

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            add(value)
        elif isinstance(value, list | tuple):
            for v in value:
                if isinstance(v, torch.Tensor):
                    add(v)
                elif isinstance(v, list | tuple):
                    for w in v:
                        add(w)
        elif isinstance(value, dict):
            for v in value.values():
                add(v)

    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", None))
        add(p.grad)
    for value in vars(opt).values():
        walk(value)
    inner = getattr(opt, "optimizer", None)
    for st in getattr(inner, "state", {}).values():
        for v in st.values():
            add(v)
    return sum(seen.values()), sum(pools.values())


def ds_worker(spec_path: Path) -> None:
    """One DeepSpeed rank (``--ds-worker``): RANK, WORLD_SIZE, MASTER_* from the driver."""
    import torch

    spec = json.loads(spec_path.read_text())
    a = BenchArgs(**spec["args"])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(spec["out"]) / f"rank{rank}.json"
    try:
        import deepspeed

        torch.set_num_threads(a.threads)
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        model = build_model(a)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=spec["ds_config"]
        )

        def forward_backward(x: Any) -> Any:
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            return loss

        def state() -> dict[str, Any]:
            state, pools = ds_state_bytes(engine)
            return {"state_ram": state, "state_nvme": None, "swap_buffers": pools}

        result = train_loop(
            a,
            rank,
            world_size,
            RankEngine(
                forward_backward=forward_backward,
                step=engine.step,  # zeroes the gradients too
                zero_grad=lambda: None,
                state=state,
                counters=dict,
            ),
        )
        result["deepspeed"] = deepspeed.__version__
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        payload: tuple[str, Any] = ("ok", result)
    except BaseException:
        import traceback

        payload = ("error", traceback.format_exc())
    out.with_suffix(".tmp").write_text(json.dumps(payload))
    out.with_suffix(".tmp").rename(out)


def run_deepspeed_ranks(
    python: str, offload: str, a: BenchArgs, o: OffloadArgs, world_size: int, timeout: float
) -> list[dict[str, Any]]:
    """A torchrun-style spawn of ``--ds-worker`` under ``python``; raises with every
    rank's error and the tail of its output."""
    from accel_zero.launch import find_free_port

    with tempfile.TemporaryDirectory(prefix="bench_offload_ds_") as out:
        swap = tempfile.mkdtemp(prefix="ds_", dir=o.nvme_path) if offload != "none" else ""
        spec = {
            "args": dataclasses.asdict(a),
            "ds_config": ds_config(offload, a, o, world_size, swap),
            "out": out,
        }
        spec_path = Path(out) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        port = find_free_port()
        procs = []
        try:
            for rank in range(world_size):
                env = {
                    **os.environ,
                    "OMP_NUM_THREADS": str(a.threads),
                    **torchrun_env(rank, world_size, port),
                }
                log = (Path(out) / f"rank{rank}.log").open("w")
                procs.append(
                    subprocess.Popen(
                        [python, str(Path(__file__).resolve()), "--ds-worker", str(spec_path)],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own group: a timeout ends its children too
                    )
                )
                log.close()
            deadline = time.monotonic() + timeout
            failed_at: float | None = None
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                    failed_at = time.monotonic()
                if failed_at is not None and time.monotonic() > failed_at + 10:
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
            if swap:
                shutil.rmtree(swap, ignore_errors=True)
        errors, results = [], []
        for rank, p in enumerate(procs):
            path = Path(out) / f"rank{rank}.json"
            tail = (Path(out) / f"rank{rank}.log").read_text(errors="replace")[-3000:]
            if not path.exists():
                errors.append(f"rank {rank}: no result (exit code {p.returncode}):\n{tail}")
                continue
            status, value = json.loads(path.read_text())
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            else:
                results.append(value)
        if errors:
            raise RuntimeError("\n".join(errors))
        return sorted(results, key=lambda r: r["rank"])


# --- fio on the swap folder ----------------------------------------------------------


def fio_gbps(o: OffloadArgs, jobs: int, size: int) -> dict[str, float]:
    """fio's sequential write then read GB/s of ``size`` bytes in the swap folder, at the
    swapper's block size and queue depth (scripts/bench_aio.py's runner)."""
    from bench_aio import ensure_fio, fio_run

    fio = ensure_fio()
    if fio is None:
        return {}
    folder = Path(tempfile.mkdtemp(prefix="fio_", dir=o.nvme_path))
    try:
        path = folder / "data.bin"
        out = {}
        for write in (True, False):
            seconds = fio_run(fio, path, write, size, o.block_size, o.queue_depth, jobs)
            out["write" if write else "read"] = size / seconds / 1e9
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- driver ----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    name: str
    times: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    runs: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)
    """Per run: every rank's result (``report`` dropped but for the first run)."""
    error: str = ""
    seconds: list[float] = dataclasses.field(default_factory=list)


def run_one(name: str, a: BenchArgs, o: OffloadArgs, ns: argparse.Namespace, row: Row) -> None:
    engine, offload = split_name(name)
    start = time.monotonic()
    try:
        if engine == "az":
            results = spawn_ranks(
                az_rank_body,
                ns.world_size,
                (offload, a, o),
                ns.timeout,
                {"OMP_NUM_THREADS": str(a.threads)},
            )
        else:
            results = run_deepspeed_ranks(
                ns.deepspeed_python, offload, a, o, ns.world_size, ns.timeout
            )
    except RuntimeError as exc:
        row.error = error_line(str(exc))
        print(f"  {name}: FAILED\n{exc}", file=sys.stderr, flush=True)
        return
    if row.runs:
        for r in results:
            r.pop("report", None)
    row.runs.append(results)
    row.times.extend(results[0]["step_times"])
    row.losses.append(results[0]["final_loss"])
    row.seconds.append(time.monotonic() - start)
    stall = max(r["swap"].get("swap_stall_seconds", 0.0) for r in results) / a.steps
    print(
        f"  {name}: median {statistics.median(results[0]['step_times']):.3f} s/step, "
        f"stall {stall:.3f} s/step, final loss {results[0]['final_loss']:.6f}, "
        f"wall {row.seconds[-1]:.0f} s",
        flush=True,
    )


def error_line(text: str) -> str:
    """The exception line of the last traceback in ``text`` (else bench_train's pick)."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not ln[0].isspace() and not ln.startswith(("Traceback", "rank ")):
            return ln[:140]
    return _first_line(text)


def per_rank(row: Row, key: str) -> list[float | None]:
    """Median over runs of each rank's ``key`` (None where a run did not report it)."""
    world = len(row.runs[0])
    out: list[float | None] = []
    for rank in range(world):
        values = [run[rank][key] for run in row.runs if run[rank].get(key) is not None]
        out.append(statistics.median(values) if values else None)
    return out


def swap_sum(row: Row, rank: int, key: str) -> float:
    return sum(run[rank]["swap"].get(key, 0.0) for run in row.runs)


def fmt_ranks(values: list[float | None], scale: float = MiB, width: int = 11) -> str:
    if any(v is None for v in values):
        return f"{'n/a':>{width}}"
    text = "/".join(f"{v / scale:.0f}" for v in values if v is not None)
    return f"{text:>{width}}"


def baseline(rows: dict[str, Row], name: str) -> Row | None:
    engine, _ = split_name(name)
    base = rows.get(f"{engine}-none")
    return base if base is not None and base.runs else None


def format_tables(
    rows: dict[str, Row], a: BenchArgs, o: OffloadArgs, fio: dict[str, list[float]]
) -> str:
    lines: list[str] = []
    done = [r for r in rows.values() if r.runs]

    header = (
        f"{'step time (s; phases: medians)':42} {'median':>7} {'min':>6} {'x none':>6} "
        f"{'fwd+bwd':>7} {'step':>6} {'stall f+b':>9} {'stall step':>10} {'final loss':>10}"
    )
    lines += [header, "-" * len(header)]
    for r in rows.values():
        if not r.runs:
            lines.append(f"{label(r.name):42} n/a ({r.error or 'not run'})")
            continue
        med = statistics.median(r.times)
        base = baseline(rows, r.name)
        ratio = f"{med / statistics.median(base.times):6.3f}" if base else f"{'n/a':>6}"
        has_swap = any("swap_stall_seconds" in x["swap"] for run in r.runs for x in run)

        def phase(name: str, width: int, r: Row = r, has_swap: bool = has_swap) -> str:
            if name.startswith("stall") and not has_swap:
                return f"{'-':>{width}}"
            values = [v for run in r.runs for v in run[0]["phases"][name]]
            return f"{statistics.median(values):{width}.3f}"

        lines.append(
            f"{label(r.name):42} {med:7.3f} {min(r.times):6.3f} {ratio} "
            f"{phase('forward_backward', 7)} {phase('step', 6)} "
            f"{phase('stall_forward_backward', 9)} {phase('stall_step', 10)} "
            f"{r.losses[-1]:10.6f}"
        )

    lines.append("")
    header = (
        f"{'memory per rank (MiB, rank 0/1...)':42} {'peak RSS':>11} {'steady RSS':>11} "
        f"{'state RAM':>11} {'x none':>7} {'swap bufs':>11} {'x none+buf':>10} "
        f"{'state NVMe':>11}"
    )
    lines += [header, "-" * len(header)]
    for r in done:
        base = baseline(rows, r.name)
        state = per_rank(r, "state_ram")
        bufs = per_rank(r, "swap_buffers")
        ratio = ratio_buf = f"{'n/a':>7}"
        if base is not None and all(v is not None for v in state):
            base_state = max(v or 0 for v in per_rank(base, "state_ram"))
            top = max(v or 0 for v in state)
            ratio = f"{top / base_state:7.3f}" if base_state else f"{'n/a':>7}"
            if all(v is not None for v in bufs):
                with_bufs = max((s or 0) + (b or 0) for s, b in zip(state, bufs, strict=True))
                ratio_buf = f"{with_bufs / base_state:10.3f}" if base_state else f"{'n/a':>10}"
        lines.append(
            f"{label(r.name):42} {fmt_ranks(per_rank(r, 'vm_hwm'))} "
            f"{fmt_ranks(per_rank(r, 'vm_rss'))} {fmt_ranks(state)} {ratio} "
            f"{fmt_ranks(bufs)} {ratio_buf:>10} {fmt_ranks(per_rank(r, 'state_nvme'))}"
        )

    lines.append("")
    fio1 = {k: statistics.median(v) for k, v in fio.items() if v}
    header = (
        f"{'disk per rank (MB/step: f+b | step)':42} {'read':>11} {'written':>11} "
        f"{'read GB/s':>9} {'write GB/s':>10} {'r vs fio':>8} {'w vs fio':>8}"
    )
    lines += [header, "-" * len(header)]
    for r in done:
        if split_name(r.name)[1] not in ("nvme", "nvme+param"):
            continue
        world = len(r.runs[0])
        steps = a.steps * len(r.runs)

        def mb(key: str, r: Row = r, world: int = world, steps: int = steps) -> float:
            """/proc/self/io bytes of one phase, per step, mean over ranks."""
            total = sum(run[k]["io_phases"][key] for run in r.runs for k in range(world))
            return total / world / steps / 1e6

        read = f"{mb('read_forward_backward'):.0f} | {mb('read_step'):.0f}"
        written = f"{mb('written_forward_backward'):.0f} | {mb('written_step'):.0f}"
        gbps = f"{'n/a':>9} {'n/a':>10}"
        vs = f"{'n/a':>8} {'n/a':>8}"
        if split_name(r.name)[0] == "az":
            # The disk's busy time (some IO in flight), from zero_stats(): comparable with fio.
            rg, wg = (
                statistics.mean(
                    swap_sum(r, k, f"swap_bytes_{moved}")
                    / max(swap_sum(r, k, f"swap_{kind}_seconds"), 1e-9)
                    / 1e9
                    for k in range(world)
                )
                for moved, kind in (("read", "read"), ("written", "write"))
            )
            gbps = f"{rg:9.2f} {wg:10.2f}"
            if "read-1" in fio1 and "write-1" in fio1:
                vs = f"{rg / fio1['read-1']:8.2f} {wg / fio1['write-1']:8.2f}"
        lines.append(f"{label(r.name):42} {read:>11} {written:>11} {gbps} {vs}")
    if fio1:
        jobs = max(int(k.split("-")[1]) for k in fio1)
        lines.append(
            f"fio in {o.nvme_path}, bs {o.block_size // 1024} KiB, qd {o.queue_depth} "
            f"(median of {len(fio['write-1'])}): 1 job write {fio1['write-1']:.2f} read "
            f"{fio1['read-1']:.2f} GB/s; {jobs} jobs (one per rank) write "
            f"{fio1.get(f'write-{jobs}', float('nan')):.2f} read "
            f"{fio1.get(f'read-{jobs}', float('nan')):.2f} GB/s in all"
        )
    else:
        lines.append("fio: not available (apt-get install fio)")
    return "\n".join(lines)


def verdicts(rows: dict[str, Row]) -> list[str]:
    out = []
    nvme, none = rows.get("az-nvme"), rows.get("az-none")
    if nvme and none and nvme.runs and none.runs:
        ratio = statistics.median(nvme.times) / statistics.median(none.times)
        best = min(nvme.times) / min(none.times)
        out.append(
            f"target step time, optimizer on NVMe <= 1.05x no offload: {ratio:.3f}x "
            f"(medians; minima {best:.3f}x) -> {'met' if ratio <= 1.05 else 'NOT met'}"
        )

        def phase(row: Row, name: str) -> float:
            return statistics.median(v for run in row.runs for v in run[0]["phases"][name])

        # Forward+backward is the same work in both and carries most of a busy machine's
        # noise; the optimizer step is where the disk shows, so give the phases too.
        added = phase(nvme, "step") - phase(none, "step")
        out.append(
            f"  phases (medians): optimizer step {phase(none, 'step'):.3f} -> "
            f"{phase(nvme, 'step'):.3f} s ({added:+.3f} s = "
            f"{added / statistics.median(none.times):+.1%} of no offload's step), "
            f"forward+backward {phase(none, 'forward_backward'):.3f} -> "
            f"{phase(nvme, 'forward_backward'):.3f} s"
        )
    for name in ("az-nvme", "az-nvme+param"):
        row = rows.get(name)
        if not (row and row.runs and none and none.runs):
            continue
        base = max(v or 0 for v in per_rank(none, "state_ram"))
        state = max(v or 0 for v in per_rank(row, "state_ram"))
        bufs = max(
            (s or 0) + (b or 0)
            for s, b in zip(per_rank(row, "state_ram"), per_rank(row, "swap_buffers"), strict=True)
        )
        if base:
            out.append(
                f"target model-state RAM <= 0.35x no offload, {label(name)}: "
                f"{state / base:.3f}x -> {'met' if state / base <= 0.35 else 'NOT met'} "
                f"({bufs / base:.3f}x counting the swap buffers)"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", help="comma list (default: all of az-*, and ds-* with DS)")
    parser.add_argument("--deepspeed-python", help="an interpreter with DeepSpeed installed")
    parser.add_argument("--nvme-path", default="/work/bench-swap", help="swap folder (made)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each config")
    parser.add_argument(
        "--sub-group-size",
        default="1M",
        help="elements per optimizer record (accel_zero's default 10M cuts this model's 11.6 M "
        "elements per rank into 2 records: no pipeline, and 640 MB of swap buffers per rank)",
    )
    parser.add_argument("--buffer-count", type=int, default=4, help="swap buffers per space")
    parser.add_argument("--block-size", type=int, default=1 << 20, help="aio bytes per request")
    parser.add_argument("--queue-depth", type=int, default=32, help="aio requests in flight")
    parser.add_argument("--aio-threads", type=int, default=1)
    parser.add_argument("--fio-mib", type=int, default=512, help="MiB fio moves per run; 0: none")
    add_run_arguments(parser)
    parser.add_argument("--ds-worker", type=Path, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.ds_worker is not None:
        ds_worker(ns.ds_worker)
        return 0

    from accel_zero.config import parse_count

    known = config_names(with_deepspeed=True)
    configs = (
        [c.strip() for c in ns.configs.split(",") if c.strip()]
        if ns.configs
        else config_names(ns.deepspeed_python is not None)
    )
    unknown = [c for c in configs if c not in known]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {known}")
    if any(c.startswith("ds-") for c in configs) and ns.deepspeed_python is None:
        parser.error("ds-* configurations need --deepspeed-python (an interpreter with DeepSpeed)")
    if ns.deepspeed_python is not None:
        probe = subprocess.run(
            [ns.deepspeed_python, "-c", "import deepspeed, torch; print(deepspeed.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode != 0:
            print(
                f"# DeepSpeed not importable by {ns.deepspeed_python}; running accel_zero only:\n"
                f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else ''}",
                flush=True,
            )
            configs = [c for c in configs if not c.startswith("ds-")]
        else:
            print(f"# DeepSpeed {probe.stdout.strip().splitlines()[-1]} via {ns.deepspeed_python}")
    a = bench_args(ns)
    made_root = not Path(ns.nvme_path).exists()
    Path(ns.nvme_path).mkdir(parents=True, exist_ok=True)
    nvme_path = tempfile.mkdtemp(prefix="bench_offload_", dir=ns.nvme_path)
    o = OffloadArgs(
        nvme_path=nvme_path,
        sub_group_size=parse_count(ns.sub_group_size, "--sub-group-size", minimum=1),
        buffer_count=ns.buffer_count,
        block_size=ns.block_size,
        queue_depth=ns.queue_depth,
        threads=ns.aio_threads,
    )
    print(
        f"GPT-2 {a.layers} layers, hidden {a.hidden}, {a.heads} heads, vocab {a.vocab}, "
        f"seq {a.seq}, micro-batch {a.micro_batch}, fp32 AdamW; {ns.world_size} ranks x "
        f"{a.threads} threads (gloo); {a.steps} timed steps after {a.warmup} warm-up, "
        f"{ns.repeats} repeat(s); swap in {nvme_path}: sub_group_size {o.sub_group_size}, "
        f"buffer_count {o.buffer_count}, aio block {o.block_size} qd {o.queue_depth} "
        f"threads {o.threads}",
        flush=True,
    )
    rows = {c: Row(name=c) for c in configs}
    fio: dict[str, list[float]] = {}
    t_start = time.monotonic()
    try:
        for rep in range(ns.repeats):
            print(f"repeat {rep + 1}/{ns.repeats}", flush=True)
            if ns.fio_mib > 0:
                for jobs in sorted({1, ns.world_size}):
                    for kind, gbps in fio_gbps(o, jobs, ns.fio_mib * MiB).items():
                        fio.setdefault(f"{kind}-{jobs}", []).append(gbps)
                if fio:
                    print(
                        "  fio: "
                        + ", ".join(f"{k} {v[-1]:.2f} GB/s" for k, v in sorted(fio.items())),
                        flush=True,
                    )
            shift = rep % len(configs)
            for c in configs[shift:] + configs[:shift]:  # a fresh order every repeat
                if rows[c].error:
                    continue  # a config that failed once will fail again; keep the run short
                run_one(c, a, o, ns, rows[c])
    finally:
        shutil.rmtree(nvme_path, ignore_errors=True)
        if made_root:
            with contextlib.suppress(OSError):
                Path(ns.nvme_path).rmdir()
    print(f"\n{time.monotonic() - t_start:.0f} s in all\n")
    print(format_tables(rows, a, o, fio))
    print()
    for line in verdicts(rows):
        print(line)
    first = {r.name: r.runs[0][0]["losses"][0] for r in rows.values() if r.runs}
    if first:
        # Same weights, same batch: any difference is in the forward (e.g. rounded weights).
        ref = statistics.median(first.values())
        odd = {n: v for n, v in first.items() if abs(v - ref) > 1e-6 * abs(ref)}
        print(
            f"first-step loss of rank 0 (same weights and batch everywhere): {ref:.6f}"
            + (f"; differs: {', '.join(f'{n} {v:.6f}' for n, v in odd.items())}" if odd else "")
        )
    versions = {
        str(r.runs[0][0]["deepspeed"])
        for r in rows.values()
        if r.runs and "deepspeed" in r.runs[0][0]
    }
    if versions:
        print(f"DeepSpeed {', '.join(sorted(versions))}; its state RAM walks its tensors")
    if ns.json:
        ns.json.write_text(
            json.dumps(
                {
                    "args": dataclasses.asdict(a),
                    "offload": dataclasses.asdict(o),
                    "fio": fio,
                    "rows": [dataclasses.asdict(r) for r in rows.values()],
                },
                indent=1,
                default=str,
            )
        )
    return 0 if all(r.runs for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
