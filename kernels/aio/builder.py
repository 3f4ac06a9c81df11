"""Builder of the libaio op (``accel_zero._ops_aio``)."""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

from ..op_builder import OpBuilder


def _find_header(name: str) -> Path | None:
    dirs = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
    dirs += [p for p in os.environ.get("CPLUS_INCLUDE_PATH", "").split(os.pathsep) if p]
    prefix = os.environ.get("CONDA_PREFIX")
    if prefix:
        dirs.append(os.path.join(prefix, "include"))
    dirs += ["/usr/include", "/usr/local/include"]
    for d in dirs:
        candidate = Path(d) / name
        if candidate.is_file():
            return candidate
    return None


class AioBuilder(OpBuilder):
    name = "aio"
    prebuilt_module = "accel_zero._ops_aio"

    def sources(self) -> list[str]:
        return [str(self.source_dir() / "aio.cpp")]

    def cxx_flags(self) -> list[str]:
        return [*super().cxx_flags(), "-pthread"]

    def ld_flags(self) -> list[str]:
        return ["-laio", "-pthread"]

    def is_compatible(self) -> tuple[bool, str]:
        ok, why = super().is_compatible()
        if not ok:
            return ok, why
        if not os.uname().sysname == "Linux":
            return False, "libaio needs Linux"
        if _find_header("libaio.h") is None:
            return False, "libaio.h not found (install libaio-dev: apt-get install libaio-dev)"
        if ctypes.util.find_library("aio") is None:
            return False, "libaio shared library not found (install libaio1 / libaio-dev)"
        return True, ""
