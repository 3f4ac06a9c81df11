"""Multi-tensor helpers: :func:`multi_tensor_l2norm` and :func:`unscale_and_check_inf`
over the ``cuda`` kernel, or torch's foreach ops."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from .adam import _DTYPE_CODE
from .loader import load_op


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
