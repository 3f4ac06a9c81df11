"""The coordinator: records the order units run in and plans prefetch and release (DESIGN D3).

Bookkeeping only: it never communicates. The hooks tell it what ran; it answers
which units to prefetch next and whether a unit that just finished may stay
gathered. A pass (forward, plus backward when there is one) is recorded as a
list of events ``(phase, unit index)``; the first pass of each kind (with or
without gradients) becomes the trace. Later passes are checked against it
event by event: while they agree, the next units in the trace are prefetched
within ``prefetch_bucket_size`` and ``max_live_parameters``, and a unit whose
next use is within ``max_reuse_distance`` elements stays gathered. When a
pass departs from the trace (a conditional module, eval vs train), the trace
is dropped for the rest of that pass (fetch on demand: never a wrong
parameter, never a hang) and the pass just seen becomes the new trace.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["Coordinator", "CoordinatorStats", "Phase"]


class Phase(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


Event = tuple[Phase, int]


@dataclass
class CoordinatorStats:
    prefetch_hits: int = 0
    """A unit was needed and a prefetch had already been issued for it."""
    prefetch_misses: int = 0
    """A unit was needed and had to be fetched on demand."""
    prefetches_issued: int = 0
    kept_gathered: int = 0
    """Releases skipped because the unit is reused soon (max_reuse_distance)."""
    trace_invalidations: int = 0
    traces_recorded: int = 0


@dataclass
class _Pass:
    grad: bool
    events: list[Event] = field(default_factory=list)
    valid: bool = True
    """Still agreeing with the trace (False: on-demand fetching for the rest of the pass)."""


class Coordinator:
    """Trace, prefetch and release plan for one engine's units."""

    def __init__(
        self,
        unit_numels: Sequence[int],
        *,
        prefetch_bucket_size: int,
        max_live_parameters: int,
        max_reuse_distance: int,
    ) -> None:
        self.unit_numels = list(unit_numels)
        self.prefetch_bucket_size = prefetch_bucket_size
        self.max_live_parameters = max_live_parameters
        self.max_reuse_distance = max_reuse_distance
        self.traces: dict[bool, list[Event]] = {}
        """Recorded pass per kind (key: gradients enabled)."""
        self.current: _Pass | None = None
        self.stats = CoordinatorStats()

    # ------------------------------------------------------------------ passes
    def begin_pass(self, grad: bool) -> None:
        self.current = _Pass(grad=grad, valid=grad in self.traces)

    def end_pass(self) -> list[Event]:
        """Close the pass; returns its events (the engine checks them across ranks)."""
        cur = self.current
        self.current = None
        if cur is None:
            return []
        trace = self.traces.get(cur.grad)
        if trace != cur.events:
            if trace is not None:
                logger.info(
                    "accel_zero: execution order changed (%d events, was %d); re-recording",
                    len(cur.events),
                    len(trace),
                )
            self.traces[cur.grad] = list(cur.events)
            self.stats.traces_recorded += 1
        return cur.events

    @property
    def in_pass(self) -> bool:
        return self.current is not None

    # ------------------------------------------------------------------ events
    def record(self, phase: Phase, unit: int) -> None:
        cur = self.current
        if cur is None:
            return
        pos = len(cur.events)
        cur.events.append((phase, unit))
        if not cur.valid:
            return
        trace = self.traces[cur.grad]
        if pos >= len(trace) or trace[pos] != (phase, unit):
            expected = trace[pos] if pos < len(trace) else "end of pass"
            logger.info(
                "accel_zero: trace invalidated at event %d: expected %s, got %s",
                pos,
                expected,
                (phase.value, unit),
            )
            cur.valid = False
            self.stats.trace_invalidations += 1

    def _upcoming(self) -> list[Event]:
        cur = self.current
        if cur is None or not cur.valid:
            return []
        return self.traces[cur.grad][len(cur.events) :]

    def prefetch_plan(self, live: set[int], in_flight: set[int], live_numel: int) -> list[int]:
        """Units to start gathering now: the next ones in the trace, within the budgets.

        ``live`` are gathered units, ``in_flight`` units whose gather is issued;
        ``live_numel`` the elements those hold.
        """
        return self._plan(self._upcoming(), live | in_flight, live_numel)

    def upcoming_units(self) -> list[int]:
        """The units the rest of the current pass needs, in order, once each (the trace's
        prediction; empty when there is none)."""
        return list(dict.fromkeys(unit for _, unit in self._upcoming()))

    def plan_pass_start(self, grad: bool, live_numel: int) -> list[int] | None:
        """The unit to gather before a pass of this kind starts, besides the root (None: no
        trace yet, or prefetch off): the first of the trace, within the budgets. Only one:
        what is gathered between passes stays gathered through the step, ``zero_grad`` and
        data loading, and the first unit's pre-forward prefetches the rest
        ([Note: prefetch across passes] in hooks.py)."""
        trace = self.traces.get(grad)
        if trace is None or self.prefetch_bucket_size <= 0:
            return None
        return self._plan(trace[:1], set(), live_numel)

    def _plan(self, events: Sequence[Event], busy: set[int], live_numel: int) -> list[int]:
        """The next units of ``events`` not ``busy``, within ``prefetch_bucket_size`` elements
        and ``max_live_parameters`` (counting the ``live_numel`` already gathered)."""
        if self.prefetch_bucket_size <= 0:
            return []
        plan: list[int] = []
        bucket = 0
        for _, unit in events:
            if unit in busy or unit in plan:
                continue
            numel = self.unit_numels[unit]
            if bucket and bucket + numel > self.prefetch_bucket_size:
                break
            if live_numel + numel > self.max_live_parameters:
                break
            plan.append(unit)
            bucket += numel
            live_numel += numel
        self.stats.prefetches_issued += len(plan)
        return plan

    def keep_gathered(self, unit: int, live_numel: int) -> bool:
        """May ``unit`` stay gathered after its current use (reused soon enough)?"""
        distance = 0
        seen: set[int] = set()
        for _, nxt in self._upcoming():
            if nxt == unit:
                keep = (
                    distance <= self.max_reuse_distance and live_numel <= self.max_live_parameters
                )
                if keep:
                    self.stats.kept_gathered += 1
                return keep
            if nxt not in seen:
                seen.add(nxt)
                distance += self.unit_numels[nxt]
        return False

    def note_fetch(self, was_prefetched: bool) -> None:
        if was_prefetched:
            self.stats.prefetch_hits += 1
        else:
            self.stats.prefetch_misses += 1
