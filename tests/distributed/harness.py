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

``RankPool(world_size)`` keeps the rank processes alive across calls
(``run_ranks(..., pool=pool)`` or ``pool.run(fn, *args)``), which saves the
seconds each rank spends importing torch, transformers and accelerate; the
``rank_pool`` fixture in tests/conftest.py hands out one pool per world size
for the whole session.

Results travel through one pickle file per rank in a temporary folder, which
avoids the classic deadlock of joining a process whose queue is not drained.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import gc
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from accel_zero.comm import import_dynamo_before_process_group, let_gloo_workers_finish
from accel_zero.launch import find_free_port

__all__ = ["RankFailure", "RankPool", "find_free_port", "gloo_threads", "init_pg", "run_ranks"]

# How long a rank's Python stack dump precedes the harness's own deadline.
_STACK_DUMP_LEAD_S = 2.0
_POLL_S = 0.05
# How long a pooled rank may take to clean up after a task before the pool restarts.
_POOL_IDLE_WAIT_S = 20.0


class RankFailure(AssertionError):
    """One or more ranks failed; ``failures`` maps rank -> its report text."""

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


def gloo_threads() -> list[str]:
    """Names of this process's live gloo threads; empty once every group has been freed.

    A destroyed group whose object something still holds keeps its threads (two
    ``pt_gloo_runloop`` and a ``gloo_tcp_loop``) until interpreter exit, where gloo can
    abort the process. See [Note: a mesh keeps its group alive] in accel_zero/lazy.py.
    """
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        with contextlib.suppress(OSError):
            names.append(comm.read_text().strip())
    return sorted(n for n in names if "gloo" in n)


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
        import_dynamo_before_process_group()  # else destroy cannot free the group
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
            let_gloo_workers_finish()
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


def _run_task(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    out_dir: str,
    deadline_wall: float,
) -> None:
    """Run ``fn`` on this rank and write its outcome to ``out_dir/result{rank}.pkl``."""
    out = Path(out_dir)
    with open(out / f"stack{rank}.txt", "w") as stack_file:
        # Wall-clock deadline from the parent: spawn start-up (importing torch)
        # eats seconds that a timer started here would not see.
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
                let_gloo_workers_finish()  # See [Note: gloo teardown deadlock]
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
            else:
                let_gloo_workers_finish()  # groups fn made and freed may still be draining
    tmp = out / f"result{rank}.pkl.tmp"
    tmp.write_bytes(payload)
    tmp.rename(out / f"result{rank}.pkl")  # atomic: the parent never reads half a file


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    env: dict[str, str],
    out_dir: str,
    deadline_wall: float,
) -> None:
    """Entry point of one spawned rank (``run_ranks`` without a pool)."""
    os.environ.update(env)
    faulthandler.enable(all_threads=True)  # a crash (SIGSEGV, abort) prints every Python stack
    torch.set_num_threads(1)
    _run_task(fn, rank, world_size, args, out_dir, deadline_wall)


def _reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state so the next task starts fresh."""
    if "accelerate.state" not in sys.modules:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _pool_worker(rank: int, world_size: int, tasks: Any, idle: Any) -> None:
    """A pool rank: run tasks until ``None``, each with fresh env and process group."""
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    base_env = dict(os.environ)
    # See [Note: pool cleanup]: cyclic garbage is collected only between tasks.
    gc.disable()
    idle.set()
    while True:
        task = tasks.get()
        if task is None:
            return
        idle.clear()
        fn, args, env, out_dir, deadline_wall = task
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update(env)
        try:
            _run_task(fn, rank, world_size, args, out_dir, deadline_wall)
        finally:
            _reset_accelerate_state()
            torch.set_num_threads(1)
            # [Note: pool cleanup] Pooled ranks hung (rarely, at load) at the
            # first line of a task with no Python frame below it: a collection
            # triggered there ran the finalizer of an earlier task's object (a
            # process group, a reducer, pending async work) and it blocked. So
            # automatic GC is off in pooled ranks and garbage is collected here,
            # between tasks; if that blocks, ``idle`` is never set and the next
            # ``run`` restarts the pool with a warning naming this task.
            gc.collect()
        idle.set()


def _torchrun_env(rank: int, world_size: int, port: int, extra: Mapping[str, str] | None) -> dict:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "OMP_NUM_THREADS": "1",
        **(dict(extra) if extra else {}),
    }


class RankPool:
    """``world_size`` rank processes kept alive to run many functions in turn.

    Spawning ranks and importing torch, transformers and accelerate in each
    costs seconds per test on a small machine; a pool pays it once. Each
    ``run`` gets a fresh port, environment and (if ``fn`` makes one) process
    group; Accelerate's process-wide state is reset after each task. After
    any failure or timeout the workers are killed (a rank may be wedged in a
    collective) and the next ``run`` spawns new ones. Use ``run_ranks`` for
    tests whose point is a fresh process (peak RSS, start-up, os._exit).
    """

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._procs: list[Any] = []
        self._queues: list[Any] = []
        self._idle: list[Any] = []
        self._last_task = ""

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._queues = [ctx.SimpleQueue() for _ in range(self.world_size)]
        self._idle = [ctx.Event() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_pool_worker,
                args=(rank, self.world_size, self._queues[rank], self._idle[rank]),
                name=f"pool-rank{rank}",
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        failure_grace: float = 10.0,
    ) -> list[Any]:
        """Like ``run_ranks(fn, self.world_size, *args, ...)`` on the pooled ranks."""
        if self._procs and not self._wait_idle(_POOL_IDLE_WAIT_S):
            stuck = [r for r, e in enumerate(self._idle) if not e.is_set()]
            warnings.warn(
                f"RankPool({self.world_size}): ranks {stuck} still cleaning up after "
                f"{self._last_task} {_POOL_IDLE_WAIT_S:.0f} s after it returned (a blocking "
                "destructor?); restarting the pool",
                RuntimeWarning,
                stacklevel=2,
            )
            self.close()
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        self._last_task = getattr(fn, "__qualname__", repr(fn))
        port = find_free_port()
        deadline_wall = time.time() + timeout
        with tempfile.TemporaryDirectory(prefix="accel_zero_ranks_") as tmp:
            for rank, queue in enumerate(self._queues):
                rank_env = _torchrun_env(rank, self.world_size, port, env)
                queue.put((fn, args, rank_env, tmp, deadline_wall))
            try:
                return _wait(self._procs, Path(tmp), timeout=timeout, failure_grace=failure_grace)
            except RankFailure:
                self.close()
                raise

    def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for event, proc in zip(self._idle, self._procs, strict=True):
            while proc.is_alive() and not event.wait(0.1):
                if time.monotonic() > deadline:
                    return False
        return True

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for proc, queue in zip(self._procs, self._queues, strict=True):
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    queue.put(None)
        for proc in self._procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        self._procs, self._queues, self._idle = [], [], []

    def __enter__(self) -> RankPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
    pool: RankPool | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks.

    Returns the ranks' return values in rank order. Raises ``RankFailure`` (an
    ``AssertionError``) naming every failing rank with its traceback, or the
    ranks still running at ``timeout`` with their stacks; never waits longer
    than ``timeout`` (+ a few seconds to kill and reap). Fresh processes
    unless ``pool`` (a ``RankPool`` of the same world size) is given.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if pool is not None:
        if pool.world_size != world_size:
            raise ValueError(f"pool has world size {pool.world_size}, asked for {world_size}")
        return pool.run(fn, *args, timeout=timeout, env=env, failure_grace=failure_grace)
    ctx = mp.get_context("spawn")
    port = find_free_port()
    deadline_wall = time.time() + timeout
    with tempfile.TemporaryDirectory(prefix="accel_zero_ranks_") as tmp:
        procs = []
        try:
            for rank in range(world_size):
                proc = ctx.Process(
                    target=_rank_main,
                    args=(
                        fn,
                        rank,
                        world_size,
                        args,
                        _torchrun_env(rank, world_size, port, env),
                        tmp,
                        deadline_wall,
                    ),
                    name=f"rank{rank}",
                    daemon=True,
                )
                proc.start()
                procs.append(proc)
            return _wait(procs, Path(tmp), timeout=timeout, failure_grace=failure_grace)
        finally:
            for proc in procs:  # reaped on success; killed if the caller was interrupted
                if proc.is_alive():
                    proc.kill()
                    proc.join(5.0)


def _wait(procs: list[Any], out: Path, *, timeout: float, failure_grace: float) -> list[Any]:
    """Collect every rank's result file; kill stragglers after a failure or at timeout."""
    world_size = len(procs)
    deadline = time.monotonic() + timeout
    first_failure_at: float | None = None
    outcomes: dict[int, tuple[str, Any]] = {}
    reason = ""
    while True:
        for rank, proc in enumerate(procs):
            if rank in outcomes:
                continue
            res = _read_result(out, rank)
            if res is None and not proc.is_alive():
                res = _read_result(out, rank)  # written just before it exited?
                if res is None:
                    res = (
                        "error",
                        f"process exited with code {proc.exitcode} and no result "
                        "(killed by a signal or os._exit?); its output is above",
                    )
            if res is None:
                continue
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
