"""Fused Adam/AdamW: :func:`fused_adam_step` over the ``cpu_adam`` kernel (CPU tensors),
the ``cuda`` kernel (CUDA tensors), or torch ops."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from .loader import CPU_ADAM_ISA_ENV, load_op

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
