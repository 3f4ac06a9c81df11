"""Parity of accel_zero stages 1/2/3 with DDP on the same seed and data.

Each case spawns one process group that trains the DDP reference and then
accel_zero at every stage on the same micro-batches; the test process compares
per-step losses, clip norms and final full weights (fp32 within 1e-6 relative,
bf16 within bf16 tolerance: see ``reference.tolerance``).

The grid covers every stage in every case; world size 2 takes every
combination of precision × accumulation × clipping, world sizes 1 and 4 the
corners.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.distributed.harness import run_ranks
from tests.distributed.reference import (
    TrainResult,
    TrainSpec,
    assert_parity,
    train_accel_zero_rank,
    train_ddp_in_group,
)

STAGES = (1, 2, 3)


def _body(rank: int, world_size: int, spec: TrainSpec, extra: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, TrainResult] = {}
    bf16 = spec.mixed_precision == "bf16"
    for stage in STAGES:
        # Threshold 0: every parameter is sharded, the hardest case for the layout.
        cfg = {"stage": stage, "param_persistence_threshold": 0, **extra}
        if bf16:
            # fp32 parameters under autocast: Accelerate's own bf16, exactly what DDP runs.
            cfg["param_dtype"] = "fp32"
        results[f"stage{stage}"] = train_accel_zero_rank(rank, world_size, spec, cfg)
    if bf16:
        # The default: parameters stored, gathered and computed in bf16 (fp32 masters).
        cfg = {"stage": 3, "param_persistence_threshold": 0, **extra}
        results["stage3-bf16-params"] = train_accel_zero_rank(rank, world_size, spec, cfg)
    # DDP in the group the Accelerator made: one group serves the whole case.
    results["ddp"] = train_ddp_in_group(rank, world_size, spec)
    return results if rank == 0 else {}


def _check_model_update(
    expected: TrainResult,
    actual: TrainResult,
    spec: TrainSpec,
    *,
    loss_rtol: float,
    update_rtol: float,
    label: str,
) -> None:
    """Losses within ``loss_rtol`` and the model-wide update within ``update_rtol`` of DDP's.

    For bf16, where element-wise weight checks are meaningless: AdamW turns a
    rounding flip in a near-zero gradient into an lr-sized move of that element,
    so a tensor like GPT-2's attention bias can differ by ~lr per element while
    the step as a whole is the same. ``reference.assert_parity`` checks each
    tensor's update direction and size on top.
    """
    for i, (e, a) in enumerate(zip(expected.losses, actual.losses, strict=True)):
        assert abs(a - e) <= loss_rtol * abs(e), f"{label}: loss {i}: {a} vs {e}"
    initial = spec.build_model().state_dict()
    err = total = 0.0
    for key, exp in expected.state_dict.items():
        if key in initial and exp.is_floating_point():
            d_exp = exp.double() - initial[key].double()
            d_act = actual.state_dict[key].double() - initial[key].double()
            err += float((d_act - d_exp).pow(2).sum())
            total += float(d_exp.pow(2).sum())
    assert err**0.5 <= update_rtol * total**0.5, f"{label}: update error {err**0.5} of {total**0.5}"


def _check(
    pool: Any, world_size: int, spec: TrainSpec, extra: dict[str, Any] | None = None
) -> None:
    results = run_ranks(_body, world_size, spec, extra or {}, timeout=300, pool=pool(world_size))[0]
    label = (
        f"world {world_size}, {spec.mixed_precision}, accum {spec.grad_accum}, "
        f"clip {spec.max_grad_norm}"
    )
    for stage in STAGES:
        name = f"stage {stage}, {label}"
        assert_parity(results["ddp"], results[f"stage{stage}"], spec, label=name)
        if spec.mixed_precision == "bf16":
            # fp32 parameters under autocast: DDP's arithmetic up to the order gradients
            # are summed in (stages 2/3 reduce every micro-batch, DDP once per step).
            _check_model_update(
                results["ddp"], results[f"stage{stage}"], spec,
                loss_rtol=1e-4, update_rtol=0.05, label=f"{name} (param_dtype fp32)",
            )  # fmt: skip
    if spec.mixed_precision == "bf16":
        # bf16 parameters: every weight is rounded to bf16 before use, DDP's only inside
        # autocast ops; the same losses within bf16 resolution and the same step overall.
        name = f"stage 3 bf16 params, {label}"
        assert_parity(results["ddp"], results["stage3-bf16-params"], spec, label=name)
        _check_model_update(
            results["ddp"], results["stage3-bf16-params"], spec,
            loss_rtol=2e-2, update_rtol=0.25, label=name,
        )  # fmt: skip


GRID_W2 = [(mp, accum, clip) for mp in ("no", "bf16") for accum in (1, 4) for clip in (None, 0.5)]


@pytest.mark.parametrize(("mp", "accum", "clip"), GRID_W2)
def test_parity_world2(rank_pool: Any, mp: str, accum: int, clip: float | None) -> None:
    spec = TrainSpec(model="gpt2", mixed_precision=mp, grad_accum=accum, max_grad_norm=clip)
    _check(rank_pool, 2, spec)


@pytest.mark.parametrize(
    ("world_size", "mp", "accum", "clip"),
    [(1, "no", 4, 0.5), (1, "bf16", 1, None), (4, "no", 1, None), (4, "bf16", 4, 0.5)],
)
def test_parity_world_1_and_4(
    rank_pool: Any, world_size: int, mp: str, accum: int, clip: float | None
) -> None:
    spec = TrainSpec(model="gpt2", mixed_precision=mp, grad_accum=accum, max_grad_norm=clip)
    _check(rank_pool, world_size, spec)


@pytest.mark.parametrize("model", ["llama", "frozen", "twice", "sometimes"])
def test_parity_special_models(rank_pool: Any, model: str) -> None:
    """Frozen params, a module used twice per forward, one used only on some steps, Llama."""
    spec = TrainSpec(model=model, steps=4, max_grad_norm=1.0)
    _check(rank_pool, 2, spec)


def test_parity_prefetch_and_reuse_settings(rank_pool: Any) -> None:
    """No prefetch and no reuse (re-gather every unit in backward) change nothing numerically."""
    spec = TrainSpec(model="gpt2", grad_accum=2)
    _check(rank_pool, 2, spec, {"prefetch_bucket_size": 0, "max_reuse_distance": 0})
