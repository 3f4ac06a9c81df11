"""Model-data memory tracer (DESIGN D10, D12, after seed 000's ModelDataTracer).

Counts the bytes of model data this rank holds (parameters, gradients,
optimizer state), per device, updated at every shard, gather, release and move
by the code that does it, with the peak of each. It counts what the engine
allocates on purpose, not what the allocator happens to hold: activations and
temporaries are out of scope. So that a report claiming half can be checked,
:meth:`MemoryTracer.report` also gives the process's resident memory (what the
OOM killer weighs) and the part of it the tracer does not account for.

[Note: memory timeline]
``mark(event, detail)`` appends a sample (time, event, the tracer's bytes per
kind and device, the process's RSS) while recording is on, and returns at once
while it is off, so the engine can mark every phase boundary (load, prepare,
forward/backward/step, each unit's gather and release) unconditionally.
Recording starts with :meth:`MemoryTracer.record_timeline` or
``ACCEL_ZERO_MEMORY_TIMELINE=1``; :meth:`MemoryTracer.save_timeline` writes the
JSON that ``accel-zero memory-plot`` draws.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from accel_zero.host_memory import current_rss_bytes, malloc_stats, process_memory

logger = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "TIMELINE_ENV",
    "MemoryTracer",
    "TimelineSample",
    "load_timeline",
]

Kind = Literal["params", "gathered_params", "grads", "optimizer_state"]
KINDS: tuple[Kind, ...] = ("params", "gathered_params", "grads", "optimizer_state")

TIMELINE_ENV = "ACCEL_ZERO_MEMORY_TIMELINE"
"""``1``/``true``/``on``: every new tracer records a timeline from its start."""

TIMELINE_FORMAT = "accel_zero.memory_timeline"
_TIMELINE_VERSION = 1

HOST_DEVICE = "cpu"
"""The device whose bytes are resident in this process (pinned memory included)."""

_NON_TORCH_DEVICES = frozenset({"nvme"})
"""Devices the tracer counts that torch has no device type for (offloaded state on disk)."""


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _device_key(device: torch.device | str) -> str:
    if isinstance(device, str):
        name = device.split(":", 1)[0]
        if name in _NON_TORCH_DEVICES:
            return name
    return torch.device(device).type


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "on", "yes"}


@dataclass(frozen=True, kw_only=True)
class TimelineSample:
    """One point of the memory timeline. See [Note: memory timeline]."""

    t: float
    """Seconds since the tracer was created."""
    event: str
    """What just happened (``prepare``, ``forward``, ``gather``, ...)."""
    detail: str
    """Which one (a unit name, a step number); may be empty."""
    rss_bytes: int
    """The process's resident memory at this point (0 where ``/proc`` is missing)."""
    bytes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """The tracer's bytes now: ``{device: {kind: bytes}}``, zero entries left out."""

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "event": self.event,
            "detail": self.detail,
            "rss": self.rss_bytes,
            "bytes": {dev: dict(kinds) for dev, kinds in self.bytes.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TimelineSample:
        return cls(
            t=float(data["t"]),
            event=str(data["event"]),
            detail=str(data.get("detail", "")),
            rss_bytes=int(data.get("rss", 0)),
            bytes={
                str(dev): {str(k): int(v) for k, v in kinds.items()}
                for dev, kinds in dict(data.get("bytes", {})).items()
            },
        )


def load_timeline(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[TimelineSample]]:
    """Read a timeline written by :meth:`MemoryTracer.save_timeline`: (meta, samples)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable memory timeline JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != TIMELINE_FORMAT:
        raise ValueError(
            f'{path}: not an accel_zero memory timeline (no "format": "{TIMELINE_FORMAT}"); '
            "write one with accelerator.save_memory_timeline(path) or "
            "MemoryTracer.save_timeline(path)"
        )
    meta = dict(data.get("meta", {}))
    return meta, [TimelineSample.from_json(s) for s in data.get("samples", [])]


class MemoryTracer:
    """Current and peak bytes per (kind, device) and per device in total, and a timeline.

    ``max_samples`` bounds the timeline (a long run marking every unit); samples
    past it are dropped with one warning.
    """

    def __init__(self, *, max_samples: int = 200_000) -> None:
        self._now: dict[tuple[str, str], int] = defaultdict(int)
        self._peak: dict[tuple[str, str], int] = defaultdict(int)
        self._device_now: dict[str, int] = defaultdict(int)
        self._device_peak: dict[str, int] = defaultdict(int)
        self._t0 = time.monotonic()
        self._recording = _env_on(TIMELINE_ENV)
        self._samples: list[TimelineSample] = []
        self._max_samples = max_samples
        self._dropped = 0

    def add(self, kind: Kind, device: torch.device | str, n: int) -> None:
        key = (kind, _device_key(device))
        self._now[key] += n
        self._peak[key] = max(self._peak[key], self._now[key])
        dev = key[1]
        self._device_now[dev] += n
        self._device_peak[dev] = max(self._device_peak[dev], self._device_now[dev])

    def sub(self, kind: Kind, device: torch.device | str, n: int) -> None:
        key = (kind, _device_key(device))
        self._now[key] -= n
        assert self._now[key] >= 0, f"memory tracer went negative for {key}"
        self._device_now[key[1]] -= n

    def add_tensor(self, kind: Kind, t: torch.Tensor) -> None:
        self.add(kind, t.device, nbytes(t))

    def sub_tensor(self, kind: Kind, t: torch.Tensor) -> None:
        self.sub(kind, t.device, nbytes(t))

    def reset_peaks(self) -> None:
        self._peak = defaultdict(int, self._now)
        self._device_peak = defaultdict(int, self._device_now)

    # ---------------------------------------------------------------- timeline
    @property
    def recording(self) -> bool:
        """Whether :meth:`mark` records samples."""
        return self._recording

    def record_timeline(self, on: bool = True) -> None:
        """Start (or stop) recording the timeline; samples already taken are kept."""
        self._recording = on

    def mark(self, event: str, detail: str = "") -> None:
        """Record a timeline sample if recording is on. See [Note: memory timeline]."""
        if not self._recording:
            return
        if len(self._samples) >= self._max_samples:
            if not self._dropped:
                logger.warning(
                    "accel_zero: memory timeline is full (%d samples); later marks are dropped",
                    self._max_samples,
                )
            self._dropped += 1
            return
        per_device: dict[str, dict[str, int]] = {}
        for (kind, dev), n in self._now.items():
            if n:
                per_device.setdefault(dev, {})[kind] = n
        self._samples.append(
            TimelineSample(
                t=time.monotonic() - self._t0,
                event=event,
                detail=detail,
                rss_bytes=current_rss_bytes(),
                bytes=per_device,
            )
        )

    def timeline(self) -> list[TimelineSample]:
        """The samples recorded so far, oldest first."""
        return list(self._samples)

    def clear_timeline(self) -> None:
        self._samples.clear()
        self._dropped = 0

    def save_timeline(
        self, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the timeline as JSON (``meta``: e.g. rank, world size, config); returns the path.

        Draw it with ``accel-zero memory-plot PATH -o out.png``.
        """
        path = Path(path)
        if not self._samples:
            logger.warning(
                "accel_zero: saving an empty memory timeline to %s; turn recording on with "
                "%s=1 or record_timeline() before the run",
                path,
                TIMELINE_ENV,
            )
        payload = {
            "format": TIMELINE_FORMAT,
            "version": _TIMELINE_VERSION,
            "meta": {"pid": os.getpid(), "dropped_samples": self._dropped, **(meta or {})},
            "kinds": list(KINDS),
            "samples": [s.to_json() for s in self._samples],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, separators=(",", ":")))
        tmp.replace(path)
        return path

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, object]:
        """Bytes now and at peak, per device and kind; ``total_bytes`` is all devices now.

        ``model_state_bytes`` is what a rank keeps between steps (parameter
        shards, gradient shards, optimizer state): the figure ZeRO divides by N.

        What the process really holds, read from ``/proc/self/status`` in the
        same call (None where there is no ``/proc``): ``rss_bytes`` (VmRSS),
        ``peak_rss_bytes`` (VmHWM), ``tracked_host_bytes`` (the tracer's bytes
        on the CPU now) and ``untracked_rss_bytes`` = ``rss_bytes -
        tracked_host_bytes``: activations, temporaries, communication buffers,
        memory the C allocator keeps after a free, libraries, the interpreter.
        ``allocator_free_bytes``: of that, what glibc's malloc holds freed but
        has not given back (None under another allocator): resident unless
        trimmed, reusable by later allocations of fitting sizes.
        """
        devices = sorted({d for _, d in self._now} | {d for _, d in self._peak})
        per_device: dict[str, dict[str, int]] = {}
        for dev in devices:
            entry: dict[str, int] = {}
            for kind in KINDS:
                entry[kind] = self._now.get((kind, dev), 0)
                entry[f"peak_{kind}"] = self._peak.get((kind, dev), 0)
            entry["total"] = self._device_now.get(dev, 0)
            entry["peak_total"] = self._device_peak.get(dev, 0)
            per_device[dev] = entry
        total = sum(self._device_now.values())
        model_state = sum(
            v
            for (kind, _), v in self._now.items()
            if kind in ("params", "grads", "optimizer_state")
        )
        host = self._device_now.get(HOST_DEVICE, 0)
        proc = process_memory()
        heap = malloc_stats()
        return {
            "per_device": per_device,
            "total_bytes": total,
            "peak_total_bytes": max(self._device_peak.values(), default=0),
            "model_state_bytes": model_state,
            "rss_bytes": proc.rss_bytes if proc else None,
            "peak_rss_bytes": proc.peak_rss_bytes if proc else None,
            "tracked_host_bytes": host,
            "untracked_rss_bytes": proc.rss_bytes - host if proc else None,
            "allocator_free_bytes": heap.free_bytes if heap else None,
        }
