"""Asynchronous file IO of CPU tensors: :class:`AsyncIO` over the ``aio`` kernel (libaio)
or its Python fallback engine, and :func:`aligned_empty` for O_DIRECT-ready buffers."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .loader import load_op

IO_ALIGN = 4096
"""Alignment of O_DIRECT buffers, lengths and file offsets (bytes)."""


# --------------------------------------------------------------------------------------
# Asynchronous IO
# --------------------------------------------------------------------------------------
class AioError(OSError):
    """An IO of :class:`AsyncIO` failed; ``errno`` and ``filename`` say what and where."""


class ShortReadError(AioError):
    """A read found fewer bytes than requested (file too small or truncated)."""


def aligned_empty(numel: int, dtype: torch.dtype, pin: bool = True) -> torch.Tensor:
    """An uninitialised 1-D host tensor whose data starts on a 4096-byte boundary.

    IO on it needs no bounce buffer under O_DIRECT. With ``pin=True`` and CUDA
    present the memory is page-locked too (host<->device copies can be async).
    """
    if numel < 0:
        raise ValueError(f"aligned_empty: numel must be >= 0, got {numel}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    padded = -(-max(nbytes, 1) // IO_ALIGN) * IO_ALIGN
    pin_ok = pin and torch.cuda.is_available()
    raw = torch.empty(padded + IO_ALIGN, dtype=torch.uint8, pin_memory=pin_ok)
    start = (-raw.data_ptr()) % IO_ALIGN
    return raw[start : start + nbytes].view(dtype)


@dataclass(frozen=True, kw_only=True)
class _Request:
    tensor: torch.Tensor  # kept alive until the IO finished
    path: str
    write: bool
    nbytes: int
    offset: int


class _PyOp:
    def __init__(self, op_id: int, pieces: int) -> None:
        self.id = op_id
        self.remaining = pieces
        self.err = 0
        self.short = False
        self.done = 0


class _PyEngine:
    """The fallback engine: same interface as the C++ ``AioHandle``, a thread pool
    over ``os.preadv``/``os.pwritev`` (which release the GIL)."""

    def __init__(self, block_size: int, queue_depth: int, threads: int) -> None:
        self.block_size = block_size
        self.queue_depth = queue_depth
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="accel_zero_aio")
        self._local = threading.local()
        self._cv = threading.Condition()
        self._next_id = 0
        self._submitted = 0
        self._results: list[tuple[int, int, bool, int]] = []

    def _bounce(self) -> mmap.mmap:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = mmap.mmap(-1, self.block_size)  # anonymous mmap: page aligned
            self._local.buf = buf
        return buf

    def submit(
        self, fd: int, write: bool, ptr: int, nbytes: int, offset: int, close_fd: bool
    ) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT) if _O_DIRECT else False
        aligned = ptr % IO_ALIGN == 0
        body = nbytes - nbytes % IO_ALIGN
        pieces = [
            (rel, min(self.block_size, body - rel), direct and not aligned)
            for rel in range(0, body, self.block_size)
        ]
        if nbytes > body:
            pieces.append((body, nbytes - body, write or direct))
        with self._cv:
            op = _PyOp(self._next_id, len(pieces))
            self._next_id += 1
            self._submitted += 1
        if not pieces:
            self._finish(op, fd, close_fd)
        for rel, length, bounce in pieces:
            self._pool.submit(
                self._piece, op, fd, write, ptr, offset, rel, length, bounce, direct, close_fd
            )
        return op.id

    def _piece(
        self,
        op: _PyOp,
        fd: int,
        write: bool,
        ptr: int,
        offset: int,
        rel: int,
        length: int,
        bounce: bool,
        direct: bool,
        close_fd: bool,
    ) -> None:
        io_len = -(-length // IO_ALIGN) * IO_ALIGN if bounce and (write or direct) else length
        view: Any
        if bounce:
            mm = self._bounce()
            view = memoryview(mm)[:io_len]
            if write:
                ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(mm)), ptr + rel, length)
                mm[length:io_len] = bytes(io_len - length)
        else:
            view = memoryview((ctypes.c_char * length).from_address(ptr + rel)).cast("B")
        done = 0
        err = 0
        try:
            while done < io_len:
                at = offset + rel + done
                if write:
                    n = os.pwritev(fd, [view[done:]], at)
                else:
                    n = os.preadv(fd, [view[done:]], at)
                if n == 0:
                    err = errno.ENOSPC if write else 0
                    break
                done += n
        except OSError as e:
            err = e.errno or errno.EIO
            if write and done > 0 and err == errno.EINVAL:
                err = errno.ENOSPC  # unaligned O_DIRECT remainder of a short write
        if bounce and not write and done >= length:
            ctypes.memmove(ptr + rel, ctypes.addressof(ctypes.c_char.from_buffer(mm)), length)
        del view
        with self._cv:
            if err and not op.err:
                op.err = err
            if not write and not err and done < length:
                if not op.err:
                    op.short = True
                    op.err = errno.EIO
            elif not err:
                op.done += length
            op.remaining -= 1
            last = op.remaining == 0
        if last:
            self._finish(op, fd, close_fd)

    def _finish(self, op: _PyOp, fd: int, close_fd: bool) -> None:
        if close_fd:
            os.close(fd)
        with self._cv:
            self._results.append((op.id, op.err, op.short, op.done))
            self._cv.notify_all()

    def wait(self) -> list[tuple[int, int, bool, int]]:
        with self._cv:
            self._cv.wait_for(lambda: len(self._results) == self._submitted)
            out, self._results = self._results, []
            self._submitted = 0
            return out

    def pending(self) -> int:
        with self._cv:
            return self._submitted - len(self._results)


_O_DIRECT = getattr(os, "O_DIRECT", 0)


class AsyncIO:
    """Asynchronous reads and writes of contiguous CPU tensors to files.

    ``write``/``read`` open the file (O_DIRECT unless ``direct=False`` or the file
    system refuses it, which is warned about once per handle), queue the IO and
    return at once; ``wait()`` blocks until everything queued finished, returns
    how many requests did, and raises :class:`AioError` (errno + path) for the
    first that failed. The tensor must stay untouched until ``wait()`` returns;
    the handle keeps a reference to it meanwhile.

    Offsets must be multiples of 4096. Writes are padded with zeros to a whole
    4096-byte block (so the file may be up to 4095 bytes longer than the data);
    reads return exactly ``tensor.nbytes`` bytes. Files are created mode 0600.
    Backed by the libaio kernel (``backend == "libaio"``) or a thread pool over
    ``os.preadv``/``os.pwritev`` (``backend == "python"``) with the same results.
    A handle is meant to be driven from one Python thread; use one per thread.
    """

    def __init__(
        self,
        block_size: int = 1 << 20,
        queue_depth: int = 32,
        threads: int = 1,
        *,
        direct: bool = True,
    ) -> None:
        if block_size < IO_ALIGN or block_size % IO_ALIGN:
            raise ValueError(f"AsyncIO block_size must be a multiple of 4096, got {block_size}")
        if queue_depth < 1 or threads < 1:
            raise ValueError(
                f"AsyncIO needs queue_depth >= 1 and threads >= 1, got {queue_depth}, {threads}"
            )
        self.direct = direct
        ext = load_op("aio")
        self.backend: Literal["libaio", "python"] = "libaio" if ext is not None else "python"
        self._engine: Any = (
            ext.AioHandle(block_size, queue_depth, threads)
            if ext is not None
            else _PyEngine(block_size, queue_depth, threads)
        )
        self._requests: dict[int, _Request] = {}
        self._buffered_paths: set[str] = set()

    @property
    def block_size(self) -> int:
        return int(self._engine.block_size)

    @property
    def queue_depth(self) -> int:
        return int(self._engine.queue_depth)

    @property
    def threads(self) -> int:
        return int(self._engine.threads)

    def write(self, tensor: torch.Tensor, path: str | os.PathLike[str], offset: int = 0) -> None:
        """Queue a write of ``tensor``'s bytes to ``path`` at byte ``offset``."""
        self._submit(True, tensor, os.fspath(path), offset)

    def read(self, tensor: torch.Tensor, path: str | os.PathLike[str], offset: int = 0) -> None:
        """Queue a read of ``tensor.nbytes`` bytes of ``path`` at ``offset`` into ``tensor``."""
        self._submit(False, tensor, os.fspath(path), offset)

    def sync_write(
        self, tensor: torch.Tensor, path: str | os.PathLike[str], offset: int = 0
    ) -> int:
        """``write`` then ``wait`` (also waits for anything queued before)."""
        self.write(tensor, path, offset)
        return self.wait()

    def sync_read(self, tensor: torch.Tensor, path: str | os.PathLike[str], offset: int = 0) -> int:
        """``read`` then ``wait`` (also waits for anything queued before)."""
        self.read(tensor, path, offset)
        return self.wait()

    def pending(self) -> int:
        """Requests queued and not yet finished."""
        return int(self._engine.pending())

    def wait(self) -> int:
        """Block until every queued request finished; return how many finished."""
        results = self._engine.wait()
        failures: list[AioError] = []
        for op_id, err, short, done in results:
            req = self._requests.pop(op_id)
            if err:
                failures.append(_error_for(req, err, short, done))
        if failures:
            first = failures[0]
            if len(failures) > 1:
                first.add_note(f"{len(failures) - 1} more request(s) of this wait() failed too")
            raise first
        return len(results)

    def close(self) -> None:
        """Wait for everything in flight, raising its errors (workers stop when collected)."""
        if self._requests:
            self.wait()

    def __enter__(self) -> AsyncIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Memory handed to the kernel must outlive the IO even if the user forgot wait().
        engine = getattr(self, "_engine", None)
        if engine is not None and getattr(self, "_requests", None):
            engine.wait()

    def _submit(self, write: bool, tensor: torch.Tensor, path: str, offset: int) -> None:
        what = "write" if write else "read"
        if tensor.device.type != "cpu":
            raise ValueError(f"AsyncIO.{what}({path!r}): tensor is on {tensor.device}, not cpu")
        if not tensor.is_contiguous():
            raise ValueError(f"AsyncIO.{what}({path!r}): tensor must be contiguous")
        if offset < 0 or offset % IO_ALIGN:
            raise ValueError(
                f"AsyncIO.{what}({path!r}): offset {offset} is not a non-negative multiple of "
                f"{IO_ALIGN} (O_DIRECT alignment); place tensors at 4096-aligned offsets"
            )
        nbytes = tensor.numel() * tensor.element_size()
        fd = self._open(path, write)
        try:
            if not write:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size < offset + nbytes:
                    raise ShortReadError(
                        errno.EIO,
                        f"file is {st.st_size} bytes, smaller than the {nbytes} bytes requested "
                        f"at offset {offset} (truncated or never fully written?)",
                        path,
                    )
            op_id = self._engine.submit(fd, write, tensor.data_ptr(), nbytes, offset, True)
        except BaseException:
            os.close(fd)
            raise
        self._requests[op_id] = _Request(
            tensor=tensor, path=path, write=write, nbytes=nbytes, offset=offset
        )

    def _open(self, path: str, write: bool) -> int:
        flags = (os.O_WRONLY | os.O_CREAT) if write else os.O_RDONLY
        flags |= os.O_CLOEXEC
        what = "writing" if write else "reading"
        if self.direct and _O_DIRECT:
            try:
                return os.open(path, flags | _O_DIRECT, 0o600)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise AioError(e.errno, f"cannot open for {what}: {e.strerror}", path) from e
                if path not in self._buffered_paths:
                    self._buffered_paths.add(path)
                    warnings.warn(
                        f"O_DIRECT is not supported by the file system of {path!r}; "
                        "using buffered IO (through the page cache) for this file",
                        RuntimeWarning,
                        stacklevel=4,
                    )
        try:
            return os.open(path, flags, 0o600)
        except OSError as e:
            raise AioError(e.errno, f"cannot open for {what}: {e.strerror}", path) from e


def _error_for(req: _Request, err: int, short: bool, done: int) -> AioError:
    what = "write" if req.write else "read"
    where = f"{req.nbytes} bytes at offset {req.offset}"
    if short:
        return ShortReadError(
            err, f"short read: got {done} of {where} (file truncated while reading?)", req.path
        )
    hint = {
        errno.ENOSPC: "; the device is full: free space or point nvme_path elsewhere",
        errno.EACCES: "; check the file's permissions",
        errno.EIO: "; the device reported an IO error",
    }.get(err, "")
    return AioError(err, f"async {what} of {where} failed: {os.strerror(err)}{hint}", req.path)
