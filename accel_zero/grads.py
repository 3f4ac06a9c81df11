"""Gradient reduction per unit (DESIGN D4, D5).

When every gradient of a unit has been accumulated (a post-accumulate-grad
hook per parameter counts them), the unit joins a bucket that is reduced
asynchronously, so communication overlaps the rest of backward:

- ZeRO-2/3 (``reduce_scatter``): the unit's full gradients are copied into one
  flat ``(world, S)`` buffer in ``reduce_dtype`` and reduce-scattered; the
  averaged shard is added into an fp32 accumulator, which is what the master
  rows see as their gradient. The full-size ``param.grad`` is freed as soon as
  it has been copied.
- ZeRO-1 (``all_reduce``): gradients stay whole, exactly as under DDP: the
  unit's ``param.grad`` are all-reduced (averaged) in place, and the optimizer
  reads this rank's rows of them. Under ``no_sync`` nothing is reduced and
  ``param.grad`` holds the local sum, as DDP's does. ZeRO-3's small persistent
  parameters are treated the same way (they are whole anyway), so a model made
  of them trains bit for bit like DDP.

Gradients add up across backward passes until ``zero`` (any ``zero_grad``),
as torch's do.

[Note: reduce order]
Reductions are collectives: every rank must issue them in the same order.
Units complete in autograd's execution order, which is the same on every rank
when every rank runs the same modules (checked by the coordinator each step);
units left at the end of backward are flushed in unit order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from accel_zero.comm import PendingWork
from accel_zero.partition import BufferPool, Unit, copy_in_rows, full_rows, same_device
from accel_zero.tracer import MemoryTracer, nbytes

__all__ = ["ReduceBuckets", "UnitGrads"]


@dataclass(eq=False)
class _Bucket:
    """One coalesced collective in flight and the units waiting on it."""

    work: PendingWork
    flat: torch.Tensor
    """The pooled input (and, for all-reduce, the output too)."""
    waiting: int
    """Members that have not consumed their result yet; the last gives ``flat`` back."""
    pool: BufferPool

    def done_with(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.pool.give(self.flat)


class UnitGrads:
    """The gradient side of one unit: readiness count, reduction in flight, accumulated result."""

    def __init__(
        self, unit: Unit, reduce_dtype: torch.dtype, tracer: MemoryTracer, *, all_reduce: bool
    ) -> None:
        self.unit = unit
        self.reduce_dtype = reduce_dtype
        self.tracer = tracer
        self.all_reduce = all_reduce
        """Whole gradients all-reduced in place, exactly as DDP (ZeRO-1, and ZeRO-3's small
        persistent parameters); else reduce-scattered into ``acc`` (ZeRO-2/3). Under
        ``no_sync`` whole gradients add up locally and are reduced once, at the synchronising
        backward, as DDP's do; the others reduce every micro-batch, so that no whole gradient
        outlives its unit's backward."""
        self.expected = sum(1 for s in unit.slots if s.requires_grad)
        """Gradients this unit waits for before it reduces."""
        self.acc: torch.Tensor | None = None
        """Reduce-scatter mode: averaged fp32 gradient shard, accumulated; None = none yet."""
        self.had_grad = [False] * len(unit.slots)
        """Per slot: a gradient arrived since the last zero (else the optimizer sees None,
        as torch does for a parameter that took no part in the loss)."""
        self.ready = 0
        self.reduced = False
        self._pending: tuple[_Bucket, torch.Tensor] | None = None
        self._traced = 0
        """All-reduce mode: bytes of whole gradients reported to the tracer."""
        self.acc_device: torch.device | None = None
        """Where the accumulator lives (host memory under optimizer offload); None: where
        the reduction ran."""
        self.sink: Callable[[int, torch.Tensor, list[bool]], None] | None = None
        """Set for one synchronising backward when the shard goes to disk (offload nvme):
        receives (unit index, final averaged shard, had_grad) and the shard is dropped."""

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

    def numel_in_bucket(self) -> int:
        world = self.unit.comm.world_size
        return self.unit.full_numel if self.all_reduce else self.unit.numel * world

    def pack(self, dst: torch.Tensor) -> None:
        """Copy the unit's gradients into its part of a bucket (zeros where none arrived).

        Reduce-scatter: ``dst`` is the unit's ``(world, S)`` columns and the full
        gradients are freed. All-reduce: ``dst`` is flat and they stay.
        """
        world = self.unit.comm.world_size
        offset = 0
        for i, slot in enumerate(self.unit.slots):
            grad = slot.param.grad if slot.requires_grad else None
            self.had_grad[i] |= grad is not None
            if self.all_reduce:
                part = dst[offset : offset + slot.numel]
                if grad is None:
                    part.zero_()
                else:
                    part.copy_(grad.reshape(-1))
                offset += slot.numel
            else:
                copy_in_rows(grad, slot, world, dst)
                slot.param.grad = None
        self.reduced = True

    def pending(self, bucket: _Bucket, out: torch.Tensor) -> None:
        self._pending = (bucket, out)

    def finish(self) -> None:
        """Wait for the reduction and take its (averaged) result."""
        if self._pending is None:
            return
        bucket, out = self._pending
        self._pending = None
        bucket.work.wait()
        world = self.unit.comm.global_world_size  # averaged over every rank (hybrid: all groups)
        if self.all_reduce:
            self._finish_all_reduce(out, world)
            bucket.done_with()
            return
        # Reduce-scatter: the bucket's input is dead once the collective is done.
        bucket.done_with()
        shard = out.float() if out.dtype != torch.float32 else out
        if self.acc_device is not None and not same_device(shard.device, self.acc_device):
            shard = shard.to(self.acc_device)  # optimizer offload: the step runs on the host
        if self.reduce_dtype == torch.float32 and world > 1:
            shard.div_(world)
        if self.acc is None:
            self.acc = shard  # freshly allocated by this reduction: owned, no copy
            self.tracer.add_tensor("grads", self.acc)
        else:
            self.acc.add_(shard)
        if self.sink is not None:
            self.sink(self.unit.index, self.acc, self.had_grad)
            self.tracer.sub_tensor("grads", self.acc)
            self.acc = None
        self.tracer.mark("reduced", self.unit.name)

    def _finish_all_reduce(self, out: torch.Tensor, world: int) -> None:
        scale = 1.0 / world if self.reduce_dtype == torch.float32 and world > 1 else 1.0
        offset = 0
        traced = 0
        for slot in self.unit.slots:
            grad = slot.param.grad
            if grad is not None:
                reduced = out[offset : offset + slot.numel].view(grad.shape)
                with torch.no_grad():
                    if scale != 1.0:
                        torch.mul(reduced, scale, out=reduced)
                    grad.copy_(reduced)
                traced += nbytes(grad)
            offset += slot.numel
        if traced > self._traced:
            self.tracer.add("grads", self.unit.device, traced - self._traced)
            self._traced = traced

    def zero(self) -> None:
        """Forget every gradient (``zero_grad`` in any form)."""
        self.had_grad = [False] * len(self.unit.slots)
        if self.acc is not None:
            self.tracer.sub_tensor("grads", self.acc)
            self.acc = None
        if self._traced:
            self.tracer.sub("grads", self.unit.device, self._traced)
            self._traced = 0

    @property
    def has_any(self) -> bool:
        return any(self.had_grad) or (
            self.all_reduce and any(s.param.grad is not None for s in self.unit.slots)
        )

    def slot_grad(self, index: int) -> torch.Tensor | None:
        """This rank's rows of slot ``index``'s averaged gradient (a view), or None."""
        slot = self.unit.slots[index]
        if self.all_reduce:
            grad = slot.param.grad
            return None if grad is None else full_rows(grad, slot, self.unit.rank)
        if self.acc is None or not self.had_grad[index]:
            return None
        return self.unit.flat_view(slot, self.acc)


class ReduceBuckets:
    """Coalesces completed units into collectives of up to ``bucket_size`` elements.

    A unit joins the open bucket of its kind (reduce-scatter or all-reduce) when its
    gradients are complete; a bucket is sent (one collective) once it holds
    ``bucket_size`` elements, and whatever is left at the end of backward is sent then.
    [Note: reduce order] holds because buckets fill in completion order, the same on
    every rank.
    """

    max_in_flight = 2
    """Buckets whose collective may be in flight at once: sending another first finishes the
    oldest, so reduce buffers (4 bytes per parameter of the unit) do not pile up until the
    end of backward, while two keep the network busy during the compute that follows."""

    def __init__(
        self, bucket_size: int, reduce_dtype: torch.dtype, async_op: bool, pool: BufferPool
    ) -> None:
        self.pool = pool
        self.bucket_size = bucket_size
        self.reduce_dtype = reduce_dtype
        self.async_op = async_op
        self._open: dict[bool, list[UnitGrads]] = {False: [], True: []}
        self._numel: dict[bool, int] = {False: 0, True: 0}
        self._in_flight: list[list[UnitGrads]] = []

    def add(self, grads: UnitGrads) -> None:
        kind = grads.all_reduce
        if not grads.wants_reduce or grads in self._open[kind]:
            return
        self._open[kind].append(grads)
        self._numel[kind] += grads.numel_in_bucket()
        if self._numel[kind] >= self.bucket_size:
            self._send(kind)

    def flush(self) -> None:
        """Send the open buckets (reduce-scatter first, then all-reduce)."""
        self._send(False)
        self._send(True)

    def _send(self, all_reduce: bool) -> None:
        members = self._open[all_reduce]
        self._open[all_reduce], self._numel[all_reduce] = [], 0
        if not members:
            return
        first = members[0].unit
        comm, world, device = first.comm, first.comm.world_size, first.device
        ranks = comm.global_world_size  # gradients average over the world (hybrid sharding)
        names = ", ".join(g.unit.name for g in members)
        if all_reduce:
            total = sum(g.unit.full_numel for g in members)
            flat = self.pool.take(total, self.reduce_dtype, device)
            col = 0
            for g in members:
                g.pack(flat[col : col + g.unit.full_numel])
                col += g.unit.full_numel
            if self.reduce_dtype != torch.float32 and ranks > 1:
                flat.div_(ranks)  # low-precision sums: divide first so they cannot overflow
            work = comm.all_reduce(
                flat,
                what=f"all_reduce of gradients of {names}",
                async_op=self.async_op,
                group="world",  # whole gradients: one all-reduce over every rank
            )
            out = flat
            sizes = [g.unit.full_numel for g in members]
        else:
            total = sum(g.unit.numel for g in members)
            flat = self.pool.take(world * total, self.reduce_dtype, device)
            flat2d = flat.view(world, total)
            col = 0
            for g in members:
                g.pack(flat2d[:, col : col + g.unit.numel])
                col += g.unit.numel
            if self.reduce_dtype != torch.float32 and ranks > 1:
                flat.div_(ranks)
            # The output is laid out like the input's row: each unit's shard at its column.
            out = torch.empty(total, dtype=self.reduce_dtype, device=device)
            work = comm.reduce_scatter(
                out,
                flat,
                what=f"reduce_scatter of gradients of {names}",
                async_op=self.async_op,
                sum_over="world",  # hybrid sharding: then all-reduced across the replicas
                input_is_scratch=True,  # the pooled bucket is not read again
            )
            sizes = [g.unit.numel for g in members]
        members[0].tracer.mark("reduce", names)
        bucket = _Bucket(work=work, flat=flat, waiting=len(members), pool=self.pool)
        col = 0
        for g, size in zip(members, sizes, strict=True):
            g.pending(bucket, out[col : col + size])
            col += size
        if not self.async_op:
            for g in members:
                g.finish()
            return
        self._in_flight.append(members)
        while len(self._in_flight) > self.max_in_flight:
            for g in self._in_flight.pop(0):
                g.finish()

    def drain(self) -> None:
        """Send what is open and take every result (the end of backward)."""
        self.flush()
        for members in self._in_flight:
            for g in members:
                g.finish()
        self._in_flight.clear()
