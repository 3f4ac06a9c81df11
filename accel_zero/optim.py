"""The sharded optimizer (DESIGN D5).

The user's optimizer (any ``torch.optim.Optimizer``: its class, param groups
and hyper-parameters) is re-pointed, in place, at fp32 master shards: each
parameter in a group is replaced by its rows of the unit's master buffer, so
the same object keeps stepping and an LR scheduler built on it keeps working.
Gradients arrive as fp32 shards (``grads.UnitGrads``); ``step`` runs the
user's optimizer on this rank's rows only, then copies the masters into the
compute-dtype shards (and re-gathers ZeRO-1/2 parameters).

fp16: dynamic loss scaling; the overflow decision is one all-reduce (MAX) of
a local flag, so every rank skips the same step. ``clip_grad_norm_`` is the
norm over all shards with one all-reduce.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from accel_zero.config import LossScaleConfig
from accel_zero.tracer import nbytes

if TYPE_CHECKING:
    from accel_zero.engine import Engine
    from accel_zero.partition import Unit

logger = logging.getLogger(__name__)

__all__ = ["LossScaler", "ZeroOptimizer"]  # and CPUAdam, resolved lazily below


def __getattr__(name: str) -> Any:
    # accel_zero.optim.CPUAdam is the kernel-backed optimizer of accel_zero.cpu_adam.
    if name == "CPUAdam":
        from accel_zero.cpu_adam import CPUAdam

        return CPUAdam
    raise AttributeError(name)


class LossScaler:
    """Dynamic loss scale for fp16 (the same rule on every rank: inputs are agreed)."""

    def __init__(self, config: LossScaleConfig) -> None:
        self.config = config
        self.scale = float(config.initial_scale)
        self._good_steps = 0
        self._hysteresis_left = config.hysteresis

    def update(self, found_inf: bool) -> None:
        cfg = self.config
        if found_inf:
            self._good_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * cfg.backoff_factor, cfg.min_scale)
                self._hysteresis_left = cfg.hysteresis
            logger.info("accel_zero: fp16 overflow, step skipped; loss scale now %g", self.scale)
            return
        self._good_steps += 1
        if self._good_steps % cfg.growth_interval == 0:
            self.scale *= cfg.growth_factor
            self._hysteresis_left = cfg.hysteresis

    def state_dict(self) -> dict[str, float | int]:
        return {
            "scale": self.scale,
            "good_steps": self._good_steps,
            "hysteresis_left": self._hysteresis_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])


@dataclass(eq=False)
class _Entry:
    engine: Engine
    unit: Unit
    slot: int
    master: torch.Tensor


class ZeroOptimizer:
    """Drives a user's torch optimizer over the master shards of one or more engines."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        engines: list[Engine],
        *,
        scaler: LossScaler | None = None,
    ) -> None:
        if not engines:
            raise ValueError("ZeroOptimizer needs at least one prepared model (engine)")
        offload = engines[0].config.offload_optimizer.device
        if offload != "none":
            raise NotImplementedError(
                f"zero_config.offload_optimizer.device={offload!r} is parsed but not "
                "implemented yet; set it to 'none'"
            )
        self.optimizer = optimizer
        self.engines = engines
        self.comm = engines[0].comm
        self.scaler = scaler
        self.step_was_skipped = False
        self._unscaled = False
        self._clipped = False
        self.auto_clip = engines[0].config.gradient_clipping
        """DeepSpeed's ``gradient_clipping``: applied at step unless the loop clipped already."""
        self.entries: list[_Entry] = []
        self._by_param: dict[int, _Entry] = {}
        self._state_bytes = 0
        """Optimizer-state bytes last reported to the tracer."""
        self._repoint(optimizer)

    def _lookup(self, p: torch.Tensor) -> _Entry | None:
        for engine in self.engines:
            hit = engine.lookup(p)
            if hit is not None:
                unit, slot = hit
                return _Entry(engine, unit, slot, unit.shard_view(unit.slots[slot], unit.master))
        return None

    def _repoint(self, optimizer: torch.optim.Optimizer) -> None:
        by_slot: dict[tuple[int, int, int], _Entry] = {}
        for gi, group in enumerate(optimizer.param_groups):
            new_params = []
            for p in group["params"]:
                entry = self._lookup(p)
                if entry is None:
                    raise ValueError(
                        f"rank {self.comm.rank}: optimizer param group {gi} holds a parameter of "
                        f"shape {tuple(p.shape)} that is not in any prepared model. Build the "
                        "optimizer from model.parameters() and pass both to one prepare() call "
                        "(or build it after prepare() from the prepared model's parameters)."
                    )
                key = (id(entry.engine), entry.unit.index, entry.slot)
                if key in by_slot:
                    entry = by_slot[key]
                else:
                    by_slot[key] = entry
                    self.entries.append(entry)
                self._by_param[id(p)] = entry
                self._by_param[id(entry.unit.slots[entry.slot].param)] = entry
                new_params.append(entry.master)
            group["params"] = new_params
        if optimizer.state:
            logger.warning(
                "accel_zero: optimizer state built before prepare() is dropped; "
                "it is rebuilt over the sharded master weights"
            )
            optimizer.state.clear()

    # ---------------------------------------------------------------- gradients
    def _attach_grads(self) -> None:
        for e in self.entries:
            e.master.grad = e.engine.unit_grads[e.unit.index].slot_grad(e.slot)

    def _grads(self, entries: Iterable[_Entry] | None = None) -> list[torch.Tensor]:
        out = []
        for e in self.entries if entries is None else entries:
            g = e.engine.unit_grads[e.unit.index].slot_grad(e.slot)
            if g is not None:
                out.append(g)
        return out

    def unscale_(self) -> None:
        """Divide gradients by the loss scale once per step (fp16 only)."""
        if self.scaler is None or self._unscaled:
            return
        grads = self._grads()
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        self._unscaled = True

    def _found_inf(self) -> bool:
        local = any(not bool(torch.isfinite(g).all()) for g in self._grads())
        flag = torch.tensor([1.0 if local else 0.0], device=self.comm.device)
        self.comm.all_reduce(flag, op="max", what="fp16 overflow check")
        return bool(flag.item() > 0)

    def clip_grad_norm_(
        self, parameters: Iterable[torch.Tensor] | None, max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        """Clip by the global norm over every shard on every rank; returns that norm."""
        self.unscale_()
        if parameters is None:
            entries = list(self.entries)
        else:
            seen: dict[int, _Entry] = {}
            for p in parameters:
                e = self._by_param.get(id(p))
                if e is None:
                    e = self._lookup(p)
                if e is not None:
                    seen[id(e.master)] = e
            entries = list(seen.values())
        grads = self._grads(entries)
        norm_type = float(norm_type)
        device = self.comm.device
        if math.isinf(norm_type):
            local = max((g.abs().max() for g in grads), default=torch.zeros((), device=device))
            total = local.reshape(1).float().clone()
            self.comm.all_reduce(total, op="max", what="gradient norm (inf)")
            norm = total[0]
        else:
            local = sum(
                (torch.linalg.vector_norm(g, norm_type) ** norm_type for g in grads),
                torch.zeros((), device=device),
            )
            total = local.reshape(1).float().clone()
            self.comm.all_reduce(total, op="sum", what="gradient norm")
            norm = total[0] ** (1.0 / norm_type)
        if torch.isfinite(norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            if grads:
                torch._foreach_mul_(grads, coef)
        self._clipped = True
        return norm

    # --------------------------------------------------------------------- step
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def step(self, closure: Any = None) -> Any:
        self.step_was_skipped = False
        if self.scaler is not None:
            found_inf = self._found_inf()
            self.scaler.update(found_inf)
            if found_inf:
                self.step_was_skipped = True
                self._unscaled = False
                self._clipped = False
                self.zero_grad()
                return None
        self.unscale_()
        if self.auto_clip and not self._clipped:
            self.clip_grad_norm_(None, self.auto_clip)
        self._attach_grads()
        result = self.optimizer.step(closure)
        touched: dict[int, set[int]] = {}
        for e in self.entries:
            if e.master.grad is not None:
                touched.setdefault(id(e.engine), set()).add(e.unit.index)
        for engine in self.engines:
            units = touched.get(id(engine), set())
            if units:
                engine.after_optimizer_step(units)
        for e in self.entries:
            e.master.grad = None
        self._unscaled = False
        self._clipped = False
        self.trace_state()
        return result

    def trace_state(self) -> None:
        """Report the optimizer's state bytes (Adam's moments, ...) to the memory tracer.

        Called after every step, where the optimizer creates its state, so the
        tracer's peaks include it.
        """
        total = 0
        seen: set[int] = set()
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    total += nbytes(value)
        tracer = self.engines[0].ctx.tracer
        delta = total - self._state_bytes
        if delta > 0:
            tracer.add("optimizer_state", self.comm.device, delta)
        elif delta < 0:
            tracer.sub("optimizer_state", self.comm.device, -delta)
        self._state_bytes = total

    def zero_grad(self, set_to_none: bool = True) -> None:
        del set_to_none  # shard accumulators are always freed: they are rebuilt by the next reduce
        for engine in self.engines:
            engine.zero_grad()
        for e in self.entries:
            e.master.grad = None

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state (its shard) and the loss scale."""
        state = self.optimizer.state_dict()
        if self.scaler is not None:
            state["accel_zero_loss_scale"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        scale = state.pop("accel_zero_loss_scale", None)
        if scale is not None and self.scaler is not None:
            self.scaler.load_state_dict(scale)
        self.optimizer.load_state_dict(state)
