"""Parameter shards and units (DESIGN D2, D5).

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

[Note: masters and precision]
Parameters are what the user built (fp32, usually) everywhere the user looks:
between uses, inside ``gathered_parameters``, in exports. The optimizer steps
fp32 *masters*, which are the parameters' storage wherever possible:
- a resharded unit (ZeRO-3) keeps one flat fp32 shard, ``master``; a forward
  gathers it in the compute dtype (bf16/fp16 under mixed precision): the shard
  is cast into a pooled buffer first, so the all-gather moves half the bytes,
  and no second low-precision shard is kept (FSDP2's layout, 16 bytes per
  parameter / N with Adam);
- a replicated unit (ZeRO-1/2, and the small persistent parameters of ZeRO-3)
  keeps whole parameters on every rank; its masters are this rank's rows *of
  those parameters* (views, no copy) when they are fp32, else a flat fp32
  ``master`` beside them. After a step the rows are all-gathered back.
The optimizer sees only real rows (``Unit.slot_master``), never the padding.
With optimizer offload the masters leave the compute device (host memory, or NVMe swap
records: accel_zero/offload/), and a resharded unit keeps a compute-dtype ``working``
shard as its gather source instead (with ``offload_param: nvme`` that is on disk too and
comes through ``param_source``).

[Note: parameter identity]
Parameters keep their identity: the registered ``nn.Parameter`` objects stay
in the module (ties and the user's optimizer keep working) and only their
``.data`` changes: the full tensor while gathered, an empty tensor while
sharded. A lazily built model (DTensor parameters) gets plain parameters in
its place, once, at set-up.

[Note: placeholder dtype]
Giving ``.data`` another dtype resets a parameter's gradient accumulator
(torch's ``set_data``). Inside a pass that would split the gradient of a unit
used twice (released and gathered again between its uses) over two
accumulators, and the unit would be reduced after its first backward use. So
between uses *inside* a pass the empty placeholder has the compute dtype, like
the gathered tensor; only at the end of a pass (``rest``), when no graph holds
an accumulator, does it go back to the user's dtype.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from accel_zero.comm import Comm, PendingWork
from accel_zero.tracer import MemoryTracer, nbytes

logger = logging.getLogger(__name__)

__all__ = [
    "BufferPool",
    "ParamSlot",
    "ParamSource",
    "Unit",
    "UnitOwner",
    "UnitState",
    "copy_in_rows",
    "copy_out_rows",
    "device_key",
    "full_rows",
    "group_by_unit",
    "pack_rows",
    "same_device",
]


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cpu`` and ``cpu:0`` (or ``cuda`` and ``cuda:0``) are one device to us; torch's ``==``
    says they differ (which once replaced every parameter of a CPU model)."""
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def device_key(device: torch.device | str) -> tuple[str, int]:
    """A hashable key with one value per memory, for what :func:`same_device` compares:
    the engine asks for ``cpu:0`` (or ``cuda``) where the tensors it gets back say ``cpu``
    (``cuda:0``). Keyed by ``torch.device``, BufferPool never matched on CPU and every
    buffer was allocated afresh."""
    d = torch.device(device)
    if d.type == "cpu":
        return ("cpu", -1)
    if d.index is None and d.type == "cuda":
        return ("cuda", torch.cuda.current_device())
    return (d.type, -1 if d.index is None else d.index)


@dataclass
class UnitOwner:
    """A module that owns parameters: a unit module, or the root (``name == ""``)."""

    module: nn.Module
    name: str
    """Its qualified name; ``""`` for the root."""
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    """(first qualified name, parameter) of each parameter it owns, each once."""


def group_by_unit(model: nn.Module, unit_classes: set[str]) -> tuple[list[UnitOwner], set[str]]:
    """Which module owns each parameter: the outermost module of a class in ``unit_classes``
    that contains it, else the root; a parameter used by two owners (tied) belongs to the
    root, which keeps it gathered for a whole pass. Returns the owners that own parameters
    (the root first) and the unit classes found. Shared by the engine and the cluster
    model, so the model groups exactly as a run does."""
    root = UnitOwner(model, "")
    owners: dict[int, UnitOwner] = {id(model): root}
    where: dict[int, tuple[int, str, nn.Parameter]] = {}
    found: set[str] = set()

    def visit(module: nn.Module, prefix: str, owner: nn.Module) -> None:
        cls = type(module).__name__
        if module is not model and owner is model and cls in unit_classes:
            owner = module
            found.add(cls)
            owners.setdefault(id(module), UnitOwner(module, prefix))
        for pname, p in module._parameters.items():
            if p is None:
                continue
            fqn = f"{prefix}.{pname}" if prefix else pname
            prev = where.get(id(p))
            if prev is None:
                where[id(p)] = (id(owner), fqn, p)
            elif prev[0] != id(owner):
                where[id(p)] = (id(model), prev[1], p)
        for cname, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}.{cname}" if prefix else cname, owner)

    visit(model, "", model)
    for owner_id, fqn, p in where.values():
        owners[owner_id].params.append((fqn, p))
    return [o for o in owners.values() if o.params], found


class BufferPool:
    """Reuses the engine's internal flat buffers (all-gather inputs and outputs, reduce inputs).

    Every unit of a transformer has the same size, so the buffer one unit just
    gave back fits the next. On CPU this saves a fresh multi-megabyte allocation
    (mmap, page faults, zeroing) per gather and per reduction. Only buffers that
    never escape the engine come here: gathered parameters themselves do not,
    since autograd may still hold views of them. ``keep_per_size`` 6: gathers in
    flight under the prefetch budget, their cast inputs and two reduce buckets
    need that many at once (with 2, SmolLM2 ZeRO-3 missed 93 times per step,
    904 MiB of fresh allocations: scripts/bench_memory.py's diagnosis).
    """

    def __init__(self, keep_per_size: int = 6) -> None:
        self.keep_per_size = keep_per_size
        self._free: dict[tuple[int, torch.dtype, tuple[str, int]], list[torch.Tensor]] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.get((numel, dtype, device_key(device)))
        if free:
            return free.pop()
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, t: torch.Tensor) -> None:
        free = self._free.setdefault((t.numel(), t.dtype, device_key(t.device)), [])
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
    """The dtype the parameter is gathered and computed in (its unit's)."""
    orig_dtype: torch.dtype
    """The dtype it was built or loaded in: what the user sees and an export writes."""
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

    def row_start(self, rank: int) -> int:
        return min(rank * self.chunk, self.rows)


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


def pack_rows(src: torch.Tensor, slot: ParamSlot, rank: int, flat: torch.Tensor) -> None:
    """Copy this rank's rows of a full-shape tensor into its padded place in a flat shard."""
    n = slot.local_rows(rank)
    dst = flat[slot.offset : slot.offset + slot.shard_numel].view(slot.chunk, slot.row_numel)
    start = slot.row_start(rank)
    if n:
        dst[:n].copy_(src.reshape(slot.rows, slot.row_numel)[start : start + n])
    if n < slot.chunk:
        dst[n:].zero_()


def full_rows(full: torch.Tensor, slot: ParamSlot, rank: int) -> torch.Tensor:
    """This rank's real rows of a full-shape tensor, as a view (0-d: one element on rank 0)."""
    start, n = slot.row_start(rank), slot.local_rows(rank)
    rows = full if slot.shape else full.view(1)
    return rows[start : start + n]


class ParamSource(Protocol):
    """Where a unit's working shard comes from when it is not in memory (NVMe)."""

    def fetch(self, unit: int) -> torch.Tensor:
        """The unit's flat compute-dtype shard, valid until ``done``."""
        ...

    def done(self, unit: int) -> None: ...


@dataclass
class _InFlight:
    """An issued all-gather: its output, what to do with its input afterwards, the work."""

    out: torch.Tensor
    release_send: Callable[[], None] | None
    work: PendingWork


@dataclass(eq=False)
class Unit:
    """Parameters communicated together, with their fp32 masters and gather state.

    ``resharded`` units (ZeRO-3) hold only their shard between uses and are
    gathered for compute; the others (ZeRO-1/2, and small persistent params in
    ZeRO-3) keep full parameters on every rank and are re-gathered after each
    optimizer step. See [Note: masters and precision].
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
    flat_master: bool
    """Keep a flat fp32 master shard in memory (resharded units unless their masters are
    swapped to NVMe; replicated units only when their parameters are not fp32)."""
    master_device: torch.device | None = None
    """Where that master lives (host memory under optimizer offload); None: ``device``."""
    master: torch.Tensor | None = field(init=False, default=None)
    """This rank's padded fp32 rows of every slot, flat; None when the masters are views of
    the replicated fp32 parameters, or swapped out to NVMe."""
    working: torch.Tensor | None = field(init=False, default=None)
    """Compute-dtype copy of the shard, the gather source, when the master is not in this
    device's memory (optimizer offload); the optimizer step refreshes it."""
    param_source: ParamSource | None = field(init=False, default=None)
    """The working shard's home when it is on NVMe (``offload_param: nvme``)."""
    state: UnitState = field(init=False, default=UnitState.SHARDED)
    _gather: _InFlight | None = field(init=False, default=None)
    _full: torch.Tensor | None = field(init=False, default=None)
    _refresh: tuple[torch.Tensor, Callable[[], None] | None, PendingWork] | None = field(
        init=False, default=None
    )

    def __post_init__(self) -> None:
        dtypes = {s.dtype for s in self.slots}
        assert len(dtypes) == 1, f"unit {self.name} mixes dtypes {dtypes}; split by dtype first"
        self.dtype = dtypes.pop()
        self.numel = sum(s.shard_numel for s in self.slots)
        self.full_numel = sum(s.numel for s in self.slots)
        if not self.resharded:
            self.state = UnitState.GATHERED

    @property
    def rank(self) -> int:
        return self.comm.rank

    def allocate_master(self) -> torch.Tensor:
        """The in-memory fp32 master (``flat_master``), zeroed; allocated when the unit is
        filled, not when it is planned, so set-up holds one unit's worth at a time."""
        assert self.flat_master and self.master is None
        where = self.master_device or self.device
        self.master = torch.zeros(self.numel, dtype=torch.float32, device=where)
        return self.master

    def slot_master(self, slot: ParamSlot) -> torch.Tensor:
        """The fp32 rows of ``slot`` this rank's optimizer updates (real rows only, a view)."""
        if self.master is not None:
            return self.flat_view(slot, self.master)
        assert not self.resharded, f"unit {self.name}: its masters are on disk (offload nvme)"
        return full_rows(slot.param.data, slot, self.rank)

    def flat_view(self, slot: ParamSlot, flat: torch.Tensor) -> torch.Tensor:
        """This rank's real rows of ``slot`` in a flat padded buffer laid out like the shard
        (a 0-d parameter is one row of one element, owned by rank 0)."""
        view = flat[slot.offset : slot.offset + slot.shard_numel]
        rows = view.view(slot.chunk, *slot.shape[1:]) if slot.shape else view
        return rows[: slot.local_rows(self.rank)]

    # ---------------------------------------------------------- gather/release
    def _send_buffer(
        self, dtype: torch.dtype, master: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        """The flat shard to all-gather in ``dtype``, and what to do with it once the
        collective is done: the working shard or the master itself (nothing), or a pooled
        buffer (give it back): a cast of the master, or a copy of a record read from disk.
        ``master`` overrides ``self.master`` (masters read back from NVMe)."""
        master = self.master if master is None else master
        if dtype == self.dtype:
            if self.working is not None:
                return self.working, None
            if self.param_source is not None:
                # Copy the record out and give its swap buffer back at once, so the number of
                # gathers in flight is bounded by the prefetch budget, not by swap buffers.
                source, index = self.param_source, self.index
                send = self.pool.take(self.numel, dtype, self.device)
                send.copy_(source.fetch(index), non_blocking=True)
                source.done(index)
                pool = self.pool
                return send, lambda: pool.give(send)
        pool = self.pool
        if master is None:  # replicated fp32 parameters: pack this rank's rows
            send = pool.take(self.numel, dtype, self.device)
            for slot in self.slots:
                pack_rows(slot.param.data, slot, self.rank, send)
            return send, lambda: pool.give(send)
        if master.dtype == dtype and same_device(master.device, self.device):
            return master, None
        cast = pool.take(self.numel, dtype, self.device)
        cast.copy_(master, non_blocking=True)
        return cast, lambda: pool.give(cast)

    def start_gather(self) -> None:
        """Issue the all-gather in the compute dtype (asynchronously); idempotent."""
        if self.state is not UnitState.SHARDED:
            return
        send, release = self._send_buffer(self.dtype)
        out = self.pool.take(self.comm.world_size * self.numel, self.dtype, self.device)
        self.tracer.add_tensor("gathered_params", out)
        work = self.comm.all_gather(
            out, send, what=f"all_gather of unit {self.name}", async_op=True
        )
        self._gather = _InFlight(out, release, work)
        self.state = UnitState.GATHERING

    def _finish_in_flight(self) -> torch.Tensor:
        """Wait for the issued gather; release its input; return its output."""
        assert self._gather is not None
        g, self._gather = self._gather, None
        g.work.wait()
        if g.release_send is not None:
            g.release_send()
        return g.out

    def finish_gather(self) -> None:
        """Wait for the all-gather and point every parameter at its full rows."""
        if self.state is UnitState.GATHERED:
            return
        self.start_gather()
        out = self._finish_in_flight()
        self._install_full(out.view(self.comm.world_size, self.numel), self.dtype)
        self.tracer.sub_tensor("gathered_params", out)
        self.pool.give(out)

    def gather_full_precision(self, master: torch.Tensor | None = None) -> None:
        """Gather the fp32 masters into parameters of their own dtype (``gathered_parameters``,
        exports): what the user sees, not the compute copy. ``master``: this rank's flat
        masters when they are not in memory (read back from NVMe). Synchronous."""
        if not self.resharded:
            return
        self.release()  # a compute-dtype gather is not what the caller wants
        master = self.master if master is None else master
        assert master is not None, f"unit {self.name}: no master to gather"
        world = self.comm.world_size
        out = torch.empty(world * self.numel, dtype=torch.float32, device=self.device)
        send = master if same_device(master.device, self.device) else master.to(self.device)
        self.comm.all_gather(out, send, what=f"all_gather of unit {self.name} (fp32)")
        orig = {s.orig_dtype for s in self.slots}
        self._install_full(out.view(world, self.numel), orig.pop() if len(orig) == 1 else None)

    def _install_full(self, gathered: torch.Tensor, dtype: torch.dtype | None) -> None:
        world = self.comm.world_size
        dtype = dtype or gathered.dtype
        full = torch.empty(self.full_numel, dtype=dtype, device=self.device)
        self.tracer.add_tensor("gathered_params", full)
        offset = 0
        for slot in self.slots:
            dst = full[offset : offset + slot.numel].view(slot.shape)
            copy_out_rows(gathered, slot, world, dst)
            slot.param.data = dst
            offset += slot.numel
        self._full = full
        self.state = UnitState.GATHERED
        self.tracer.mark("gather", self.name)

    def release(self, *, in_pass: bool = False) -> None:
        """Drop the full parameters (ZeRO-3 units only); idempotent. ``in_pass``: between two
        uses inside a pass, the placeholder keeps the compute dtype ([Note: placeholder
        dtype]); else it is the user's dtype."""
        if not self.resharded:
            return
        if self.state is UnitState.SHARDED:
            if not in_pass:
                self.rest()
            return
        if self.state is UnitState.GATHERING:
            # A prefetch that was never used: complete it so collectives stay paired.
            out = self._finish_in_flight()
            self.tracer.sub_tensor("gathered_params", out)
            self.pool.give(out)
        for slot in self.slots:
            slot.param.data = self.placeholder(slot, compute=in_pass)
        if self._full is not None:
            self.tracer.sub_tensor("gathered_params", self._full)
            self._full = None
        self.state = UnitState.SHARDED
        self.tracer.mark("release", self.name)

    def rest(self) -> None:
        """Between passes: a sharded unit's placeholders go back to the user's dtype."""
        if self.resharded and self.state is UnitState.SHARDED:
            for slot in self.slots:
                if slot.param.data.dtype != slot.orig_dtype:
                    slot.param.data = self.placeholder(slot)

    # ------------------------------------------------------ replicated units
    def refresh_full(self, async_op: bool = False) -> None:
        """Re-gather a replicated unit's parameters from every rank's updated rows."""
        assert not self.resharded
        dtype = self.master.dtype if self.master is not None else self.dtype
        send, release = self._send_buffer(dtype)
        out = self.pool.take(self.comm.world_size * self.numel, dtype, self.device)
        work = self.comm.all_gather(
            out, send, what=f"all_gather of updated unit {self.name}", async_op=async_op
        )
        self._refresh = (out, release, work)
        if not async_op:
            self.finish_refresh()

    def finish_refresh(self) -> None:
        assert self._refresh is not None
        out, release, work = self._refresh
        self._refresh = None
        work.wait()
        if release is not None:
            release()
        gathered = out.view(self.comm.world_size, self.numel)
        with torch.no_grad():
            for slot in self.slots:
                copy_out_rows(gathered, slot, self.comm.world_size, slot.param.data)
        self.pool.give(out)

    def placeholder(self, slot: ParamSlot, *, compute: bool = False) -> torch.Tensor:
        """What a sharded parameter holds between uses: empty, in the user's dtype (or the
        compute dtype, inside a pass: [Note: placeholder dtype])."""
        dtype = slot.dtype if compute else slot.orig_dtype
        return torch.empty(0, dtype=dtype, device=self.device)

    def master_bytes(self) -> int:
        return nbytes(self.master) if self.master is not None else 0
