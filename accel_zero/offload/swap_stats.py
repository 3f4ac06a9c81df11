"""Swap IO accounting: bytes, disk busy time, caller stalls and checksum time.

Busy time is the wall time during which at least one IO of a direction was in
flight (the union of the IO intervals, not their sum), so ``bytes / seconds``
is the throughput the disk delivered, comparable with fio, however many IOs
overlapped. Stalls are the caller's waits on the disk.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class SwapStats:
    """Swap traffic since the space was created (``SwapSpace.stats``)."""

    bytes_read: int
    """Bytes of completed reads (whole records: header block and padding included)."""
    bytes_written: int
    """Bytes of completed writes (whole records); failed IOs count nowhere."""
    reads: int
    writes: int
    read_seconds: float
    """Wall time with at least one read in flight (the disk's busy time, not a sum)."""
    write_seconds: float
    """Wall time with at least one write in flight."""
    stall_seconds: float
    """Time the caller was blocked on the disk in acquire, prefetch, get, drop and flush."""
    checksum_seconds: float
    """Worker time spent computing and verifying checksums (beside the caller)."""

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0

    @property
    def write_gbps(self) -> float:
        return self.bytes_written / self.write_seconds / 1e9 if self.write_seconds else 0.0


class IOAccounting:
    """The counters behind :class:`SwapStats`; safe to update from the swap workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = {False: 0, True: 0}  # keyed by "is a write"
        self._count = {False: 0, True: 0}
        self._busy = {False: 0.0, True: 0.0}
        self._inflight = {False: 0, True: 0}
        self._since = {False: 0.0, True: 0.0}
        self._stall = 0.0
        self._checksum = 0.0

    def started(self, *, write: bool) -> None:
        with self._lock:
            if self._inflight[write] == 0:
                self._since[write] = time.perf_counter()
            self._inflight[write] += 1

    def done(self, *, write: bool, nbytes: int) -> None:
        """An IO ended; ``nbytes`` is 0 when it failed."""
        with self._lock:
            self._inflight[write] -= 1
            if self._inflight[write] == 0:
                self._busy[write] += time.perf_counter() - self._since[write]
            if nbytes:
                self._bytes[write] += nbytes
                self._count[write] += 1

    def add_stall(self, seconds: float) -> None:
        with self._lock:
            self._stall += seconds

    def add_checksum(self, seconds: float) -> None:
        with self._lock:
            self._checksum += seconds

    def snapshot(self) -> SwapStats:
        with self._lock:
            now = time.perf_counter()
            busy = {
                w: self._busy[w] + (now - self._since[w] if self._inflight[w] else 0.0)
                for w in (False, True)
            }
            return SwapStats(
                bytes_read=self._bytes[False],
                bytes_written=self._bytes[True],
                reads=self._count[False],
                writes=self._count[True],
                read_seconds=busy[False],
                write_seconds=busy[True],
                stall_seconds=self._stall,
                checksum_seconds=self._checksum,
            )
