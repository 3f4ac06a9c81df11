"""The engine: one model's units, their gradients, the coordinator and the hooks.

Built by ``Accelerator.prepare`` (or directly, for tests and other front
ends); it imports neither accelerate nor transformers (STYLE 13).

Set-up (``Engine.__init__``):
1. find unit modules (``units`` class names, default the model's
   ``_no_split_modules``); every other parameter belongs to the root, and a
   parameter used by two units is moved to the root;
2. in ZeRO-3, parameters under ``param_persistence_threshold`` elements go to
   one persistent unit that stays whole on every rank;
3. cut each parameter's rows into its unit's flat shard: from the full tensor,
   or from a lazily built model's local rows (DTensor ``Shard(0)``, no
   communication), keeping an fp32 master copy when compute is bf16/fp16;
4. release (ZeRO-3) or keep whole (ZeRO-1/2) and install the hooks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from accel_zero.comm import Comm
from accel_zero.config import ZeroConfig
from accel_zero.coordinator import Coordinator
from accel_zero.grads import ReduceBuckets, UnitGrads
from accel_zero.hooks import HookDriver
from accel_zero.partition import BufferPool, ParamSlot, Unit, UnitState, copy_out_rows
from accel_zero.tracer import MemoryTracer

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineContext"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class EngineContext:
    """Shared runtime resources of one engine, passed down instead of globals."""

    comm: Comm
    """Process group, rank facts and every collective (DESIGN D11)."""
    tracer: MemoryTracer
    """Model-data bytes per device, updated where they are allocated (DESIGN D10)."""
    device: torch.device
    """Where shards and gathered parameters live (the accelerator's device)."""
    param_dtype: torch.dtype | None
    """Compute dtype of floating parameters (bf16/fp16 mixed precision); None keeps theirs."""
    reduce_dtype: torch.dtype
    """Dtype gradients are reduced in."""


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cpu`` and ``cpu:0`` (or ``cuda`` and ``cuda:0``) are one device to us; torch's ``==``
    says they differ, which replaced every parameter of a CPU model (losing its identity)."""
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def _unit_class_names(model: nn.Module, config: ZeroConfig) -> set[str]:
    if config.units is not None:
        return set(config.units)
    names = getattr(model, "_no_split_modules", None) or []
    return set(names)


@dataclass
class _Owner:
    module: nn.Module
    name: str
    params: list[tuple[str, nn.Parameter]]


class Engine:
    """Partitioned parameters, gradient reduction and prefetch for one model."""

    def __init__(self, model: nn.Module, config: ZeroConfig, ctx: EngineContext) -> None:
        if config.offload_param.device != "none":
            raise NotImplementedError(
                "zero_config.offload_param.device="
                f"{config.offload_param.device!r} is parsed but not implemented yet; "
                "set it to 'none'"
            )
        self.model = model
        self.config = config
        self.ctx = ctx
        self.comm = ctx.comm
        self.stage = config.stage
        self.no_sync = False
        """Set by the accelerator's ``no_sync``: skip gradient communication (ZeRO-1)."""
        self.ran_units: set[int] = set()
        """Units whose forward ran with gradients since the last end of backward."""
        self.replaced: dict[int, nn.Parameter] = {}
        """id(original parameter) -> parameter now registered (lazily built models)."""
        self._original_params: dict[int, nn.Parameter] = {}
        self.pool = BufferPool()
        """Internal flat buffers reused across gathers and reductions."""
        self.units: list[Unit] = []
        self.unit_grads: list[UnitGrads] = []
        self.module_units: list[tuple[nn.Module, list[Unit]]] = []
        self.pass_units: list[Unit] = []
        """Resharded units gathered for a whole pass (the root's parameters)."""
        self.slot_of: dict[int, tuple[int, int]] = {}
        """id(parameter) -> (unit index, slot index), for original and current objects."""
        self._build()
        self.coordinator = Coordinator(
            [u.full_numel for u in self.units],
            prefetch_bucket_size=config.prefetch_bucket_size,
            max_live_parameters=config.max_live_parameters,
            max_reuse_distance=config.max_reuse_distance,
        )
        self.buckets = ReduceBuckets(
            config.reduce_bucket_size,
            ctx.reduce_dtype,
            async_op=config.overlap_comm,
            pool=self.pool,
        )
        self.hooks = HookDriver(self)
        self.hooks.install()
        guard = self._guard_state_dict

        def state_dict_guard(module: nn.Module, state_dict: Any, prefix: str, meta: Any) -> None:
            guard(module, state_dict, prefix, meta)  # (torch tags the hook: a plain function)

        self.hooks.handles.append(model.register_state_dict_post_hook(state_dict_guard))

    # ------------------------------------------------------------------ set-up
    def _owners(self) -> list[_Owner]:
        model = self.model
        names = _unit_class_names(model, self.config)
        owners: dict[int, _Owner] = {id(model): _Owner(model, "<root>", [])}
        where: dict[int, tuple[int, str, nn.Parameter]] = {}
        found_classes: set[str] = set()

        def visit(module: nn.Module, prefix: str, owner: nn.Module) -> None:
            cls = type(module).__name__
            if module is not model and owner is model and cls in names:
                owner = module
                found_classes.add(cls)
                owners.setdefault(id(module), _Owner(module, prefix, []))
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                fqn = f"{prefix}.{pname}" if prefix else pname
                prev = where.get(id(p))
                if prev is None:
                    where[id(p)] = (id(owner), fqn, p)
                elif prev[0] != id(owner):
                    # Shared between two units: the root keeps it gathered for the whole pass.
                    where[id(p)] = (id(model), prev[1], p)
            for cname, child in module._modules.items():
                if child is not None:
                    visit(child, f"{prefix}.{cname}" if prefix else cname, owner)

        visit(model, "", model)
        missing = names - found_classes
        if self.config.units is not None and missing:
            raise ValueError(
                f"zero_config.units names {sorted(missing)}, which no module of "
                f"{type(model).__name__} is an instance of; module classes present: "
                f"{sorted({type(m).__name__ for m in model.modules()})[:20]}"
            )
        for owner_id, fqn, p in where.values():
            owners[owner_id].params.append((fqn, p))
        return [o for o in owners.values() if o.params]

    def _build(self) -> None:
        ctx = self.ctx
        world = self.comm.world_size
        all_params = list(self.model.parameters())
        if not all_params:
            raise ValueError(
                f"{type(self.model).__name__} has no parameters: there is nothing to shard "
                "(pass the model after its layers are built)"
            )
        resharded = self.stage == 3
        persistent: list[tuple[nn.Module, str, nn.Parameter]] = []
        groups: list[tuple[nn.Module, str, list[tuple[str, nn.Parameter]], bool]] = []
        for owner in self._owners():
            big: list[tuple[str, nn.Parameter]] = []
            for fqn, p in owner.params:
                if resharded and p.numel() < self.config.param_persistence_threshold:
                    persistent.append((owner.module, fqn, p))
                else:
                    big.append((fqn, p))
            if big:
                groups.append((owner.module, owner.name, big, resharded))
        if persistent:
            groups.append(
                (self.model, "<persistent>", [(fqn, p) for _, fqn, p in persistent], False)
            )

        module_units: dict[int, tuple[nn.Module, list[Unit]]] = {}
        for module, name, params, is_resharded in groups:
            by_dtype: dict[torch.dtype, list[tuple[str, nn.Parameter]]] = {}
            for fqn, p in params:
                by_dtype.setdefault(self._compute_dtype(p), []).append((fqn, p))
            for dtype, members in by_dtype.items():
                unit = self._make_unit(module, name, dtype, members, is_resharded, world)
                if name != "<persistent>":
                    module_units.setdefault(id(module), (module, []))[1].append(unit)
        self.module_units = list(module_units.values())
        self.pass_units = [u for u in self.units if u.module is self.model and u.resharded]
        self._replace_parameters()
        for unit in self.units:
            if unit.resharded:
                unit.state = UnitState.GATHERED  # set up as gathered, then released
                unit.release()
        for p in self.model.parameters():
            if p.device.type == "meta":
                raise ValueError(f"a parameter is still on the meta device after set-up: {p.shape}")
        ctx.tracer.reset_peaks()

    def _compute_dtype(self, p: torch.Tensor) -> torch.dtype:
        if self.ctx.param_dtype is not None and p.dtype == torch.float32:
            return self.ctx.param_dtype
        return p.dtype

    def _make_unit(
        self,
        module: nn.Module,
        name: str,
        dtype: torch.dtype,
        members: list[tuple[str, nn.Parameter]],
        resharded: bool,
        world: int,
    ) -> Unit:
        slots: list[ParamSlot] = []
        offset = 0
        for fqn, p in members:
            shape = torch.Size(p.shape)
            rows = shape[0] if len(shape) else 1
            row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
            chunk = max(1, math.ceil(rows / world))
            slot = ParamSlot(
                fqn=fqn,
                param=p,
                shape=shape,
                dtype=dtype,
                orig_dtype=p.dtype,
                chunk=chunk,
                row_numel=row_numel,
                offset=offset,
                requires_grad=p.requires_grad,
            )
            slots.append(slot)
            offset += slot.shard_numel
        index = len(self.units)
        unit = Unit(
            index=index,
            name=f"{name}[{index}]" if name.startswith("<") else name,
            module=module if name != "<persistent>" else None,
            slots=slots,
            comm=self.comm,
            device=self.ctx.device,
            resharded=resharded,
            tracer=self.ctx.tracer,
            pool=self.pool,
        )
        # Master copy: fp32 rows of the original values, before any cast to the compute dtype.
        unit.master = torch.zeros(unit.numel, dtype=torch.float32, device=self.ctx.device)
        for i, slot in enumerate(slots):
            self._load_slot(unit, slot, unit.master)
            self.slot_of[id(slot.param)] = (index, i)
        if unit.shard.dtype == torch.float32:
            self.ctx.tracer.sub_tensor("params", unit.shard)
            unit.shard = unit.master  # fp32 training: the master is the shard, no copy
            self.ctx.tracer.add_tensor("params", unit.shard)
        else:
            unit.shard.copy_(unit.master)
            self.ctx.tracer.add_tensor("optimizer_state", unit.master)
        self.units.append(unit)
        self.unit_grads.append(UnitGrads(unit, self.ctx.reduce_dtype, self.ctx.tracer))
        return unit

    def _load_slot(self, unit: Unit, slot: ParamSlot, flat: torch.Tensor) -> None:
        p = slot.param
        rank = self.comm.rank
        dst = flat[slot.offset : slot.offset + slot.shard_numel].view(slot.chunk, slot.row_numel)
        n = slot.local_rows(rank)
        if _is_dtensor(p):
            dt: Any = p  # a DTensor (lazily built model): its local rows and placements
            local = dt.to_local()
            got = local.shape[0] if local.dim() else 1
            placements = getattr(p, "placements", ())
            if any(type(pl).__name__ != "Shard" for pl in placements) or len(placements) != 1:
                local = dt.full_tensor()
                local = local.reshape(slot.rows, slot.row_numel)[rank * slot.chunk :][:n]
                got = n
            if got != n:
                raise ValueError(
                    f"rank {rank}: parameter {slot.fqn} holds {got} local rows, expected {n} "
                    f"(dim-0 Shard over {self.comm.world_size} ranks, chunk {slot.chunk})"
                )
            src = local
        else:
            if p.device.type == "meta":
                raise ValueError(
                    f"parameter {slot.fqn} is on the meta device: load its weights before "
                    "prepare (build the model under accel_zero.lazy_init, or call "
                    "to_empty() and initialise it)"
                )
            src = p.detach().reshape(slot.rows, slot.row_numel)[rank * slot.chunk :][:n]
        if n:
            with torch.no_grad():
                dst[:n].copy_(src.reshape(n, slot.row_numel))

    def _replace_parameters(self) -> None:
        """Give DTensor parameters a plain replacement, everywhere they are registered.

        See [Note: parameter identity] in partition.py.
        """
        new_for: dict[int, nn.Parameter] = {}
        for unit in self.units:
            for i, slot in enumerate(unit.slots):
                old = slot.param
                self._original_params[id(old)] = old
                if (
                    _is_dtensor(old)
                    or old.dtype != slot.dtype
                    or not _same_device(old.device, unit.device)
                ):
                    new = nn.Parameter(unit.placeholder(slot), requires_grad=old.requires_grad)
                    new_for[id(old)] = new
                    self.replaced[id(old)] = new
                    slot.param = new
                    self.slot_of[id(new)] = (unit.index, i)
                if not unit.resharded:
                    full = torch.empty(slot.shape, dtype=slot.dtype, device=unit.device)
                    slot.param.data = full
        if new_for:
            for module in self.model.modules():
                for pname, p in list(module._parameters.items()):
                    if p is not None and id(p) in new_for:
                        setattr(module, pname, new_for[id(p)])
        # Non-resharded units: full parameters from the shards (one all-gather each).
        for unit in self.units:
            if not unit.resharded:
                unit.state = UnitState.GATHERED
                unit.refresh_full()
                # Whole on every rank for good: model state, not a transient gather.
                self.ctx.tracer.add("params", unit.device, unit.full_numel * _elt(unit))

    # ------------------------------------------------------------ hook helpers
    def check_ready(self) -> None:
        if not self.hooks.handles:
            raise RuntimeError("accel_zero engine was removed from this model")

    def skip_reduction(self) -> bool:
        return self.no_sync and self.stage == 1

    def unit_ran(self, index: int) -> bool:
        unit = self.units[index]
        return unit.module is None or unit.module is self.model or index in self.ran_units

    def live_units(self) -> set[int]:
        return {u.index for u in self.units if u.resharded and u.state is UnitState.GATHERED}

    def in_flight_units(self) -> set[int]:
        return {u.index for u in self.units if u.state is UnitState.GATHERING}

    def live_numel(self) -> int:
        return sum(
            u.full_numel for u in self.units if u.resharded and u.state is not UnitState.SHARDED
        )

    def check_order(self, events: Sequence[tuple[object, int]]) -> None:
        """All ranks ran the same units in the same order this pass (ZeRO-3), or a clear error."""
        if self.stage != 3 or not self.comm.distributed:
            return
        digest = hashlib.blake2b(repr(events).encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little", signed=True)
        seen = self.comm.check_same(value, what="execution-order check")
        if len(set(seen)) > 1:
            groups: dict[int, list[int]] = {}
            for rank, v in enumerate(seen):
                groups.setdefault(v, []).append(rank)
            mine = groups[value]
            raise RuntimeError(
                f"accel_zero rank {self.comm.rank}: ranks ran different modules in this pass "
                f"(ranks {sorted(groups.values())} each agree among themselves; this rank is with "
                f"{mine}). ZeRO-3 gathers parameters collectively, so every rank must run the "
                "same modules in the same order: make data-dependent branches agree across ranks."
            )

    def _sharded_now(self) -> list[str]:
        return [
            slot.fqn
            for unit in self.units
            if unit.resharded and unit.state is not UnitState.GATHERED
            for slot in unit.slots
        ]

    def _guard_state_dict(self, module: nn.Module, state_dict: Any, prefix: str, meta: Any) -> None:
        # model.state_dict() on a ZeRO-3 model outside forward would silently hold
        # empty tensors (and save_pretrained would write them): refuse loudly.
        sharded = self._sharded_now()
        if sharded:
            raise RuntimeError(
                f"accel_zero rank {self.comm.rank}: model.state_dict() was called while "
                f"{len(sharded)} parameters are sharded (ZeRO-3), e.g. {sharded[0]!r}. Use "
                "accelerator.get_state_dict(model) or accelerator.save_model(model, dir) on "
                "every rank, or read them inside `with accelerator.gathered_parameters(model):`."
            )

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Every parameter full on every rank inside the block (all ranks must enter).

        Read-only: changes made inside are not written back to the shards.
        """
        if self.coordinator.in_pass:
            raise RuntimeError("gathered_parameters() cannot be used inside forward/backward")
        for unit in self.units:
            unit.finish_gather()
        try:
            yield
        finally:
            for unit in self.units:
                unit.release()

    def forget_original_parameters(self) -> None:
        """Drop the pre-prepare parameter objects (lazily built models).

        Their ids map to slots only until the optimizer built on them has been
        re-pointed; holding them longer would keep the loaded checkpoint rows
        (often views of the memory-mapped file) alive. Once dropped, an id could
        be reused by another tensor, so it leaves ``slot_of`` too.
        """
        for key, old in self._original_params.items():
            new = self.replaced.get(key)
            if new is not None and new is not old:
                self.slot_of.pop(key, None)
        self._original_params.clear()
        self.replaced.clear()

    # ------------------------------------------------------------------ public
    def lookup(self, p: torch.Tensor) -> tuple[Unit, int] | None:
        """(unit, slot index) of a parameter, original (pre-replacement) or current."""
        hit = self.slot_of.get(id(p))
        if hit is None:
            return None
        return self.units[hit[0]], hit[1]

    def zero_grad(self) -> None:
        for grads in self.unit_grads:
            grads.zero()
        for unit in self.units:
            for slot in unit.slots:
                slot.param.grad = None

    def after_optimizer_step(self, units: set[int]) -> None:
        """Copy updated masters into the shards and refresh full parameters where kept."""
        pending = []
        for index in sorted(units):
            unit = self.units[index]
            if unit.shard is not unit.master:
                unit.shard.copy_(unit.master)
            if not unit.resharded:
                pending.append((unit, unit.refresh_full(async_op=True)))
        for unit, _ in pending:
            unit.finish_refresh()

    def memory_report(self) -> dict[str, object]:
        return self.ctx.tracer.report()

    def stats(self) -> dict[str, object]:
        c = self.coordinator.stats
        comm = self.comm.stats
        return {
            "prefetch_hits": c.prefetch_hits,
            "prefetch_misses": c.prefetch_misses,
            "prefetches_issued": c.prefetches_issued,
            "kept_gathered": c.kept_gathered,
            "trace_invalidations": c.trace_invalidations,
            "traces_recorded": c.traces_recorded,
            "bytes_gathered": comm.bytes.get("all_gather", 0) * self.comm.world_size,
            "bytes_reduced": comm.bytes.get("reduce_scatter", 0),
            "collective_calls": dict(comm.calls),
            "comm_wait_seconds": comm.wait_seconds,
        }

    def iter_full_state_dict(
        self, *, dtype: torch.dtype | None = None, rank0_only: bool = True
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Full tensors unit by unit, keyed like ``model.state_dict()`` (every rank must iterate).

        Parameters come from the fp32 master rows (or the shard when there is no
        master), so a bf16-trained model exports its fp32 weights unless ``dtype``
        says otherwise. The last chunk holds the buffers.
        """
        world = self.comm.world_size
        main = self.comm.rank == 0
        names = _param_names(self.model)
        for unit in self.units:
            src = unit.master
            out = torch.empty(world * unit.numel, dtype=src.dtype, device=src.device)
            self.comm.all_gather(out, src, what=f"all_gather of unit {unit.name} for export")
            chunk: dict[str, torch.Tensor] = {}
            if main or not rank0_only:
                gathered = out.view(world, unit.numel)
                for slot in unit.slots:
                    full = torch.empty(slot.shape, dtype=src.dtype, device=src.device)
                    copy_out_rows(gathered, slot, world, full)
                    full = full.to(device="cpu", dtype=dtype or slot.orig_dtype)
                    for name in names.get(id(slot.param), [slot.fqn]):
                        chunk[name] = full
            del out
            yield chunk
        buffers: dict[str, torch.Tensor] = {}
        if main or not rank0_only:
            for mname, module in self.model.named_modules():
                for bname, buf in module._buffers.items():
                    if buf is not None and bname not in module._non_persistent_buffers_set:
                        key = f"{mname}.{bname}" if mname else bname
                        buffers[key] = buf.detach().to("cpu")
        yield buffers

    def full_state_dict(self, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for chunk in self.iter_full_state_dict(dtype=dtype):
            out.update(chunk)
        return out


def _elt(unit: Unit) -> int:
    return torch.empty((), dtype=unit.dtype).element_size()


def _param_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names
