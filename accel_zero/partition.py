"""Parameter shards and units (DESIGN D2).

A :class:`ParamSlot` is one parameter's place in its unit: the parameter is cut
along dim 0 into ``world_size`` row ranges of ``chunk = ceil(rows / world)``
rows (torch.chunk / DTensor ``Shard(0)`` layout), the last ones padded with
zero rows. A :class:`Unit` is the group of parameters communicated together:
its shards sit in one flat buffer, so a unit is gathered with one
``all_gather`` and its gradients reduced with one ``reduce_scatter``.

[Note: flat layout]
The unit's flat shard is the concatenation, slot by slot, of this rank's
padded rows (``slot.shard_numel`` elements at ``slot.offset``). An all-gather
output viewed as ``(world, S)`` therefore holds rank r's shard in row r, and
slot i's full padded parameter is ``out[:, off:off + s].view(world, chunk,
row)``: the copy-out and the gradient copy-in both go through that view.

[Note: parameter identity]
Parameters keep their identity: the registered ``nn.Parameter`` objects stay
in the module (ties and the user's optimizer keep working) and only their
``.data`` changes: the full tensor while gathered, an empty tensor while
sharded. A lazily built model (DTensor parameters) gets plain parameters in
its place, once, at set-up; ``Unit.replaced`` maps old to new.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from accel_zero.comm import Comm, PendingWork
from accel_zero.tracer import MemoryTracer

logger = logging.getLogger(__name__)

__all__ = ["BufferPool", "ParamSlot", "Unit", "UnitState", "copy_in_rows", "copy_out_rows"]


class BufferPool:
    """Reuses the engine's internal flat buffers (all-gather outputs, reduce inputs).

    Every unit of a transformer has the same size, so the buffer one unit just
    gave back fits the next. On CPU this saves a fresh multi-megabyte allocation
    (mmap, page faults, zeroing) per gather and per reduction. Only buffers that
    never escape the engine come here: gathered parameters themselves do not,
    since autograd may still hold views of them.
    """

    def __init__(self, keep_per_size: int = 2) -> None:
        self.keep_per_size = keep_per_size
        self._free: dict[tuple[int, torch.dtype, torch.device], list[torch.Tensor]] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.get((numel, dtype, torch.device(device)))
        if free:
            return free.pop()
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, t: torch.Tensor) -> None:
        free = self._free.setdefault((t.numel(), t.dtype, t.device), [])
        if len(free) < self.keep_per_size and all(f is not t for f in free):
            free.append(t)

    def clear(self) -> None:
        self._free.clear()


class UnitState(enum.Enum):
    SHARDED = "sharded"
    GATHERING = "gathering"
    GATHERED = "gathered"


@dataclass(eq=False)
class ParamSlot:
    """One parameter's place in its unit's flat buffers."""

    fqn: str
    """First fully qualified name of the parameter in the model."""
    param: nn.Parameter
    """The registered parameter (the same object wherever it is tied)."""
    shape: torch.Size
    """Full shape; 0-d parameters are treated as one row of one element."""
    dtype: torch.dtype
    """The parameter's dtype for compute (gathered) and storage (shard)."""
    orig_dtype: torch.dtype
    """The dtype it was built or loaded in (what an export writes)."""
    chunk: int
    """Rows per rank, padded: ceil(rows / world_size)."""
    row_numel: int
    offset: int
    """Start of this slot's rows in the unit's flat shard."""
    requires_grad: bool

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) else 1

    @property
    def shard_numel(self) -> int:
        return self.chunk * self.row_numel

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_rows(self, rank: int) -> int:
        """How many real (unpadded) rows rank ``rank`` owns."""
        return max(0, min(self.chunk, self.rows - rank * self.chunk))


def copy_out_rows(gathered: torch.Tensor, slot: ParamSlot, world: int, dst: torch.Tensor) -> None:
    """Copy slot's rows from a ``(world, S)`` gathered buffer into ``dst`` (full shape).

    See [Note: flat layout].
    """
    src = gathered[:, slot.offset : slot.offset + slot.shard_numel].view(
        world, slot.chunk, slot.row_numel
    )
    dst2 = dst.view(slot.rows, slot.row_numel)
    full, rem = divmod(slot.rows, slot.chunk)
    if full:
        dst2[: full * slot.chunk].view(full, slot.chunk, slot.row_numel).copy_(src[:full])
    if rem:
        dst2[full * slot.chunk :].copy_(src[full, :rem])


def copy_in_rows(
    src: torch.Tensor | None, slot: ParamSlot, world: int, flat2d: torch.Tensor
) -> None:
    """Copy a full-shape tensor (a gradient) into a ``(world, S)`` buffer, padding with zeros.

    ``src=None`` (no gradient this step) writes zeros. See [Note: flat layout].
    """
    dst = flat2d[:, slot.offset : slot.offset + slot.shard_numel].view(
        world, slot.chunk, slot.row_numel
    )
    if src is None:
        dst.zero_()
        return
    src2 = src.reshape(slot.rows, slot.row_numel)
    full, rem = divmod(slot.rows, slot.chunk)
    if full:
        dst[:full].copy_(src2[: full * slot.chunk].view(full, slot.chunk, slot.row_numel))
    if rem:
        dst[full, :rem].copy_(src2[full * slot.chunk :])
        dst[full, rem:].zero_()
        start = full + 1
    else:
        start = full
    if start < world:
        dst[start:].zero_()


def _empty_like_placeholder(slot: ParamSlot, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=slot.dtype, device=device)


@dataclass(eq=False)
class Unit:
    """Parameters communicated together, with their flat shard and gather state.

    ``resharded`` units (ZeRO-3) hold only their shard between uses and are
    gathered for compute; the others (ZeRO-1/2, and small persistent params in
    ZeRO-3) keep full parameters on every rank and are re-gathered after each
    optimizer step.
    """

    index: int
    name: str
    module: nn.Module | None
    """The module whose forward gathers this unit (None for the persistent unit)."""
    slots: list[ParamSlot]
    comm: Comm
    device: torch.device
    resharded: bool
    tracer: MemoryTracer
    pool: BufferPool
    shard: torch.Tensor = field(init=False)
    """This rank's rows of every slot, flat, in the parameters' dtype."""
    master: torch.Tensor = field(init=False)
    """fp32 rows the optimizer updates; the same tensor as ``shard`` in fp32 training."""
    state: UnitState = field(init=False, default=UnitState.SHARDED)
    _gather_out: torch.Tensor | None = field(init=False, default=None)
    _gather_work: PendingWork | None = field(init=False, default=None)
    _full: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        dtypes = {s.dtype for s in self.slots}
        assert len(dtypes) == 1, f"unit {self.name} mixes dtypes {dtypes}; split by dtype first"
        self.dtype = dtypes.pop()
        self.numel = sum(s.shard_numel for s in self.slots)
        self.full_numel = sum(s.numel for s in self.slots)
        self.shard = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.tracer.add_tensor("params", self.shard)
        self.master = self.shard
        if not self.resharded:
            self.state = UnitState.GATHERED

    def shard_view(self, slot: ParamSlot, flat: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's padded rows of ``slot`` in ``flat`` (default: the param shard)."""
        flat = self.shard if flat is None else flat
        view = flat[slot.offset : slot.offset + slot.shard_numel]
        return view.view(slot.chunk, *slot.shape[1:]) if len(slot.shape) else view

    # ---------------------------------------------------------- gather/release
    def start_gather(self) -> None:
        """Issue the all-gather (asynchronously); idempotent while gathering or gathered."""
        if self.state is not UnitState.SHARDED:
            return
        world = self.comm.world_size
        self._gather_out = self.pool.take(world * self.numel, self.dtype, self.device)
        self.tracer.add_tensor("gathered_params", self._gather_out)
        self._gather_work = self.comm.all_gather(
            self._gather_out, self.shard, what=f"all_gather of unit {self.name}", async_op=True
        )
        self.state = UnitState.GATHERING

    def finish_gather(self) -> None:
        """Wait for the all-gather and point every parameter at its full rows."""
        if self.state is UnitState.GATHERED:
            return
        self.start_gather()
        assert self._gather_work is not None and self._gather_out is not None
        self._gather_work.wait()
        world = self.comm.world_size
        gathered = self._gather_out.view(world, self.numel)
        full = torch.empty(self.full_numel, dtype=self.dtype, device=self.device)
        self.tracer.add_tensor("gathered_params", full)
        offset = 0
        for slot in self.slots:
            dst = full[offset : offset + slot.numel].view(slot.shape)
            copy_out_rows(gathered, slot, world, dst)
            slot.param.data = dst
            offset += slot.numel
        self.tracer.sub_tensor("gathered_params", self._gather_out)
        self.pool.give(self._gather_out)
        self._gather_out = None
        self._gather_work = None
        self._full = full
        self.state = UnitState.GATHERED

    def release(self) -> None:
        """Drop the full parameters (ZeRO-3 units only); idempotent."""
        if not self.resharded or self.state is UnitState.SHARDED:
            return
        if self.state is UnitState.GATHERING:
            # A prefetch that was never used: complete it so collectives stay paired.
            assert self._gather_work is not None and self._gather_out is not None
            self._gather_work.wait()
            self.tracer.sub_tensor("gathered_params", self._gather_out)
            self.pool.give(self._gather_out)
            self._gather_out = None
            self._gather_work = None
        for slot in self.slots:
            slot.param.data = _empty_like_placeholder(slot, self.device)
        if self._full is not None:
            self.tracer.sub_tensor("gathered_params", self._full)
            self._full = None
        self.state = UnitState.SHARDED

    def refresh_full(self, async_op: bool = False) -> PendingWork | None:
        """Re-gather a non-resharded unit after its shard changed (optimizer step)."""
        assert not self.resharded
        world = self.comm.world_size
        out = torch.empty(world * self.numel, dtype=self.dtype, device=self.device)
        work = self.comm.all_gather(
            out, self.shard, what=f"all_gather of updated unit {self.name}", async_op=async_op
        )
        self._refresh = (out, work)
        if not async_op:
            self.finish_refresh()
            return None
        return work

    def finish_refresh(self) -> None:
        out, work = self._refresh
        work.wait()
        gathered = out.view(self.comm.world_size, self.numel)
        with torch.no_grad():
            for slot in self.slots:
                copy_out_rows(gathered, slot, self.comm.world_size, slot.param.data)
        del self._refresh

    def placeholder(self, slot: ParamSlot) -> torch.Tensor:
        return _empty_like_placeholder(slot, self.device)
