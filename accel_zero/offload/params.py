"""Parameter shards on NVMe (``offload_param: nvme``, ZeRO-3; DESIGN D6).

With the optimizer state on NVMe, what a rank still keeps in memory is each resharded
unit's compute-dtype working shard, the source of its all-gathers. Here those go to disk
too: one record per unit (``param/<unit>``), read when the unit is about to be gathered
and released as soon as the all-gather has consumed it, so at most ``buffer_count``
shards are in memory. The coordinator's recorded order says which units come next: the
hooks call :meth:`SwappedParams.prefetch` for the units beyond the gathers they issue
(seed 003's NVMe prefetch), within the free buffers. The optimizer step rewrites a
unit's record after updating its pieces (:meth:`update`), one generation further.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accel_zero.offload.swap import SwapSpace
from accel_zero.offload.swap_buffer import SwapBuffer
from accel_zero.partition import Unit
from accel_zero.tracer import MemoryTracer

__all__ = ["SwappedParams"]


class SwappedParams:
    """Working shards of resharded units in swap records (the gather sources)."""

    def __init__(self, space: SwapSpace, units: Sequence[Unit], tracer: MemoryTracer) -> None:
        self.space = space
        self.units = {u.index: u for u in units}
        self.generation: dict[int, int] = {}
        """Per unit: the generation of its record on disk."""
        self._held: dict[int, SwapBuffer] = {}
        """Records read for a gather (or an update) and not released yet."""
        for u in units:
            space.register(self.key(u.index), [("shard", u.numel, u.dtype)])
            tracer.add("params", "nvme", u.numel * u.dtype.itemsize)

    @staticmethod
    def key(unit: int) -> str:
        return f"param/{unit}"

    def write_initial(self, unit: int, shard: torch.Tensor) -> None:
        """The unit's first working shard (cast from its masters at set-up)."""
        buf = self.space.acquire(self.key(unit))
        buf.fields["shard"].copy_(shard)
        self.space.write(buf, generation=0)
        self.generation[unit] = 0

    # ---------------------------------------------------------------- gathers
    def prefetch(self, units: Sequence[int]) -> None:
        """Start reading these units' records, as far as free buffers allow, always leaving
        one free: a read-ahead is a hint, and the gather that needs a unit now (the trace
        was wrong, or a recomputed forward gathers again) must find a buffer."""
        for unit in units:
            if unit in self._held or unit not in self.units:
                continue
            if self.space.free_buffers <= 1:
                return
            self.space.prefetch(self.key(unit), generation=self.generation[unit])

    def fetch(self, unit: int) -> torch.Tensor:
        """The unit's working shard (reads it now unless prefetched); ``done`` releases it."""
        buf = self._held.get(unit)
        if buf is None:
            key = self.key(unit)
            if self.space.free_buffers == 0 and not self.space.in_memory(key):
                # Every buffer holds a read-ahead nobody asked for yet: forget them.
                self.drop_prefetches()
            buf = self.space.get(key, generation=self.generation[unit])
            self._held[unit] = buf
        return buf.fields["shard"]

    def done(self, unit: int) -> None:
        buf = self._held.pop(unit, None)
        if buf is not None:
            self.space.release(buf)

    # ---------------------------------------------------------------- updates
    def update(self, unit: int) -> torch.Tensor:
        """The unit's working shard to update in place; ``commit`` writes it back."""
        return self.fetch(unit)

    def commit(self, unit: int) -> None:
        """Write back a shard taken with ``update`` (a unit that was not updated: nothing)."""
        buf = self._held.pop(unit, None)
        if buf is None:
            return
        self.generation[unit] += 1
        self.space.write(buf, generation=self.generation[unit])

    def drop_prefetches(self) -> None:
        """Forget reads started for gathers (their data is about to change)."""
        for unit in self.units:
            if unit not in self._held:
                self.space.drop(self.key(unit))

    def close(self, *, keep: bool = False) -> None:
        for unit in list(self._held):
            self.done(unit)
        self.space.close(keep=keep)
