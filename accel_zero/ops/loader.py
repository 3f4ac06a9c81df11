"""Loading of the compiled ops: prebuilt module, JIT build, or the pure-PyTorch fallback.

The order, the environment variables and :func:`op_status` are described in
:mod:`accel_zero.ops`; this is the only place that imports a compiled kernel.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

logger = logging.getLogger(__name__)

OP_NAMES = ("aio", "cpu_adam", "cuda")
FORCE_FALLBACK_ENV = "ACCEL_ZERO_FORCE_FALLBACK"
NO_JIT_ENV = "ACCEL_ZERO_NO_JIT"
CPU_ADAM_ISA_ENV = "ACCEL_ZERO_CPU_ADAM_ISA"
"""Pins the CPU Adam kernel to ``avx512``, ``avx2`` or ``scalar`` (default: the widest)."""


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
