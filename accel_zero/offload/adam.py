"""The CPU Adam kernel in the user's optimizer's terms (offloaded steps, DESIGN D6/D8).

With optimizer offload the step runs on the host: the ``cpu_adam`` kernel (AVX-512/AVX2,
OpenMP; ``ops.fused_adam_step``) updates master, moments and, in the same pass, the
compute-dtype copy. It computes exactly what ``torch.optim.Adam``/``AdamW`` (and
``accel_zero.CPUAdam``) compute, so their param groups' hyper-parameters map onto it one
to one, read at every step (schedulers change ``lr``). Anything else (another optimizer
class, ``amsgrad``, ``maximize``) is None here: CPU offload then steps it with torch,
NVMe offload refuses it (its state would have to be swapped tensor by tensor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from accel_zero.ops import fused_adam_step

__all__ = ["AdamHyper", "adam_hyper", "adam_step"]


@dataclass(frozen=True)
class AdamHyper:
    """One param group's Adam hyper-parameters, as the kernel takes them."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    adamw_mode: bool
    """Decoupled weight decay (AdamW); False: L2 added to the gradient (Adam)."""
    bias_correction: bool = True


def _flag(group: Mapping[str, Any], name: str) -> bool:
    return bool(group.get(name, False))


def adam_hyper(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> AdamHyper | None:
    """The kernel's view of ``group`` of ``optimizer``, or None if it cannot compute it."""
    from accel_zero.cpu_adam import CPUAdam

    cls = type(optimizer)
    if cls is torch.optim.AdamW:
        adamw, bias = True, True
    elif cls is torch.optim.Adam:
        adamw, bias = _flag(group, "decoupled_weight_decay"), True
    elif cls is CPUAdam:
        adamw, bias = bool(group["adamw_mode"]), bool(group["bias_correction"])
    else:
        return None
    if _flag(group, "amsgrad") or _flag(group, "maximize") or _flag(group, "differentiable"):
        return None
    beta1, beta2 = group["betas"]
    return AdamHyper(
        lr=float(group["lr"]),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(group["eps"]),
        weight_decay=float(group["weight_decay"]),
        adamw_mode=adamw,
        bias_correction=bias,
    )


def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[int],
    hyper: AdamHyper,
    *,
    inv_scale: float = 1.0,
    copies: Sequence[torch.Tensor | None] | None = None,
    threads: int | None = None,
) -> None:
    """One update of fp32 ``params`` in place; ``steps[i]`` is the count after it."""
    fused_adam_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        lr=hyper.lr,
        beta1=hyper.beta1,
        beta2=hyper.beta2,
        eps=hyper.eps,
        weight_decay=hyper.weight_decay,
        steps=steps,
        adamw_mode=hyper.adamw_mode,
        bias_correction=hyper.bias_correction,
        inv_scale=inv_scale,
        copies=copies,
        threads=threads,
    )
