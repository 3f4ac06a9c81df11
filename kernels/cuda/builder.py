"""Builder of the multi-tensor CUDA ops (``accel_zero._ops_cuda``)."""

from __future__ import annotations

from ..op_builder import OpBuilder


class CudaOpsBuilder(OpBuilder):
    name = "cuda"
    prebuilt_module = "accel_zero._ops_cuda"

    def sources(self) -> list[str]:
        d = self.source_dir()
        return [str(d / "bindings.cpp"), str(d / "multi_tensor.cu")]

    def nvcc_flags(self) -> list[str]:
        return ["-O3"]  # the C++ standard is torch's (C++20 for torch 2.13)

    def is_cuda(self) -> bool:
        return True

    def is_compatible(self) -> tuple[bool, str]:
        ok, why = super().is_compatible()
        if not ok:
            return ok, why
        import torch
        from torch.utils import cpp_extension

        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} was built without CUDA"
        if cpp_extension.CUDA_HOME is None:
            return False, "CUDA toolkit (nvcc) not found: set CUDA_HOME"
        return True, ""
