"""One buffer of the swap pool: aligned host memory, its IO handle and its worker.

The caller sees a :class:`SwapBuffer` between ``SwapSpace.acquire``/``get`` and
``write``/``release``/``drop`` and uses ``key``, ``layout`` and ``fields``; the
underscored attributes are :class:`~accel_zero.offload.swap.SwapSpace`'s
bookkeeping, changed only under its lock (see [Note: swap pipeline]).
"""

from __future__ import annotations

import enum
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from accel_zero import ops
from accel_zero.offload.swap_format import RecordLayout


class BufferState(enum.Enum):
    FREE = "free"
    READING = "reading"
    """A read (prefetch) is in flight or done and not yet taken by ``get``."""
    HELD = "held"
    """The caller has it (``fields`` valid)."""
    WRITING = "writing"


class SwapBuffer:
    """A pool buffer holding one record for the caller (from ``acquire`` or ``get``).

    ``fields`` maps field names to 1-D views of the buffer. They are valid until
    the buffer is passed to ``SwapSpace.write``, ``release`` or ``drop``; the
    memory is reused for other records afterwards.
    """

    def __init__(self, index: int, data: torch.Tensor, aio: ops.AsyncIO) -> None:
        self.index = index
        """Position in the pool (for messages)."""
        self.layout: RecordLayout | None = None
        """Layout of the record it holds (None while free)."""
        self._data = data  # uint8 image of the record: header block + field slots
        self._aio = aio  # used only by this buffer's worker thread
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"accel_zero_swap{index}")
        self._state = BufferState.FREE
        self._future: Future[None] | None = None  # the IO job in flight (or just done)
        self._keep_after_write = False  # a prefetch of the record being written
        self._generation: int | None = None  # what it holds: None after acquire

    @property
    def key(self) -> str:
        """The record this buffer holds."""
        if self.layout is None:
            raise RuntimeError(f"swap buffer {self.index} is free: it holds no record")
        return self.layout.key

    @property
    def nbytes(self) -> int:
        """Capacity in bytes (the largest registered record)."""
        return self._data.numel()

    @property
    def fields(self) -> dict[str, torch.Tensor]:
        """The record's fields as views of this buffer (only while the caller holds it)."""
        if self._state is not BufferState.HELD or self.layout is None:
            raise RuntimeError(
                f"swap buffer {self.index} is {self._state.value}, not held: its fields are only "
                "valid between acquire/get and write/release/drop"
            )
        return {
            f.name: self._data[f.offset : f.offset + f.nbytes].view(f.dtype)
            for f in self.layout.fields
        }

    def close(self) -> None:
        """Wait for the job in flight and stop the worker (IO errors were reported by it)."""
        self._worker.shutdown(wait=True)
        try:
            self._aio.close()
        except ops.AioError:
            pass
