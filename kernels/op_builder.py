"""Common base of the per-op builders in ``kernels/<op>/builder.py``.

A builder knows one op's sources and flags, whether this machine can build it
(``is_compatible``), how to describe it to setuptools for a prebuilt install
(``extension``) and how to build it just in time (``jit_load``). It never decides
*whether* to build: that is ``accel_zero/ops/loader.py``'s job (the only loader).

This module imports nothing from ``accel_zero`` because ``setup.py`` imports it as
the top-level package ``kernels`` before ``accel_zero`` is installed.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

# Compiler flags shared by every op (the C++ standard is left to torch, whose
# headers need C++20 from 2.13 on). -ffp-contract=off stops the compiler from
# fusing multiply-adds on its own: every FMA is one we wrote (where torch's own
# kernels have one), so vector bodies and scalar tails round alike.
COMMON_CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fvisibility=hidden"]


def cache_root() -> Path:
    """Where JIT builds live: ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/accel_zero/ops``."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "accel_zero" / "ops"


def _abi_tag() -> str:
    import torch

    cuda = torch.version.cuda or "cpu"
    return f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}_{cuda}"


class OpBuilder:
    """One compiled op. Subclasses set ``name`` and ``prebuilt_module`` and the source lists."""

    name: str = ""
    """Short op name used in env vars and reports: ``aio``, ``cpu_adam``, ``cuda``."""
    prebuilt_module: str = ""
    """Import path of the module ``ACCEL_ZERO_BUILD_OPS=1 pip install .`` produces."""

    def source_dir(self) -> Path:
        return Path(sys.modules[type(self).__module__].__file__ or "").resolve().parent

    def sources(self) -> list[str]:
        raise NotImplementedError

    def include_dirs(self) -> list[str]:
        return [str(self.source_dir())]

    def cxx_flags(self) -> list[str]:
        return list(COMMON_CXX_FLAGS)

    def nvcc_flags(self) -> list[str]:
        return []

    def ld_flags(self) -> list[str]:
        return []

    def is_cuda(self) -> bool:
        return False

    def is_compatible(self) -> tuple[bool, str]:
        """``(True, "")`` when this machine can build the op, else ``(False, why)``."""
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            return False, f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)"
        return True, ""

    # -- prebuilt ---------------------------------------------------------------------------
    def extension(self) -> Any:
        """A setuptools extension for ``setup.py`` (sources relative to the repository root)."""
        from torch.utils import cpp_extension

        root = Path(__file__).resolve().parent.parent
        rel = [os.path.relpath(s, root) for s in self.sources()]
        kwargs: dict[str, Any] = {
            "name": self.prebuilt_module,
            "sources": rel,
            "include_dirs": self.include_dirs(),
            "extra_link_args": self.ld_flags(),
        }
        if self.is_cuda():
            kwargs["extra_compile_args"] = {"cxx": self.cxx_flags(), "nvcc": self.nvcc_flags()}
            return cpp_extension.CUDAExtension(**kwargs)
        kwargs["extra_compile_args"] = {"cxx": self.cxx_flags()}
        return cpp_extension.CppExtension(**kwargs)

    # -- JIT --------------------------------------------------------------------------------
    def jit_name(self) -> str:
        return f"accel_zero_{self.name}"

    def build_dir(self) -> Path:
        return cache_root() / _abi_tag() / self.jit_name()

    def jit_built(self) -> bool:
        """True when a JIT build of this op already sits in the cache (no build is started)."""
        return any(self.build_dir().glob(f"{self.jit_name()}*.so"))

    def jit_load(self, verbose: bool = False) -> ModuleType:
        """Build (or reuse the cached build of) the op with ninja and import it."""
        from torch.utils import cpp_extension

        build_dir = self.build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(
            name=self.jit_name(),
            sources=self.sources(),
            extra_cflags=self.cxx_flags(),
            extra_cuda_cflags=self.nvcc_flags() or None,
            extra_ldflags=self.ld_flags(),
            extra_include_paths=self.include_dirs(),
            build_directory=str(build_dir),
            verbose=verbose,
            with_cuda=self.is_cuda(),
        )
