"""NVMe swap space: records in swap files, moved through a pool of aligned buffers.

One :class:`SwapSpace` per run, rank and kind of state (optimizer, parameters)::

    nvme = validate_nvme_path(cfg.nvme_path, key="zero_config.offload_optimizer.nvme_path")
    space = SwapSpace(nvme, run_id=run_id, rank=rank, buffer_count=4)
    space.register("opt/0", [("master", n, torch.float32), ("exp_avg", n, torch.float32), ...])
    buf = space.acquire("opt/0")            # first write: nothing on disk yet
    buf.fields["master"].copy_(...)
    space.write(buf, generation=0)          # async; the buffer returns to the pool when done
    space.prefetch("opt/0", generation=0)   # async read
    buf = space.get("opt/0", generation=0)  # waits for that read only, verifies it
    ...; space.write(buf, generation=1)     # or space.release(buf): back unwritten
    space.drop("opt/1")                     # cancel a prefetch nobody will use
    space.flush(); space.close()            # close(keep=True) leaves the files

Files live in ``<nvme_path>/<run_id>/rank<r>/`` (folders 0700, files 0600), one
per record; their format and checksum are in :mod:`accel_zero.offload.swap_format`.

[Note: swap pipeline]
Each pool buffer owns one :class:`~accel_zero.ops.AsyncIO` handle and one worker
thread, and carries at most one IO at a time. ``AsyncIO.wait()`` waits for
everything queued on its handle, so one handle per buffer is what lets ``get``
wait for one record's read without waiting for unrelated writes. The worker
submits the IO, waits for it and computes or verifies the checksum, so the
checksum runs beside the caller's compute (numpy and blake2b release the GIL), and the
worker's timestamps give the disk's real busy time for the GB/s figures. Every
state change takes ``_cond``; the caller's waits on it are counted as stalls.
A ``prefetch`` of a record whose write is still in flight does no IO: it keeps
that buffer, which already holds the data, once the write lands. When no buffer
is free, ``acquire``/``prefetch`` wait for the first write to land (a stall); if
none is in flight either, they raise instead of waiting forever.

[Note: swap alignment]
DeepSpeed aligns swapped tensors to 1024 x threads bytes because its aio splits
each request into ``threads`` equal parts. ``ops.AsyncIO`` deals
``block_size`` pieces round-robin to its threads, so 4096-aligned offsets and
sizes (what O_DIRECT needs) keep every thread busy: fields start on 4096-byte
boundaries and a record moves as one IO of header + fields. Measured with
``scripts/bench_swap.py`` (1 GiB of 4 MiB records): aligning fields to
block_size x threads = 1 MiB made each record 7 MiB on disk instead of 4 MiB
for the same useful throughput (pipelined step 0.94 vs 0.92 GB/s of data), so
``align`` defaults to 4096 and stays a parameter.

Sizing, measured here (virtio disk, fio: write 2.9, read 1.3-2.5 GB/s, noisy):
records of 128 MiB reach raw AsyncIO speed, 32 MiB about 80%, 4 MiB about 60%
(per-record overhead, fewer pieces in flight). Records much larger than a few
percent of a rank's state shorten the pipeline (the first read and the last
write are not hidden). Hence ``sub_group_size`` 1e7 elements for optimizer
records (3 x fp32 = 120 MB, just under 128 MiB, which also suits CUDA's
power-of-two pinned allocator) and ``buffer_count`` 4: three for "read i+1,
step i, write i-1" plus one so a slow write does not stall the next read
(480 MB of host memory).
"""

from __future__ import annotations

import errno as errno_mod
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import torch

from accel_zero import ops
from accel_zero.offload.nvme_path import NvmePath, make_private_dir
from accel_zero.offload.swap_buffer import BufferState as _State
from accel_zero.offload.swap_buffer import SwapBuffer
from accel_zero.offload.swap_format import (
    HEADER_BYTES,
    RecordLayout,
    SwapError,
    SwapIOError,
    SwapRecordInvalidError,
    SwapStaleError,
    SwapTruncatedError,
    encode_header,
    field_checksums,
    verify_record,
)
from accel_zero.offload.swap_stats import IOAccounting, SwapStats

__all__ = ["SwapSpace"]

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(kw_only=True)
class _Record:
    layout: RecordLayout
    path: Path
    generation: int | None = None
    """Generation of the last write that completed; None: nothing valid on disk."""
    writing: int | None = None
    """Generation of the write in flight."""
    failure: str | None = None
    """Why the last write failed (the record stays invalid until written again)."""
    buffer: SwapBuffer | None = None


# --------------------------------------------------------------------------------------
# The swap space
# --------------------------------------------------------------------------------------
class SwapSpace:
    """Swap files of one run and rank, and the buffer pool that moves them.

    ``buffer_count`` buffers, each the size of the largest record registered
    before the first ``acquire``/``prefetch``/``get``, are allocated then (4096-
    aligned, page-locked when ``pin_memory`` and CUDA). ``block_size``,
    ``queue_depth`` and ``threads`` configure each buffer's AsyncIO handle.
    Field offsets are aligned to ``align`` bytes (default 4096: see
    [Note: swap alignment]). ``preallocate`` reserves each file's blocks at
    ``register`` (``posix_fallocate``), so a disk too small fails there, before
    the first step. A failed write is raised once, by the next ``acquire``,
    ``prefetch``, ``get``, ``write`` or ``flush`` (whatever its record), and its
    record reads as :class:`SwapRecordInvalidError` until written again. Not
    thread-safe: drive it from one thread.
    """

    def __init__(
        self,
        nvme: NvmePath,
        *,
        run_id: str,
        rank: int,
        buffer_count: int = 4,
        block_size: int = 1 << 20,
        queue_depth: int = 32,
        threads: int = 1,
        align: int | None = None,
        pin_memory: bool = True,
        preallocate: bool = True,
    ) -> None:
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(
                f"swap run_id {run_id!r} must be 1-64 characters of [A-Za-z0-9._-] "
                "(it names a folder); use new_run_id()"
            )
        if buffer_count < 1:
            raise ValueError(f"swap buffer_count must be >= 1, got {buffer_count}")
        self.run_id = run_id
        self.rank = rank
        self.buffer_count = buffer_count
        self.direct = nvme.direct
        self.align = align if align is not None else ops.IO_ALIGN
        self._aio_args = (block_size, queue_depth, threads)
        self._pin = pin_memory
        self._preallocate = preallocate
        self.run_folder = nvme.path / run_id
        self.folder = self.run_folder / f"rank{rank}"
        make_private_dir(self.run_folder)
        make_private_dir(self.folder)
        self._records: dict[str, _Record] = {}
        self._buffers: list[SwapBuffer] = []
        self._cond = threading.Condition()
        self._io = IOAccounting()
        self._unreported: list[SwapError] = []  # write failures not raised yet
        self._closed = False

    # -- records -----------------------------------------------------------------------
    def register(self, key: str, fields: Sequence[tuple[str, int, torch.dtype]]) -> RecordLayout:
        """Declare record ``key`` with ``fields`` = ``[(name, numel, dtype), ...]``.

        Creates its file (mode 0600; blocks reserved when ``preallocate``).
        Register every record before the first ``acquire``/``prefetch``/``get``
        (the pool is sized from the largest).
        """
        self._check_open()
        if key in self._records:
            raise ValueError(f"swap record {key!r} is already registered in {self.folder}")
        layout = RecordLayout.build(key, fields, align=self.align)
        if self._buffers and layout.nbytes > self._buffers[0].nbytes:
            raise ValueError(
                f"swap record {key!r} needs {layout.nbytes} bytes but the pool's buffers "
                f"({self._buffers[0].nbytes} bytes) were sized at first use; register "
                "every record before the first acquire/prefetch/get"
            )
        path = self.folder / (quote(key, safe="") + ".swp")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            if self._preallocate:
                os.posix_fallocate(fd, 0, layout.nbytes)
        except OSError as e:
            raise SwapIOError(
                f"cannot reserve {layout.nbytes} bytes for swap record {key!r} in {path}: "
                f"{e.strerror}; free space on that disk or point nvme_path elsewhere",
                path=path,
                errno=e.errno or errno_mod.EIO,
                nbytes=layout.nbytes,
            ) from e
        finally:
            os.close(fd)
        self._records[key] = _Record(layout=layout, path=path)
        return layout

    def layout(self, key: str) -> RecordLayout:
        return self._record(key).layout

    def path(self, key: str) -> Path:
        """The swap file of record ``key``."""
        return self._record(key).path

    @property
    def disk_bytes(self) -> int:
        """Bytes the registered records take on disk."""
        return sum(r.layout.nbytes for r in self._records.values())

    @property
    def buffer_bytes(self) -> int:
        """Bytes of host memory in the buffer pool (0 before the first use)."""
        return sum(b.nbytes for b in self._buffers)

    @property
    def free_buffers(self) -> int:
        """Buffers an ``acquire``/``prefetch`` can take without the caller giving one
        back: free now, or free once a write lands (all of them before the first use)."""
        with self._cond:
            if not self._buffers:
                return self.buffer_count
            return sum(
                b._state is _State.FREE or (b._state is _State.WRITING and not b._keep_after_write)
                for b in self._buffers
            )

    def in_memory(self, key: str) -> bool:
        """Whether record ``key`` has a buffer now (being read, held or being written), so
        that a ``get`` of it needs no free one."""
        record = self._record(key)
        with self._cond:
            return record.buffer is not None

    # -- the pipeline ------------------------------------------------------------------
    def acquire(self, key: str) -> SwapBuffer:
        """A buffer for record ``key`` whose contents the caller sets in full (contents
        undefined until then), for a write that needs nothing from disk."""
        record = self._enter(key)
        with self._cond:
            if record.buffer is not None and record.buffer._state is _State.WRITING:
                # A second write of the same file must not race the one in flight.
                self._wait_for(lambda: record.buffer is None or record.writing is None)
            self._check_unused(record, "acquire")
            buf = self._take_buffer(record)
            buf._state = _State.HELD
            buf._generation = None
            return buf

    def prefetch(self, key: str, *, generation: int) -> None:
        """Start reading generation ``generation`` of record ``key`` (no-op if it is
        already being read or held)."""
        record = self._enter(key)
        with self._cond:
            buf = record.buffer
            if buf is not None and buf._state is _State.WRITING:
                if record.writing != generation:
                    raise SwapStaleError(
                        f"swap record {key!r} ({record.path}): generation {generation} was "
                        f"asked for while generation {record.writing} is being written",
                        path=record.path,
                    )
                buf._keep_after_write = True  # no IO: the buffer already holds the data
            elif buf is not None:
                if buf._generation != generation:
                    raise RuntimeError(
                        f"swap prefetch/get of {key!r} at generation {generation}: the record is "
                        f"already {buf._state.value} as "
                        + (
                            "a fresh acquire"
                            if buf._generation is None
                            else f"generation {buf._generation}"
                        )
                        + "; write or release it first"
                    )
                return
            else:
                self._check_generation(record, record.generation, generation)
                buf = self._take_buffer(record)
                buf._state = _State.READING
                buf._future = buf._worker.submit(self._read_job, buf, record, generation)
            buf._generation = generation

    def get(self, key: str, *, generation: int) -> SwapBuffer:
        """Record ``key`` at ``generation``, read (or prefetched) and verified.

        Waits only for this record's IO. Raises a :class:`SwapError` when the
        record's last write failed or what was read is not intact.
        """
        self.prefetch(key, generation=generation)
        record = self._records[key]
        with self._cond:
            buf = record.buffer
            assert buf is not None
            if buf._state is _State.HELD:
                return buf
            future = buf._future
        assert future is not None
        t0 = time.perf_counter()
        try:
            future.result()
        except BaseException:
            with self._cond:
                # Only a finished read gives its memory back (not one a Ctrl-C interrupted).
                if buf._state is _State.READING and future.done():
                    self._free(buf)
                self._unreported = [e for e in self._unreported if e.path != str(record.path)]
            raise
        finally:
            self._io.add_stall(time.perf_counter() - t0)
        with self._cond:
            buf._state = _State.HELD
            buf._future = None
            return buf

    def write(self, buf: SwapBuffer, *, generation: int) -> None:
        """Write ``buf``'s record as ``generation``, asynchronously; the buffer returns
        to the pool when the write lands (``fields`` are invalid from now on)."""
        if buf._state is not _State.HELD or buf.layout is None:
            raise RuntimeError(
                f"swap write: buffer {buf.index} is {buf._state.value}, not held (from acquire "
                "or get)"
            )
        record = self._enter(buf.layout.key)
        with self._cond:
            buf._state = _State.WRITING
            record.writing = generation
            buf._generation = generation
            buf._future = buf._worker.submit(self._write_job, buf, record, generation)

    def release(self, buf: SwapBuffer) -> None:
        """Give ``buf`` back without writing (the record keeps its last write)."""
        with self._cond:
            if buf._state is not _State.HELD:
                raise RuntimeError(f"swap release: buffer {buf.index} is {buf._state.value}")
            self._free(buf)

    def drop(self, key: str) -> None:
        """Forget record ``key`` in memory without writing it: cancel a prefetch (its
        read is waited for, its result ignored) or release a held buffer; a record
        being written is left to land. No-op when the record is not in memory."""
        record = self._record(key)
        with self._cond:
            buf = record.buffer
            if buf is None:
                return
            if buf._state is _State.WRITING:
                buf._keep_after_write = False
                return
            if buf._state is _State.HELD:
                self._free(buf)
                return
            future = buf._future
        assert future is not None
        t0 = time.perf_counter()
        wait([future])  # its errors do not matter: nobody will use the data
        self._io.add_stall(time.perf_counter() - t0)
        with self._cond:
            if record.buffer is buf and buf._state is _State.READING:
                self._free(buf)

    def flush(self) -> None:
        """Wait for every write in flight; raise the first write failure not yet raised."""
        self._check_open()
        with self._cond:
            self._wait_for(lambda: not any(b._state is _State.WRITING for b in self._buffers))
        self._raise_failures()

    @property
    def stats(self) -> SwapStats:
        """Traffic, busy time, stalls and checksum time since the space was created."""
        return self._io.snapshot()

    def close(self, *, keep: bool = False) -> None:
        """Wait for all IO, stop the workers, and remove this space's files (and its
        folders once empty) unless ``keep``. With ``keep`` a failed write raises
        (the kept files must be valid). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for buf in self._buffers:
            buf.close()
        self._buffers.clear()
        if not keep:
            for record in self._records.values():
                record.path.unlink(missing_ok=True)
            for folder in (self.folder, self.run_folder):
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty: another space or rank still uses it
        elif self._unreported:
            self._raise_failures()

    def __enter__(self) -> SwapSpace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"swap space {self.folder} is closed")

    def _record(self, key: str) -> _Record:
        record = self._records.get(key)
        if record is None:
            raise ValueError(f"swap record {key!r} is not registered in {self.folder}")
        return record

    def _enter(self, key: str) -> _Record:
        """Common entry: open, known record, pool allocated, earlier write failures raised."""
        self._check_open()
        record = self._record(key)
        self._raise_failures()
        if not self._buffers:
            self._allocate()
        return record

    def _allocate(self) -> None:
        size = max(r.layout.nbytes for r in self._records.values())
        block_size, queue_depth, threads = self._aio_args
        for i in range(self.buffer_count):
            data = ops.aligned_empty(size, torch.uint8, pin=self._pin)
            aio = ops.AsyncIO(block_size, queue_depth, threads, direct=self.direct)
            self._buffers.append(SwapBuffer(i, data, aio))

    def _raise_failures(self) -> None:
        with self._cond:
            if not self._unreported:
                return
            first, *rest = self._unreported
            self._unreported = []
        if rest:
            first.add_note(f"{len(rest)} more swap write(s) failed too: {[e.path for e in rest]}")
        raise first

    def _check_unused(self, record: _Record, what: str) -> None:
        if record.buffer is not None:
            raise RuntimeError(
                f"swap {what} of {record.layout.key!r}: the record is already "
                f"{record.buffer._state.value} in buffer {record.buffer.index}; write or release "
                "it first"
            )

    def _check_generation(self, record: _Record, have: int | None, want: int) -> None:
        if record.failure is not None:
            raise SwapRecordInvalidError(
                f"swap record {record.layout.key!r} ({record.path}) has no valid copy: its "
                f"last write failed ({record.failure})",
                path=record.path,
            )
        if have is None:
            raise SwapRecordInvalidError(
                f"swap record {record.layout.key!r} ({record.path}) was never written; "
                "acquire and write it before reading it",
                path=record.path,
            )
        if have != want:
            raise SwapStaleError(
                f"swap record {record.layout.key!r} ({record.path}): generation {want} was "
                f"asked for, the last one written is {have}",
                path=record.path,
            )

    def _wait_for(self, predicate: Callable[[], object]) -> None:
        """``_cond.wait_for`` (lock held), counting the time as a stall."""
        if predicate():
            return
        t0 = time.perf_counter()
        self._cond.wait_for(predicate)
        self._io.add_stall(time.perf_counter() - t0)

    def _take_buffer(self, record: _Record) -> SwapBuffer:
        """A free buffer (lock held), waiting for the first write to land if none is."""

        def free() -> SwapBuffer | None:
            return next((b for b in self._buffers if b._state is _State.FREE), None)

        if free() is None and not any(
            b._state is _State.WRITING and not b._keep_after_write for b in self._buffers
        ):
            busy = {b.key: b._state.value for b in self._buffers}
            raise RuntimeError(
                f"swap pool exhausted for {record.layout.key!r}: all {len(self._buffers)} "
                f"buffers are held or being read ({busy}); get/write/release one first, or "
                "raise buffer_count"
            )
        self._wait_for(lambda: free() is not None)
        buf = free()
        assert buf is not None
        buf.layout = record.layout
        buf._keep_after_write = False
        record.buffer = buf
        return buf

    def _free(self, buf: SwapBuffer) -> None:
        if buf.layout is not None:
            record = self._records[buf.layout.key]
            if record.buffer is buf:
                record.buffer = None
        buf._state = _State.FREE
        buf.layout = None
        buf._future = None
        self._cond.notify_all()

    # -- worker jobs (one worker thread per buffer) ------------------------------------
    def _write_job(self, buf: SwapBuffer, record: _Record, generation: int) -> None:
        layout = record.layout
        image = buf._data[: layout.nbytes]
        t0 = t1 = time.perf_counter()
        started = False
        error: SwapError | None = None
        try:
            sums = field_checksums(image, layout)
            head = encode_header(layout, run_id=self.run_id, generation=generation, checksums=sums)
            image[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
            t1 = time.perf_counter()
            self._io.started(write=True)
            started = True
            buf._aio.write(image, record.path)
            buf._aio.wait()
        except ops.AioError as e:
            error = SwapIOError(
                f"swap write of record {layout.key!r} ({layout.nbytes} bytes, generation "
                f"{generation}) to {record.path} failed: {e.strerror}",
                path=record.path,
                errno=e.errno or errno_mod.EIO,
                nbytes=layout.nbytes,
            )
            error.__cause__ = e
        except Exception as e:  # whatever it was, the record and the buffer must not stick
            error = SwapError(
                f"swap write of {layout.key!r} to {record.path}: {e!r}", path=record.path
            )
            error.__cause__ = e
        with self._cond:
            self._io.add_checksum(t1 - t0)
            if started:
                self._io.done(write=True, nbytes=0 if error else layout.nbytes)
            record.writing = None
            if error is None:
                record.generation, record.failure = generation, None
            else:
                record.generation, record.failure = None, str(error)
                self._unreported.append(error)
            if buf._keep_after_write and error is None:
                buf._state = _State.HELD
                buf._keep_after_write = False
                self._cond.notify_all()
            else:
                self._free(buf)  # after a failure, a waiting get() raises it from the future
        if error is not None:
            raise error

    def _read_job(self, buf: SwapBuffer, record: _Record, generation: int) -> None:
        layout = record.layout
        image = buf._data[: layout.nbytes]
        self._io.started(write=False)
        done = False
        try:
            buf._aio.read(image, record.path)
            buf._aio.wait()
            done = True
        except ops.ShortReadError as e:
            size = record.path.stat().st_size if record.path.exists() else 0
            raise SwapTruncatedError(
                f"swap file {record.path} (record {layout.key!r}) is truncated: {size} bytes, "
                f"the record needs {layout.nbytes}",
                path=record.path,
            ) from e
        except ops.AioError as e:
            raise SwapIOError(
                f"swap read of record {layout.key!r} ({layout.nbytes} bytes) from "
                f"{record.path} failed: {e.strerror}",
                path=record.path,
                errno=e.errno or errno_mod.EIO,
                nbytes=layout.nbytes,
            ) from e
        finally:
            self._io.done(write=False, nbytes=layout.nbytes if done else 0)
        t0 = time.perf_counter()
        try:
            verify_record(
                image, layout, run_id=self.run_id, generation=generation, path=record.path
            )
        finally:
            self._io.add_checksum(time.perf_counter() - t0)
