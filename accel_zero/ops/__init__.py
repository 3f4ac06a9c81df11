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

Where each part lives (import the public names from here, ``accel_zero.ops``):

- :mod:`~accel_zero.ops.loader`: op names, the environment variables above,
  :class:`OpStatus`, :func:`op_status`, :func:`load_op` and the fallback warning;
- :mod:`~accel_zero.ops.aio`: :class:`AsyncIO`, its Python fallback engine,
  O_DIRECT handling, :data:`IO_ALIGN`, :func:`aligned_empty`, :class:`AioError`,
  :class:`ShortReadError`;
- :mod:`~accel_zero.ops.adam`: :func:`fused_adam_step` and its CPU, CUDA and torch
  paths;
- :mod:`~accel_zero.ops.multi_tensor`: :func:`multi_tensor_l2norm`,
  :func:`unscale_and_check_inf`.
"""

from .adam import fused_adam_step
from .aio import IO_ALIGN, AioError, AsyncIO, ShortReadError, aligned_empty
from .loader import (
    CPU_ADAM_ISA_ENV,
    FORCE_FALLBACK_ENV,
    NO_JIT_ENV,
    OP_NAMES,
    OpStatus,
    load_op,
    op_status,
)
from .multi_tensor import multi_tensor_l2norm, unscale_and_check_inf

__all__ = [
    "CPU_ADAM_ISA_ENV",
    "FORCE_FALLBACK_ENV",
    "IO_ALIGN",
    "NO_JIT_ENV",
    "OP_NAMES",
    "AioError",
    "AsyncIO",
    "OpStatus",
    "ShortReadError",
    "aligned_empty",
    "fused_adam_step",
    "load_op",
    "multi_tensor_l2norm",
    "op_status",
    "unscale_and_check_inf",
]
