"""The one place that calls ``torch.distributed`` collectives (DESIGN D11).

Every collective the engine issues goes through a :class:`Comm` object, which
counts calls and bytes per operation (tests read ``comm.stats``; a regression
shows up as a count), wraps each call in a profiler range, and turns a failing
or timed-out collective into an error that names the rank, the operation and
what was being communicated.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "Comm",
    "CommStats",
    "PendingWork",
    "import_dynamo_before_process_group",
    "let_gloo_workers_finish",
]

# torch >= 2.13 names the flat collectives *_single; older releases *_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    """Counters for every collective issued through one :class:`Comm`."""

    calls: Counter[str] = field(default_factory=Counter)
    """Number of calls per operation name (``all_gather``, ``reduce_scatter``, ...)."""
    bytes: Counter[str] = field(default_factory=Counter)
    """Bytes sent into each operation (the input tensor's size on this rank)."""
    wait_seconds: float = 0.0
    """Seconds this rank spent blocked waiting for collectives to finish."""

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.wait_seconds = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "bytes": dict(self.bytes),
            "wait_seconds": self.wait_seconds,
        }


def import_dynamo_before_process_group() -> None:
    """Import ``torch._dynamo`` while no process group exists yet.

    Measured with torch 2.13 + gloo: when ``torch._dynamo`` is first imported
    *after* ``init_process_group`` (building any ``torch.optim`` optimizer or
    calling ``from_pretrained`` does it), ``destroy_process_group()`` no longer
    frees the group: its gloo threads (``pt_gloo_runloop``, ``gloo_tcp_loop``)
    outlive ``end_training()`` and are torn down during interpreter
    finalisation, where the process sometimes aborts with "terminate called
    without an active exception". Imported first, the group is freed at
    ``destroy_process_group()``. Every training script imports it anyway (the
    optimizer), so this moves the cost, it does not add it. Called by
    ``accel_zero.Accelerator`` and the test harness; tests/integration/
    test_torchrun.py and tests/distributed/test_lazy.py check the threads are gone.
    """
    if dist.is_available() and not dist.is_initialized():
        importlib.import_module("torch._dynamo")


def let_gloo_workers_finish() -> None:
    """Release the GIL briefly before a gloo group can be freed.

    [Note: gloo teardown deadlock] ``~ProcessGroupGloo`` joins its worker
    threads while the caller holds the GIL; a worker still freeing a finished
    ``AsyncAllreduceWork`` whose tensors have Python objects needs the GIL to
    decref them. Seen (gdb) when a DDP reducer dropped the last reference to
    the group right after the last all-reduce: both threads wait forever. Call
    this before the last reference to a group can drop (``destroy_process_group``,
    freeing a DDP model).
    """
    time.sleep(0.05)


class PendingWork:
    """An asynchronous collective in flight; ``wait()`` is idempotent."""

    def __init__(self, comm: Comm, work: Any, what: str) -> None:
        self._comm = comm
        self._work = work
        self.what = what

    @property
    def done(self) -> bool:
        return self._work is None

    def wait(self) -> None:
        if self._work is None:
            return
        work, self._work = self._work, None
        start = time.perf_counter()
        try:
            work.wait()
        except Exception as exc:
            raise self._comm.error(self.what, exc) from exc
        finally:
            self._comm.stats.wait_seconds += time.perf_counter() - start


class Comm:
    """Process group, rank facts and every collective of one engine.

    ``group=None`` means the default (world) group. A world of size 1 short-cuts
    every collective to a local copy, so the engine needs no special cases.
    """

    def __init__(
        self,
        group: Any = None,
        timeout: float | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            self.group = None
            self.rank = 0
            self.world_size = 1
        else:
            self.group = group
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        self.timeout = timeout
        self.device = torch.device(device)
        """Where small control tensors live (NCCL needs them on the GPU)."""
        self.stats = CommStats()
        # Collectives issued in a profiler range named accel_zero::<op>.

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ errors
    def error(self, what: str, exc: BaseException) -> RuntimeError:
        hint = (
            "a collective timed out or failed: most often another rank died, or ranks ran "
            "different modules (the execution order must be the same on every rank)"
        )
        timeout = f" (timeout {self.timeout:.0f} s)" if self.timeout else ""
        return RuntimeError(
            f"accel_zero rank {self.rank}/{self.world_size}: {what} failed{timeout}: {hint}. "
            f"Underlying error: {exc}"
        )

    def _run(self, op: str, what: str, nbytes: int, fn: Any, async_op: bool) -> PendingWork:
        self.stats.calls[op] += 1
        self.stats.bytes[op] += nbytes
        with torch.profiler.record_function(f"accel_zero::{op}"):
            try:
                work = fn(async_op)
            except Exception as exc:
                raise self.error(what, exc) from exc
        pending = PendingWork(self, work if async_op else None, what)
        return pending

    # ------------------------------------------------------------- collectives
    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, *, what: str, async_op: bool = False
    ) -> PendingWork:
        """``output`` (world_size × numel) receives every rank's ``input`` in rank order."""
        if not self.distributed:
            output.copy_(input)
            return PendingWork(self, None, what)
        return self._run(
            "all_gather",
            what,
            input.numel() * input.element_size(),
            lambda a: _all_gather(output, input, group=self.group, async_op=a),
            async_op,
        )

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, *, what: str, async_op: bool = False
    ) -> PendingWork:
        """Sum of every rank's ``input``; rank r receives slice r into ``output``."""
        if not self.distributed:
            output.copy_(input)
            return PendingWork(self, None, what)
        return self._run(
            "reduce_scatter",
            what,
            input.numel() * input.element_size(),
            lambda a: _reduce_scatter(
                output, input, op=dist.ReduceOp.SUM, group=self.group, async_op=a
            ),
            async_op,
        )

    def all_reduce(
        self,
        tensor: torch.Tensor,
        *,
        op: str = "sum",
        what: str,
        async_op: bool = False,
    ) -> PendingWork:
        """In-place all-reduce with ``op`` in {"sum", "max", "min"}."""
        if not self.distributed:
            return PendingWork(self, None, what)
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[
            op
        ]
        return self._run(
            "all_reduce",
            what,
            tensor.numel() * tensor.element_size(),
            lambda a: dist.all_reduce(tensor, op=reduce_op, group=self.group, async_op=a),
            async_op,
        )

    def all_gather_object(self, obj: Any, *, what: str) -> list[Any]:
        """Every rank's ``obj`` (small Python objects only: checks, traces)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._run(
            "all_gather_object",
            what,
            0,
            lambda a: dist.all_gather_object(out, obj, group=self.group),
            False,
        )
        return out

    def check_same(self, value: int, *, what: str) -> list[int]:
        """Every rank's 64-bit ``value`` (one tiny all-gather, counted as ``check``)."""
        if not self.distributed:
            return [value]
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        out = torch.empty(self.world_size, dtype=torch.int64, device=self.device)
        self._run(
            "check",
            what,
            8,
            lambda a: _all_gather(out, mine, group=self.group, async_op=a),
            False,
        )
        return out.tolist()

    def broadcast(self, tensor: torch.Tensor, *, src: int = 0, what: str) -> None:
        if not self.distributed:
            return
        self._run(
            "broadcast",
            what,
            tensor.numel() * tensor.element_size(),
            lambda a: dist.broadcast(tensor, src=src, group=self.group, async_op=a),
            False,
        )

    def barrier(self, *, what: str) -> None:
        if not self.distributed:
            return
        self._run("barrier", what, 0, lambda a: dist.barrier(group=self.group, async_op=a), False)
