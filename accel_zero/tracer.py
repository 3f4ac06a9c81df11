"""Model-data memory tracer (DESIGN D10, after seed 000's ModelDataTracer).

Counts the bytes of model data this rank holds (parameters, gradients,
optimizer state), per device, updated at every shard, gather, release and move
by the code that does it, with the peak of each. It counts what the engine
allocates on purpose, not what the allocator happens to hold: activations and
temporaries are out of scope (peak RSS / ``torch.cuda.max_memory_allocated``
measure those).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch

__all__ = ["KINDS", "MemoryTracer"]

Kind = Literal["params", "gathered_params", "grads", "optimizer_state"]
KINDS: tuple[Kind, ...] = ("params", "gathered_params", "grads", "optimizer_state")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _device_key(device: torch.device | str) -> str:
    return torch.device(device).type


class MemoryTracer:
    """Current and peak bytes per (kind, device) and per device in total."""

    def __init__(self) -> None:
        self._now: dict[tuple[str, str], int] = defaultdict(int)
        self._peak: dict[tuple[str, str], int] = defaultdict(int)
        self._device_now: dict[str, int] = defaultdict(int)
        self._device_peak: dict[str, int] = defaultdict(int)

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

    def mark(self, event: str, detail: str = "") -> None:
        """A phase boundary (prepare, forward, backward, ...): the engine marks them so a
        memory timeline can sample there; nothing is recorded yet."""
        del event, detail

    def reset_peaks(self) -> None:
        self._peak = defaultdict(int, self._now)
        self._device_peak = defaultdict(int, self._device_now)

    def report(self) -> dict[str, object]:
        """Bytes now and at peak, per device and kind; ``total_bytes`` is all devices now.

        ``model_state_bytes`` is what a rank keeps between steps (parameter
        shards, gradient shards, optimizer state): the figure ZeRO divides by N.
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
        return {
            "per_device": per_device,
            "total_bytes": total,
            "peak_total_bytes": max(self._device_peak.values(), default=0),
            "model_state_bytes": model_state,
        }
