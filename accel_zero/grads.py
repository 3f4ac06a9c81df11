"""Gradient reduction per unit (DESIGN D4).

When every gradient of a unit has been accumulated (a post-accumulate-grad
hook per parameter counts them), the unit's full gradients are copied into one
flat ``(world, S)`` buffer in ``reduce_dtype`` and reduce-scattered
asynchronously, so communication overlaps the rest of backward. The result is
averaged over ranks and added into an fp32 shard accumulator, which is what
the optimizer's master shard sees as ``.grad``. The full-size ``param.grad``
is freed as soon as it has been copied.

[Note: reduce order]
Reductions are collectives: every rank must issue them in the same order.
Units complete in autograd's execution order, which is the same on every rank
when every rank runs the same modules (checked by the coordinator each step);
units left at the end of backward are flushed in unit order.
"""

from __future__ import annotations

import torch

from accel_zero.comm import PendingWork
from accel_zero.partition import BufferPool, Unit, copy_in_rows
from accel_zero.tracer import MemoryTracer

__all__ = ["ReduceBuckets", "UnitGrads"]


class UnitGrads:
    """The gradient side of one unit: readiness count, in-flight reduction, fp32 accumulator."""

    def __init__(self, unit: Unit, reduce_dtype: torch.dtype, tracer: MemoryTracer) -> None:
        self.unit = unit
        self.reduce_dtype = reduce_dtype
        self.tracer = tracer
        self.expected = sum(1 for s in unit.slots if s.requires_grad)
        """Gradients this unit waits for before it reduces."""
        self.acc: torch.Tensor | None = None
        """Averaged gradient shard in fp32, accumulated over micro-batches; None = no gradient."""
        self.had_grad = [False] * len(unit.slots)
        """Per slot: a gradient arrived since the last zero (else the optimizer sees None,
        as torch does for a parameter that took no part in the loss)."""
        self.ready = 0
        self.reduced = False
        self._pending: tuple[PendingWork, torch.Tensor, torch.Tensor] | None = None
        self._pool: BufferPool | None = None

    def begin_backward(self) -> None:
        self.ready = 0
        self.reduced = False

    def mark_ready(self) -> bool:
        """One more parameter's gradient is accumulated; True when the unit is complete."""
        self.ready += 1
        return self.ready == self.expected

    @property
    def wants_reduce(self) -> bool:
        return not self.reduced and self.expected > 0

    def pack(self, flat2d: torch.Tensor) -> None:
        """Copy the unit's full gradients into its ``(world, S)`` columns of a bucket, free them.

        Zeros where a parameter got no gradient.
        """
        world = self.unit.comm.world_size
        for i, slot in enumerate(self.unit.slots):
            grad = slot.param.grad if slot.requires_grad else None
            self.had_grad[i] |= grad is not None
            copy_in_rows(grad, slot, world, flat2d)
            slot.param.grad = None
        self.reduced = True

    def pending(
        self, work: PendingWork, out: torch.Tensor, flat: torch.Tensor, pool: BufferPool
    ) -> None:
        self._pending = (work, out, flat)
        self._pool = pool

    def finish(self) -> None:
        """Wait for the reduction and accumulate the averaged shard into ``acc``."""
        if self._pending is None:
            return
        work, out, flat = self._pending
        self._pending = None
        work.wait()
        # The bucket's input is dead once the collective is done (shared by its members:
        # the pool ignores a second give of the same tensor).
        if self._pool is not None:
            self._pool.give(flat)
        world = self.unit.comm.world_size
        shard = out.float() if out.dtype != torch.float32 else out
        if self.reduce_dtype == torch.float32 and world > 1:
            shard.div_(world)
        if self.acc is None:
            self.acc = shard  # freshly allocated by this reduction: owned, no copy
            self.tracer.add_tensor("grads", self.acc)
        else:
            self.acc.add_(shard)

    def zero(self) -> None:
        self.had_grad = [False] * len(self.unit.slots)
        if self.acc is not None:
            self.tracer.sub_tensor("grads", self.acc)
            self.acc = None

    def slot_grad(self, index: int) -> torch.Tensor | None:
        """The fp32 gradient shard of slot ``index``, shaped like its master shard."""
        if self.acc is None or not self.had_grad[index]:
            return None
        return self.unit.shard_view(self.unit.slots[index], self.acc)


class ReduceBuckets:
    """Coalesces completed units into reduce-scatters of up to ``bucket_size`` elements.

    A unit joins the open bucket when its gradients are complete; the bucket is
    sent (one collective) once it holds ``bucket_size`` elements, and whatever
    is left at the end of backward is sent then. [Note: reduce order] holds
    because buckets fill in completion order, the same on every rank.
    """

    def __init__(
        self, bucket_size: int, reduce_dtype: torch.dtype, async_op: bool, pool: BufferPool
    ) -> None:
        self.pool = pool
        self.bucket_size = bucket_size
        self.reduce_dtype = reduce_dtype
        self.async_op = async_op
        self._open: list[UnitGrads] = []
        self._numel = 0

    def add(self, grads: UnitGrads) -> None:
        if not grads.wants_reduce or grads in self._open:
            return
        self._open.append(grads)
        self._numel += grads.unit.numel * grads.unit.comm.world_size
        if self._numel >= self.bucket_size:
            self.flush()

    def flush(self) -> None:
        """Send the open bucket (one reduce-scatter for all its units)."""
        members, self._open, self._numel = self._open, [], 0
        if not members:
            return
        first = members[0].unit
        comm, world, device = first.comm, first.comm.world_size, first.device
        total = sum(g.unit.numel for g in members)
        flat = self.pool.take(world * total, self.reduce_dtype, device)
        flat2d = flat.view(world, total)
        col = 0
        for g in members:
            g.pack(flat2d[:, col : col + g.unit.numel])
            col += g.unit.numel
        if self.reduce_dtype != torch.float32 and world > 1:
            flat.div_(world)  # low-precision sums: divide first so they cannot overflow
        # The output is laid out like the input's row: each unit's shard at its column.
        out = torch.empty(total, dtype=self.reduce_dtype, device=device)
        names = ", ".join(g.unit.name for g in members)
        work = comm.reduce_scatter(
            out, flat, what=f"reduce_scatter of gradients of {names}", async_op=self.async_op
        )
        col = 0
        for g in members:
            g.pending(work, out[col : col + g.unit.numel], flat, self.pool)
            col += g.unit.numel
        if not self.async_op:
            for g in members:
                g.finish()
