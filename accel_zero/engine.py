"""The engine: one model's units, their gradients, the coordinator and the hooks.

Built by ``Accelerator.prepare`` (or directly, for tests and other front
ends); it imports neither accelerate nor transformers (STYLE 13).

Set-up (``Engine.__init__``):
1. find unit modules (``units`` class names, default the model's
   ``_no_split_modules``); every other parameter belongs to the root, and a
   parameter used by two units is moved to the root;
2. in ZeRO-3, parameters under ``param_persistence_threshold`` elements go to
   one persistent unit that stays whole on every rank;
3. cut each parameter's rows into its unit's fp32 master shard: from the full
   tensor, or from a lazily built model's local rows (DTensor ``Shard(0)``, no
   communication), freeing the source rows as they are copied (no tensor of a
   lazily loaded model exists twice on a rank);
4. release (ZeRO-3) or keep whole (ZeRO-1/2) and install the hooks.

The user's view of the model is kept exactly as without accel_zero (DESIGN
D5): parameters in their own dtype (fp32 under mixed precision), ``zero_grad``
in any form clears gradients, ZeRO-1 keeps DDP's ``param.grad``; ZeRO-2/3
gradients are read through ``local_grad`` / ``full_grad`` / ``grad_norms``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from accel_zero.comm import Comm
from accel_zero.config import ZeroConfig
from accel_zero.coordinator import Coordinator
from accel_zero.grads import ReduceBuckets, UnitGrads
from accel_zero.hooks import HookContext, HookDriver
from accel_zero.host_memory import drop_file_pages
from accel_zero.offload.engine_offload import EngineOffload
from accel_zero.partition import (
    BufferPool,
    ParamSlot,
    Unit,
    UnitOwner,
    UnitState,
    copy_out_rows,
    full_rows,
    group_by_unit,
    same_device,
)
from accel_zero.shards import RowShard, ShardReader
from accel_zero.tracer import Kind, MemoryTracer

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineContext"]


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
    """Dtype ZeRO-3 gathers and computes floating parameters in (bf16/fp16 mixed
    precision); None keeps theirs."""
    reduce_dtype: torch.dtype
    """Dtype gradients are reduced in."""


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def _free_storage(t: torch.Tensor) -> None:
    """Give a dead tensor's memory back now (its owner may outlive it: the user's optimizer
    still lists the pre-prepare parameters until it is re-pointed). Rows read straight
    from a memory-mapped checkpoint cannot be resized: their pages are dropped instead, so
    the copy in the masters is the only one resident (see host_memory.drop_file_pages)."""
    try:
        t.untyped_storage().resize_(0)
    except RuntimeError:  # not resizable: a view of a memory-mapped file, most likely
        drop_file_pages(t)


def _unit_class_names(model: nn.Module, config: ZeroConfig) -> set[str]:
    if config.units is not None:
        return set(config.units)
    names = getattr(model, "_no_split_modules", None) or []
    return set(names)


class Engine:
    """Partitioned parameters, gradient reduction and prefetch for one model."""

    def __init__(self, model: nn.Module, config: ZeroConfig, ctx: EngineContext) -> None:
        self.model = model
        self.config = config
        self.ctx = ctx
        self.comm = ctx.comm
        self.stage = config.stage
        self._original_params: dict[int, nn.Parameter] = {}
        self.replaced: dict[int, nn.Parameter] = {}
        """id(original parameter) -> parameter now registered (lazily built models)."""
        self.pool = BufferPool()
        """Internal flat buffers reused across gathers and reductions."""
        self.units: list[Unit] = []
        self.unit_grads: list[UnitGrads] = []
        self.slot_of: dict[int, tuple[int, int]] = {}
        """id(parameter) -> (unit index, slot index), for original and current objects."""
        self.offload: EngineOffload | None = None
        """Swapped optimizer state and parameters (NVMe); None when nothing is on disk."""
        self.master_device = (
            torch.device("cpu") if config.offload_optimizer.device != "none" else ctx.device
        )
        """Where in-memory fp32 masters live: host memory under optimizer offload."""
        module_units, pass_units = self._build()
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
        self.hooks = HookDriver(
            HookContext(
                model=model,
                units=self.units,
                unit_grads=self.unit_grads,
                module_units=module_units,
                pass_units=pass_units,
                coordinator=self.coordinator,
                buckets=self.buckets,
                comm=self.comm,
                stage=self.stage,
                tracer=ctx.tracer,
                offload=self.offload,
            )
        )
        self.hooks.install()
        guard = self._guard_state_dict

        def state_dict_guard(module: nn.Module, state_dict: Any, prefix: str, meta: Any) -> None:
            guard(module, state_dict, prefix, meta)  # (torch tags the hook: a plain function)

        self.hooks.handles.append(model.register_state_dict_post_hook(state_dict_guard))
        self._install_zero_grad()
        # Swap files go when the engine does (garbage collection or interpreter exit) if
        # nobody closed it first (Accelerator.end_training does).
        self._close_offload = weakref.finalize(
            self, self.offload.close if self.offload is not None else (lambda: None)
        )
        ctx.tracer.mark("prepared")

    @property
    def no_sync(self) -> bool:
        """ZeRO-1 skips gradient communication (the accelerator's ``no_sync``)."""
        return self.hooks.no_sync

    @no_sync.setter
    def no_sync(self, value: bool) -> None:
        self.hooks.no_sync = value

    # ------------------------------------------------------------------ set-up
    def _owners(self) -> list[UnitOwner]:
        names = _unit_class_names(self.model, self.config)
        owners, found = group_by_unit(self.model, names)
        missing = names - found
        if self.config.units is not None and missing:
            raise ValueError(
                f"zero_config.units names {sorted(missing)}, which no module of "
                f"{type(self.model).__name__} is an instance of; module classes present: "
                f"{sorted({type(m).__name__ for m in self.model.modules()})[:20]}"
            )
        return owners

    def _build(self) -> tuple[list[tuple[nn.Module, list[Unit]]], list[Unit]]:
        world = self.comm.world_size
        if not list(self.model.parameters()):
            raise ValueError(
                f"{type(self.model).__name__} has no parameters: there is nothing to shard "
                "(pass the model after its layers are built)"
            )
        resharded = self.stage == 3
        persistent: list[tuple[str, nn.Parameter]] = []
        groups: list[tuple[nn.Module, str, list[tuple[str, nn.Parameter]], bool]] = []
        for owner in self._owners():
            big: list[tuple[str, nn.Parameter]] = []
            for fqn, p in owner.params:
                if resharded and p.numel() < self.config.param_persistence_threshold:
                    persistent.append((fqn, p))
                else:
                    big.append((fqn, p))
            if big:
                groups.append((owner.module, owner.name or "<root>", big, resharded))
        if persistent:
            groups.append((self.model, "<persistent>", persistent, False))

        module_units: dict[int, tuple[nn.Module, list[Unit]]] = {}
        for module, name, params, is_resharded in groups:
            by_dtype: dict[tuple[torch.dtype, torch.dtype], list[tuple[str, nn.Parameter]]] = {}
            for fqn, p in params:
                key = (self._compute_dtype(p, is_resharded), p.dtype)
                by_dtype.setdefault(key, []).append((fqn, p))
            for (dtype, _), members in by_dtype.items():
                unit = self._new_unit(module, name, dtype, members, is_resharded, world)
                if name != "<persistent>":
                    module_units.setdefault(id(module), (module, []))[1].append(unit)
        # Swap records are planned from the shapes, before any rows are loaded.
        self.offload = EngineOffload.create(
            config=self.config, units=self.units, comm=self.comm, tracer=self.ctx.tracer
        )
        new_for: dict[int, nn.Parameter] = {}
        try:
            for unit in self.units:
                # Finish each unit before loading the next, so a model built eagerly is
                # freed unit by unit as its masters fill (peak: model + one unit).
                self._fill_unit(unit)
                self._finalize_unit(unit, new_for)
            if self.offload is not None and self.offload.optimizer is not None:
                if self.offload.optimizer.masters_on_disk:
                    self.offload.optimizer.finish_setup()
                else:
                    self.offload.optimizer.write_zero_moments()
        except BaseException:
            if self.offload is not None:
                self.offload.close()
            raise
        if new_for:
            for module in self.model.modules():
                for pname, old in list(module._parameters.items()):
                    if old is not None and id(old) in new_for:
                        setattr(module, pname, new_for[id(old)])
        pass_units = [u for u in self.units if u.module is self.model and u.resharded]
        for p in self.model.parameters():
            if p.device.type == "meta":
                raise ValueError(f"a parameter is still on the meta device after set-up: {p.shape}")
        self.ctx.tracer.reset_peaks()
        return list(module_units.values()), pass_units

    def _compute_dtype(self, p: torch.Tensor, resharded: bool) -> torch.dtype:
        # Replicated parameters keep their dtype and compute under Accelerate's autocast,
        # exactly as without accel_zero. See [Note: masters and precision] in partition.py.
        if resharded and self.ctx.param_dtype is not None and p.dtype == torch.float32:
            return self.ctx.param_dtype
        return p.dtype

    def _new_unit(
        self,
        module: nn.Module,
        name: str,
        dtype: torch.dtype,
        members: list[tuple[str, nn.Parameter]],
        resharded: bool,
        world: int,
    ) -> Unit:
        """The unit and its slots (nothing loaded yet)."""
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
        nvme = self.config.offload_optimizer.device == "nvme"
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
            # Resharded: an in-memory fp32 shard unless the masters are swapped to NVMe.
            # Replicated: the masters are views of the whole parameters, unless those are not
            # fp32 or the masters must leave the device (optimizer offload on a GPU).
            flat_master=(not nvme)
            if resharded
            else (
                any(s.orig_dtype != torch.float32 for s in slots)
                or not same_device(self.master_device, self.ctx.device)
            ),
            master_device=self.master_device,
        )
        for i, slot in enumerate(slots):
            self.slot_of[id(slot.param)] = (index, i)
        self.units.append(unit)
        # Whole gradients (DDP's) where the parameters are whole and it costs nothing to keep
        # them: ZeRO-1, and ZeRO-3's small persistent parameters. See grads.py.
        whole = self.stage == 1 or (self.stage == 3 and not resharded)
        grads = UnitGrads(unit, self.ctx.reduce_dtype, self.ctx.tracer, all_reduce=whole)
        grads.acc_device = self.master_device
        self.unit_grads.append(grads)
        return unit

    def _fill_unit(self, unit: Unit) -> None:
        """Load this rank's rows into the unit's masters: in memory, or into the swap records
        (then only the compute-dtype working shard stays, or goes to disk too)."""
        tracer = self.ctx.tracer
        if unit.flat_master:
            master = unit.allocate_master()
            for slot in unit.slots:
                self._load_slot(unit, slot, master)
            assert unit.master is not None
            off_device = not same_device(unit.master.device, unit.device)
            if unit.resharded and off_device:
                unit.working = unit.master.to(device=unit.device, dtype=unit.dtype)
                tracer.add_tensor("params", unit.working)
            # A resharded unit's master *is* its parameter shard; a replicated unit keeps it
            # beside whole parameters, as optimizer state (see [Note: masters and precision]),
            # and so is a master moved to the host by optimizer offload.
            kind: Kind = "params" if unit.resharded and not off_device else "optimizer_state"
            tracer.add_tensor(kind, unit.master)
            return
        if not unit.resharded:
            return  # masters are the whole parameters' rows (made whole in _finalize_unit)
        assert self.offload is not None and self.offload.optimizer is not None
        master = torch.zeros(unit.numel, dtype=torch.float32)
        for slot in unit.slots:
            self._load_slot(unit, slot, master)
        self.offload.optimizer.add_initial_masters(unit.index, master)
        if self.offload.params is not None:
            self.offload.params.write_initial(unit.index, master.to(unit.dtype))
            unit.param_source = self.offload.params
        else:
            unit.working = master.to(device=unit.device, dtype=unit.dtype)
            tracer.add_tensor("params", unit.working)
        del master

    def _source_rows(self, slot: ParamSlot) -> torch.Tensor:
        """This rank's real rows of the parameter as built (plain or lazily built DTensor)."""
        p = slot.param
        rank = self.comm.rank
        n = slot.local_rows(rank)
        if _is_dtensor(p):
            dt: Any = p  # a DTensor (lazily built model): its local rows and placements
            local = dt.to_local()
            got = local.shape[0] if local.dim() else 1
            placements = getattr(p, "placements", ())
            if any(type(pl).__name__ != "Shard" for pl in placements) or len(placements) != 1:
                local = dt.full_tensor()
                local = local.reshape(slot.rows, slot.row_numel)[slot.row_start(rank) :][:n]
                got = n
            elif (dt.device_mesh.size(), dt.device_mesh.get_local_rank()) != (
                self.comm.world_size,
                rank,
            ):
                raise ValueError(
                    f"rank {self.comm.global_rank}: parameter {slot.fqn} was built by lazy_init "
                    f"sharded over {dt.device_mesh.size()} ranks, but the engine shards over "
                    f"{self.comm.world_size} (zero_config.shard_group_size): build the model "
                    "inside lazy_init(accelerator) with this accel_zero.Accelerator"
                )
            if got != n:
                raise ValueError(
                    f"rank {rank}: parameter {slot.fqn} holds {got} local rows, expected {n} "
                    f"(dim-0 Shard over {self.comm.world_size} ranks, chunk {slot.chunk})"
                )
            return local.reshape(n, slot.row_numel)
        if p.device.type == "meta":
            raise ValueError(
                f"parameter {slot.fqn} is on the meta device: load its weights before "
                "prepare (build the model under accel_zero.lazy_init, or call "
                "to_empty() and initialise it)"
            )
        return full_rows(p.detach(), slot, rank).reshape(n, slot.row_numel)

    def _load_slot(self, unit: Unit, slot: ParamSlot, flat: torch.Tensor) -> None:
        src = self._source_rows(slot)
        n = src.shape[0]
        with torch.no_grad():
            unit.flat_view(slot, flat).reshape(n, slot.row_numel).copy_(src)
        if _is_dtensor(slot.param):
            _free_storage(src)  # the lazily loaded rows now live in the master only

    def _finalize_unit(self, unit: Unit, new_for: dict[int, nn.Parameter]) -> None:
        """Replace the unit's DTensor (or misplaced) parameters by plain ones, then release it
        (ZeRO-3) or make its parameters whole (replicated). ``new_for`` collects replacements
        for the final sweep over the modules. See [Note: parameter identity] in partition.py.
        """
        rows = None
        if not unit.resharded and unit.master is None:
            # Masters are the parameters themselves: take this rank's rows before replacing.
            rows = torch.empty(unit.numel, dtype=unit.dtype, device=unit.device)
            for slot in unit.slots:
                self._load_slot(unit, slot, rows)
        for i, slot in enumerate(unit.slots):
            old = slot.param
            self._original_params[id(old)] = old
            if _is_dtensor(old) or not same_device(old.device, unit.device):
                new = nn.Parameter(unit.placeholder(slot), requires_grad=old.requires_grad)
                new_for[id(old)] = new
                self.replaced[id(old)] = new
                slot.param = new
                self.slot_of[id(new)] = (unit.index, i)
        if unit.resharded:
            unit.state = UnitState.GATHERED  # set up as gathered, then released
            unit.release()
            return
        send = unit.master if rows is None else rows
        assert send is not None
        world = self.comm.world_size
        out = torch.empty(world * unit.numel, dtype=send.dtype, device=unit.device)
        self.comm.all_gather(out, send, what=f"all_gather of unit {unit.name} at set-up")
        del rows
        gathered = out.view(world, unit.numel)
        for slot in unit.slots:
            full = torch.empty(slot.shape, dtype=slot.orig_dtype, device=unit.device)
            copy_out_rows(gathered, slot, world, full)
            slot.param.data = full
            # Whole on every rank for good: model state, not a transient gather.
            self.ctx.tracer.add_tensor("params", full)
        unit.state = UnitState.GATHERED

    def _install_zero_grad(self) -> None:
        """``model.zero_grad()`` must clear the engine's gradients too (the HF Trainer and
        Accelerate's examples call it, not ``optimizer.zero_grad()``). nn.Module offers no
        hook for it, so this instance (only) gets a ``zero_grad`` that does both, the way
        Accelerate itself wraps ``model.forward`` per instance; ``remove`` takes it away."""
        engine = self
        model = self.model

        def zero_grad(set_to_none: bool = True) -> None:
            engine.zero_grad()
            nn.Module.zero_grad(model, set_to_none)

        model.__dict__["zero_grad"] = zero_grad

    def remove(self) -> None:
        """Detach the engine from the model (hooks and the ``zero_grad`` override) and remove
        its swap files."""
        self.hooks.invalidate()
        self.hooks.remove()
        self.model.__dict__.pop("zero_grad", None)
        self.close()

    def close(self) -> None:
        """Remove the swap files (idempotent); the engine cannot step afterwards."""
        self._close_offload()

    # ------------------------------------------------------------ state guard
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
                f"accel_zero rank {self.comm.global_rank}: model.state_dict() was called while "
                f"{len(sharded)} parameters are sharded (ZeRO-3), e.g. {sharded[0]!r}. Use "
                "accelerator.get_state_dict(model) or accelerator.save_model(model, dir) on "
                "every rank, or read them inside `with accelerator.gathered_parameters(model):`."
            )

    def unit_master(self, unit: Unit) -> torch.Tensor | None:
        """The unit's flat fp32 masters: in memory, or read back from NVMe (a fresh tensor);
        None for replicated fp32 units (their masters are the parameters' rows)."""
        if unit.master is not None:
            return unit.master
        if self.offload is not None and self.offload.swaps_masters(unit):
            return self.offload.read_masters(unit)
        return None

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Every parameter full on every rank, in its own dtype (fp32 masters), inside the
        block. All ranks must enter. Read-only: changes are not written back to the shards."""
        if self.coordinator.in_pass:
            raise RuntimeError("gathered_parameters() cannot be used inside forward/backward")
        for unit in self.units:
            if unit.resharded:
                unit.gather_full_precision(self.unit_master(unit))
        try:
            yield
        finally:
            for unit in self.units:
                unit.release()

    def forget_original_parameters(self) -> None:
        """Drop the pre-prepare parameter objects (lazily built models).

        Their ids map to slots only until the optimizer built on them has been
        re-pointed; holding them longer would keep them alive. Once dropped, an
        id could be reused by another tensor, so it leaves ``slot_of`` too.
        """
        for key, old in self._original_params.items():
            new = self.replaced.get(key)
            if new is not None and new is not old:
                self.slot_of.pop(key, None)
        self._original_params.clear()
        self.replaced.clear()

    # ------------------------------------------------------------- gradients
    def lookup(self, p: torch.Tensor) -> tuple[Unit, int] | None:
        """(unit, slot index) of a parameter, original (pre-replacement) or current."""
        hit = self.slot_of.get(id(p))
        if hit is None:
            return None
        return self.units[hit[0]], hit[1]

    def zero_grad(self) -> None:
        """Forget every gradient: shard accumulators and whole ``param.grad``."""
        for grads in self.unit_grads:
            grads.zero()
        for unit in self.units:
            for slot in unit.slots:
                slot.param.grad = None
        if self.offload is not None and self.offload.optimizer is not None:
            self.offload.optimizer.zero_grad()
        self.hooks.backward_done = False

    def _check_grad_window(self, what: str) -> None:
        if self.hooks.in_backward:
            raise RuntimeError(
                f"accel_zero rank {self.comm.global_rank}: {what} was called during backward; "
                "gradients are complete only after accelerator.backward() returns"
            )
        if not self.hooks.backward_done:
            raise RuntimeError(
                f"accel_zero rank {self.comm.global_rank}: {what} found no gradients: it is valid "
                "between the end of accelerator.backward() and the next zero_grad() "
                "(optimizer.zero_grad(), model.zero_grad() or accelerator.zero_grad())"
            )

    def _slot_of_param(self, param: torch.Tensor, what: str) -> tuple[Unit, int]:
        hit = self.lookup(param)
        if hit is None:
            raise ValueError(
                f"accel_zero rank {self.comm.global_rank}: {what}: the tensor of shape "
                f"{tuple(param.shape)} is not a parameter of the prepared model"
            )
        return hit

    def _check_not_swapped(self, unit: Unit, what: str) -> None:
        if self.offload is not None and self.offload.swaps_grads(unit):
            raise RuntimeError(
                f"accel_zero rank {self.comm.global_rank}: {what}: with offload_optimizer nvme the "
                "gradient shards are written to disk as backward produces them; use "
                "accelerator.get_grad_norms(model) (kept from that pass), or offload_optimizer "
                "cpu to read them"
            )

    def local_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """This rank's rows of ``param``'s averaged gradient (fp32 or the parameter's dtype
        in ZeRO-1), as a view; None if it got no gradient. Local, no communication."""
        self._check_grad_window("local_grad")
        unit, i = self._slot_of_param(param, "local_grad")
        self._check_not_swapped(unit, "local_grad")
        return self.unit_grads[unit.index].slot_grad(i)

    def full_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """``param``'s whole averaged gradient on every rank (ZeRO-2/3: one all-gather;
        every rank must call it for the same parameter). None if it got no gradient."""
        self._check_grad_window("full_grad")
        unit, i = self._slot_of_param(param, "full_grad")
        self._check_not_swapped(unit, "full_grad")
        grads = self.unit_grads[unit.index]
        slot = unit.slots[i]
        if grads.all_reduce:
            return slot.param.grad
        if grads.acc is None or not grads.had_grad[i]:
            return None
        world = self.comm.world_size
        send = grads.acc[slot.offset : slot.offset + slot.shard_numel]
        out = torch.empty(world * slot.shard_numel, dtype=send.dtype, device=send.device)
        self.comm.all_gather(out, send, what=f"all_gather of the gradient of {slot.fqn}")
        full = torch.empty(slot.shape, dtype=send.dtype, device=send.device)
        # The gathered buffer holds only this slot: view it as a one-slot unit at offset 0.
        one = ParamSlot(
            fqn=slot.fqn,
            param=slot.param,
            shape=slot.shape,
            dtype=slot.dtype,
            orig_dtype=slot.orig_dtype,
            chunk=slot.chunk,
            row_numel=slot.row_numel,
            offset=0,
            requires_grad=slot.requires_grad,
        )
        copy_out_rows(out.view(world, slot.shard_numel), one, world, full)
        return full

    def grad_norms(self, params: Iterable[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """L2 norm of each parameter's averaged gradient, keyed by name (one all-reduce;
        every rank must call it). Parameters without a gradient are left out."""
        self._check_grad_window("grad_norms")
        slots: list[tuple[Unit, int]] = []
        if params is None:
            slots = [(u, i) for u in self.units for i in range(len(u.slots))]
        else:
            seen: set[tuple[int, int]] = set()
            for p in params:
                unit, i = self._slot_of_param(p, "grad_norms")
                if (unit.index, i) not in seen:
                    seen.add((unit.index, i))
                    slots.append((unit, i))
        names, squares = [], []
        swapped = (
            self.offload.optimizer.grad_stats if self.offload and self.offload.optimizer else {}
        )
        for unit, i in slots:
            stats = swapped.get((unit.index, i))
            if stats is not None:
                names.append(unit.slots[i].fqn)
                squares.append(stats.norm2.float() ** 2)
                continue
            g = self.unit_grads[unit.index].slot_grad(i)
            if g is None:
                continue
            names.append(unit.slots[i].fqn)
            squares.append(g.float().pow(2).sum())
        if not squares:
            return {}
        total = torch.stack(squares).to(self.comm.device)
        self.comm.all_reduce(total, what="per-parameter gradient norms", group="shard")
        return dict(zip(names, total.sqrt().cpu().unbind(), strict=True))

    # ------------------------------------------------------------ optimizer
    def after_optimizer_step(self, units: set[int]) -> None:
        """The masters changed: drop stale gathers, refresh replicated parameters, and start
        gathering what the next training pass needs first."""
        self.hooks.invalidate()
        pending = []
        for index in sorted(units):
            unit = self.units[index]
            if unit.working is not None and unit.master is not None:
                unit.working.copy_(unit.master, non_blocking=True)  # host master -> device
            if not unit.resharded:
                unit.refresh_full(async_op=True)
                pending.append(unit)
        for unit in pending:
            unit.finish_refresh()
        self.hooks.prefetch_next_pass(grad=True)

    # ----------------------------------------------------------- reporting
    def memory_report(self) -> dict[str, object]:
        return self.ctx.tracer.report()

    def stats(self) -> dict[str, object]:
        """The coordinator's counters and this rank's communication (``zero_stats()``).

        Communication is counted by the engine's ``Comm`` since it was built (set-up
        gathers included; ``comm.stats.reset()`` starts over), on this rank:

        - ``bytes_gathered``: bytes all-gathered into this rank's outputs (input bytes x
          group size, its own shard included): forward/backward gathers (compute dtype),
          the re-gathers of whole parameters after a step (ZeRO-1/2, persistent
          parameters), ``full_grad`` and exports;
        - ``bytes_reduced``: bytes this rank passed into reduce-scatters (the whole
          ``(group, shard)`` gradient buffer in ``reduce_dtype``) and all-reduces (whole
          gradients; under hybrid sharding the gradient shard across replicas; the clip
          norm's and per-parameter norms' fp32 vectors, 4 bytes per parameter with rows;
          the fp16 overflow flag, 4 bytes);
        - ``bytes_gathered_by_group`` / ``bytes_reduced_by_group``: the same split by
          group, ``shard`` / ``replicate`` / ``world`` (a plain world has one group,
          ``world``); see [Note: hybrid sharding] in accel_zero/comm.py;
        - ``collective_bytes`` / ``collective_calls``: input bytes and calls per key,
          ``op`` or ``op[group]`` (``all_reduce[replicate]``), as ``CommStats`` names them;
        - ``groups``: the size of the shard, replicate and world groups.
        """
        c = self.coordinator.stats
        comm = self.comm.stats
        return {
            "prefetch_hits": c.prefetch_hits,
            "prefetch_misses": c.prefetch_misses,
            "prefetches_issued": c.prefetches_issued,
            "kept_gathered": c.kept_gathered,
            "trace_invalidations": c.trace_invalidations,
            "traces_recorded": c.traces_recorded,
            **self.comm.traffic(),  # bytes_gathered, bytes_reduced, per group and per key
            "collective_calls": dict(comm.calls),
            "comm_wait_seconds": comm.wait_seconds,
            **(self.offload.stats() if self.offload is not None else {}),
        }

    # -------------------------------------------------------------- export
    def iter_full_state_dict(
        self, *, dtype: torch.dtype | None = None, rank0_only: bool = True
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Full tensors unit by unit, keyed like ``model.state_dict()`` (every rank must iterate).

        Parameters come in their own dtype (fp32 masters for fp32 parameters) unless
        ``dtype`` says otherwise. The last chunk holds the buffers.
        """
        world = self.comm.world_size
        main = self.comm.global_rank == 0  # hybrid sharding: one main rank, not one per group
        names = _param_names(self.model)
        for unit in self.units:
            chunk: dict[str, torch.Tensor] = {}
            if unit.resharded:
                master = self.unit_master(unit)
                assert master is not None
                out = torch.empty(world * unit.numel, dtype=torch.float32, device=unit.device)
                self.comm.all_gather(
                    out, master.to(unit.device), what=f"all_gather of unit {unit.name} for export"
                )
                if main or not rank0_only:
                    gathered = out.view(world, unit.numel)
                    for slot in unit.slots:
                        full = torch.empty(slot.shape, dtype=torch.float32, device=unit.device)
                        copy_out_rows(gathered, slot, world, full)
                        full = full.to(device="cpu", dtype=dtype or slot.orig_dtype)
                        for name in names.get(id(slot.param), [slot.fqn]):
                            chunk[name] = full
                del out
            elif main or not rank0_only:
                for slot in unit.slots:
                    full = slot.param.detach().to(device="cpu", dtype=dtype or slot.orig_dtype)
                    for name in names.get(id(slot.param), [slot.fqn]):
                        chunk[name] = full
            yield chunk
        buffers: dict[str, torch.Tensor] = {}
        if main or not rank0_only:
            for key, buf in _persistent_buffers(self.model):
                buffers[key] = buf.detach().to("cpu")
        yield buffers

    def full_state_dict(self, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for chunk in self.iter_full_state_dict(dtype=dtype):
            out.update(chunk)
        return out

    # ---------------------------------------------------------- checkpoints
    def state_shards(self, prefix: str = "model/") -> Iterator[RowShard]:
        """This rank's fp32 master rows of every parameter (``<prefix><fqn>``) and the
        persistent buffers (replicated). See accel_zero/shards.py."""
        rank = self.comm.rank
        offload = self.offload
        if offload is not None and offload.optimizer is not None:
            if offload.optimizer.masters_on_disk:
                names = {(u.index, i): s.fqn for u in self.units for i, s in enumerate(u.slots)}
                yield from offload.optimizer.iter_shards(
                    [("master", "master")], lambda key, _: f"{prefix}{names[key]}"
                )
        for unit in self.units:
            if offload is not None and offload.swaps_masters(unit):
                continue  # streamed from the swap records above
            for slot in unit.slots:
                rows = unit.slot_master(slot)
                if rows.dtype != torch.float32:  # replicated non-fp32 parameters are masters
                    rows = rows.float()
                key = f"{prefix}{slot.fqn}"
                if not slot.shape:
                    if rows.numel():
                        yield RowShard(key=key, global_shape=(), row_start=0, tensor=rows.view(()))
                    elif not unit.resharded:
                        yield RowShard(
                            key=key,
                            global_shape=(),
                            row_start=0,
                            tensor=slot.param.detach().float(),
                            replicated=True,
                        )
                    continue
                yield RowShard(
                    key=key,
                    global_shape=tuple(slot.shape),
                    row_start=slot.row_start(rank),
                    tensor=rows,
                )
        for key, buf in _persistent_buffers(self.model):
            yield RowShard(
                key=f"{prefix}{key}",
                global_shape=tuple(buf.shape),
                row_start=0,
                tensor=buf.detach(),
                replicated=True,
            )

    def state_shapes(self, prefix: str = "model/") -> dict[str, tuple[int, ...]]:
        """The keys ``state_shards`` writes, with their global shapes (to check a checkpoint
        belongs to this model before loading it)."""
        shapes = {f"{prefix}{s.fqn}": tuple(s.shape) for u in self.units for s in u.slots}
        for key, buf in _persistent_buffers(self.model):
            shapes[f"{prefix}{key}"] = tuple(buf.shape)
        return shapes

    def _refresh_working_shards(self) -> None:
        """Masters changed on disk (a checkpoint): recast every working shard from them."""
        assert self.offload is not None
        for unit in self.units:
            if not self.offload.swaps_masters(unit):
                continue
            master = self.offload.read_masters(unit)
            if unit.working is not None:
                unit.working.copy_(master)
            elif self.offload.params is not None:
                self.offload.params.update(unit.index).copy_(master)
                self.offload.params.commit(unit.index)

    def load_state_shards(self, reader: ShardReader, prefix: str = "model/") -> None:
        """Load masters (this rank's rows, whatever world size wrote them) and buffers, then
        refresh whole parameters. Raises ValueError naming a missing or mismatched key."""
        self.hooks.invalidate()
        rank = self.comm.rank
        offload = self.offload
        for unit in self.units:
            for slot in unit.slots:
                _expect_shape(reader, f"{prefix}{slot.fqn}", tuple(slot.shape))
        if offload is not None and offload.optimizer is not None:
            if offload.optimizer.masters_on_disk:
                names = {(u.index, i): s.fqn for u in self.units for i, s in enumerate(u.slots)}
                offload.optimizer.load_shards(
                    reader, [("master", "master")], lambda key, _: f"{prefix}{names[key]}"
                )
                self._refresh_working_shards()
        for unit in self.units:
            if offload is not None and offload.swaps_masters(unit):
                continue
            for slot in unit.slots:
                key = f"{prefix}{slot.fqn}"
                start, n = slot.row_start(rank), slot.local_rows(rank)
                with torch.no_grad():
                    if unit.master is not None:
                        rows = reader.read_rows(key, start, start + n)
                        unit.flat_view(slot, unit.master).copy_(rows.reshape(n, *slot.shape[1:]))
                    if not unit.resharded:
                        whole = reader.read_rows(key, 0, slot.rows)
                        slot.param.data.copy_(whole.reshape(slot.shape))
        for key, buf in _persistent_buffers(self.model):
            _expect_shape(reader, f"{prefix}{key}", tuple(buf.shape))
            with torch.no_grad():
                n_rows = buf.shape[0] if buf.dim() else 1
                buf.copy_(reader.read_rows(f"{prefix}{key}", 0, n_rows).reshape(buf.shape))
        self.hooks.prefetch_next_pass(grad=True)


def _expect_shape(reader: ShardReader, key: str, shape: tuple[int, ...]) -> None:
    have = reader.shape(key)
    if have is None:
        raise ValueError(f"the checkpoint has no {key!r}: it was saved from another model")
    if tuple(have) != shape:
        raise ValueError(
            f"the checkpoint's {key!r} has shape {tuple(have)}, the model's is {shape}: it was "
            "saved from another model (or config)"
        )


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for mname, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is not None and bname not in module._non_persistent_buffers_set:
                yield (f"{mname}.{bname}" if mname else bname), buf


def _param_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names
