"""Builder of the CPU Adam op (``accel_zero._ops_cpu_adam``)."""

from __future__ import annotations

import platform

from ..op_builder import OpBuilder


class CPUAdamBuilder(OpBuilder):
    name = "cpu_adam"
    prebuilt_module = "accel_zero._ops_cpu_adam"

    def sources(self) -> list[str]:
        d = self.source_dir()
        # One unit per ISA, each compiled with its own target pragma; the CPU is
        # probed at run time (__builtin_cpu_supports), so one build runs anywhere.
        return [str(d / "cpu_adam.cpp"), str(d / "adam_avx512.cpp"), str(d / "adam_avx2.cpp")]

    def cxx_flags(self) -> list[str]:
        return [*super().cxx_flags(), "-fopenmp"]

    def ld_flags(self) -> list[str]:
        return ["-fopenmp"]

    def is_compatible(self) -> tuple[bool, str]:
        ok, why = super().is_compatible()
        if not ok:
            return ok, why
        if platform.machine() not in ("x86_64", "AMD64"):
            return False, f"the CPU Adam kernels are x86-64 only (this is {platform.machine()})"
        return True, ""
