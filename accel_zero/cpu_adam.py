"""CPUAdam: Adam/AdamW over fp32 CPU parameters with the ``cpu_adam`` kernel.

The kernel (``kernels/cpu_adam``, AVX-512 or AVX2 chosen at run time, OpenMP
threads) reads each parameter, gradient and both moments once and writes them
back once, so a step runs at memory bandwidth. In the same pass it can

* multiply the gradients by an inverse loss scale (``step(inv_scale=...)``), and
* write a bf16/fp16 copy of the updated weights (``step(copy_to=...)``), which
  is what ZeRO-Offload sends back to the accelerator.

Gradients may also be given apart from ``param.grad`` (``step(grads=...)``), in
fp32, bf16 or fp16: autograd insists that ``param.grad`` has the parameter's
dtype, but a sharded optimizer usually holds reduced low-precision gradients.

Without the kernel (no compiler, or ``ACCEL_ZERO_FORCE_FALLBACK=cpu_adam``) the
same arithmetic runs as torch ops, after one warning. The state dict has the
layout of ``torch.optim.AdamW`` (``step``, ``exp_avg``, ``exp_avg_sq``), so either
can load the other's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from accel_zero.ops import fused_adam_step

TensorMap = Mapping[torch.Tensor, torch.Tensor] | Sequence[torch.Tensor | None]
"""Per-parameter tensors: a mapping keyed by the parameter objects, or a sequence
aligned with the parameters of all param groups in order (None = no entry)."""


class CPUAdam(torch.optim.Optimizer):
    """Adam (``adamw_mode=False``: L2 added to the gradient) or AdamW (decoupled decay).

    Arguments match ``torch.optim.AdamW``; ``threads`` is the OpenMP thread count
    of the kernel (default: ``torch.get_num_threads()`` at each step). Parameters
    must be fp32 CPU tensors (the master weights).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        adamw_mode: bool = True,
        *,
        bias_correction: bool = True,
        threads: int | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"CPUAdam: invalid lr {lr} (must be >= 0)")
        if eps < 0.0:
            raise ValueError(f"CPUAdam: invalid eps {eps} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"CPUAdam: invalid betas {betas} (each in [0, 1))")
        if weight_decay < 0.0:
            raise ValueError(f"CPUAdam: invalid weight_decay {weight_decay} (must be >= 0)")
        if threads is not None and threads < 1:
            raise ValueError(f"CPUAdam: threads must be >= 1 or None, got {threads}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "adamw_mode": adamw_mode,
            "bias_correction": bias_correction,
        }
        super().__init__(params, defaults)
        self.threads = threads

    def _per_param(self, given: TensorMap | None, what: str) -> dict[int, torch.Tensor]:
        if given is None:
            return {}
        if isinstance(given, Mapping):
            return {id(p): t for p, t in given.items()}
        params = [p for group in self.param_groups for p in group["params"]]
        if len(given) != len(params):
            raise ValueError(
                f"CPUAdam.step({what}=...): got {len(given)} tensors for {len(params)} parameters; "
                "pass one per parameter of all param groups in order (None to skip) or a mapping"
            )
        return {id(p): t for p, t in zip(params, given, strict=True) if t is not None}

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], float] | None = None,
        *,
        inv_scale: float = 1.0,
        grads: TensorMap | None = None,
        copy_to: TensorMap | None = None,
    ) -> float | None:
        """One optimizer step.

        Args:
            closure: re-evaluates the model and returns the loss (as in torch).
            inv_scale: gradients are multiplied by this first (e.g. 1 / loss scale).
            grads: gradients to use instead of ``param.grad`` (fp32, bf16 or fp16).
            copy_to: bf16/fp16/fp32 tensors (same numel) that receive the updated
                parameters in the same pass.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_of = self._per_param(grads, "grads")
        copy_of = self._per_param(copy_to, "copy_to")
        for gi, group in enumerate(self.param_groups):
            params, gs, ms, vs, cs, steps = [], [], [], [], [], []
            for p in group["params"]:
                g = grad_of.get(id(p), p.grad)
                if g is None:
                    continue
                if p.dtype != torch.float32 or p.device.type != "cpu":
                    raise TypeError(
                        f"CPUAdam: param group {gi} holds a {p.dtype} parameter on {p.device}; "
                        "CPUAdam updates fp32 CPU master weights"
                    )
                if g.is_sparse:
                    raise TypeError("CPUAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                gs.append(g.reshape(p.shape) if g.shape != p.shape else g)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                cs.append(copy_of.get(id(p)))
                steps.append(int(state["step"].item()))
            if not params:
                continue
            beta1, beta2 = group["betas"]
            fused_adam_step(
                params,
                gs,
                ms,
                vs,
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                steps=steps,
                adamw_mode=group.get("adamw_mode", True),
                bias_correction=group.get("bias_correction", True),
                inv_scale=inv_scale,
                copies=cs,
                threads=self.threads,
            )
        return loss
