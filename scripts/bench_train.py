"""Training step time and model-state memory: accel_zero vs DDP vs FSDP2 on CPU.

One GPT-2-style model (6 layers, hidden 512, 8 heads, vocab 8192, seq 256,
n_positions 256: 23.24 M parameters), fp32 AdamW, micro-batch 4 per rank, 2
ranks over gloo on 127.0.0.1. Every configuration runs in its own 2-rank
torchrun-style spawn (fresh processes, so peak RSS is its own), on the same
seed and the same data, so the final losses should be equal. Configurations
are interleaved across ``--repeats`` so a slow minute on a shared machine hits
all of them alike.

    python scripts/bench_train.py                       # 20 steps after 2 warm-up, 1 repeat
    python scripts/bench_train.py --steps 3 --warmup 1  # quick smoke run
    python scripts/bench_train.py --repeats 3 --configs ddp,z3

Columns: step time median/min (seconds, the slower rank of each step), ratio
of the median to DDP's, tokens/s (global: ranks x micro-batch x seq / median),
peak RSS per rank (VmHWM, max over ranks), model state per rank (MiB of
parameters + gradients + optimizer state held after ``optimizer.step()``;
DDP/FSDP2: the unique storages of local params, grads and optimizer-state
tensors; accel_zero: ``accelerator.memory_report()['model_state_bytes']``),
final loss (mean over ranks of the last step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from accel_zero.launch import find_free_port

MiB = 2**20

CONFIGS: dict[str, tuple[str, dict[str, Any] | None]] = {
    # name -> (engine, zero_config)
    "ddp": ("ddp", None),
    "fsdp2": ("fsdp2", None),
    "z3": ("accel_zero", {"stage": 3}),
    "z3-noprefetch": ("accel_zero", {"stage": 3, "prefetch_bucket_size": 0}),
    "z2": ("accel_zero", {"stage": 2}),
}
LABELS = {
    "ddp": "DDP",
    "fsdp2": "FSDP2 (fully_shard)",
    "z3": "accel_zero stage 3",
    "z3-noprefetch": "accel_zero stage 3, no prefetch",
    "z2": "accel_zero stage 2",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchArgs:
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    micro_batch: int
    steps: int
    warmup: int
    lr: float
    seed: int
    threads: int


def build_model(a: BenchArgs) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=a.vocab,
        n_positions=a.seq,
        n_embd=a.hidden,
        n_layer=a.layers,
        n_head=a.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=a.vocab - 1,
        eos_token_id=a.vocab - 1,
    )
    torch.manual_seed(a.seed)
    return GPT2LMHeadModel(config).train()


def batch_for(a: BenchArgs, step: int, rank: int, world_size: int) -> Any:
    """This rank's rows of the global batch of ``step`` (same on every engine)."""
    import torch

    gen = torch.Generator().manual_seed(a.seed * 100_003 + step)
    global_batch = torch.randint(0, a.vocab, (world_size * a.micro_batch, a.seq), generator=gen)
    return global_batch[rank * a.micro_batch : (rank + 1) * a.micro_batch].clone()


def _local(t: Any) -> Any:
    """A DTensor's local shard, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def held_bytes(model: Any, optimizer: Any) -> int:
    """Bytes of the unique storages behind local params, grads and optimizer state."""
    import torch

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = _local(t).untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())

    for p in model.parameters():
        add(p)
        add(p.grad)
    for state in optimizer.state.values():
        for value in state.values():
            add(value)
    return sum(seen.values())


def report_bytes(report: Any) -> tuple[int | None, str]:
    """Model-state bytes from ``accelerator.memory_report()``, and the key used.

    Assumes ``model_state_bytes`` (params + grads + optimizer state kept
    between steps); falls back to summing ``per_device[*]`` params/grads/
    optimizer_state, then to ``total_bytes``.
    """
    if not isinstance(report, dict):
        return None, f"memory_report() returned {type(report).__name__}"
    if isinstance(report.get("model_state_bytes"), (int, float)):
        return int(report["model_state_bytes"]), "model_state_bytes"
    per_device = report.get("per_device")
    if isinstance(per_device, dict):
        kinds = ("params", "grads", "optimizer_state")
        total = sum(
            int(entry.get(k, 0))
            for entry in per_device.values()
            if isinstance(entry, dict)
            for k in kinds
        )
        return total, "sum of per_device params+grads+optimizer_state"
    if isinstance(report.get("total_bytes"), (int, float)):
        return int(report["total_bytes"]), "total_bytes"
    return None, f"no known key in memory_report(): {sorted(report)}"


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rank_body(rank: int, world_size: int, config: str, a: BenchArgs) -> dict[str, Any]:
    """One rank of one configuration: train warmup + steps, time each step."""
    import torch
    import torch.distributed as dist

    engine, zero_config = CONFIGS[config]
    torch.set_num_threads(a.threads)
    model = build_model(a)
    accelerator = None
    if engine == "accel_zero":
        from accel_zero import Accelerator

        accelerator = Accelerator(zero_config=zero_config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr)
        model, optimizer = accelerator.prepare(model, optimizer)
        assert dist.is_initialized(), "accel_zero.Accelerator did not create a process group"
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        if engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, gradient_as_bucket_view=True)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world_size,))
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr)

    total = a.warmup + a.steps
    times: list[float] = []
    losses: list[float] = []
    state_bytes: int | None = None
    state_note = "tensors held"
    report: Any = None
    dist.barrier()
    for step in range(total):
        x = batch_for(a, step, rank, world_size)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        accounting_s = 0.0
        if step == total - 1:  # grads still held: the step's model-state high point
            t_acc = time.perf_counter()
            if accelerator is not None:
                report = accelerator.memory_report()
                state_bytes, state_note = report_bytes(report)
            else:
                state_bytes = held_bytes(model, optimizer)
            accounting_s = time.perf_counter() - t_acc  # not part of the step
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0 - accounting_s)
        losses.append(float(loss.detach()))

    timed = torch.tensor(times[a.warmup :], dtype=torch.float64)
    dist.all_reduce(timed, op=dist.ReduceOp.MAX)  # a step takes as long as its slowest rank
    last = torch.tensor([losses[-1]], dtype=torch.float64)
    dist.all_reduce(last)
    result = {
        "rank": rank,
        "step_times": timed.tolist(),
        "final_loss": float(last.item()) / world_size,
        "state_bytes": state_bytes,
        "state_note": state_note,
        "vm_hwm": vm_hwm_bytes(),
        "report": report if rank == 0 else None,
    }
    # Free the model (a DDP reducer holds the group) while the group is still
    # registered, and let gloo's worker threads finish freeing completed work
    # before the group's last reference drops: ~ProcessGroupGloo joins them
    # with the GIL held, and one still decref'ing a tensor deadlocks (seen).
    del model, optimizer, accelerator
    dist.barrier()
    time.sleep(0.05)
    dist.destroy_process_group()
    return result


# --- a minimal torchrun-style spawner (scripts do not import tests/) ---------


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    env: dict[str, str],
    out: str,
) -> None:
    os.environ.update(env)
    try:
        payload = ("ok", fn(rank, world_size, *args))
    except BaseException:
        payload = ("error", traceback.format_exc())
    path = Path(out) / f"rank{rank}.pkl"
    path.with_suffix(".tmp").write_bytes(pickle.dumps(payload))
    path.with_suffix(".tmp").rename(path)


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun sets for a rank of one local machine (MASTER_*, RANK, WORLD_SIZE, ...)."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    timeout: float,
    env: dict[str, str],
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on fresh processes; raise with every rank's error."""
    ctx = mp.get_context("spawn")
    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as out:
        procs = []
        for rank in range(world_size):
            rank_env = {**env, **torchrun_env(rank, world_size, port)}
            p = ctx.Process(
                target=_child, args=(fn, rank, world_size, args, rank_env, out), daemon=True
            )
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout
        failed_at: float | None = None

        def done(rank: int) -> bool:  # a result, or gone without one
            return (Path(out) / f"rank{rank}.pkl").exists() or not procs[rank].is_alive()

        while not all(done(r) for r in range(world_size)) and time.monotonic() < deadline:
            if failed_at is None and any(not p.is_alive() and p.exitcode != 0 for p in procs):
                failed_at = time.monotonic()
            if failed_at is None:
                for rank in range(world_size):
                    path = Path(out) / f"rank{rank}.pkl"
                    if path.exists() and pickle.loads(path.read_bytes())[0] == "error":
                        failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() > failed_at + 10:
                break
            time.sleep(0.2)
        errors = []
        results = []
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join(5)
            path = Path(out) / f"rank{rank}.pkl"
            if not path.exists():
                errors.append(
                    f"rank {rank}: no result (exit code {p.exitcode}; timeout {timeout:.0f} s?)"
                )
                continue
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                same = [i for i, e in enumerate(errors) if e.endswith(value)]
                if same:  # the same traceback on several ranks: print it once
                    errors[same[0]] = f"rank {rank} and " + errors[same[0]]
                else:
                    errors.append(f"rank {rank}:\n{value}")
            results.append(value)
        if errors:
            raise RuntimeError("\n".join(errors))
        return results


# --- driver --------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    config: str
    times: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    rss: list[int] = dataclasses.field(default_factory=list)
    state: list[int] = dataclasses.field(default_factory=list)
    note: str = ""
    error: str = ""
    report: Any = None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # The exception line is the last of a traceback.
    for ln in reversed(lines):
        if not ln.startswith(("File ", "^", "~")) and ":" in ln:
            return ln[:140]
    return (lines[-1] if lines else "unknown error")[:140]


def run_config(config: str, a: BenchArgs, world_size: int, timeout: float, row: Row) -> None:
    engine, _ = CONFIGS[config]
    if engine == "accel_zero":
        try:
            import accel_zero.accelerator  # noqa: F401
        except Exception as exc:
            row.error = f"import accel_zero failed: {type(exc).__name__}: {exc}"[:160]
            return
    start = time.monotonic()
    try:
        results = spawn_ranks(
            rank_body, world_size, (config, a), timeout, {"OMP_NUM_THREADS": str(a.threads)}
        )
    except RuntimeError as exc:
        row.error = _first_line(str(exc))
        print(f"  {config}: FAILED\n{exc}", file=sys.stderr, flush=True)
        return
    r0 = results[0]
    row.times.extend(r0["step_times"])
    row.losses.append(r0["final_loss"])
    row.rss.append(max(r["vm_hwm"] for r in results))
    states = [r["state_bytes"] for r in results if r["state_bytes"] is not None]
    if states:
        row.state.append(max(states))
    row.note = r0["state_note"]
    row.report = r0["report"] or row.report
    print(
        f"  {config}: median {statistics.median(r0['step_times']):.3f} s/step, "
        f"final loss {r0['final_loss']:.6f}, wall {time.monotonic() - start:.0f} s",
        flush=True,
    )


def format_table(rows: Iterable[Row], a: BenchArgs, world_size: int) -> str:
    rows = list(rows)
    tokens = world_size * a.micro_batch * a.seq
    ddp = next((r for r in rows if r.config == "ddp" and r.times), None)
    ddp_median = statistics.median(ddp.times) if ddp else math.nan
    header = (
        f"{'config':34} {'median s':>9} {'min s':>7} {'x DDP':>6} {'tok/s':>7} "
        f"{'RSS MiB':>8} {'state MiB':>9} {'final loss':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        label = LABELS[r.config]
        if not r.times:
            lines.append(f"{label:34} n/a ({r.error or 'not run'})")
            continue
        med = statistics.median(r.times)
        state = f"{max(r.state) / MiB:9.1f}" if r.state else f"{'n/a':>9}"
        lines.append(
            f"{label:34} {med:9.3f} {min(r.times):7.3f} {med / ddp_median:6.3f} "
            f"{tokens / med:7.0f} {max(r.rss) / MiB:8.0f} {state} {r.losses[-1]:11.6f}"
        )
    return "\n".join(lines)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark model, ranks, threads and output options (bench_offload.py's too)."""
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)"
    )
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")


def bench_args(ns: argparse.Namespace) -> BenchArgs:
    """``BenchArgs`` from :func:`add_run_arguments`'s options plus ``--steps``/``--warmup``."""
    threads = ns.threads or max(1, (os.cpu_count() or 1) // ns.world_size)
    return BenchArgs(
        layers=ns.layers,
        hidden=ns.hidden,
        heads=ns.heads,
        vocab=ns.vocab,
        seq=ns.seq,
        micro_batch=ns.micro_batch,
        steps=ns.steps,
        warmup=ns.warmup,
        lr=ns.lr,
        seed=ns.seed,
        threads=threads,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of every config")
    add_run_arguments(parser)
    ns = parser.parse_args(argv)

    configs = [c.strip() for c in ns.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    a = bench_args(ns)
    print(
        f"GPT-2 {a.layers} layers, hidden {a.hidden}, {a.heads} heads, vocab {a.vocab}, "
        f"seq {a.seq}, micro-batch {a.micro_batch}, fp32 AdamW; {ns.world_size} ranks x "
        f"{a.threads} threads (gloo); {a.steps} timed steps after {a.warmup} warm-up, "
        f"{ns.repeats} repeat(s)",
        flush=True,
    )
    rows = {c: Row(config=c) for c in configs}
    for rep in range(ns.repeats):
        print(f"repeat {rep + 1}/{ns.repeats}", flush=True)
        for c in configs:
            if rows[c].error:
                continue  # a config that failed once will fail again; keep the run short
            run_config(c, a, ns.world_size, ns.timeout, rows[c])
    print()
    print(format_table(rows.values(), a, ns.world_size))
    notes = sorted({r.note for r in rows.values() if r.note and r.times})
    print(f"\nstate MiB: {'; '.join(notes)} (per rank, after optimizer.step(), before zero_grad)")
    losses = [r.losses[-1] for r in rows.values() if r.losses]
    if losses:
        spread = max(losses) - min(losses)
        print(f"final losses: max - min = {spread:.3e}")
    if ns.json:
        ns.json.write_text(
            json.dumps(
                {
                    "args": dataclasses.asdict(a),
                    "rows": [dataclasses.asdict(r) for r in rows.values()],
                },
                indent=1,
                default=str,
            )
        )
    return 0 if all(r.times for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
