"""Reference training runs that accel_zero parity tests compare against.

One ``TrainSpec`` describes a run (tiny model by name, seed, data, AdamW
hyper-parameters, precision, gradient accumulation, clipping). Three ways to
run it, each returning a ``TrainResult`` (per-micro-step global mean losses and
the final full state dict on CPU):

- ``train_single(spec, world_size)``: one process on the *global* batch.
- ``train_ddp(spec, world_size)``: torch DDP over gloo, each rank on its slice.
- ``train_accel_zero(spec, world_size, zero_config)``: the same loop through
  accel_zero's public API (``Accelerator``, ``prepare``, ``accumulate``,
  ``backward``, ``clip_grad_norm_``, ``get_state_dict``); its rank body
  ``train_accel_zero_rank`` can be handed to ``run_ranks`` directly.

The multi-rank ones take ``pool=`` (a ``RankPool``, e.g. from the
``rank_pool`` fixture): a warm pool runs a tiny parity case in about a second
instead of the 10-40 s it takes to spawn ranks and import transformers.

All three follow Accelerate's semantics: the loss is divided by the
accumulation steps before backward, the optimizer steps (after clipping by
``clip_grad_norm_``) every ``grad_accum`` micro-steps, ``zero_grad`` sets
grads to None, and ``mixed_precision="bf16"`` runs the forward (loss
included) under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with fp32
weights, which is what ``accelerate.Accelerator(mixed_precision="bf16")``
does on CPU.

``assert_parity(expected, actual, spec)`` compares two results with the
tolerance for the spec's precision (``tolerance``) and names the worst key;
``rtol=0, atol=0`` demands bit equality (accel_zero matches DDP bit for bit
at world size 2 in fp32 without clipping).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tests.distributed.harness import RankPool, init_pg, run_ranks
from tests.distributed.models import Batches, build_model, make_batches

__all__ = [
    "Tolerance",
    "TrainResult",
    "TrainSpec",
    "assert_parity",
    "global_mean",
    "tolerance",
    "train_accel_zero",
    "train_accel_zero_rank",
    "train_ddp",
    "train_ddp_in_group",
    "train_ddp_rank",
    "train_single",
]


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """One reference run; every field has a small, fast default."""

    model: str = "gpt2"
    """Name for ``models.build_model`` (gpt2, llama, plain, frozen, twice, sometimes)."""
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra builder arguments, e.g. ``{"span": 4}`` for ``sometimes``."""
    seed: int = 0
    """Weight-init seed (identical weights on every rank)."""
    data_seed: int = 1234
    steps: int = 3
    """Optimizer steps; the run has ``steps * grad_accum`` micro-steps."""
    grad_accum: int = 1
    micro_batch: int = 2
    """Rows per rank per micro-step; the global batch is ``world_size * micro_batch`` rows."""
    seq_len: int = 16
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    mixed_precision: Literal["no", "bf16"] = "no"
    max_grad_norm: float | None = None
    """Clip by ``clip_grad_norm_(params, max_norm)`` before each step; None = off."""
    gradient_checkpointing: bool = False
    """transformers' non-reentrant gradient checkpointing (activations recomputed in
    backward, where the engine gathers units again)."""

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(
                f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}"
            )
        if self.steps < 1 or self.grad_accum < 1 or self.micro_batch < 1:
            raise ValueError("steps, grad_accum and micro_batch must be >= 1")

    def build_model(self) -> nn.Module:
        model = build_model(self.model, seed=self.seed, **dict(self.model_kwargs))
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        return model

    def build_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )

    def batches(self, world_size: int) -> Batches:
        vocab = int(self.model_kwargs.get("vocab", 96))
        return make_batches(
            self.data_seed,
            self.steps,
            world_size,
            self.micro_batch,
            self.seq_len,
            vocab,
            grad_accum=self.grad_accum,
        )

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.mixed_precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    losses: list[float]
    """Global mean loss of every micro-step (before the / grad_accum scaling)."""
    grad_norms: list[float]
    """Total grad norm returned by clipping at each optimizer step (empty if off)."""
    state_dict: dict[str, Tensor]
    """Final full ``model.state_dict()``, cloned to CPU (tied names included)."""


def global_mean(value: Tensor) -> float:
    """Mean of a scalar over all ranks (the value itself without a process group)."""
    t = value.detach().float().reshape(1).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _loop(
    spec: TrainSpec,
    model: nn.Module,
    micro_batches: list[Tensor],
    *,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]],
    step: Callable[[], float | None],
) -> tuple[list[float], list[float]]:
    """The shared micro-step loop: forward, scaled backward, step at boundaries."""
    losses: list[float] = []
    norms: list[float] = []
    for i, x in enumerate(micro_batches):
        boundary = (i + 1) % spec.grad_accum == 0
        ctx = contextlib.nullcontext() if boundary else no_sync()
        with ctx:
            with spec.autocast():
                loss = model(input_ids=x, labels=x).loss
            (loss / spec.grad_accum).backward()
        losses.append(global_mean(loss))
        if boundary:
            norm = step()
            if norm is not None:
                norms.append(norm)
    return losses, norms


def _torch_step(
    spec: TrainSpec, model: nn.Module, optimizer: torch.optim.Optimizer
) -> Callable[[], float | None]:
    def step() -> float | None:
        norm = None
        if spec.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    return step


def train_single(spec: TrainSpec, world_size: int) -> TrainResult:
    """One process, every micro-step on the global batch of ``world_size`` ranks."""
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    losses, norms = _loop(
        spec,
        model,
        list(spec.batches(world_size).global_batches),
        no_sync=contextlib.nullcontext,
        step=_torch_step(spec, model, optimizer),
    )
    return TrainResult(losses=losses, grad_norms=norms, state_dict=_cpu_state(model))


def train_ddp_in_group(rank: int, world_size: int, spec: TrainSpec) -> TrainResult:
    """The DDP reference in the default process group that already exists."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = spec.build_model()
    # Globally unused parameters on some steps need DDP's unused-parameter search.
    ddp = DDP(model, find_unused_parameters=spec.model == "sometimes")
    optimizer = spec.build_optimizer(ddp.parameters())
    losses, norms = _loop(
        spec,
        ddp,
        spec.batches(world_size).for_rank(rank),
        no_sync=ddp.no_sync,
        step=_torch_step(spec, ddp, optimizer),
    )
    result = TrainResult(losses=losses, grad_norms=norms, state_dict=_cpu_state(model))
    # Free the reducer while the group is still registered, so the group's last
    # reference drops at teardown, after its threads drained.
    # See [Note: gloo teardown deadlock] in accel_zero/comm.py.
    del ddp, optimizer
    return result


def train_ddp_rank(rank: int, world_size: int, spec: TrainSpec) -> TrainResult:
    """Rank body of the DDP reference (for ``run_ranks``); every rank returns the weights."""
    with init_pg(rank, world_size):
        return train_ddp_in_group(rank, world_size, spec)


def train_ddp(
    spec: TrainSpec, world_size: int, *, timeout: float = 240.0, pool: RankPool | None = None
) -> TrainResult:
    """DDP on ``world_size`` gloo ranks; checks all ranks ended equal, returns rank 0's result."""
    results: list[TrainResult] = run_ranks(
        train_ddp_rank, world_size, spec, timeout=timeout, pool=pool
    )
    for rank, res in enumerate(results[1:], start=1):
        for key, value in res.state_dict.items():
            if not torch.equal(value, results[0].state_dict[key]):
                raise AssertionError(f"DDP rank {rank} ended with a different {key!r} than rank 0")
    return results[0]


def train_accel_zero_rank(
    rank: int,
    world_size: int,
    spec: TrainSpec,
    zero_config: Mapping[str, Any],
    accelerator_kwargs: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Rank body running ``spec`` through accel_zero's public API (for ``run_ranks``).

    The Accelerator creates the process group itself from the torchrun-style
    environment the harness sets. ``state_dict`` is ``get_state_dict(model)``:
    full on rank 0, whatever the engine returns elsewhere (compare rank 0's).
    """
    from accel_zero import Accelerator

    accelerator = Accelerator(
        zero_config=dict(zero_config),
        mixed_precision=spec.mixed_precision,
        gradient_accumulation_steps=spec.grad_accum,
        **dict(accelerator_kwargs or {}),
    )
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    losses: list[float] = []
    norms: list[float] = []
    for x in spec.batches(world_size).for_rank(rank):
        with accelerator.accumulate(model):
            loss = model(input_ids=x, labels=x).loss
            accelerator.backward(loss)  # divides by gradient_accumulation_steps
            if accelerator.sync_gradients and spec.max_grad_norm is not None:
                norms.append(
                    float(accelerator.clip_grad_norm_(model.parameters(), spec.max_grad_norm))
                )
            optimizer.step()  # a no-op inside an accumulation window, as in Accelerate
            optimizer.zero_grad()
        losses.append(global_mean(loss))
    state = accelerator.get_state_dict(model)
    state_dict = {k: v.detach().to("cpu", copy=True) for k, v in (state or {}).items()}
    accelerator.wait_for_everyone()
    return TrainResult(losses=losses, grad_norms=norms, state_dict=state_dict)


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """How close two runs of one spec must be; see ``tolerance``."""

    loss_rtol: float
    """Per-micro-step losses (and clip norms): ``|a - e| <= loss_rtol * |e|``."""
    rtol: float
    atol: float
    """Final weights, element-wise: ``|a - e| <= atol + rtol * |e|``."""
    update_cos: float | None = None
    """If set, per tensor with Δ = final - initial: ``cos(Δa, Δe) >= update_cos`` and
    ``||Δa|| / ||Δe||`` within ``[1/update_norm_ratio, update_norm_ratio]``."""
    update_norm_ratio: float = 2.0


def train_accel_zero(
    spec: TrainSpec,
    world_size: int,
    zero_config: Mapping[str, Any],
    *,
    accelerator_kwargs: Mapping[str, Any] | None = None,
    timeout: float = 240.0,
    pool: RankPool | None = None,
) -> TrainResult:
    """accel_zero on ``world_size`` ranks; rank 0's result (its full state dict)."""
    results: list[TrainResult] = run_ranks(
        train_accel_zero_rank,
        world_size,
        spec,
        dict(zero_config),
        dict(accelerator_kwargs or {}),
        timeout=timeout,
        pool=pool,
    )
    for rank, res in enumerate(results[1:], start=1):
        if res.losses != results[0].losses:
            raise AssertionError(
                f"accel_zero rank {rank} saw losses {res.losses}, rank 0 {results[0].losses}"
            )
    return results[0]


def tolerance(spec: TrainSpec) -> Tolerance:
    """Tolerance for two runs of ``spec`` that split or reduce the batch differently.

    fp32 (measured on the tiny models, single process vs DDP at world size 2
    and 4, lr 1e-3, 3 steps): losses agree to ~2e-7 relative; weights to
    ~8e-7 absolute. Weights cannot be held to 1e-6 *element-wise relative*:
    AdamW's first step is ~lr * sign(grad), so a gradient that is pure
    rounding noise (GPT-2's key bias has a true gradient of 0) moves by a
    layout-dependent ~lr * grad/eps. Hence rtol 1e-6 plus torch.testing's fp32
    atol of 1e-5 for weights, rtol 1e-6 and no atol for losses.

    bf16: 8 mantissa bits make many of AdamW's sign-like updates differ
    element-wise (measured: up to the full lr * steps), more so when one side
    autocasts fp32 weights and the other computes with bf16 copies (accel_zero),
    so weights are checked per tensor on the *update* Δ = final - initial:
    direction ``cos(Δa, Δe) >= 0.5`` and size ``||Δa|| / ||Δe||`` in [0.5, 2]
    (measured accel_zero vs DDP: cos >= 0.98, size 0.998-1.013). That catches
    an update that is missing (size 0) or reversed (cos -1); losses within
    1e-2 relative (measured 2e-5 autocast vs autocast, 3e-5 accel_zero).

    For two runs with the *same* per-rank arithmetic (accel_zero vs DDP at
    world size 2, where a + b is the same sum in any order), pass
    ``rtol=0, atol=0`` to ``assert_parity`` to demand bit equality.
    """
    if spec.mixed_precision == "bf16":
        return Tolerance(loss_rtol=1e-2, rtol=0.0, atol=float("inf"), update_cos=0.5)
    return Tolerance(loss_rtol=1e-6, rtol=1e-6, atol=1e-5)


def _worst(expected: Tensor, actual: Tensor, rtol: float, atol: float) -> float:
    """Largest |a - e| / (atol + rtol * |e|): <= 1 means within tolerance."""
    e, a = expected.double(), actual.double()
    if e.numel() == 0:
        return 0.0
    excess = (a - e).abs() - (atol + rtol * e.abs())
    if float(excess.max()) <= 0.0:
        return 0.0
    return float(((a - e).abs() / (atol + rtol * e.abs())).max())


def _check_update(
    prefix: str, key: str, initial: Tensor, expected: Tensor, actual: Tensor, tol: Tolerance
) -> None:
    assert tol.update_cos is not None
    d_exp = (expected.double() - initial.double()).flatten()
    d_act = (actual.double() - initial.double()).flatten()
    n_exp, n_act = float(d_exp.norm()), float(d_act.norm())
    if n_exp < 1e-12:  # not updated (frozen, or unused on every step): must stay put
        if n_act > 1e-6:
            raise AssertionError(f"{prefix}{key}: moved by {n_act:.3e}, expected no update")
        return
    ratio = n_act / n_exp
    cos = float(d_exp @ d_act) / (n_exp * n_act) if n_act > 0 else 0.0
    if cos < tol.update_cos or not 1 / tol.update_norm_ratio <= ratio <= tol.update_norm_ratio:
        raise AssertionError(
            f"{prefix}{key}: update differs: cos {cos:.3f} (need >= {tol.update_cos}), size "
            f"ratio {ratio:.3f} (need {1 / tol.update_norm_ratio:g}..{tol.update_norm_ratio:g})"
        )


def assert_parity(
    expected: TrainResult,
    actual: TrainResult,
    spec: TrainSpec,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    label: str = "",
) -> None:
    """Losses, clip norms and final weights of ``actual`` match ``expected``.

    Tolerances come from ``tolerance(spec)``; ``rtol``/``atol`` override the
    weight and loss tolerances (``rtol=0, atol=0``: bit-equal). The message
    names the micro-step or state-dict key that is furthest off.
    """
    tol = tolerance(spec)
    loss_rtol = tol.loss_rtol if rtol is None else rtol
    loss_atol = 0.0 if atol is None else atol
    w_rtol = tol.rtol if rtol is None else rtol
    w_atol = tol.atol if atol is None else atol
    prefix = f"{label}: " if label else ""
    for name, exp_list, act_list in (
        ("loss", expected.losses, actual.losses),
        ("grad norm", expected.grad_norms, actual.grad_norms),
    ):
        if len(exp_list) != len(act_list):
            raise AssertionError(f"{prefix}{len(act_list)} {name}es, expected {len(exp_list)}")
        for i, (e, a) in enumerate(zip(exp_list, act_list, strict=True)):
            if not (math.isfinite(a) and abs(a - e) <= loss_atol + loss_rtol * abs(e)):
                raise AssertionError(
                    f"{prefix}{name} at micro-step {i}: {a!r} != expected {e!r} "
                    f"(rtol={loss_rtol}, atol={loss_atol}); expected {exp_list}, got {act_list}"
                )
    missing = sorted(set(expected.state_dict) - set(actual.state_dict))
    extra = sorted(set(actual.state_dict) - set(expected.state_dict))
    if missing or extra:
        raise AssertionError(
            f"{prefix}state dict keys differ: missing {missing}, unexpected {extra}"
        )
    initial = spec.build_model().state_dict() if tol.update_cos is not None else {}
    worst_key, worst = "", 0.0
    for key, exp in sorted(expected.state_dict.items()):
        act = actual.state_dict[key]
        if act.shape != exp.shape:
            raise AssertionError(f"{prefix}{key}: shape {tuple(act.shape)} != {tuple(exp.shape)}")
        if not torch.isfinite(act.float()).all():
            raise AssertionError(f"{prefix}{key}: non-finite values")
        w = _worst(exp, act, w_rtol, w_atol)
        if w > worst:
            worst_key, worst = key, w
        if tol.update_cos is not None and key in initial and exp.is_floating_point():
            _check_update(prefix, key, initial[key], exp, act, tol)
    if worst > 1.0:
        exp, act = expected.state_dict[worst_key], actual.state_dict[worst_key]
        diff = (act.double() - exp.double()).abs()
        raise AssertionError(
            f"{prefix}final weights differ beyond rtol={w_rtol}, atol={w_atol}: worst key "
            f"{worst_key!r} (max abs diff {float(diff.max()):.3e}, {worst:.1f}x the tolerance)"
        )
