"""Safetensors files written tensor by tensor, and read by byte range (no mmap, no pickle).

[Note: streamed safetensors]
A safetensors file is ``u64 header length | JSON header | data``, and the header (every
tensor's dtype, shape and byte range) comes first. ``safetensors.torch.save_file`` therefore
needs every tensor in memory at once. ``SafetensorsStream`` instead reserves
``header_reserve`` bytes for the header, writes each tensor's bytes as it arrives (the caller
may reuse the tensor's memory right after ``add``), and at ``close`` writes the header into the
reserved space, padded with spaces: the format allows trailing whitespace in the header
(safetensors itself pads to 8-byte alignment that way), so ``safe_open``/``load_file`` read
these files like any other. A file whose header would outgrow the reserve is full
(``fits``); the caller rotates to a new file.

With a ``DirectWriter`` the data goes around the page cache (O_DIRECT through
``accel_zero.ops.AsyncIO``): tensor bytes are copied (one memcpy) into a ring of aligned
buffers, each written asynchronously while the next fills; the reserve is sized so the data
starts on a 4096-byte boundary, the last partial block is padded and the file truncated to
its real size at ``close``. The reserved header space stays a hole until ``close``.

Reading (``read_header`` + ``pread_into``) parses the header once and reads exactly the
bytes of the rows asked for straight into the destination tensor: no mapped file pages that
would count in the reader's resident memory. Reads of 1 MiB and more go through
``DirectReader`` (aligned O_DIRECT windows, copied out), the rest through ``preadv``.

Why O_DIRECT: on the (virtual, shared) disk this was built on, fio wrote 1.3-1.6 GB/s with
O_DIRECT and 0.4-1.5 GB/s buffered + fsync, and read 1-1.8 GB/s O_DIRECT against 0.26 GB/s
buffered; a multi-GB checkpoint written through the page cache also evicts everything
else. Where the file system refuses O_DIRECT (tmpfs) both sides fall back to buffered IO.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DirectReader",
    "DirectWriter",
    "SafetensorsStream",
    "dtype_name",
    "parse_dtype",
    "pread_into",
    "read_header",
    "supports_direct_io",
]

_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
_BY_NAME: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in _CODES}
_BY_CODE: dict[str, torch.dtype] = {code: d for d, code in _CODES.items()}
_LEN = struct.Struct("<Q")
# Linux moves at most 0x7ffff000 bytes per read/write call.
_MAX_IO = 1 << 30
_ALIGN = 4096  # O_DIRECT alignment of buffers, offsets and lengths


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``; a dtype safetensors cannot store is a TypeError."""
    if dtype not in _CODES:
        raise TypeError(f"dtype {dtype} cannot be stored in a safetensors file")
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """Inverse of ``dtype_name`` (only the dtypes listed here: the name is untrusted input)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {name!r}") from None


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.reshape(-1).view(torch.uint8)
    array: Any = flat.numpy()
    return memoryview(array).cast("B")


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data[:_MAX_IO])
        data = data[written:]


def supports_direct_io(folder: Path) -> bool:
    """Can files in ``folder`` be opened with O_DIRECT (not on tmpfs, for one)?"""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = folder / f".direct-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | flag, 0o644)
    except OSError:
        return False
    os.close(fd)
    probe.unlink(missing_ok=True)
    return True


class DirectWriter:
    """Appends bytes to one file at a time with O_DIRECT through a ring of aligned buffers,
    each with its own ``AsyncIO`` handle: while one buffer's write is in flight the next one
    fills (see [Note: streamed safetensors]). One per rank, reused by the files it writes."""

    def __init__(self, *, buffer_bytes: int = 8 << 20, buffers: int = 2) -> None:
        from accel_zero import ops

        size = max(_ALIGN, buffer_bytes - buffer_bytes % _ALIGN)
        block = min(size, 1 << 20)
        self._aio = [ops.AsyncIO(block_size=block, queue_depth=16) for _ in range(buffers)]
        self._buffers = [ops.aligned_empty(size, torch.uint8, pin=True) for _ in range(buffers)]
        self._views = [tensor_bytes(buffer) for buffer in self._buffers]
        self._size = size
        self._path = ""
        self._offset = 0
        self._fill = 0
        self._current = 0

    def begin(self, path: Path, offset: int) -> None:
        """Start appending to ``path`` at ``offset`` (a multiple of 4096)."""
        assert offset % _ALIGN == 0, offset
        self._path, self._offset, self._fill = str(path), offset, 0

    def append(self, data: Tensor) -> None:
        """Copy ``data`` (contiguous bytes, on any device) behind what came before."""
        # CPU bytes go through memoryview slices: one memcpy on this thread. torch's
        # copy_ splits it over intra-op threads, several times slower on a busy machine.
        source = tensor_bytes(data) if data.device.type == "cpu" else None
        pos, total = 0, data.numel()
        while pos < total:
            if self._fill == 0:
                self._aio[self._current].wait()  # this buffer's previous write is done
            take = min(total - pos, self._size - self._fill)
            if source is not None:
                view = self._views[self._current]
                view[self._fill : self._fill + take] = source[pos : pos + take]
            else:
                buffer = self._buffers[self._current]
                buffer[self._fill : self._fill + take].copy_(data[pos : pos + take])
            self._fill += take
            pos += take
            if self._fill == self._size:
                self._submit()

    def _submit(self) -> None:
        buffer = self._buffers[self._current][: self._fill]
        self._aio[self._current].write(buffer, self._path, self._offset)
        self._offset += self._fill
        self._fill = 0
        self._current = (self._current + 1) % len(self._buffers)

    def finish(self) -> None:
        """Write what is buffered (padded to 4096 bytes) and wait for every write."""
        if self._fill:
            self._submit()
        for aio in self._aio:
            aio.wait()

    def abort(self) -> None:
        self._fill = 0
        for aio in self._aio:
            aio.wait()


class DirectReader:
    """Reads a byte range of a file with O_DIRECT, in aligned windows through a ring of
    aligned buffers (each window's read in flight while the previous one is copied out).
    Buffered reads crawled on the virtual disk this was measured on (fio: 0.26 GB/s
    buffered, 1-1.8 GB/s O_DIRECT)."""

    def __init__(self, *, buffer_bytes: int = 8 << 20, buffers: int = 2) -> None:
        from accel_zero import ops

        size = max(_ALIGN, buffer_bytes - buffer_bytes % _ALIGN)
        block = min(size, 1 << 20)
        self._aio = [ops.AsyncIO(block_size=block, queue_depth=16) for _ in range(buffers)]
        self._buffers = [ops.aligned_empty(size, torch.uint8, pin=False) for _ in range(buffers)]
        self._views = [tensor_bytes(buffer) for buffer in self._buffers]
        self._size = size

    def read(self, fd: int, path: Path, file_size: int, offset: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[offset, offset + len(out))`` of the file (``fd`` open,
        for the unaligned tail past the last whole block)."""
        end = offset + len(out)
        first = offset - offset % _ALIGN
        direct_end = min(-(-end // _ALIGN) * _ALIGN, file_size - file_size % _ALIGN)
        windows = [
            (start, min(start + self._size, direct_end))
            for start in range(first, direct_end, self._size)
        ]
        ring = len(self._buffers)
        for i, (start, stop) in enumerate(windows[:ring]):
            self._aio[i].read(self._buffers[i][: stop - start], str(path), start)
        for i, (start, stop) in enumerate(windows):
            slot = i % ring
            self._aio[slot].wait()
            lo, hi = max(start, offset), min(stop, end)
            out[lo - offset : hi - offset] = self._views[slot][lo - start : hi - start]
            if i + ring < len(windows):
                nxt, nxt_stop = windows[i + ring]
                self._aio[slot].read(self._buffers[slot][: nxt_stop - nxt], str(path), nxt)
        done = max(min(direct_end, end), offset)
        if done < end:  # the file's last, partial block
            pread_into(fd, out[done - offset :], done, path)


class SafetensorsStream:
    """One safetensors file written tensor by tensor; see [Note: streamed safetensors]."""

    def __init__(
        self,
        path: Path,
        *,
        header_reserve: int,
        metadata: dict[str, str] | None = None,
        direct: DirectWriter | None = None,
    ) -> None:
        self.path = path
        if direct is not None:  # data starts on a 4096-byte boundary
            self._reserve = -(-(header_reserve + _LEN.size) // _ALIGN) * _ALIGN - _LEN.size
        else:
            self._reserve = header_reserve - header_reserve % 8  # 8-byte aligned data
        self._metadata = dict(metadata or {})
        self._entries: dict[str, dict[str, Any]] = {}
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct = direct
        if direct is not None:
            direct.begin(path, _LEN.size + self._reserve)
        else:
            os.lseek(self._fd, _LEN.size + self._reserve, os.SEEK_SET)
        self.data_bytes = 0
        # Exact length of the compact JSON header so far: '{' '}' and the metadata entry.
        self._header_len = len(self._header_json({}))

    def _header_json(self, entries: dict[str, dict[str, Any]]) -> bytes:
        header: dict[str, Any] = {}
        if self._metadata:
            header["__metadata__"] = self._metadata
        header.update(entries)
        return json.dumps(header, separators=(",", ":")).encode()

    def _entry_len(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> int:
        entry = {
            key: {
                "dtype": _CODES[dtype],
                "shape": list(shape),
                "data_offsets": [self.data_bytes, self.data_bytes + nbytes],
            }
        }
        # '{...}' of one entry minus the braces, plus a comma after an earlier member.
        comma = 1 if (self._metadata or self._entries) else 0
        return len(json.dumps(entry, separators=(",", ":")).encode()) - 2 + comma

    def fits(self, key: str, tensor: Tensor) -> bool:
        """Would the header still fit the reserve with ``tensor`` added?"""
        nbytes = tensor.numel() * tensor.element_size()
        added = self._entry_len(key, tuple(tensor.shape), tensor.dtype, nbytes)
        return self._header_len + added <= self._reserve

    @property
    def count(self) -> int:
        return len(self._entries)

    def add(self, key: str, tensor: Tensor) -> None:
        """Append ``tensor``'s bytes (from any device); the caller may then reuse it."""
        assert self._fd is not None, f"{self.path} is closed"
        if key in self._entries:
            raise ValueError(f"{self.path}: tensor {key!r} written twice")
        dtype_name(tensor.dtype)  # TypeError for an unsupported dtype, before writing
        if not self.fits(key, tensor):
            raise ValueError(
                f"{self.path}: the header reserve ({self._reserve} bytes) cannot hold {key!r}; "
                "rotate to a new file (or raise header_reserve)"
            )
        data = tensor.detach().contiguous()
        nbytes = data.numel() * data.element_size()
        self._header_len += self._entry_len(key, tuple(data.shape), data.dtype, nbytes)
        self._entries[key] = {
            "dtype": _CODES[data.dtype],
            "shape": list(data.shape),
            "data_offsets": [self.data_bytes, self.data_bytes + nbytes],
        }
        if nbytes and self._direct is not None:
            self._direct.append(data.reshape(-1).view(torch.uint8))
        elif nbytes:
            _write_all(self._fd, tensor_bytes(data.to("cpu")))
        self.data_bytes += nbytes

    def close(self, *, fsync: bool = True) -> int:
        """Write the header into the reserve, fsync, close; returns the file size."""
        assert self._fd is not None, f"{self.path} is closed"
        size = _LEN.size + self._reserve + self.data_bytes
        if self._direct is not None:
            self._direct.finish()
            os.ftruncate(self._fd, size)  # the last O_DIRECT block was padded
        header = self._header_json(self._entries)
        assert len(header) == self._header_len, "header length bookkeeping is off"
        padded = header + b" " * (self._reserve - len(header))
        os.pwrite(self._fd, _LEN.pack(len(padded)) + padded, 0)
        if fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        return size

    def abort(self) -> None:
        """Close without a header (the file stays unreadable; its save is never published)."""
        if self._direct is not None:
            self._direct.abort()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_header(fd: int, path: Path) -> tuple[int, dict[str, Any]]:
    """``(data_start, entries)`` of an open safetensors file; ValueError if malformed."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, _LEN.size, 0)
    if len(head) < _LEN.size:
        raise ValueError(f"{path}: {size} bytes, too short for a safetensors file")
    (length,) = _LEN.unpack(head)
    if length > size - _LEN.size:
        raise ValueError(f"{path}: header of {length} bytes in a file of {size} bytes (truncated?)")
    raw = os.pread(fd, length, _LEN.size)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = _LEN.size + length
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= size - data_start:
            raise ValueError(f"{path}: tensor {key!r} lies outside the file (truncated?)")
        if entry["dtype"] not in _BY_CODE:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']!r}")
    return data_start, header


def code_dtype(code: str) -> torch.dtype:
    return _BY_CODE[code]


def pread_into(fd: int, out: memoryview, offset: int, path: Path) -> None:
    """Fill ``out`` with the file's bytes from ``offset`` (ValueError at an early EOF)."""
    while out:
        got = os.preadv(fd, [out[:_MAX_IO]], offset)
        if got == 0:
            raise ValueError(f"{path}: unexpected end of file at byte {offset} (truncated?)")
        out = out[got:]
        offset += got
