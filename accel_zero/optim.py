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

Optimizer offload (DESIGN D6): with ``offload_optimizer: cpu`` the masters and state are
in host memory and Adam/AdamW steps run in the CPU Adam kernel (other optimizer classes
step through torch); with ``nvme`` the state of the units an engine swaps lives in swap
records and is stepped there (accel_zero/offload/swapped.py): those entries have no
master tensor in the user's optimizer (an empty placeholder keeps its param groups
intact for schedulers), and their gradients may be on disk, so clipping and the fp16
check use the statistics noted when they were written, and the clip coefficient and
inverse loss scale are applied by the kernel as it reads them back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from accel_zero.config import LossScaleConfig
from accel_zero.offload.adam import AdamHyper, adam_hyper, adam_step
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
    """This rank's fp32 rows (in memory), or an empty placeholder when they are swapped."""
    swapped: bool = False
    """The optimizer state lives in the engine's swap records (offload nvme)."""
    group: int = 0
    """Index of its param group in the user's optimizer."""

    @property
    def key(self) -> tuple[int, int]:
        return (self.unit.index, self.slot)


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
        self.offload = engines[0].config.offload_optimizer.device
        """none | cpu | nvme (``zero_config.offload_optimizer.device``)."""
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
        self._state_bytes: dict[str, int] = {}
        """Optimizer-state bytes last reported to the tracer, per device."""
        self._swapped_scale = 1.0
        """Unscale and clip factors owed by gradients on disk (applied by the kernel)."""
        self._repoint(optimizer)
        self._hyper = [adam_hyper(optimizer, g) for g in optimizer.param_groups]
        self.fused = self.offload != "none" and all(h is not None for h in self._hyper)
        """Resident entries step in the CPU Adam kernel (offload with Adam/AdamW)."""
        if any(e.swapped for e in self.entries) and not self.fused:
            raise ValueError(
                f"zero_config.offload_optimizer.device='nvme' steps Adam/AdamW (and "
                f"accel_zero.CPUAdam, without amsgrad/maximize) in the CPU Adam kernel, record by "
                f"record; {type(optimizer).__name__} is not one of them. Use "
                "offload_optimizer.device='cpu' (any torch optimizer) or 'none'."
            )
        if self.offload == "cpu" and not self.fused:
            logger.info(
                "accel_zero: offload_optimizer cpu: %s steps through torch on the host (the "
                "CPU Adam kernel computes Adam/AdamW only)",
                type(optimizer).__name__,
            )

    def _lookup(self, p: torch.Tensor) -> _Entry | None:
        for engine in self.engines:
            hit = engine.lookup(p)
            if hit is not None:
                unit, slot = hit
                offload = engine.offload
                swapped = (
                    offload is not None
                    and offload.optimizer is not None
                    and (unit.resharded or not offload.optimizer.masters_on_disk)
                )
                if offload is not None and offload.swaps_masters(unit):
                    master = torch.empty(0, dtype=torch.float32)  # rows are on disk
                else:
                    master = unit.slot_master(unit.slots[slot])
                return _Entry(engine, unit, slot, master, swapped=swapped)
        return None

    def _repoint(self, optimizer: torch.optim.Optimizer) -> None:
        by_slot: dict[tuple[int, int, int], _Entry] = {}
        for gi, group in enumerate(optimizer.param_groups):
            new_params = []
            for p in group["params"]:
                entry = self._lookup(p)
                if entry is None:
                    raise ValueError(
                        f"rank {self.comm.global_rank}: optimizer param group {gi} holds a "
                        f"parameter of shape {tuple(p.shape)} that is not in any prepared model. "
                        "Build the "
                        "optimizer from model.parameters() and pass both to one prepare() call "
                        "(or build it after prepare() from the prepared model's parameters)."
                    )
                key = (id(entry.engine), entry.unit.index, entry.slot)
                if key in by_slot:
                    entry = by_slot[key]
                else:
                    entry.group = gi
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
        """This rank's rows of the entry's averaged gradient (a view of the real storage);
        None when it got none, or when it is on disk (see ``_swapped_stats``)."""
        return e.engine.unit_grads[e.unit.index].slot_grad(e.slot)

    def _swapped_stats(self, e: _Entry) -> Any:
        """Norm/finiteness of a gradient written to disk (offload nvme), else None."""
        swapped = e.engine.offload.optimizer if e.engine.offload is not None else None
        return swapped.grad_stats.get(e.key) if swapped is not None else None

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
            if e.swapped:
                continue  # stepped from its swap record
            g = self._grad(e)
            e.master.grad = g if g is None or g.dtype == torch.float32 else g.float()

    def unscale_(self) -> None:
        """Divide gradients by the loss scale once per step (fp16 only)."""
        if self.scaler is None or self._unscaled:
            return
        targets = self._scale_targets(self.entries)
        if targets:
            torch._foreach_mul_(targets, 1.0 / self.scaler.scale)
        self._swapped_scale /= self.scaler.scale
        self._unscaled = True

    def _found_inf(self) -> bool:
        local = any(not bool(torch.isfinite(g).all()) for g in self._grads())
        local |= any(not st.finite for e in self.entries if (st := self._swapped_stats(e)))
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
            if any(self._swapped_stats(e) is not None for e in entries):
                self._swapped_scale *= float(coef)
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
            stats = self._swapped_stats(e) if rows is None else None
            if rows is None and stats is None:
                norms.append(None)
                continue
            where.append(len(norms))
            norms.append(None)
            if stats is not None:  # on disk: the norms noted when it was written
                if not (math.isinf(norm_type) or norm_type == 2.0):
                    raise ValueError(
                        f"clip_grad_norm_(norm_type={norm_type}): with offload_optimizer nvme "
                        "the gradients are on disk and only the 2-norm and inf-norm are kept"
                    )
                local = stats.amax if math.isinf(norm_type) else stats.norm2**norm_type
            elif math.isinf(norm_type):
                assert rows is not None
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
        for engine in self.engines:
            if engine.offload is not None:
                engine.hooks.invalidate()  # read-ahead parameter records are about to change
        self._attach_grads()
        if self.fused:
            result = self._fused_step(closure)
        else:
            result = self.optimizer.step(closure)
        touched: dict[int, set[int]] = {}
        for e in self.entries:
            if e.master.grad is not None:
                touched.setdefault(id(e.engine), set()).add(e.unit.index)
        for engine in self.engines:
            swapped = engine.offload.optimizer if engine.offload is not None else None
            if swapped is not None:
                units = self._swapped_step(engine)
                touched.setdefault(id(engine), set()).update(units)
        for engine in self.engines:
            units = touched.get(id(engine), set())
            if units:
                engine.after_optimizer_step(units)
        for e in self.entries:
            e.master.grad = None
        self._unscaled = False
        self._clipped = False
        self._swapped_scale = 1.0
        self.trace_state()
        self.engines[0].ctx.tracer.mark("step")
        return result

    def _adam(self, group: int) -> AdamHyper:
        hyper = adam_hyper(self.optimizer, self.optimizer.param_groups[group])
        assert hyper is not None
        return hyper

    def _fused_step(self, closure: Any = None) -> Any:
        """The resident entries' Adam step in the CPU Adam kernel, with torch's state layout
        (``step``, ``exp_avg``, ``exp_avg_sq``) so checkpoints and torch can take over."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.optimizer.param_groups):
            params, grads, ms, vs, steps = [], [], [], [], []
            for master in group["params"]:
                if master.grad is None:
                    continue
                state = self.optimizer.state[master]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(master)
                    state["exp_avg_sq"] = torch.zeros_like(master)
                state["step"] += 1
                params.append(master)
                grads.append(master.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(int(state["step"].item()))
            if params:
                adam_step(params, grads, ms, vs, steps, self._adam(gi))
        return loss

    def _swapped_step(self, engine: Engine) -> set[int]:
        """One step of the engine's swapped entries (offload/swapped.py)."""
        offload = engine.offload
        assert offload is not None and offload.optimizer is not None
        entries = {e.key: e for e in self.entries if e.engine is engine and e.swapped}
        hypers = {gi: self._adam(gi) for gi in {e.group for e in entries.values()}}
        params = offload.params

        def has_grad(key: tuple[int, int]) -> bool:
            e = entries.get(key)
            if e is None:
                return False
            grads = engine.unit_grads[key[0]]
            if self._swapped_stats(e) is not None:
                return grads.had_grad[key[1]]
            return grads.slot_grad(key[1]) is not None

        def resident_grad(key: tuple[int, int]) -> torch.Tensor | None:
            g = engine.unit_grads[key[0]].slot_grad(key[1])
            return g if g is None or g.dtype == torch.float32 else g.float()

        def copies(key: tuple[int, int]) -> torch.Tensor | None:
            unit = engine.units[key[0]]
            if not unit.resharded:
                return None  # the master is the parameter's rows: updated in place
            shard = unit.working if unit.working is not None else None
            if shard is None and params is not None:
                shard = params.update(unit.index)
            return None if shard is None else unit.flat_view(unit.slots[key[1]], shard).reshape(-1)

        stepped = offload.optimizer.step(
            lambda key: hypers[entries[key].group],
            has_grad,
            resident_grad,
            inv_scale=self._swapped_scale,
            copies=copies,
            unit_done=params.commit if params is not None else None,
        )
        return stepped

    def trace_state(self) -> None:
        """Report the optimizer's state bytes (Adam's moments, ...) to the memory tracer.

        Called after every step, where the optimizer creates its state, so the
        tracer's peaks include it.
        """
        totals: dict[str, int] = {}
        seen: set[int] = set()
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    totals[value.device.type] = totals.get(value.device.type, 0) + nbytes(value)
        tracer = self.engines[0].ctx.tracer
        for device in set(totals) | set(self._state_bytes):
            delta = totals.get(device, 0) - self._state_bytes.get(device, 0)
            if delta > 0:
                tracer.add("optimizer_state", device, delta)
            elif delta < 0:
                tracer.sub("optimizer_state", device, -delta)
        self._state_bytes = totals

    def zero_grad(self, set_to_none: bool = True) -> None:
        del set_to_none  # shard accumulators are always freed: they are rebuilt by the next reduce
        for engine in self.engines:
            engine.zero_grad()
        for e in self.entries:
            e.master.grad = None
        self._swapped_scale = 1.0
        self.engines[0].ctx.tracer.mark("zero_grad")

    # -------------------------------------------------------------- checkpoints
    def _fqn(self, e: _Entry) -> str:
        return e.unit.slots[e.slot].fqn

    def state_shards(self, prefix: str = "optim/") -> Iterator[RowShard]:
        """This rank's rows of every per-parameter optimizer tensor (``<prefix><fqn>/<name>``),
        scalars (Adam's ``step``) replicated. See accel_zero/shards.py."""
        rank = self.comm.rank
        for engine in self.engines:
            yield from self._swapped_shards(engine, prefix)
        for e in self.entries:
            if e.swapped:
                continue
            slot = e.unit.slots[e.slot]
            for name, value in self.optimizer.state.get(e.master, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                key = f"{prefix}{slot.fqn}/{name}"
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

    @staticmethod
    def _slot_names(engine: Engine) -> dict[tuple[int, int], str]:
        return {(u.index, i): s.fqn for u in engine.units for i, s in enumerate(u.slots)}

    def _swapped_shards(self, engine: Engine, prefix: str) -> Iterator[RowShard]:
        """The moments of an engine's swapped entries, streamed from the swap records, and
        their step counts (replicated, as torch's ``step`` tensors)."""
        swapped = engine.offload.optimizer if engine.offload is not None else None
        if swapped is None:
            return
        fqn = self._slot_names(engine)
        yield from swapped.iter_shards(
            [("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")],
            lambda key, name: f"{prefix}{fqn[key]}/{name}",
        )
        if self.comm.rank == 0:
            for key, step in swapped.steps.items():
                yield RowShard(
                    key=f"{prefix}{fqn[key]}/step",
                    global_shape=(),
                    row_start=0,
                    tensor=torch.tensor(float(step)),
                    replicated=True,
                )

    def _load_swapped(
        self, engine: Engine, reader: ShardReader, names: dict[str, list[str]], prefix: str
    ) -> None:
        """Moments and step counts of an engine's swapped entries, into its swap records."""
        swapped = engine.offload.optimizer if engine.offload is not None else None
        if swapped is None:
            return
        fqn = self._slot_names(engine)
        swapped.load_shards(
            reader,
            [("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")],
            lambda key, name: f"{prefix}{fqn[key]}/{name}",
        )
        swapped.steps = {}
        for key, name in fqn.items():
            if "step" in names.get(name, []):
                value = reader.read_rows(f"{prefix}{name}/step", 0, 1)
                swapped.steps[key] = int(float(value.reshape(-1)[0]))

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
            if not e.swapped
        }  # fmt: skip
        for e in self.entries:
            swapped = e.engine.offload.optimizer if e.engine.offload is not None else None
            if e.swapped and swapped is not None and swapped.steps.get(e.key, 0):
                state[self._fqn(e)] = ["exp_avg", "exp_avg_sq", "step"]
        return {
            "optimizer_class": type(self.optimizer).__name__,
            "param_groups": groups,
            "state": state,
            "loss_scale": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_shards(
        self, reader: ShardReader, meta: dict[str, Any], prefix: str = "optim/"
    ) -> None:
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
        for engine in self.engines:
            self._load_swapped(engine, reader, names, prefix)
        for e in self.entries:
            if e.swapped:
                continue
            slot = e.unit.slots[e.slot]
            state: dict[str, torch.Tensor] = {}
            for name in names.get(slot.fqn, []):
                key = f"{prefix}{slot.fqn}/{name}"
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
