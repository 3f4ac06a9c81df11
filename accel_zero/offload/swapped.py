"""Optimizer state on NVMe: the swapped sub-groups and their pipelined Adam step (DESIGN D6).

With ``offload_optimizer: nvme`` each rank's Adam state lives in swap records, one per
:class:`~accel_zero.offload.plan.SubGroup`: the fp32 masters (ZeRO-3: the masters are
not kept in memory at all; ZeRO-1/2: they are the rows of the whole parameters, which
stay in memory) and ``exp_avg`` / ``exp_avg_sq``. What stays in memory is the
compute-dtype working shard the forward gathers (``Unit.working``; with
``offload_param: nvme`` that goes to disk too, see params.py).

[Note: swapped step]
``step`` walks the sub-groups in order with ``buffer_count`` buffers: record i+1 (and
its gradients) is read while record i is stepped by the CPU Adam kernel, which writes
the updated master, both moments and, in the same pass, the compute-dtype copy into the
working shard; record i is written back while i+1 steps. Records carry the number of
steps they hold (their generation), so a record from another step is refused.

[Note: swapped gradients]
ZeRO-3 gradient shards do not stay in memory either: at a synchronising backward each
unit's averaged fp32 shard, as soon as its reduction completes, is copied into its
sub-groups' gradient records (``take_grads``), which are written as soon as every piece
arrived, during the rest of backward. Their norms and finiteness are noted on the way,
for ``clip_grad_norm_`` and the fp16 overflow check; the clip coefficient and the
inverse loss scale are applied by the Adam kernel as it reads them back. Inside an
accumulation window (``no_sync``) shards accumulate in memory as usual.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from accel_zero.offload.adam import AdamHyper, adam_step
from accel_zero.offload.plan import SubGroup, pieces_by_slot
from accel_zero.offload.swap import SwapSpace
from accel_zero.offload.swap_buffer import SwapBuffer
from accel_zero.partition import ParamSlot, Unit
from accel_zero.shards import RowShard, ShardReader
from accel_zero.tracer import MemoryTracer

logger = logging.getLogger(__name__)

__all__ = ["GradStats", "SwappedOptimizer"]

SlotKey = tuple[int, int]
"""(unit index, slot index)."""


@dataclass
class GradStats:
    """What the step needs to know of a swapped gradient without reading it back."""

    norm2: torch.Tensor
    """L2 norm of this rank's rows (fp32 scalar, as ``vector_norm`` computes it)."""
    amax: torch.Tensor
    """Largest absolute value of this rank's rows."""
    finite: bool


@dataclass
class _Batch:
    """Pieces of one sub-group stepped with the same hyper-parameters (one kernel call)."""

    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    copies: list[torch.Tensor | None] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


@dataclass
class _PendingGrad:
    """A gradient record being filled during backward."""

    buf: SwapBuffer
    missing: set[int] = field(default_factory=set)
    """Positions (in ``SubGroup.pieces``) not filled yet."""


class SwappedOptimizer:
    """Adam state of one engine's swapped units, in records on disk.

    ``masters_on_disk``: the records hold the fp32 masters too (ZeRO-3); else the masters
    are the units' resident rows (``Unit.slot_master``). ``grad_space``: gradient
    records (ZeRO-3); None: gradients stay in memory (``UnitGrads``).
    """

    def __init__(
        self,
        *,
        units: Sequence[Unit],
        groups: Sequence[SubGroup],
        space: SwapSpace,
        grad_space: SwapSpace | None,
        masters_on_disk: bool,
        tracer: MemoryTracer,
    ) -> None:
        self.units = units
        self.groups = list(groups)
        self.space = space
        self.grad_space = grad_space
        self.masters_on_disk = masters_on_disk
        self.tracer = tracer
        self.generation = 0
        """Steps the records hold (the optimizer's step count for these units)."""
        self.steps: dict[SlotKey, int] = {}
        """Adam's per-parameter step count (a parameter that got no gradient does not step)."""
        self.grad_stats: dict[SlotKey, GradStats] = {}
        """Swapped gradients since the last zero: their norms and finiteness."""
        self.grads_on_disk = False
        """The gradient records hold this step's gradients (written by ``take_grads``)."""
        self._pending: dict[int, _PendingGrad] = {}
        self.by_slot = pieces_by_slot(self.groups)
        self.fields = (
            ("master", "exp_avg", "exp_avg_sq")
            if masters_on_disk
            else (
                "exp_avg",
                "exp_avg_sq",
            )
        )
        for g in self.groups:
            space.register(g.key, [(name, g.numel, torch.float32) for name in self.fields])
            if grad_space is not None:
                grad_space.register(g.grad_key, [("grad", g.numel, torch.float32)])
        state_bytes = sum(4 * g.numel * len(self.fields) for g in self.groups)
        tracer.add("optimizer_state", "nvme", state_bytes)
        if grad_space is not None:
            tracer.add("grads", "nvme", sum(4 * g.numel for g in self.groups))
        self._initial: dict[int, tuple[SwapBuffer, set[int]]] = {}

    # ------------------------------------------------------------------ set-up
    def slot_rows(self, key: SlotKey, flat: torch.Tensor) -> torch.Tensor:
        """The slot's real rows in a flat padded buffer laid out like its unit's shard."""
        unit = self.units[key[0]]
        return unit.flat_view(unit.slots[key[1]], flat).reshape(-1)

    def add_initial_masters(self, unit_index: int, flat_master: torch.Tensor) -> None:
        """Write a freshly built unit's fp32 masters (zero moments) into its records; a record
        is written once all its pieces arrived (units are built in plan order)."""
        unit = self.units[unit_index]
        for i in range(len(unit.slots)):
            src = self.slot_rows((unit_index, i), flat_master)
            for g, piece in self.by_slot.get((unit_index, i), []):
                if g not in self._initial:
                    buf = self.space.acquire(self.groups[g].key)
                    for name in ("exp_avg", "exp_avg_sq"):
                        buf.fields[name].zero_()
                    self._initial[g] = (buf, set(range(len(self.groups[g].pieces))))
                buf, missing = self._initial[g]
                pos = self.groups[g].pieces.index(piece)
                buf.fields["master"][piece.offset : piece.offset + piece.numel].copy_(
                    src[piece.elem_start : piece.elem_start + piece.numel]
                )
                missing.discard(pos)
                if not missing:
                    del self._initial[g]
                    self.space.write(buf, generation=0)

    def write_zero_moments(self) -> None:
        """Records of zero moments (masters resident: ZeRO-1/2)."""
        for g in self.groups:
            buf = self.space.acquire(g.key)
            for name in self.fields:
                buf.fields[name].zero_()
            self.space.write(buf, generation=0)
        self.space.flush()

    def finish_setup(self) -> None:
        if self._initial:
            raise AssertionError(f"sub-groups {sorted(self._initial)} never got all masters")
        self.space.flush()

    # -------------------------------------------------------------- gradients
    def take_grads(self, unit_index: int, acc: torch.Tensor, had_grad: Sequence[bool]) -> None:
        """A unit's final averaged gradient shard: note its statistics and copy it into the
        gradient records, writing each record once complete. See [Note: swapped gradients]."""
        assert self.grad_space is not None
        unit = self.units[unit_index]
        for i, slot in enumerate(unit.slots):
            key = (unit_index, i)
            rows = unit.flat_view(slot, acc)
            if had_grad[i] and rows.numel():
                self.grad_stats[key] = GradStats(
                    norm2=torch.linalg.vector_norm(rows, 2.0),
                    amax=rows.abs().max(),
                    finite=bool(torch.isfinite(rows).all()),
                )
            elif had_grad[i]:
                zero = torch.zeros((), device=rows.device)
                self.grad_stats[key] = GradStats(norm2=zero, amax=zero, finite=True)
            src = rows.reshape(-1)
            for g, piece in self.by_slot.get(key, []):
                pending = self._pending_grad(g)
                pending.buf.fields["grad"][piece.offset : piece.offset + piece.numel].copy_(
                    src[piece.elem_start : piece.elem_start + piece.numel]
                )
                pending.missing.discard(self.groups[g].pieces.index(piece))
                if not pending.missing:
                    del self._pending[g]
                    self.grad_space.write(pending.buf, generation=self.generation)
        self.grads_on_disk = True

    def _pending_grad(self, g: int) -> _PendingGrad:
        assert self.grad_space is not None
        pending = self._pending.get(g)
        if pending is None:
            buf = self.grad_space.acquire(self.groups[g].grad_key)
            pending = _PendingGrad(buf, set(range(len(self.groups[g].pieces))))
            self._pending[g] = pending
        return pending

    def end_of_backward(self) -> None:
        """Write gradient records some of whose units did not run this backward (zeros
        there: those parameters got no gradient, and the step skips them)."""
        assert self.grad_space is not None
        for g, pending in sorted(self._pending.items()):
            for pos in pending.missing:
                piece = self.groups[g].pieces[pos]
                pending.buf.fields["grad"][piece.offset : piece.offset + piece.numel].zero_()
            self.grad_space.write(pending.buf, generation=self.generation)
        self._pending.clear()

    def zero_grad(self) -> None:
        self.grad_stats.clear()
        self.grads_on_disk = False

    # -------------------------------------------------------------------- step
    def step(
        self,
        hyper_of: Callable[[SlotKey], AdamHyper],
        has_grad: Callable[[SlotKey], bool],
        resident_grad: Callable[[SlotKey], torch.Tensor | None],
        *,
        inv_scale: float,
        copies: Callable[[SlotKey], torch.Tensor | None],
        unit_done: Callable[[int], None] | None = None,
        threads: int | None = None,
    ) -> set[int]:
        """One Adam step of every swapped parameter that has a gradient; returns the units
        stepped. ``resident_grad`` gives in-memory gradient rows (no grad_space);
        ``copies(key)`` the slot's flat compute-dtype rows to refresh, or None;
        ``unit_done(u)`` is called once a unit's last sub-group of this step is stepped (its
        working shard is final). See [Note: swapped step]."""
        stepping = [key for key in self.by_slot if has_grad(key)]
        for key in stepping:
            self.steps[key] = self.steps.get(key, 0) + 1
        stepping_set = set(stepping)
        gen = self.generation
        grads_swapped = self.grad_space is not None
        if grads_swapped and stepping and not self.grads_on_disk:
            raise RuntimeError("swapped gradients are missing: no backward since zero_grad")
        last_group: dict[int, int] = {}
        for g in self.groups:
            for index in g.units:
                last_group[index] = g.index
        self._prefetch(0, gen)
        for g in self.groups:
            self._prefetch(g.index + 1, gen)
            buf = self.space.get(g.key, generation=gen)
            gbuf = (
                self.grad_space.get(g.grad_key, generation=gen)
                if self.grad_space is not None and self.grads_on_disk
                else None
            )
            # Unit by unit (a unit's pieces are consecutive), so a unit's working shard is
            # final, and can be written back (parameters on NVMe), as soon as its last piece
            # is stepped: at most one unit's record is held for it.
            for unit_index, run in itertools.groupby(g.pieces, key=lambda piece: piece.unit):
                batches: dict[AdamHyper, _Batch] = {}
                for piece in run:
                    key = (piece.unit, piece.slot)
                    if key not in stepping_set or not piece.numel:
                        continue
                    a, b = piece.offset, piece.offset + piece.numel
                    e0, e1 = piece.elem_start, piece.elem_start + piece.numel
                    if self.masters_on_disk:
                        master = buf.fields["master"][a:b]
                    else:
                        owner = self.units[piece.unit]
                        master = owner.slot_master(owner.slots[piece.slot]).reshape(-1)[e0:e1]
                    if gbuf is not None:
                        grad = gbuf.fields["grad"][a:b]
                    else:
                        rows = resident_grad(key)
                        assert rows is not None, key
                        grad = rows.reshape(-1)[e0:e1]
                    copy = copies(key)
                    batch = batches.setdefault(hyper_of(key), _Batch())
                    batch.params.append(master)
                    batch.grads.append(grad)
                    batch.exp_avgs.append(buf.fields["exp_avg"][a:b])
                    batch.exp_avg_sqs.append(buf.fields["exp_avg_sq"][a:b])
                    batch.copies.append(None if copy is None else copy[e0:e1])
                    batch.steps.append(self.steps[key])
                for hyper, batch in batches.items():
                    adam_step(
                        batch.params,
                        batch.grads,
                        batch.exp_avgs,
                        batch.exp_avg_sqs,
                        batch.steps,
                        hyper,
                        inv_scale=inv_scale,
                        copies=batch.copies,
                        threads=threads,
                    )
                if unit_done is not None and last_group[unit_index] == g.index:
                    unit_done(unit_index)
            self.space.write(buf, generation=gen + 1)
            if gbuf is not None:
                self.grad_space.release(gbuf)  # type: ignore[union-attr]
        self.generation = gen + 1
        self.grads_on_disk = False
        return {key[0] for key in stepping}

    def _prefetch(self, index: int, gen: int) -> None:
        if index >= len(self.groups) or self.space.free_buffers == 0:
            return
        g = self.groups[index]
        self.space.prefetch(g.key, generation=gen)
        if self.grad_space is not None and self.grads_on_disk and self.grad_space.free_buffers:
            self.grad_space.prefetch(g.grad_key, generation=gen)

    # ------------------------------------------------------------ reading back
    def read_unit_masters(self, unit_index: int, out: torch.Tensor) -> None:
        """Fill ``out`` (the unit's flat padded fp32 layout) with its masters from disk."""
        assert self.masters_on_disk
        unit = self.units[unit_index]
        out.zero_()
        needed = sorted({g for i in range(len(unit.slots)) for g, _ in self.by_slot.get(
            (unit_index, i), [])})  # fmt: skip
        for g in needed:
            buf = self.space.get(self.groups[g].key, generation=self.generation)
            try:
                for piece in self.groups[g].pieces:
                    if piece.unit != unit_index:
                        continue
                    dst = self.slot_rows((unit_index, piece.slot), out)
                    dst[piece.elem_start : piece.elem_start + piece.numel].copy_(
                        buf.fields["master"][piece.offset : piece.offset + piece.numel]
                    )
            finally:
                self.space.release(buf)

    def iter_shards(
        self, fields: Sequence[tuple[str, str]], key_of: Callable[[SlotKey, str], str]
    ) -> Iterator[RowShard]:
        """RowShards of the named record fields (``(field, name)`` pairs), sub-group by
        sub-group; a parameter spanning sub-groups is assembled first (at most one at a
        time). ``key_of(slot, name)`` names each shard."""
        partial: dict[tuple[SlotKey, str], torch.Tensor] = {}
        for g in self.groups:
            buf = self.space.get(g.key, generation=self.generation)
            try:
                for piece in g.pieces:
                    key = (piece.unit, piece.slot)
                    unit = self.units[piece.unit]
                    slot = unit.slots[piece.slot]
                    parts = self.by_slot[key]
                    whole = len(parts) == 1
                    for field_name, name in fields:
                        data = buf.fields[field_name][piece.offset : piece.offset + piece.numel]
                        if whole:
                            yield _row_shard(key_of(key, name), slot, unit.rank, data)
                            continue
                        total = sum(p.numel for _, p in parts)
                        acc = partial.setdefault((key, name), torch.empty(total))
                        acc[piece.elem_start : piece.elem_start + piece.numel].copy_(data)
                        if piece is parts[-1][1]:
                            yield _row_shard(key_of(key, name), slot, unit.rank, acc)
                            del partial[(key, name)]
            finally:
                self.space.release(buf)

    def load_shards(
        self,
        reader: ShardReader,
        fields: Sequence[tuple[str, str]],
        key_of: Callable[[SlotKey, str], str],
    ) -> None:
        """Overwrite the named fields of every record from a checkpoint (any world size);
        a key the checkpoint lacks (a parameter that never stepped) becomes zeros. The other
        fields are kept; records move one generation on."""
        gen = self.generation
        self._prefetch(0, gen)
        for g in self.groups:
            self._prefetch(g.index + 1, gen)
            buf = self.space.get(g.key, generation=gen)
            for piece in g.pieces:
                key = (piece.unit, piece.slot)
                unit = self.units[piece.unit]
                slot = unit.slots[piece.slot]
                start = slot.row_start(unit.rank) + piece.row_start
                for field_name, name in fields:
                    dst = buf.fields[field_name][piece.offset : piece.offset + piece.numel]
                    if reader.shape(key_of(key, name)) is None:
                        dst.zero_()
                        continue
                    rows = reader.read_rows(
                        key_of(key, name), start, start + piece.row_end - piece.row_start
                    )
                    dst.copy_(rows.reshape(-1))
            self.space.write(buf, generation=gen + 1)
        self.space.flush()
        self.generation = gen + 1

    def close(self, *, keep: bool = False) -> None:
        self.space.close(keep=keep)
        if self.grad_space is not None:
            self.grad_space.close(keep=keep)


def _row_shard(key: str, slot: ParamSlot, rank: int, data: torch.Tensor) -> RowShard:
    if not slot.shape:
        return RowShard(key=key, global_shape=(), row_start=0, tensor=data.view(()))
    rows = data.numel() // max(1, math.prod(slot.shape[1:]))
    return RowShard(
        key=key,
        global_shape=tuple(slot.shape),
        row_start=slot.row_start(rank),
        tensor=data.view(rows, *slot.shape[1:]),
    )
