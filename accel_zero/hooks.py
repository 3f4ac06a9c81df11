"""Forward and backward hooks that drive units through the coordinator (STYLE 7).

Only public hook APIs: ``register_forward_pre_hook(with_kwargs=True)``,
``register_forward_hook``, ``torch.autograd.graph.register_multi_grad_hook``
on a unit's outputs (pre-backward: gather the unit again), and
``Tensor.register_post_accumulate_grad_hook`` on each parameter (the unit's
gradients are complete: reduce them). The end of backward is found with the
autograd engine's ``queue_callback`` (as FSDP2 does), which flushes units
that did not complete, waits for every reduction and releases what is still
gathered.

[Note: pass lifecycle]
The root module's pre-forward opens a pass and gathers the root units (the
parameters outside any unit: embeddings, final norm, head, and anything
shared between units), which stay gathered for the whole pass. A pass with
gradients ends at the end of backward; one without ends at the root's
post-forward. A forward with gradients that is never followed by backward
(evaluation without ``no_grad``) is closed when the next pass opens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from accel_zero.coordinator import Phase
from accel_zero.partition import UnitState

if TYPE_CHECKING:
    from accel_zero.engine import Engine
    from accel_zero.partition import Unit

logger = logging.getLogger(__name__)

__all__ = ["HookDriver"]


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

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.handles: list[RemovableHandle] = []
        self.in_backward = False
        self._callback_queued = False
        self._pass_has_backward = False

    # ----------------------------------------------------------------- install
    def install(self) -> None:
        engine = self.engine
        root = engine.model
        self.handles.append(
            root.register_forward_pre_hook(self._root_pre_forward, with_kwargs=True)
        )
        self.handles.append(root.register_forward_hook(self._root_post_forward))
        for module, units in engine.module_units:
            if module is root:
                continue
            self.handles.append(
                module.register_forward_pre_hook(self._make_pre_forward(units), with_kwargs=True)
            )
            self.handles.append(module.register_forward_hook(self._make_post_forward(units)))
        for unit in engine.units:
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

    # -------------------------------------------------------------- root hooks
    def _begin_pass(self) -> None:
        engine = self.engine
        coord = engine.coordinator
        if coord.in_pass:
            # The previous pass had gradients but no backward (eval without no_grad).
            self._end_pass()
        grad = torch.is_grad_enabled()
        coord.begin_pass(grad)
        self._pass_has_backward = False
        self._callback_queued = False
        for unit in engine.pass_units:
            if unit.state is not UnitState.GATHERED:
                coord.note_fetch(unit.state is UnitState.GATHERING)
            unit.finish_gather()

    def _root_pre_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self.in_backward:
            return None  # activation recomputation: everything needed is gathered on demand
        self.engine.check_ready()
        self._begin_pass()
        return None

    def _root_post_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.in_backward:
            return output
        engine = self.engine
        if not torch.is_grad_enabled():
            self._end_pass()
            return output
        tensors = _tensors_requiring_grad(output)
        if tensors:
            torch.autograd.graph.register_multi_grad_hook(
                tensors, lambda _grad: self._pre_backward(engine.pass_units), mode="any"
            )
        return output

    # -------------------------------------------------------------- unit hooks
    def _make_pre_forward(self, units: list[Unit]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            engine = self.engine
            coord = engine.coordinator
            if not self.in_backward:
                if not coord.in_pass:
                    self._begin_pass()  # a submodule called directly
                for unit in units:
                    coord.record(Phase.FORWARD, unit.index)
                    if torch.is_grad_enabled():
                        engine.ran_units.add(unit.index)
            self._ensure_gathered(units)

        return hook

    def _make_post_forward(self, units: list[Unit]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.in_backward:
                return output  # recomputation inside backward: keep for the backward that follows
            engine = self.engine
            for unit in units:
                if not engine.coordinator.keep_gathered(unit.index, engine.live_numel()):
                    unit.release()
            if torch.is_grad_enabled():
                tensors = _tensors_requiring_grad(output)
                if tensors:
                    torch.autograd.graph.register_multi_grad_hook(
                        tensors, lambda _grad: self._pre_backward(units), mode="any"
                    )
            return output

        return hook

    def _ensure_gathered(self, units: list[Unit]) -> None:
        engine = self.engine
        coord = engine.coordinator
        for unit in units:
            if unit.state is not UnitState.GATHERED:
                coord.note_fetch(unit.state is UnitState.GATHERING)
                unit.start_gather()
        # Issue the next gathers before waiting on ours, so they overlap this unit's compute.
        for index in coord.prefetch_plan(
            engine.live_units(), engine.in_flight_units(), engine.live_numel()
        ):
            engine.units[index].start_gather()
        for unit in units:
            unit.finish_gather()

    # ---------------------------------------------------------------- backward
    def _queue_end_of_backward(self) -> None:
        if self._callback_queued:
            return
        self._callback_queued = True
        self.in_backward = True
        self._pass_has_backward = True
        for grads in self.engine.unit_grads:
            grads.begin_backward()
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _pre_backward(self, units: list[Unit]) -> None:
        self._queue_end_of_backward()
        coord = self.engine.coordinator
        for unit in units:
            if unit.resharded and unit not in self.engine.pass_units:
                coord.record(Phase.BACKWARD, unit.index)
        self._ensure_gathered([u for u in units if u.resharded])

    def _make_post_accumulate(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            self._queue_end_of_backward()
            engine = self.engine
            grads = engine.unit_grads[index]
            if grads.mark_ready():
                self._unit_grads_complete(index)

        return hook

    def _unit_grads_complete(self, index: int) -> None:
        engine = self.engine
        unit = engine.units[index]
        if engine.skip_reduction():
            return  # ZeRO-1 under no_sync: gradients accumulate in param.grad
        engine.buckets.add(engine.unit_grads[index])
        if unit.resharded and unit not in engine.pass_units:
            if not engine.coordinator.keep_gathered(index, engine.live_numel()):
                unit.release()

    def _end_of_backward(self) -> None:
        engine = self.engine
        self.in_backward = False
        self._callback_queued = False
        if not engine.skip_reduction():
            # [Note: reduce order] leftovers in unit order, then wait for all.
            for index, grads in enumerate(engine.unit_grads):
                if engine.unit_ran(index):
                    engine.buckets.add(grads)
            engine.buckets.flush()
            for grads in engine.unit_grads:
                grads.finish()
            engine.ran_units.clear()
        self._end_pass()

    def _end_pass(self) -> None:
        engine = self.engine
        events = engine.coordinator.end_pass()
        engine.check_order(events)
        for unit in engine.units:
            unit.release()
