"""Sharded checkpoints saved by real rank processes (gloo barrier), and killed mid-save.

``test_two_process_save_reads_on_other_world_sizes``: 2 ranks of the shared harness pool save
with a real gloo barrier; the test process reads the rows 1, 2 and 4 ranks would own.

``test_kill_9_at_each_moment_of_a_save``: a folder holds checkpoint OLD; 2 fresh rank
processes save NEW into it and one of them sends itself SIGKILL at a chosen moment of the
save (the ``on_event`` hook fires at each step of [Note: crash-safe publish]); the other rank
is then killed too, as torchrun does with the rest of a job. The folder must then load as
exactly OLD or exactly NEW (every tensor, every state, the metadata), the moment decides
which, and the next save into the same folder must succeed and leave no debris.

Rank processes come from a ``forkserver`` that has imported torch once, so each of the
moments costs a fork and a gloo rendezvous, not two interpreter start-ups.
"""

from __future__ import annotations

import collections
import datetime
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from accel_zero.checkpoint import CheckpointError, begin_save, open_checkpoint
from accel_zero.shards import RowShard, local_row_range
from tests.distributed.harness import find_free_port, init_pg, run_ranks

OLD, NEW, NEXT = 1, 2, 3
WORLD = 2


def checkpoint_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {f"model/layers.{i}.weight": torch.randn(9 + i, 16, generator=gen) for i in range(4)}
    state["model/norm.weight"] = torch.randn(16, generator=gen)
    state["optim/layers.0.weight/exp_avg"] = torch.randn(9, 16, generator=gen).to(torch.bfloat16)
    state["optim/layers.0.weight/step"] = torch.tensor(float(seed))
    return state


def rank_shards(seed: int, rank: int, world_size: int) -> Iterator[RowShard]:
    for key, full in checkpoint_state(seed).items():
        if full.dim() == 0:
            yield RowShard(key=key, global_shape=(), row_start=0, tensor=full, replicated=True)
            continue
        start, end = local_row_range(full.shape[0], rank, world_size)
        yield RowShard(
            key=key, global_shape=tuple(full.shape), row_start=start, tensor=full[start:end]
        )


def save_rank(
    rank: int,
    world_size: int,
    directory: str,
    seed: int,
    barrier: Any,
    kill: tuple[int, str, int] | None = None,
) -> str:
    """One rank's save of state ``seed``; SIGKILLs itself at event ``kill = (rank, event, n)``."""
    seen: collections.Counter[str] = collections.Counter()

    def on_event(event: str) -> None:
        seen[event] += 1
        if kill is not None and (rank, event, seen[event]) == kill:
            os.kill(os.getpid(), signal.SIGKILL)

    with begin_save(
        directory, rank=rank, world_size=world_size, barrier=barrier, on_event=on_event
    ) as save:
        save.write_shards(rank_shards(seed, rank, world_size))
        save.write_state("progress", {"seed": seed, "step": 10 * seed})
        save.write_state("rng", {"rank": rank, "seed": seed}, per_rank=True)
        return str(save.commit({"seed": seed}))


def loaded_seed(directory: Path) -> int:
    """Which state the folder loads as; fails on any mix of two states."""
    with open_checkpoint(directory) as reader:
        seed = reader.metadata["seed"]
        assert reader.read_state("progress") == {"seed": seed, "step": 10 * seed}
        for rank in range(reader.world_size):
            assert reader.read_state("rng", rank=rank) == {"rank": rank, "seed": seed}
        expected = checkpoint_state(seed)
        assert set(reader.keys()) == set(expected)
        for key, value in expected.items():
            assert torch.equal(reader.read(key), value), f"{key} is not from state {seed}"
    return int(seed)


def save_in_threads(directory: Path, seed: int) -> None:
    """The same save by 2 ranks simulated with threads (fast; the format is the same)."""
    barrier = threading.Barrier(WORLD, timeout=60)
    results: list[Any] = []

    def run(rank: int) -> None:
        try:
            results.append(save_rank(rank, WORLD, str(directory), seed, barrier.wait))
        except BaseException as exc:
            results.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(WORLD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors


# --------------------------------------------------- a real 2-process save
def _pool_save(rank: int, world_size: int, directory: str, seed: int) -> str:
    from accel_zero.comm import Comm

    with init_pg(rank, world_size):
        comm = Comm()
        return save_rank(rank, world_size, directory, seed, lambda: comm.barrier(what="save"))


def test_two_process_save_reads_on_other_world_sizes(tmp_path: Path, rank_pool: Any) -> None:
    directory = tmp_path / "ckpt"
    save_in_threads(directory, OLD)  # replaced by the real save
    published = run_ranks(_pool_save, WORLD, str(directory), NEW, pool=rank_pool(WORLD))
    assert published[0] == published[1] == str(directory / "v000002")
    assert loaded_seed(directory) == NEW
    state = checkpoint_state(NEW)
    with open_checkpoint(directory) as reader:
        for readers in (1, 4):
            for rank in range(readers):
                for key, full in state.items():
                    if full.dim() == 0:
                        continue
                    start, end = local_row_range(full.shape[0], rank, readers)
                    assert torch.equal(reader.read_rows(key, start, end), full[start:end])


# ------------------------------------------------------------- kill -9
def _crash_rank(
    rank: int, port: int, directory: str, seed: int, kill: tuple[int, str, int]
) -> None:
    import torch.distributed as dist

    from accel_zero.comm import Comm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    comm = Comm()
    save_rank(rank, WORLD, directory, seed, lambda: comm.barrier(what="save"), kill)


def _forkserver() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "accel_zero.checkpoint", __name__])
    return ctx


def crash_save(directory: Path, seed: int, kill: tuple[int, str, int]) -> None:
    """Run a 2-process save of ``seed``; rank ``kill[0]`` SIGKILLs itself at the moment."""
    ctx = _forkserver()
    port = find_free_port()
    procs = [
        ctx.Process(target=_crash_rank, args=(rank, port, str(directory), seed, kill), daemon=True)
        for rank in range(WORLD)
    ]
    for proc in procs:
        proc.start()
    victim = procs[kill[0]]
    victim.join(120)
    try:
        assert victim.exitcode == -signal.SIGKILL, f"rank {kill[0]} exited {victim.exitcode}"
    finally:
        for proc in procs:  # the launcher takes the rest of the job down
            if proc.is_alive():
                proc.kill()
            proc.join(10)


# (name, rank killed, event, occurrence, what must load)
MOMENTS = [
    ("before any file", 1, "staging-ready", 1, OLD),
    ("mid-file", 0, "tensor-written", 2, OLD),
    ("after files, before publish", 1, "rank-files-done", 1, OLD),
    ("publish: manifest written", 0, "manifest-written", 1, OLD),
    ("publish: version renamed", 0, "version-renamed", 1, OLD),
    ("publish: pointer staged", 0, "pointer-staged", 1, OLD),
    ("after publish, before cleanup", 0, "published", 1, NEW),
]


def test_kill_9_at_each_moment_of_a_save(tmp_path: Path) -> None:
    outcomes = {}
    for i, (name, rank, event, count, expected) in enumerate(MOMENTS):
        directory = tmp_path / f"moment{i}"
        save_in_threads(directory, OLD)
        crash_save(directory, NEW, (rank, event, count))
        outcomes[name] = loaded_seed(directory)
        debris = sorted(p.name for p in directory.iterdir())
        save_in_threads(directory, NEXT)  # the next save cleans up and publishes
        assert loaded_seed(directory) == NEXT
        left = sorted(p.name for p in directory.iterdir())
        assert len(left) == 2 and left[0] == "LATEST" and left[1].startswith("v"), (left, debris)
        print(
            f"kill -9 rank {rank} at {name} ({event} #{count}): loads "
            f"{'OLD' if outcomes[name] == OLD else 'NEW'} (expected "
            f"{'OLD' if expected == OLD else 'NEW'}); left {debris}"
        )
    assert outcomes == {name: expected for name, *_, expected in MOMENTS}


def test_kill_9_during_a_first_save_is_refused_as_incomplete(tmp_path: Path) -> None:
    good = tmp_path / "checkpoint_1"
    save_in_threads(good, OLD)
    fresh = tmp_path / "checkpoint_2"
    crash_save(fresh, NEW, (0, "tensor-written", 2))
    with pytest.raises(CheckpointError, match=r"checkpoint_2 is incomplete") as info:
        open_checkpoint(fresh)
    assert info.value.last_complete == good
    assert loaded_seed(good) == OLD
