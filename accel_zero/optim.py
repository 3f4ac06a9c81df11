"""The sharded optimizer (DESIGN D5).

The user's optimizer (any ``torch.optim.Optimizer``: its class, param groups
and hyper-parameters) is re-pointed, in place, at fp32 masters: each
parameter in a group is replaced by this rank's real rows of its master (see
[Note: masters and precision] in partition.py), so the same object keeps
stepping and an LR scheduler built on it keeps working. Gradients are this
rank's rows of the averaged gradient (``grads.UnitGrads``); ``step`` runs the
user's optimizer on them, then lets the engines re-gather what they keep whole.

fp16: dynamic loss scaling; the overflow decision is one all-reduce (MAX) of
a local flag, so every rank skips the same step. ``clip_grad_norm_`` is the
norm over all shards with one all-reduce.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from accel_zero.config import LossScaleConfig
from accel_zero.shards import RowShard, ShardReader
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
        self._by_master: dict[int, _Entry] = {}
        self._state_bytes = 0
        """Optimizer-state bytes last reported to the tracer."""
        self._repoint(optimizer)

    def _lookup(self, p: torch.Tensor) -> _Entry | None:
        for engine in self.engines:
            hit = engine.lookup(p)
            if hit is not None:
                unit, slot = hit
                return _Entry(engine, unit, slot, unit.slot_master(unit.slots[slot]))
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
                self._by_master[id(entry.master)] = entry
                new_params.append(entry.master)
            group["params"] = new_params
        if optimizer.state:
            logger.warning(
                "accel_zero: optimizer state built before prepare() is dropped; "
                "it is rebuilt over the sharded master weights"
            )
            optimizer.state.clear()

    # ---------------------------------------------------------------- gradients
    def _grad(self, e: _Entry) -> torch.Tensor | None:
        """This rank's rows of the entry's averaged gradient (a view of the real storage)."""
        return e.engine.unit_grads[e.unit.index].slot_grad(e.slot)

    def _grads(self, entries: Iterable[_Entry] | None = None) -> list[torch.Tensor]:
        out = []
        for e in self.entries if entries is None else entries:
            g = self._grad(e)
            if g is not None:
                out.append(g)
        return out

    def _scale_targets(self, entries: Iterable[_Entry]) -> list[torch.Tensor]:
        """What to multiply to unscale or clip the entries' gradients: ZeRO-1 keeps whole
        ``param.grad`` on every rank (scaled whole, as DDP's clip does), ZeRO-2/3 the rows."""
        out: list[torch.Tensor] = []
        seen: set[int] = set()
        for e in entries:
            grads = e.engine.unit_grads[e.unit.index]
            g = e.unit.slots[e.slot].param.grad if grads.all_reduce else self._grad(e)
            if g is not None and g.numel() and id(g) not in seen:
                seen.add(id(g))
                out.append(g)
        return out

    def _attach_grads(self) -> None:
        for e in self.entries:
            g = self._grad(e)
            e.master.grad = g if g is None or g.dtype == torch.float32 else g.float()

    def unscale_(self) -> None:
        """Divide gradients by the loss scale once per step (fp16 only)."""
        if self.scaler is None or self._unscaled:
            return
        targets = self._scale_targets(self.entries)
        if targets:
            torch._foreach_mul_(targets, 1.0 / self.scaler.scale)
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
        norm = self._total_norm(entries, float(norm_type))
        if torch.isfinite(norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            targets = self._scale_targets(entries)
            if targets:
                torch._foreach_mul_(targets, coef)
        self._clipped = True
        return norm

    def _total_norm(self, entries: list[_Entry], norm_type: float) -> torch.Tensor:
        """The global gradient norm, computed as ``torch.nn.utils.clip_grad_norm_`` does:
        one norm per parameter, then the norm of those. Whole gradients (ZeRO-1, persistent
        parameters) give each rank the exact per-tensor norm locally, so a model of them
        clips bit for bit like DDP; sharded ones add up their rows' powers across ranks
        (one all-reduce of a small vector, MAX for the inf-norm)."""
        device = self.comm.device
        norms: list[torch.Tensor | None] = []
        partial: list[torch.Tensor] = []
        where: list[int] = []
        for e in entries:
            grads = e.engine.unit_grads[e.unit.index]
            if grads.all_reduce:
                g = e.unit.slots[e.slot].param.grad
                norms.append(None if g is None else torch.linalg.vector_norm(g, norm_type))
                continue
            rows = self._grad(e)
            if rows is None:
                norms.append(None)
                continue
            where.append(len(norms))
            norms.append(None)
            if math.isinf(norm_type):
                local = rows.abs().max() if rows.numel() else torch.zeros((), device=rows.device)
            else:
                local = torch.linalg.vector_norm(rows, norm_type) ** norm_type
            partial.append(local.float())
        if where:
            total = torch.stack(partial).to(device)
            op = "max" if math.isinf(norm_type) else "sum"
            # Sharded rows: replicas (hybrid sharding) hold the same rows, so sum the shard group.
            self.comm.all_reduce(total, op=op, what="gradient norm", group="shard")
            if not math.isinf(norm_type):
                total = total ** (1.0 / norm_type)
            for i, value in zip(where, total.unbind(), strict=True):
                norms[i] = value
        present = [n.to(device) for n in norms if n is not None]
        if not present:
            return torch.zeros((), device=device)
        return torch.linalg.vector_norm(torch.stack(present), norm_type)

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

    # -------------------------------------------------------------- checkpoints
    def _fqn(self, e: _Entry) -> str:
        return e.unit.slots[e.slot].fqn

    def state_shards(self) -> Iterator[RowShard]:
        """This rank's rows of every per-parameter optimizer tensor (``optim/<fqn>/<name>``),
        scalars (Adam's ``step``) replicated. See accel_zero/shards.py."""
        rank = self.comm.rank
        for e in self.entries:
            slot = e.unit.slots[e.slot]
            for name, value in self.optimizer.state.get(e.master, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                key = f"optim/{slot.fqn}/{name}"
                if value.shape == e.master.shape and slot.shape:
                    yield RowShard(
                        key=key,
                        global_shape=tuple(slot.shape),
                        row_start=slot.row_start(rank),
                        tensor=value,
                    )
                elif value.shape == e.master.shape:  # a 0-d parameter: rank 0 holds it
                    if value.numel():
                        yield RowShard(key=key, global_shape=(), row_start=0, tensor=value.view(()))
                else:
                    yield RowShard(
                        key=key,
                        global_shape=tuple(value.shape),
                        row_start=0,
                        tensor=value,
                        replicated=True,
                    )

    def meta_state(self) -> dict[str, Any]:
        """JSON-able: each param group's hyper-parameters with its parameters' names, the
        names of each parameter's optimizer tensors, and the loss scaler."""
        groups = []
        for group in self.optimizer.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            names = [self._fqn(self._by_master[id(m)]) for m in group["params"]]
            groups.append({"hyper": _jsonable(hyper), "params": names})
        state = {
            self._fqn(e): sorted(
                k for k, v in self.optimizer.state.get(e.master, {}).items()
                if isinstance(v, torch.Tensor)
            )
            for e in self.entries
        }  # fmt: skip
        return {
            "optimizer_class": type(self.optimizer).__name__,
            "param_groups": groups,
            "state": state,
            "loss_scale": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_shards(self, reader: ShardReader, meta: dict[str, Any]) -> None:
        """Rebuild this rank's optimizer state from a checkpoint of any world size."""
        if meta.get("optimizer_class") not in (None, type(self.optimizer).__name__):
            raise ValueError(
                f"the checkpoint's optimizer is {meta['optimizer_class']}, this run's is "
                f"{type(self.optimizer).__name__}: build the same optimizer to resume"
            )
        groups = meta.get("param_groups", [])
        if len(groups) != len(self.optimizer.param_groups):
            raise ValueError(
                f"the checkpoint has {len(groups)} optimizer param groups, this optimizer "
                f"{len(self.optimizer.param_groups)}: build it the same way to resume"
            )
        for group, saved in zip(self.optimizer.param_groups, groups, strict=True):
            group.update(saved["hyper"])
        rank = self.comm.rank
        names = meta.get("state", {})
        self.optimizer.state.clear()
        for e in self.entries:
            slot = e.unit.slots[e.slot]
            state: dict[str, torch.Tensor] = {}
            for name in names.get(slot.fqn, []):
                key = f"optim/{slot.fqn}/{name}"
                shape = reader.shape(key)
                if shape is None:
                    raise ValueError(f"the checkpoint has no {key!r} (incomplete checkpoint?)")
                if tuple(shape) == tuple(slot.shape):
                    start, n = slot.row_start(rank), slot.local_rows(rank)
                    rows = reader.read_rows(key, start, start + n)
                    state[name] = rows.reshape(e.master.shape).to(e.master.device).clone()
                else:
                    state[name] = reader.read_rows(key, 0, 1).to(self.comm.device).clone()
            if state:
                self.optimizer.state[e.master] = state
        if meta.get("loss_scale") is not None and self.scaler is not None:
            self.scaler.load_state_dict(meta["loss_scale"])
        self.trace_state()

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


def _jsonable(value: Any) -> Any:
    """Hyper-parameters as JSON values (tuples become lists, tensors numbers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
