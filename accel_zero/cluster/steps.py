"""The collectives one rank issues per optimizer step: the engine's units and hooks replayed
around a real :class:`~accel_zero.coordinator.Coordinator` (see accel_zero/cluster/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from accel_zero.cluster.layout import ModelLayout, ParamInfo
from accel_zero.config import ZeroConfig
from accel_zero.coordinator import Coordinator, Phase

__all__ = ["KINDS", "Collective", "CommStep", "Group", "build_units", "simulate_steps"]

_ITEMSIZE = {"no": 4, "fp32": 4, "bf16": 2, "fp16": 2}

Group = Literal["shard", "replica", "world"]
"""Which ranks a collective spans: the shard group (G ranks), the N/G ranks holding the same
shard in each group (hybrid), or all N ranks."""

KINDS = (
    "gather_forward",
    "gather_backward",
    "reduce_scatter",
    "all_reduce_replicas",
    "all_reduce_whole",
    "regather_after_step",
    "grad_norm",
    "overflow_check",
    "order_check",
)
"""Collective kinds, in report order."""


@dataclass(eq=False)
class _Unit:
    index: int
    name: str
    module: str | None
    """Unit module, "" for the root, None for the persistent unit."""
    params: list[ParamInfo]
    resharded: bool
    itemsize: int
    """Bytes per element gathered (resharded: the compute dtype) or re-gathered (fp32)."""
    numel: int
    """This rank's padded flat shard."""
    full_numel: int

    @property
    def trainable(self) -> int:
        return sum(1 for p in self.params if p.requires_grad)


def build_units(
    layout: ModelLayout, zero: ZeroConfig, *, group: int, compute_itemsize: int | None
) -> list[_Unit]:
    """The engine's units (``Engine._build``): per owner, split into persistent (ZeRO-3, small)
    and the rest; each group split by (compute dtype, dtype); the persistent unit last."""
    resharded = zero.stage == 3
    by_owner: dict[str, list[ParamInfo]] = {"": []}
    for m in layout.modules:
        by_owner[m] = []
    for p in layout.params:
        by_owner[p.owner].append(p)
    persistent: list[ParamInfo] = []
    groups: list[tuple[str, list[ParamInfo], bool]] = []
    for owner, params in by_owner.items():
        big = []
        for p in params:
            if resharded and p.numel < zero.param_persistence_threshold:
                persistent.append(p)
            else:
                big.append(p)
        if big:
            groups.append((owner, big, resharded))
    if persistent:
        groups.append(("<persistent>", persistent, False))
    units: list[_Unit] = []
    for owner, params, is_resharded in groups:
        by_dtype: dict[tuple[int, int], list[ParamInfo]] = {}
        for p in params:
            size = p.itemsize
            if is_resharded and compute_itemsize is not None and p.itemsize == 4:
                size = compute_itemsize  # fp32 parameters gathered in the compute dtype
            by_dtype.setdefault((size, p.itemsize), []).append(p)
        for (itemsize, _), members in by_dtype.items():
            index = len(units)
            units.append(
                _Unit(
                    index=index,
                    name=owner or f"<root>[{index}]",
                    module=None if owner == "<persistent>" else owner,
                    params=members,
                    resharded=is_resharded,
                    # Replicated units re-gather fp32 rows (their fp32 parameters or masters).
                    itemsize=itemsize if is_resharded else 4,
                    numel=sum(p.shard_numel(group) for p in members),
                    full_numel=sum(p.numel for p in members),
                )
            )
    return units


# ------------------------------------------------------------------------------- collectives
@dataclass(frozen=True, kw_only=True)
class Collective:
    """One collective one rank issues."""

    kind: str
    """One of ``KINDS``."""
    op: str
    """``Comm``'s name for it: all_gather, reduce_scatter, all_reduce or check."""
    window: str
    """When it is issued: forward, backward or step (``optimizer.step``, incl. clipping)."""
    group: Group
    ranks: int
    """How many ranks it spans."""
    input_bytes: int
    """The input tensor on this rank, as ``CommStats.bytes`` counts it."""
    hybrid: bool = False
    """Issued under hybrid sharding (comm.py then names collectives outside the shard group
    ``op[replicate]`` / ``op[world]``)."""

    @property
    def stats_key(self) -> str:
        """The name ``CommStats`` counts it under."""
        if not self.hybrid or self.group == "shard":
            return self.op
        return f"{self.op}[{'replicate' if self.group == 'replica' else self.group}]"


@dataclass(kw_only=True)
class CommStep:
    """The collectives of one optimizer step on one rank, and the coordinator's counters."""

    collectives: list[Collective] = field(default_factory=list)
    coordinator: dict[str, int] = field(default_factory=dict)
    """Increments of ``CoordinatorStats`` during the step (prefetch hits, ...)."""
    peak_gathered_bytes: int = 0
    """Most bytes of gathered (or in-flight) parameters at once, padded, in the gather dtype."""

    def calls(self, window: str | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.collectives:
            if window is None or c.window == window:
                out[c.stats_key] = out.get(c.stats_key, 0) + 1
        return out

    def input_bytes(self, window: str | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.collectives:
            if window is None or c.window == window:
                out[c.stats_key] = out.get(c.stats_key, 0) + c.input_bytes
        return out

    def engine_stats(self) -> dict[str, int]:
        """``Engine.stats()``'s byte counters for this step (``bytes_gathered`` counts the
        all-gathers' outputs: ranks x input)."""
        gathered = sum(c.input_bytes * c.ranks for c in self.collectives if c.op == "all_gather")
        reduced = sum(
            c.input_bytes for c in self.collectives if c.op in ("reduce_scatter", "all_reduce")
        )
        return {"bytes_gathered": gathered, "bytes_reduced": reduced}


class _Buckets:
    """``grads.ReduceBuckets``: coalesce completed units per kind up to ``bucket_size``."""

    def __init__(self, sim: _StepSim) -> None:
        self.sim = sim
        self.open: dict[bool, list[_Unit]] = {False: [], True: []}
        self.numel: dict[bool, int] = {False: 0, True: 0}
        self.reduced: set[int] = set()

    def add(self, unit: _Unit) -> None:
        whole = self.sim.whole_grads(unit)
        if unit.index in self.reduced or unit.trainable == 0 or unit in self.open[whole]:
            return
        self.open[whole].append(unit)
        self.numel[whole] += unit.full_numel if whole else unit.numel * self.sim.group
        if self.numel[whole] >= self.sim.zero.reduce_bucket_size:
            self.send(whole)

    def flush(self) -> None:
        self.send(False)
        self.send(True)

    def send(self, whole: bool) -> None:
        members, self.open[whole], self.numel[whole] = self.open[whole], [], 0
        if not members:
            return
        self.reduced.update(u.index for u in members)
        size = self.sim.reduce_itemsize
        if whole:
            total = sum(u.full_numel for u in members) * size
            self.sim.emit("all_reduce_whole", "all_reduce", "world", total)
        else:
            shard = sum(u.numel for u in members) * size
            self.sim.emit("reduce_scatter", "reduce_scatter", "shard", shard * self.sim.group)
            if self.sim.replicas > 1:
                self.sim.emit("all_reduce_replicas", "all_reduce", "replica", shard)


class _StepSim:
    """The hooks' state machine (accel_zero/hooks.py) around a real Coordinator.

    Mirrors, call for call, what ``HookDriver`` asks the coordinator and which units it
    gathers and releases, so prefetch and keep-gathered decisions are the coordinator's own.
    """

    def __init__(
        self,
        layout: ModelLayout,
        zero: ZeroConfig,
        *,
        world_size: int,
        group: int,
        compute_itemsize: int | None,
        reduce_itemsize: int,
        clip: bool,
        fp16: bool,
    ) -> None:
        self.zero = zero
        self.world = world_size
        self.group = group
        self.replicas = world_size // group
        self.reduce_itemsize = reduce_itemsize
        self.clip = clip
        self.fp16 = fp16
        self.units = build_units(layout, zero, group=group, compute_itemsize=compute_itemsize)
        self.module_units: dict[str, list[_Unit]] = {}
        for u in self.units:
            if u.module:
                self.module_units.setdefault(u.module, []).append(u)
        self.pass_units = [u for u in self.units if u.module == "" and u.resharded]
        self.uses = [m for m in layout.forward_order if m in self.module_units]
        self.coord = Coordinator(
            [u.full_numel for u in self.units],
            prefetch_bucket_size=zero.prefetch_bucket_size,
            max_live_parameters=zero.max_live_parameters,
            max_reuse_distance=zero.max_reuse_distance,
        )
        self.state = {u.index: "gathered" if not u.resharded else "sharded" for u in self.units}
        self.step = CommStep()
        self.window = "forward"

    # -------------------------------------------------------------------------- plumbing
    def whole_grads(self, unit: _Unit) -> bool:
        return self.zero.stage == 1 or (self.zero.stage == 3 and not unit.resharded)

    def emit(self, kind: str, op: str, group: Group, nbytes: int) -> None:
        if group == "replica" and self.replicas == 1:
            return
        span = {"shard": self.group, "replica": self.replicas, "world": self.world}[group]
        if span == 1:
            return  # Comm short-cuts a world of one to a local copy
        self.step.collectives.append(
            Collective(
                kind=kind,
                op=op,
                window=self.window,
                group=group,
                ranks=span,
                input_bytes=nbytes,
                hybrid=self.replicas > 1,
            )
        )

    def live_numel(self) -> int:
        return sum(
            u.full_numel for u in self.units if u.resharded and self.state[u.index] != "sharded"
        )

    def _note_peak(self) -> None:
        live = sum(
            self.group * u.numel * u.itemsize
            for u in self.units
            if u.resharded and self.state[u.index] != "sharded"
        )
        self.step.peak_gathered_bytes = max(self.step.peak_gathered_bytes, live)

    def _next_phase(self, index: int) -> Phase:
        cur = self.coord.current
        if cur is None or not cur.valid:
            return Phase.FORWARD if self.window == "step" else Phase(self.window)
        for phase, unit in self.coord.traces[cur.grad][len(cur.events) :]:
            if unit == index:
                return phase
        return Phase.FORWARD

    def start_gather(self, unit: _Unit, phase: Phase) -> None:
        if self.state[unit.index] != "sharded":
            return
        self.state[unit.index] = "gathering"
        kind = "gather_forward" if phase is Phase.FORWARD else "gather_backward"
        self.emit(kind, "all_gather", "shard", unit.numel * unit.itemsize)
        self._note_peak()

    def finish_gather(self, unit: _Unit, phase: Phase) -> None:
        if self.state[unit.index] == "gathered":
            return
        self.start_gather(unit, phase)
        self.state[unit.index] = "gathered"

    def release(self, unit: _Unit) -> None:
        if unit.resharded:
            self.state[unit.index] = "sharded"

    def ensure_gathered(self, units: list[_Unit], phase: Phase) -> None:
        """``HookDriver._ensure_gathered``."""
        for u in units:
            if self.state[u.index] != "gathered":
                self.coord.note_fetch(self.state[u.index] == "gathering")
                self.start_gather(u, phase)
        live = {u.index for u in self.units if u.resharded and self.state[u.index] == "gathered"}
        in_flight = {u.index for u in self.units if self.state[u.index] == "gathering"}
        for index in self.coord.prefetch_plan(live, in_flight, self.live_numel()):
            self.start_gather(self.units[index], self._next_phase(index))
        for u in units:
            self.finish_gather(u, phase)

    # ------------------------------------------------------------------------- one step
    def run_step(self) -> CommStep:
        before = dict(vars(self.coord.stats))
        self.window = "forward"
        self._forward()
        self.window = "backward"
        self._backward()
        self.window = "step"
        self._optimizer_step()
        self.step.coordinator = {k: v - before[k] for k, v in vars(self.coord.stats).items()}
        done, self.step = self.step, CommStep()
        return done

    def _forward(self) -> None:
        coord = self.coord
        coord.begin_pass(True)  # HookDriver._begin_pass
        for u in self.pass_units:
            if self.state[u.index] != "gathered":
                coord.note_fetch(self.state[u.index] == "gathering")
            self.finish_gather(u, Phase.FORWARD)
        for module in self.uses:
            units = self.module_units[module]
            for u in units:
                coord.record(Phase.FORWARD, u.index)
            self.ensure_gathered(units, Phase.FORWARD)
            for u in units:  # post-forward
                if not coord.keep_gathered(u.index, self.live_numel()):
                    self.release(u)

    def _backward(self) -> None:
        coord = self.coord
        buckets = _Buckets(self)
        # The root's output is the first to get its gradient: its pre-backward hook.
        self.ensure_gathered(list(self.pass_units), Phase.BACKWARD)
        first_use = {m: i for i, m in reversed(list(enumerate(self.uses)))}
        for i in reversed(range(len(self.uses))):
            module = self.uses[i]
            units = [u for u in self.module_units[module] if u.resharded]
            for u in units:
                coord.record(Phase.BACKWARD, u.index)
            self.ensure_gathered(units, Phase.BACKWARD)
            if first_use[module] != i:
                continue  # gradients complete after the backward of the first forward call
            for u in self.module_units[module]:  # HookDriver._unit_grads_complete
                if u.trainable == 0:
                    continue
                buckets.add(u)
                if u.resharded and not coord.keep_gathered(u.index, self.live_numel()):
                    self.release(u)
        # The root's gradients (the embedding's last of all) and the persistent unit's.
        for u in self.units:
            if u.module is None or u.module == "":
                buckets.add(u)
        for u in self.units:  # _end_of_backward: leftovers that ran, in unit order; flush
            if not u.module or u.module in first_use:
                buckets.add(u)
        buckets.flush()
        coord.end_pass()
        if self.zero.stage == 3:
            self.emit("order_check", "check", "world", 8)
        for u in self.units:
            self.release(u)

    def _optimizer_step(self) -> None:
        if self.fp16:
            self.emit("overflow_check", "all_reduce", "world", 4)
        if self.clip:
            sharded = sum(u.trainable for u in self.units if not self.whole_grads(u))
            if sharded:
                self.emit("grad_norm", "all_reduce", "shard", 4 * sharded)
        for u in self.units:  # Engine.after_optimizer_step: invalidate, re-gather, prefetch
            self.release(u)
        for u in self.units:
            if not u.resharded and u.trainable:
                self.emit("regather_after_step", "all_gather", "shard", u.numel * u.itemsize)
        if self.zero.stage != 3:
            return
        plan = self.coord.plan_pass_start(True, self.live_numel())
        if plan is None:
            return
        for u in self.pass_units:
            self.start_gather(u, Phase.FORWARD)
        for index in plan:
            self.start_gather(self.units[index], Phase.FORWARD)


def dtype_sizes(zero: ZeroConfig, mixed_precision: str) -> tuple[int | None, int]:
    """(gather itemsize of ZeRO-3's fp32 parameters, or None to keep theirs; reduce itemsize)."""
    mixed = zero.mixed_precision or mixed_precision
    if mixed not in _ITEMSIZE:
        raise ValueError(f"mixed_precision={mixed!r} (allowed: no, bf16, fp16)")
    compute = None if mixed == "no" or zero.param_dtype == "fp32" else _ITEMSIZE[mixed]
    return compute, _ITEMSIZE[zero.reduce_dtype or "fp32"]


def simulate_steps(
    layout: ModelLayout,
    zero: ZeroConfig,
    *,
    world_size: int,
    shard_group_size: int | None = None,
    mixed_precision: str = "no",
    clip: bool = True,
    steps: int = 2,
) -> list[CommStep]:
    """The collectives each of ``steps`` optimizer steps issues on one rank, from a freshly
    prepared engine: step 1 records the execution order (every unit gathered on demand),
    later steps follow the trace (all equal: step 2 is the steady state).
    ``shard_group_size`` None takes ``zero.shard_group_size`` where the config has it."""
    if shard_group_size is None:
        shard_group_size = getattr(zero, "shard_group_size", None)
    group = group_size(world_size, shard_group_size)
    compute, reduce_size = dtype_sizes(zero, mixed_precision)
    sim = _StepSim(
        layout,
        zero,
        world_size=world_size,
        group=group,
        compute_itemsize=compute,
        reduce_itemsize=reduce_size,
        clip=clip,
        fp16=(zero.mixed_precision or mixed_precision) == "fp16",
    )
    return [sim.run_step() for _ in range(steps)]


def group_size(world_size: int, shard_group_size: int | None) -> int:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    group = world_size if shard_group_size is None else shard_group_size
    if group < 1 or world_size % group:
        raise ValueError(
            f"shard_group_size={shard_group_size} must divide world_size={world_size} "
            "(null shards over all ranks)"
        )
    return group
