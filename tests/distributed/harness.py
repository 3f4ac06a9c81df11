"""Run a function on N local ranks (gloo on CPU) and report every rank's failure.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` fresh processes
(``spawn`` context, so each rank imports torch on its own, as under torchrun),
sets the environment torchrun would set (MASTER_ADDR/MASTER_PORT/RANK/
WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE), calls ``fn(rank, world_size, *args)``
on each and returns the ranks' return values in rank order.

``fn`` must be a module-level function and its arguments picklable. The
process group is *not* created for you: the code under test (an Accelerator)
usually creates it from the environment; plain tests use ``init_pg``::

    def _body(rank, world_size):
        with init_pg(rank, world_size):
            ...

Failures: if any rank raises or dies, the others get ``failure_grace`` seconds
to finish (a peer blocked in a collective usually errors out at once when the
failed rank's connection closes), then are killed; one ``AssertionError``
carries every failing rank's traceback. If ranks are still running at
``timeout`` they are killed and their Python stacks (dumped by
``faulthandler`` just before the deadline) are in the error, so a hang names
the line it hung on.

Results travel through one pickle file per rank in a temporary folder, which
avoids the classic deadlock of joining a process whose queue is not drained.
"""

from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RankFailure", "find_free_port", "init_pg", "run_ranks"]

# How long a rank's Python stack dump precedes the harness's own deadline.
_STACK_DUMP_LEAD_S = 2.0
_POLL_S = 0.05


class RankFailure(AssertionError):
    """One or more ranks failed; ``failures`` maps rank -> its report text."""

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class init_pg:
    """Initialise the default gloo process group from the harness environment.

    Works as a call (``init_pg(rank, ws)`` then ``init_pg.teardown()``) or as a
    context manager (``with init_pg(rank, ws): ...``) that destroys the group
    on exit.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        backend: str = "gloo",
        timeout: float = 60.0,
    ) -> None:
        if dist.is_initialized():
            raise RuntimeError(
                f"rank {rank}: a default process group already exists; "
                "call init_pg once per rank (or use the one the code under test created)"
            )
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )

    @staticmethod
    def teardown() -> None:
        """Destroy the default process group if one exists (idempotent)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> init_pg:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    env: dict[str, str],
    out_dir: str,
    deadline_wall: float,
) -> None:
    """Entry point of one spawned rank: run ``fn`` and write its outcome."""
    os.environ.update(env)
    torch.set_num_threads(1)
    out = Path(out_dir)
    stack_file = open(out / f"stack{rank}.txt", "w")
    # Wall-clock deadline from the parent: spawn start-up (importing torch) eats
    # seconds that a timer started here would not see.
    stack_dump_after = deadline_wall - time.time() - _STACK_DUMP_LEAD_S
    if stack_dump_after > 0:
        faulthandler.dump_traceback_later(stack_dump_after, exit=False, file=stack_file)
    try:
        result = fn(rank, world_size, *args)
        payload = pickle.dumps(("ok", result))
    except BaseException:
        payload = pickle.dumps(("error", traceback.format_exc()))
    finally:
        faulthandler.cancel_dump_traceback_later()
        if dist.is_initialized():
            # Leave no half-open group behind; errors here must not mask fn's.
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    tmp = out / f"result{rank}.pkl.tmp"
    tmp.write_bytes(payload)
    tmp.rename(out / f"result{rank}.pkl")  # atomic: the parent never reads half a file
    stack_file.close()


def _read_result(out: Path, rank: int) -> tuple[str, Any] | None:
    path = out / f"result{rank}.pkl"
    if not path.exists():
        return None
    return pickle.loads(path.read_bytes())  # type: ignore[no-any-return]


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    failure_grace: float = 10.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks.

    Returns the ranks' return values in rank order. Raises ``RankFailure`` (an
    ``AssertionError``) naming every failing rank with its traceback, or the
    ranks still running at ``timeout`` with their stacks; never waits longer
    than ``timeout`` (+ a second or two to kill and reap).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    port = find_free_port()
    deadline_wall = time.time() + timeout
    with tempfile.TemporaryDirectory(prefix="accel_zero_ranks_") as tmp:
        out = Path(tmp)
        procs = []
        for rank in range(world_size):
            rank_env = {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "GROUP_RANK": "0",
                "OMP_NUM_THREADS": "1",
                **(dict(env) if env else {}),
            }
            proc = ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, args, rank_env, tmp, deadline_wall),
                name=f"rank{rank}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        return _wait(procs, out, timeout=timeout, failure_grace=failure_grace)


def _wait(procs: list[Any], out: Path, *, timeout: float, failure_grace: float) -> list[Any]:
    world_size = len(procs)
    start = time.monotonic()
    deadline = start + timeout
    first_failure_at: float | None = None
    outcomes: dict[int, tuple[str, Any]] = {}
    reason = ""
    while True:
        for rank, proc in enumerate(procs):
            if rank in outcomes:
                continue
            if not proc.is_alive():
                proc.join()
                # The result file is written before the process exits.
                res = _read_result(out, rank)
                if res is None:
                    res = (
                        "error",
                        f"process exited with code {proc.exitcode} and no result "
                        "(killed by a signal or os._exit?)",
                    )
                outcomes[rank] = res
                if res[0] == "error" and first_failure_at is None:
                    first_failure_at = time.monotonic()
        if len(outcomes) == world_size:
            break
        now = time.monotonic()
        if now >= deadline:
            reason = f"timed out after {timeout:.0f} s"
            break
        if first_failure_at is not None and now >= first_failure_at + failure_grace:
            reason = f"still running {failure_grace:.0f} s after another rank failed"
            break
        time.sleep(_POLL_S)

    for rank, proc in enumerate(procs):
        if rank in outcomes:
            continue
        proc.kill()
        proc.join(5.0)
        stack = out / f"stack{rank}.txt"
        dump = stack.read_text() if stack.exists() else ""
        outcomes[rank] = (
            "error",
            f"killed: {reason}."
            + (f"\nPython stacks just before the deadline:\n{dump}" if dump.strip() else ""),
        )

    failures = {r: str(o[1]) for r, o in sorted(outcomes.items()) if o[0] == "error"}
    if failures:
        parts = [f"{len(failures)} of {world_size} ranks failed ({sorted(failures)}):"]
        for rank, text in failures.items():
            parts.append(f"\n----- rank {rank} -----\n{text.rstrip()}")
        raise RankFailure("\n".join(parts), failures)
    return [outcomes[r][1] for r in range(world_size)]
