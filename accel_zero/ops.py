"""The only loader of accel_zero's compiled kernels, and their pure-PyTorch fallbacks.

Each op (``aio``, ``cpu_adam``, ``cuda``; sources and builders in ``kernels/<op>/``)
is loaded the first time it is needed, in this order:

1. the prebuilt module from ``ACCEL_ZERO_BUILD_OPS=1 pip install .``
   (``accel_zero._ops_<op>``);
2. a JIT build through ``torch.utils.cpp_extension`` with ninja, cached under
   ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/accel_zero/ops`` and reused;
3. the pure-PyTorch fallback, announced by exactly one warning saying why.

``ACCEL_ZERO_FORCE_FALLBACK=aio,cpu_adam`` (or ``=all``) forces step 3 for the named
ops; ``ACCEL_ZERO_NO_JIT=1`` skips step 2 (useful where compilers are not allowed);
``ACCEL_ZERO_CPU_ADAM_ISA=avx2`` (or ``scalar``) pins the CPU Adam code path.

Public API: :class:`AsyncIO` and :func:`aligned_empty` (NVMe swapping),
:func:`fused_adam_step` (CPU kernel or CUDA kernel), :func:`multi_tensor_l2norm`,
:func:`unscale_and_check_inf`, and :func:`op_status` for ``accel-zero env``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import importlib
import importlib.util
import logging
import math
import mmap
import os
import stat
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

OP_NAMES = ("aio", "cpu_adam", "cuda")
FORCE_FALLBACK_ENV = "ACCEL_ZERO_FORCE_FALLBACK"
NO_JIT_ENV = "ACCEL_ZERO_NO_JIT"
CPU_ADAM_ISA_ENV = "ACCEL_ZERO_CPU_ADAM_ISA"
"""Pins the CPU Adam kernel to ``avx512``, ``avx2`` or ``scalar`` (default: the widest)."""
IO_ALIGN = 4096
"""Alignment of O_DIRECT buffers, lengths and file offsets (bytes)."""


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class OpStatus:
    """Where an op comes from on this machine (what ``accel-zero env`` prints)."""

    name: str
    """Short op name: ``aio``, ``cpu_adam`` or ``cuda``."""
    source: Literal["prebuilt", "jit", "jit-buildable", "fallback"]
    """``prebuilt``/``jit``: compiled and importable (``jit`` = cached JIT build);
    ``jit-buildable``: will be compiled on first use; ``fallback``: pure PyTorch."""
    reason: str = ""
    """Why the op is on the fallback (empty otherwise)."""


def _forced_fallbacks() -> set[str]:
    raw = os.environ.get(FORCE_FALLBACK_ENV, "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    if "all" in names:
        return set(OP_NAMES)
    unknown = names - set(OP_NAMES)
    if unknown:
        raise ValueError(
            f"{FORCE_FALLBACK_ENV}={raw!r} names unknown ops {sorted(unknown)}; "
            f"use a comma list of {list(OP_NAMES)} or 'all'"
        )
    return names


def _builder(name: str) -> Any:
    from accel_zero.kernels.builder import BUILDERS

    return BUILDERS[name]


def _import_prebuilt(name: str) -> ModuleType | None:
    module = _builder(name).prebuilt_module
    if importlib.util.find_spec(module) is None:
        return None
    return importlib.import_module(module)


def op_status(name: str) -> OpStatus:
    """How ``name`` would load, without building anything."""
    if name not in OP_NAMES:
        raise ValueError(f"unknown op {name!r}; known: {list(OP_NAMES)}")
    if name in _forced_fallbacks():
        return OpStatus(name=name, source="fallback", reason=f"forced by {FORCE_FALLBACK_ENV}")
    builder = _builder(name)
    if importlib.util.find_spec(builder.prebuilt_module) is not None:
        return OpStatus(name=name, source="prebuilt")
    ok, why = builder.is_compatible()
    if not ok:
        return OpStatus(name=name, source="fallback", reason=why)
    if os.environ.get(NO_JIT_ENV) == "1":
        return OpStatus(name=name, source="fallback", reason=f"not prebuilt and {NO_JIT_ENV}=1")
    if builder.jit_built():
        return OpStatus(name=name, source="jit")
    return OpStatus(name=name, source="jit-buildable")


def load_op(name: str) -> ModuleType | None:
    """The compiled module of op ``name``, or None (after one warning) when it must fall back.

    ``ACCEL_ZERO_FORCE_FALLBACK`` is read on every call, so it can be toggled at
    run time; the compiled module itself is loaded once per process.
    """
    if name not in OP_NAMES:
        raise ValueError(f"unknown op {name!r}; known: {list(OP_NAMES)}")
    if name in _forced_fallbacks():
        _warn_fallback(name, f"forced by {FORCE_FALLBACK_ENV}={os.environ[FORCE_FALLBACK_ENV]}")
        return None
    module, reason = _load_compiled(name)
    if module is None:
        _warn_fallback(name, reason)
    return module


@functools.cache
def _warn_fallback(name: str, reason: str) -> None:
    warnings.warn(
        f"accel_zero op {name!r} uses its pure-PyTorch fallback (slower): {reason}. "
        "Run `accel-zero env` for details.",
        RuntimeWarning,
        stacklevel=4,
    )


@functools.cache
def _load_compiled(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") from the prebuilt module or a JIT build, else (None, why not).

    Cached: an extension module can be imported only once per process anyway.
    """
    try:
        module = _import_prebuilt(name)
    except ImportError as e:
        module = None
        logger.info("accel_zero op %r: prebuilt module unusable (%s), trying JIT", name, e)
    if module is not None:
        return module, ""
    builder = _builder(name)
    ok, reason = builder.is_compatible()
    if ok and os.environ.get(NO_JIT_ENV) == "1":
        ok, reason = False, f"not prebuilt and {NO_JIT_ENV}=1"
    if not ok:
        return None, reason
    try:
        logger.info("accel_zero op %r: JIT build in %s", name, builder.build_dir())
        return builder.jit_load(), ""
    except Exception as e:  # a compiler error must not stop training
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"JIT build failed ({type(e).__name__}: {first})"


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


# --------------------------------------------------------------------------------------
# Adam (CPU kernel, CUDA kernel, or torch)
# --------------------------------------------------------------------------------------
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _adam_constants(
    lr: float, beta1: float, beta2: float, step: int, bias_correction: bool
) -> tuple[float, float]:
    """(-step_size, sqrt(bias_correction2)) in double, like torch.optim.AdamW."""
    bc1 = 1 - beta1**step if bias_correction else 1.0
    bc2 = 1 - beta2**step if bias_correction else 1.0
    return -lr / bc1, math.sqrt(bc2)


def fused_adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    steps: Sequence[int],
    adamw_mode: bool = True,
    bias_correction: bool = True,
    inv_scale: float = 1.0,
    copies: Sequence[torch.Tensor | None] | None = None,
    found_inf: torch.Tensor | None = None,
    threads: int | None = None,
) -> None:
    """One Adam/AdamW update of fp32 ``params`` (and their moments) in place.

    ``steps[i]`` is parameter i's step count *after* this update (1 on the first).
    ``grads`` may be fp32, bf16 or fp16 and are multiplied by ``inv_scale`` first.
    ``copies[i]`` (bf16/fp16/fp32, same numel) receives the updated parameter in
    the same pass. ``found_inf`` (CUDA, 1-element fp32): skip the update when it
    is non-zero, without a host sync. CPU tensors use the ``cpu_adam`` kernel with
    ``threads`` OpenMP threads (default ``torch.get_num_threads()``), CUDA tensors
    the ``cuda`` kernel; each falls back to torch ops.
    """
    n = len(params)
    copies = list(copies) if copies is not None else [None] * n
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == len(copies) == n):
        raise ValueError(
            "fused_adam_step: params, grads, moments, steps and copies differ in length"
        )
    if n == 0:
        return
    for i, (p, g, m, v, c) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, copies, strict=True)
    ):
        if p.dtype != torch.float32 or m.dtype != torch.float32 or v.dtype != torch.float32:
            raise TypeError(f"fused_adam_step: tensor {i}: params and moments must be float32")
        if g.dtype not in _DTYPE_CODE or (c is not None and c.dtype not in _DTYPE_CODE):
            raise TypeError(f"fused_adam_step: tensor {i}: grad/copy must be fp32, bf16 or fp16")
        sizes = {p.numel(), g.numel(), m.numel(), v.numel()}
        if c is not None:
            sizes.add(c.numel())
        if len(sizes) != 1:
            raise ValueError(f"fused_adam_step: tensor {i}: sizes differ {sorted(sizes)}")
    device = params[0].device.type
    if found_inf is not None and (found_inf.dtype != torch.float32 or found_inf.numel() != 1):
        raise TypeError("fused_adam_step: found_inf must be a 1-element float32 tensor")
    kwargs: dict[str, Any] = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "weight_decay": weight_decay,
        "steps": steps,
        "adamw_mode": adamw_mode,
        "bias_correction": bias_correction,
        "inv_scale": inv_scale,
    }
    tensors = (params, grads, exp_avgs, exp_avg_sqs, copies)
    all_contig = all(t is None or t.is_contiguous() for ts in tensors for t in ts)
    if (
        device == "cpu"
        and all_contig
        and all(t is None or t.device.type == "cpu" for ts in tensors for t in ts)
    ):
        ext = load_op("cpu_adam")
        if ext is not None:
            _cpu_adam_kernel(ext, *tensors, threads=threads, **kwargs)
            return
    elif device == "cuda" and all_contig:
        ext = load_op("cuda")
        if ext is not None:
            _cuda_adam_kernel(ext, *tensors, found_inf=found_inf, **kwargs)
            return
    if found_inf is not None and bool(found_inf.item()):
        return
    _adam_torch(*tensors, **kwargs)


def _cpu_adam_kernel(
    ext: ModuleType,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    copies: Sequence[torch.Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    steps: Sequence[int],
    adamw_mode: bool,
    bias_correction: bool,
    inv_scale: float,
    threads: int | None,
) -> None:
    consts = [_adam_constants(lr, beta1, beta2, s, bias_correction) for s in steps]
    copy_codes = []
    for c in copies:
        # An fp32 "copy" is a plain copy; the kernel writes only bf16/fp16, torch does fp32.
        copy_codes.append(-1 if c is None or c.dtype == torch.float32 else _DTYPE_CODE[c.dtype])
    ext.step(
        [p.data_ptr() for p in params],
        [g.data_ptr() for g in grads],
        [m.data_ptr() for m in exp_avgs],
        [v.data_ptr() for v in exp_avg_sqs],
        [
            c.data_ptr() if c is not None and code >= 0 else 0
            for c, code in zip(copies, copy_codes, strict=True)
        ],
        [p.numel() for p in params],
        [_DTYPE_CODE[g.dtype] for g in grads],
        copy_codes,
        [c[0] for c in consts],
        [c[1] for c in consts],
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        eps,
        1.0 - lr * weight_decay if adamw_mode else 1.0,
        0.0 if adamw_mode else weight_decay,
        inv_scale,
        threads if threads is not None else torch.get_num_threads(),
        os.environ.get(CPU_ADAM_ISA_ENV, ""),
    )
    for p, c, code in zip(params, copies, copy_codes, strict=True):
        if c is not None and code < 0:
            c.copy_(p)


def _cuda_adam_kernel(
    ext: ModuleType,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    copies: Sequence[torch.Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    steps: Sequence[int],
    adamw_mode: bool,
    bias_correction: bool,
    inv_scale: float,
    found_inf: torch.Tensor | None,
) -> None:
    # One launch per (step, grad dtype, copy dtype): the kernel's scalars and types are uniform.
    groups: dict[tuple[int, torch.dtype, torch.dtype | None], list[int]] = {}
    for i, (g, c) in enumerate(zip(grads, copies, strict=True)):
        key = (int(steps[i]), g.dtype, None if c is None else c.dtype)
        groups.setdefault(key, []).append(i)
    for (step, _, _), idx in groups.items():
        neg_step, bc2_sqrt = _adam_constants(lr, beta1, beta2, step, bias_correction)
        group_copies = [copies[i] for i in idx]
        ext.fused_adam(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [] if group_copies[0] is None else group_copies,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            eps,
            neg_step,
            bc2_sqrt,
            1.0 - lr * weight_decay if adamw_mode else 1.0,
            0.0 if adamw_mode else weight_decay,
            inv_scale,
            found_inf,
        )


def _adam_torch(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    copies: Sequence[torch.Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    steps: Sequence[int],
    adamw_mode: bool,
    bias_correction: bool,
    inv_scale: float,
) -> None:
    """The fallback: torch.optim.AdamW's single-tensor arithmetic, op for op."""
    with torch.no_grad():
        for p, grad, m, v, c, step in zip(
            params, grads, exp_avgs, exp_avg_sqs, copies, steps, strict=True
        ):
            g = grad.float() if grad.dtype != torch.float32 else grad
            if inv_scale != 1.0:
                g = g * inv_scale
            if weight_decay != 0.0:
                if adamw_mode:
                    p.mul_(1 - lr * weight_decay)
                else:
                    g = g.add(p, alpha=weight_decay)
            neg_step, bc2_sqrt = _adam_constants(lr, beta1, beta2, step, bias_correction)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=neg_step)
            if c is not None:
                c.copy_(p)


# --------------------------------------------------------------------------------------
# Multi-tensor helpers (CONTRACT.md)
# --------------------------------------------------------------------------------------
def _cuda_ext_for(tensors: Sequence[torch.Tensor]) -> ModuleType | None:
    if not tensors or any(t.device.type != "cuda" for t in tensors):
        return None
    if len({t.device for t in tensors}) != 1 or not all(t.is_contiguous() for t in tensors):
        return None
    if any(t.dtype not in _DTYPE_CODE for t in tensors):
        return None
    return load_op("cuda")


def multi_tensor_l2norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all elements of ``tensors`` together, as a 0-d fp32 tensor on their device.

    Accumulates in fp32 whatever the input dtype. An empty list gives a CPU zero.
    """
    tensors = [t for t in tensors if t.numel() > 0] or list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    ext = _cuda_ext_for(tensors)
    if ext is not None:
        return ext.l2norm(list(tensors))
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack([n.to(tensors[0].device) for n in norms]))


def unscale_and_check_inf(tensors: Sequence[torch.Tensor], inv_scale: float) -> bool:
    """Multiply every tensor by ``inv_scale`` in place; True if any held an inf or NaN.

    On CUDA this synchronises once (to return the bool). The values of a tensor
    holding inf/NaN are unspecified afterwards (the step is to be skipped).
    """
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return False
    ext = _cuda_ext_for(tensors)
    found = torch.zeros(1, dtype=torch.float32, device=tensors[0].device)
    if ext is not None:
        ext.unscale_check_inf(tensors, float(inv_scale), found)
        return bool(found.item())
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault((t.device, t.dtype), []).append(t)
    any_bad = False
    for (dev, _), group in by_device.items():
        flag = torch.zeros(1, dtype=torch.float32, device=dev)
        scale = torch.full((1,), float(inv_scale), dtype=torch.float32, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, scale)
        any_bad = any_bad or bool(flag.item())
    return any_bad
