"""Forward and backward hooks that drive units through the coordinator (STYLE 7).

Only public hook APIs: ``register_forward_pre_hook(with_kwargs=True)``,
``register_forward_hook``, ``torch.autograd.graph.register_multi_grad_hook``
on a unit's outputs (pre-backward: gather the unit again), and
``Tensor.register_post_accumulate_grad_hook`` on each parameter (the unit's
gradients are complete: reduce them). The end of backward is found with the
autograd engine's ``queue_callback`` (as FSDP2 does), which flushes units
that did not complete, waits for every reduction and releases what is still
gathered.

The hooks see the engine's pieces through a :class:`HookContext` (units,
gradients, coordinator, buckets) and own the runtime state of passes; the
engine builds both and never the other way round.

[Note: pass lifecycle]
The root module's pre-forward opens a pass and gathers the root units (the
parameters outside any unit: embeddings, final norm, head, and anything
shared between units), which stay gathered for the whole pass. A pass with
gradients ends at the end of backward; one without ends at the root's
post-forward. A forward with gradients that is never followed by backward
(evaluation without ``no_grad``) is closed when the next pass opens.

[Note: prefetch across passes]
The first units of a pass (the root and the first block) are gathered
before the pass starts when the next pass is predictable and the parameters
cannot change in between: after an optimizer step (for the next training
pass), at the end of a pass without gradients (generation runs many in a
row) and at the end of a backward inside an accumulation window (no step
follows). Only those two: what is gathered between passes stays gathered
through the step, ``zero_grad`` and data loading (measured: with the whole
prefetch budget the whole model stayed gathered between steps), and the first
block's pre-forward prefetches the rest. Anything gathered is dropped when
the masters change (``HookDriver.invalidate``), so a prefetch can waste
traffic, never serve stale weights.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from accel_zero.comm import Comm
from accel_zero.coordinator import Coordinator, Phase
from accel_zero.grads import ReduceBuckets, UnitGrads
from accel_zero.partition import Unit, UnitState
from accel_zero.tracer import MemoryTracer

if TYPE_CHECKING:
    from accel_zero.offload.engine_offload import EngineOffload

logger = logging.getLogger(__name__)

__all__ = ["HookContext", "HookDriver"]


@dataclass(frozen=True, kw_only=True)
class HookContext:
    """The engine's pieces the hooks drive (built by the engine, shared with it)."""

    model: nn.Module
    units: list[Unit]
    unit_grads: list[UnitGrads]
    module_units: list[tuple[nn.Module, list[Unit]]]
    """Each unit module and the units its forward gathers."""
    pass_units: list[Unit]
    """Resharded units gathered for a whole pass (the root's parameters)."""
    coordinator: Coordinator
    buckets: ReduceBuckets
    comm: Comm
    stage: int
    tracer: MemoryTracer
    offload: EngineOffload | None = None
    """Swapped optimizer state / parameters: gradients go to disk at a synchronising
    backward, parameter records are read ahead of their gathers."""


def _tensors_requiring_grad(obj: Any) -> list[torch.Tensor]:
    """Tensors requiring grad in a module output (tensors, tuples, lists, dicts, ModelOutput)."""
    out: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.requires_grad:
                out.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return out


class HookDriver:
    """Owns the hook handles of one engine and turns hook events into unit transitions."""

    def __init__(self, ctx: HookContext) -> None:
        self.ctx = ctx
        self.handles: list[RemovableHandle] = []
        self.no_sync = False
        """Set by the accelerator's ``no_sync``: ZeRO-1 skips gradient communication."""
        self.in_backward = False
        self.ran_units: set[int] = set()
        """Units whose forward ran with gradients since the last end of backward."""
        self.backward_done = False
        """A backward has completed since the last ``zero_grad``: gradients are readable."""
        self._callback_queued = False

    # ----------------------------------------------------------------- install
    def install(self) -> None:
        ctx = self.ctx
        root = ctx.model
        self.handles.append(
            root.register_forward_pre_hook(self._root_pre_forward, with_kwargs=True)
        )
        self.handles.append(root.register_forward_hook(self._root_post_forward))
        for module, units in ctx.module_units:
            if module is root:
                continue
            self.handles.append(
                module.register_forward_pre_hook(self._make_pre_forward(units), with_kwargs=True)
            )
            self.handles.append(module.register_forward_hook(self._make_post_forward(units)))
        for unit in ctx.units:
            for slot in unit.slots:
                if slot.requires_grad:
                    self.handles.append(
                        slot.param.register_post_accumulate_grad_hook(
                            self._make_post_accumulate(unit.index)
                        )
                    )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # ----------------------------------------------------------- unit queries
    def _check_ready(self) -> None:
        if not self.handles:
            raise RuntimeError("accel_zero engine was removed from this model")

    def _skip_reduction(self, index: int) -> bool:
        """Under ``no_sync``, gradients that stay whole accumulate locally (UnitGrads)."""
        return self.no_sync and self.ctx.unit_grads[index].all_reduce

    def _unit_ran(self, index: int) -> bool:
        unit = self.ctx.units[index]
        return unit.module is None or unit.module is self.ctx.model or index in self.ran_units

    def _live_units(self) -> set[int]:
        return {u.index for u in self.ctx.units if u.resharded and u.state is UnitState.GATHERED}

    def _in_flight_units(self) -> set[int]:
        return {u.index for u in self.ctx.units if u.state is UnitState.GATHERING}

    def live_numel(self) -> int:
        return sum(
            u.full_numel for u in self.ctx.units if u.resharded and u.state is not UnitState.SHARDED
        )

    # -------------------------------------------------------------- root hooks
    def _begin_pass(self) -> None:
        ctx = self.ctx
        coord = ctx.coordinator
        if coord.in_pass:
            # The previous pass had gradients but no backward (eval without no_grad).
            self._end_pass()
        grad = torch.is_grad_enabled()
        coord.begin_pass(grad)
        self._callback_queued = False
        for unit in ctx.pass_units:
            if unit.state is not UnitState.GATHERED:
                coord.note_fetch(unit.state is UnitState.GATHERING)
            unit.finish_gather()

    def _root_pre_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self.in_backward:
            return None  # activation recomputation: everything needed is gathered on demand
        self._check_ready()
        self._begin_pass()
        return None

    def _root_post_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.in_backward:
            return output
        # A timeline sample is what was held as the phase ended ([Note: memory timeline]).
        self.ctx.tracer.mark("forward", "train" if torch.is_grad_enabled() else "no_grad")
        if not torch.is_grad_enabled():
            self._end_pass()
            self.prefetch_next_pass(grad=False)
            return output
        tensors = _tensors_requiring_grad(output)
        if tensors:
            pass_units = self.ctx.pass_units
            torch.autograd.graph.register_multi_grad_hook(
                tensors, lambda _grad: self._pre_backward(pass_units), mode="any"
            )
        return output

    # -------------------------------------------------------------- unit hooks
    def _make_pre_forward(self, units: list[Unit]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            coord = self.ctx.coordinator
            if not self.in_backward:
                if not coord.in_pass:
                    self._begin_pass()  # a submodule called directly
                for unit in units:
                    coord.record(Phase.FORWARD, unit.index)
                    if torch.is_grad_enabled():
                        self.ran_units.add(unit.index)
            self._ensure_gathered(units)

        return hook

    def _make_post_forward(self, units: list[Unit]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.in_backward:
                return output  # recomputation inside backward: keep for the backward that follows
            coord = self.ctx.coordinator
            for unit in units:
                if not coord.keep_gathered(unit.index, self.live_numel()):
                    unit.release(in_pass=True)
            if torch.is_grad_enabled():
                tensors = _tensors_requiring_grad(output)
                if tensors:
                    torch.autograd.graph.register_multi_grad_hook(
                        tensors, lambda _grad: self._pre_backward(units), mode="any"
                    )
            return output

        return hook

    def _ensure_gathered(self, units: list[Unit]) -> None:
        ctx = self.ctx
        coord = ctx.coordinator
        for unit in units:
            if unit.state is not UnitState.GATHERED:
                coord.note_fetch(unit.state is UnitState.GATHERING)
                unit.start_gather()
        # Issue the next gathers before waiting on ours, so they overlap this unit's compute.
        for index in coord.prefetch_plan(
            self._live_units(), self._in_flight_units(), self.live_numel()
        ):
            ctx.units[index].start_gather()
        self._read_ahead()
        for unit in units:
            unit.finish_gather()

    def _read_ahead(self) -> None:
        """Parameters on NVMe: start reading the records of the units the trace needs after
        those already gathering (as many as free swap buffers allow)."""
        params = self.ctx.offload.params if self.ctx.offload is not None else None
        if params is not None:
            busy = self._live_units() | self._in_flight_units()
            params.prefetch([u for u in self.ctx.coordinator.upcoming_units() if u not in busy])

    def prefetch_next_pass(self, *, grad: bool) -> None:
        """Start gathering what the next pass of this kind needs first.

        See [Note: prefetch across passes].
        """
        ctx = self.ctx
        if ctx.stage != 3 or ctx.coordinator.in_pass:
            return
        plan = ctx.coordinator.plan_pass_start(grad, self.live_numel())
        if plan is None:
            return
        for unit in ctx.pass_units:
            unit.start_gather()
        for index in plan:
            ctx.units[index].start_gather()

    def invalidate(self) -> None:
        """Drop every gathered or in-flight unit (the masters are about to change or did)."""
        for unit in self.ctx.units:
            unit.release()
        if self.ctx.offload is not None and self.ctx.offload.params is not None:
            self.ctx.offload.params.drop_prefetches()

    # ---------------------------------------------------------------- backward
    def _queue_end_of_backward(self) -> None:
        if self._callback_queued:
            return
        self._callback_queued = True
        self.in_backward = True
        offload = self.ctx.offload
        # [Note: swapped gradients] in offload/swapped.py: only at a synchronising backward.
        sink = offload.optimizer.take_grads if offload and offload.optimizer else None
        for grads in self.ctx.unit_grads:
            grads.begin_backward()
            swaps = sink is not None and offload is not None and offload.swaps_grads(grads.unit)
            grads.sink = sink if swaps and not self.no_sync else None
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _pre_backward(self, units: list[Unit]) -> None:
        self._queue_end_of_backward()
        coord = self.ctx.coordinator
        for unit in units:
            if unit.resharded and unit not in self.ctx.pass_units:
                coord.record(Phase.BACKWARD, unit.index)
        self._ensure_gathered([u for u in units if u.resharded])

    def _make_post_accumulate(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            self._queue_end_of_backward()
            if self.ctx.unit_grads[index].mark_ready():
                self._unit_grads_complete(index)

        return hook

    def _unit_grads_complete(self, index: int) -> None:
        ctx = self.ctx
        unit = ctx.units[index]
        if self._skip_reduction(index):
            return  # under no_sync: whole gradients accumulate in param.grad
        ctx.buckets.add(ctx.unit_grads[index])
        if unit.resharded and unit not in ctx.pass_units:
            if not ctx.coordinator.keep_gathered(index, self.live_numel()):
                unit.release(in_pass=True)

    def _end_of_backward(self) -> None:
        ctx = self.ctx
        self.in_backward = False
        self._callback_queued = False
        # [Note: reduce order] leftovers in unit order, then wait for all.
        for index, grads in enumerate(ctx.unit_grads):
            if self._unit_ran(index) and not self._skip_reduction(index):
                ctx.buckets.add(grads)
        ctx.buckets.drain()
        for grads in ctx.unit_grads:
            grads.sink = None
        offload = ctx.offload
        if offload is not None and offload.optimizer is not None and offload.optimizer.grad_space:
            if not self.no_sync:
                offload.optimizer.end_of_backward()
        # A unit accumulating locally must still be reduced at the synchronising backward,
        # even if it does not run in that micro-batch ("sometimes" modules).
        self.ran_units = {i for i in self.ran_units if self._skip_reduction(i)}
        self.backward_done = True
        self._end_pass()
        ctx.tracer.mark("backward")
        if self.no_sync:
            self.prefetch_next_pass(grad=True)  # inside accumulation: no step follows

    def _end_pass(self) -> None:
        ctx = self.ctx
        events = ctx.coordinator.end_pass()
        self._check_order(events)
        for unit in ctx.units:
            unit.release()  # and back to the user's dtype: [Note: placeholder dtype]

    def _check_order(self, events: Sequence[tuple[object, int]]) -> None:
        """All ranks ran the same units in the same order this pass (ZeRO-3), or a clear error."""
        comm = self.ctx.comm
        if self.ctx.stage != 3 or comm.global_world_size == 1:  # spans the world (hybrid too)
            return
        digest = hashlib.blake2b(repr(events).encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little", signed=True)
        seen = comm.check_same(value, what="execution-order check")
        if len(set(seen)) > 1:
            groups: dict[int, list[int]] = {}
            for rank, v in enumerate(seen):
                groups.setdefault(v, []).append(rank)
            mine = groups[value]
            raise RuntimeError(
                f"accel_zero rank {comm.global_rank}: ranks ran different modules in this pass "
                f"(ranks {sorted(groups.values())} each agree among themselves; this rank is with "
                f"{mine}). ZeRO-3 gathers parameters collectively, so every rank must run the "
                "same modules in the same order: make data-dependent branches agree across ranks."
            )
