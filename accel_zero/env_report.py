"""``accel-zero env``: what this machine offers accel_zero, and per op where it comes from.

Like DeepSpeed's ``ds_report``: torch / CUDA / compiler / ninja / libaio / CPU
features, then for each compiled op whether it is prebuilt, already JIT-built
(cached), JIT-buildable on first use, or on its fallback and why. Nothing is
built unless ``build=True`` (``accel-zero env --build``).
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import shutil
import subprocess
import sys

import torch

from accel_zero import ops

_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in _CPU_FLAGS if flag in have]
    except OSError:
        pass
    return []


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        return f"missing ({cxx!r} not on PATH)"
    try:
        out = subprocess.run(
            [path, "--version"], check=False, capture_output=True, text=True, timeout=10
        )
        return f"{out.stdout.splitlines()[0]} ({path})"
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return f"{path} (version unknown: {e})"


def collect(build: bool = False) -> list[tuple[str, str]]:
    """(label, value) rows of the report; ``build=True`` loads (and so builds) every op."""
    from torch.utils import cpp_extension

    from accel_zero.kernels.aio.builder import _find_header

    rows: list[tuple[str, str]] = [
        ("python", sys.version.split()[0]),
        ("torch", f"{torch.__version__} ({os.path.dirname(torch.__file__)})"),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"  cuda:{i}", torch.cuda.get_device_name(i)))
    rows += [
        ("nvcc (CUDA_HOME)", str(cpp_extension.CUDA_HOME)),
        ("C++ compiler", _compiler()),
        ("ninja", "yes" if cpp_extension.is_ninja_available() else "no (pip install ninja)"),
        ("libaio.h", str(_find_header("libaio.h") or "missing (apt-get install libaio-dev)")),
        ("libaio.so", ctypes.util.find_library("aio") or "missing"),
        ("CPU", f"{platform.machine()}, {os.cpu_count()} logical cores"),
        ("CPU features", " ".join(_cpu_flags()) or "none of " + ",".join(_CPU_FLAGS)),
        ("torch threads", str(torch.get_num_threads())),
        ("JIT cache", str(_cache_root())),
    ]
    forced = os.environ.get(ops.FORCE_FALLBACK_ENV)
    if forced:
        rows.append((ops.FORCE_FALLBACK_ENV, forced))
    for name in ops.OP_NAMES:
        status = ops.op_status(name)
        if build and status.source != "fallback":
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = ops.load_op(name)
            if module is None:
                why = str(caught[0].message) if caught else "unknown"
                rows.append((f"op {name}", f"FALLBACK: {why}"))
                continue
            status = ops.op_status(name)
        rows.append((f"op {name}", _describe(status)))
    if ops.op_status("cpu_adam").source in ("prebuilt", "jit") or build:
        module = ops.load_op("cpu_adam") if build else None
        if module is not None:
            rows.append(("  cpu_adam ISA", module.best_isa()))
    return rows


def _cache_root() -> str:
    from accel_zero.kernels.op_builder import cache_root

    return str(cache_root())


def _describe(status: ops.OpStatus) -> str:
    return {
        "prebuilt": "available (prebuilt)",
        "jit": "available (JIT-built, cached)",
        "jit-buildable": "JIT-buildable (compiled on first use)",
        "fallback": f"FALLBACK (pure PyTorch): {status.reason}",
    }[status.source]


def main(argv: list[str] | None = None) -> int:
    """Print the report; ``--build`` builds every buildable op first. Returns 0."""
    args = sys.argv[1:] if argv is None else argv
    build = "--build" in args
    rows = collect(build=build)
    width = max(len(label) for label, _ in rows)
    print("accel_zero environment report")
    print("-" * 60)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
