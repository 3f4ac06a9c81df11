"""The Accelerate contract (issue 7): the loops users write train exactly like DDP.

- Every ``zero_grad`` form (``optimizer.zero_grad()`` with either ``set_to_none``,
  ``model.zero_grad()``, ``accelerator.zero_grad()``, a loop that mixes them, a loop
  without ``accumulate``, and one that never clears gradients) at stages 1, 2 and 3,
  with accumulation 1 and 4 and clipping on and off, against DDP running the same loop.
- Gradients you can read: ZeRO-1's ``param.grad`` equals DDP's after every micro-step
  (the local sum under ``no_sync``, the average after a synchronising backward);
  ZeRO-2/3's ``get_full_grad`` / ``get_local_grad`` / ``get_grad_norms`` equal DDP's
  averaged gradient; reading outside the valid window is an error that says when.
- Mixed precision with Accelerate's meaning: parameters stay fp32 under bf16 (bf16 is only
  the gather and compute dtype), model state is 16 bytes per parameter / N with Adam, and a
  model made only of persistent parameters trains like Accelerate's DDP with autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tests.distributed.harness import run_ranks
from tests.distributed.reference import (
    TrainResult,
    TrainSpec,
    assert_parity,
    global_mean,
)

STAGES = (1, 2, 3)
FORMS = ("optimizer", "optimizer_keep", "model", "accelerator", "mixed", "no_accumulate", "never")
"""How a loop clears gradients (see ``_accel_zero_run``)."""


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _ddp_run(rank: int, world: int, spec: TrainSpec, *, clear: bool) -> TrainResult:
    """DDP with Accelerate's loop semantics; ``clear=False``: gradients are never zeroed."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = spec.build_model()
    ddp = DDP(model)
    optimizer = spec.build_optimizer(ddp.parameters())
    losses, norms = [], []
    for i, x in enumerate(spec.batches(world).for_rank(rank)):
        boundary = (i + 1) % spec.grad_accum == 0
        with contextlib.nullcontext() if boundary else ddp.no_sync():
            with spec.autocast():
                loss = ddp(input_ids=x, labels=x).loss
            (loss / spec.grad_accum).backward()
        losses.append(global_mean(loss))
        if boundary:
            if spec.max_grad_norm is not None:
                norms.append(float(nn.utils.clip_grad_norm_(ddp.parameters(), spec.max_grad_norm)))
            optimizer.step()
            if clear:
                optimizer.zero_grad()
    result = TrainResult(losses=losses, grad_norms=norms, state_dict=_cpu_state(model.state_dict()))
    del ddp, optimizer  # see [Note: gloo teardown deadlock] in accel_zero/comm.py
    return result


def _accel_zero_run(
    rank: int, world: int, spec: TrainSpec, zero: dict[str, Any], form: str
) -> TrainResult:
    """``spec`` through accel_zero with the gradient-clearing ``form``.

    optimizer / optimizer_keep: the prepared ``optimizer.zero_grad()`` inside ``accumulate``
    (a no-op mid-accumulation, as in Accelerate), set_to_none True / False. model,
    accelerator: ``model.zero_grad()`` / ``accelerator.zero_grad()`` after each step (the HF
    Trainer's loop). mixed: the three in turn. no_accumulate: no ``accumulate`` and no
    ``no_sync``; the loss is divided by hand and the loop steps every ``grad_accum``
    micro-steps. never: gradients are never cleared (they add up, as in torch).
    """
    from accel_zero import Accelerator

    manual = form in ("no_accumulate", "never")
    accelerator = Accelerator(
        zero_config=zero,
        mixed_precision=spec.mixed_precision,
        gradient_accumulation_steps=1 if manual else spec.grad_accum,
    )
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    clearers: list[Callable[[], None]] = [
        model.zero_grad,
        optimizer.zero_grad,
        accelerator.zero_grad,
    ]
    losses, norms = [], []
    for i, x in enumerate(spec.batches(world).for_rank(rank)):
        boundary = (i + 1) % spec.grad_accum == 0
        ctx = contextlib.nullcontext() if manual else accelerator.accumulate(model)
        with ctx:
            loss = model(input_ids=x, labels=x).loss
            accelerator.backward(loss / spec.grad_accum if manual else loss)
            if boundary and spec.max_grad_norm is not None:
                norms.append(
                    float(accelerator.clip_grad_norm_(model.parameters(), spec.max_grad_norm))
                )
            if not manual or boundary:
                optimizer.step()
            if form == "optimizer":
                optimizer.zero_grad()
            elif form == "optimizer_keep":
                optimizer.zero_grad(set_to_none=False)
        if boundary:
            if form == "model":
                model.zero_grad()
            elif form == "accelerator":
                accelerator.zero_grad()
            elif form in ("mixed", "no_accumulate"):
                clearers[(i // spec.grad_accum) % len(clearers)]()
        losses.append(global_mean(loss))
    state = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    return TrainResult(losses=losses, grad_norms=norms, state_dict=_cpu_state(state or {}))


def _forms_body(rank: int, world: int, spec: TrainSpec) -> dict[str, TrainResult]:
    results: dict[str, TrainResult] = {}
    for stage in STAGES:
        zero = {"stage": stage, "param_persistence_threshold": 0}
        for form in FORMS:
            results[f"stage{stage}-{form}"] = _accel_zero_run(rank, world, spec, zero, form)
    results["ddp"] = _ddp_run(rank, world, spec, clear=True)
    results["ddp-never"] = _ddp_run(rank, world, spec, clear=False)
    return results if rank == 0 else {}


@pytest.mark.parametrize(("accum", "clip"), [(1, None), (1, 0.5), (4, None), (4, 0.5)])
def test_every_zero_grad_form_trains_like_ddp(
    rank_pool: Any, accum: int, clip: float | None
) -> None:
    spec = TrainSpec(model="gpt2", steps=3, grad_accum=accum, max_grad_norm=clip)
    results = run_ranks(_forms_body, 2, spec, timeout=600, pool=rank_pool(2))[0]
    # The never-clearing loop really differs (else the comparison below proves nothing).
    assert results["ddp-never"].losses[-1] != results["ddp"].losses[-1]
    for stage in STAGES:
        for form in FORMS:
            expected = results["ddp-never" if form == "never" else "ddp"]
            label = f"stage {stage}, {form}, accum {accum}, clip {clip}"
            assert_parity(expected, results[f"stage{stage}-{form}"], spec, label=label)


def _grads_body(rank: int, world: int, stage: int) -> dict[str, Any]:
    """Per micro-step gradients of DDP and accel_zero on the same data (accumulation 2)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from accel_zero import Accelerator

    spec = TrainSpec(model="llama", steps=2, grad_accum=2)
    batches = spec.batches(world).for_rank(rank)
    accelerator = Accelerator(  # creates the process group DDP uses too
        zero_config={"stage": stage, "param_persistence_threshold": 0},
        gradient_accumulation_steps=spec.grad_accum,
    )

    model = spec.build_model()
    ddp = DDP(model)
    optimizer = spec.build_optimizer(ddp.parameters())
    expected: list[dict[str, torch.Tensor]] = []
    for i, x in enumerate(batches):
        boundary = (i + 1) % spec.grad_accum == 0
        with contextlib.nullcontext() if boundary else ddp.no_sync():
            (ddp(input_ids=x, labels=x).loss / spec.grad_accum).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if boundary:
            optimizer.step()
            optimizer.zero_grad()
    del ddp, optimizer

    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    named = dict(model.named_parameters())
    try:
        accelerator.get_full_grad(next(iter(named.values())))
        early = "no error"
    except RuntimeError as exc:
        early = str(exc)
    got: list[dict[str, Any]] = []
    for x in batches:
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=x, labels=x).loss)
            step: dict[str, Any] = {"sync": accelerator.sync_gradients}
            if stage == 1:
                step["param.grad"] = {n: p.grad.clone() for n, p in named.items()}
            step["full"] = {n: accelerator.get_full_grad(p) for n, p in named.items()}
            step["local"] = {n: accelerator.get_local_grad(p).clone() for n, p in named.items()}
            step["norms"] = accelerator.get_grad_norms(model)
            optimizer.step()
            optimizer.zero_grad()
        got.append(step)
    try:
        accelerator.get_local_grad(next(iter(named.values())))
        late = "no error"
    except RuntimeError as exc:
        late = str(exc)
    return {"expected": expected, "got": got, "early": early, "late": late}


@pytest.mark.parametrize("stage", STAGES)
def test_gradients_are_readable_and_equal_to_ddp(rank_pool: Any, stage: int) -> None:
    out = run_ranks(_grads_body, 2, stage, timeout=300, pool=rank_pool(2))
    for rank, res in enumerate(out):
        for i, (exp, step) in enumerate(zip(res["expected"], res["got"], strict=True)):
            where = f"rank {rank}, stage {stage}, micro-step {i}"
            if stage == 1:
                # DDP's param.grad after every micro-step: the local sum, then the average.
                for name, grad in exp.items():
                    torch.testing.assert_close(
                        step["param.grad"][name], grad, rtol=1e-6, atol=1e-7, msg=where + name
                    )
            if not step["sync"]:
                continue
            for name, grad in exp.items():
                torch.testing.assert_close(
                    step["full"][name], grad, rtol=1e-6, atol=1e-7, msg=f"{where} full {name}"
                )
                rows = -(-grad.shape[0] // 2) if grad.dim() else 1
                mine = grad[rank * rows : (rank + 1) * rows] if grad.dim() else grad.view(1)
                mine = mine[: max(0, min(rows, (grad.shape[0] if grad.dim() else 1) - rank * rows))]
                torch.testing.assert_close(
                    step["local"][name], mine, rtol=1e-6, atol=1e-7, msg=f"{where} local {name}"
                )
                torch.testing.assert_close(
                    step["norms"][name],
                    grad.norm(),
                    rtol=1e-5,
                    atol=1e-7,
                    msg=f"{where} norm {name}",
                )
        for msg in (res["early"], res["late"]):
            assert f"accel_zero rank {rank}" in msg and "valid between" in msg, msg


def _dtype_body(rank: int, world: int) -> dict[str, Any]:
    from accel_zero import Accelerator
    from accel_zero.estimator import estimate, shapes_from_module
    from tests.distributed.models import build_model, make_batches

    accelerator = Accelerator(
        mixed_precision="bf16", zero_config={"stage": 3, "param_persistence_threshold": 100}
    )
    model = build_model("gpt2", seed=0)
    shapes = shapes_from_module(model)
    n_params = shapes.numel
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    seen: dict[str, Any] = {"between": {p.dtype for p in model.parameters()}}
    compute: set[torch.dtype] = set()
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args: compute.update(p.dtype for p in mod.parameters(recurse=False))
        )
        for m in model.modules()
    ]
    x = make_batches(1, 1, world, 2, 16, 96).for_rank(rank)[0]
    accelerator.backward(model(input_ids=x, labels=x).loss)
    optimizer.step()
    for h in handles:
        h.remove()
    seen["compute"] = compute
    report = accelerator.memory_report()
    with accelerator.gathered_parameters(model):
        seen["gathered"] = {p.dtype for p in model.parameters()}
    seen["state_dict"] = {v.dtype for v in (accelerator.get_state_dict(model) or {}).values()}
    (row,) = [
        r
        for r in estimate(
            shapes, world_size=world, mixed_precision="bf16", param_persistence_threshold=100
        )
        if (r.stage, r.offload_optimizer, r.offload_param) == (3, "none", "none")
    ]
    seen["model_state_bytes"] = report["model_state_bytes"]
    seen["estimated"] = row.total_bytes
    seen["n_params"] = n_params
    seen["n_tensors"] = len(shapes.shapes)
    seen["persistent"] = sum(
        p.numel() for p in build_model("gpt2", seed=0).parameters() if p.numel() < 100
    )
    return seen


def test_parameters_stay_fp32_under_bf16_and_state_is_16_bytes_per_param_over_n(
    rank_pool: Any,
) -> None:
    for rank, seen in enumerate(run_ranks(_dtype_body, 2, timeout=300, pool=rank_pool(2))):
        assert seen["between"] == {torch.float32}, (rank, seen["between"])
        # Gathered units compute in bf16; persistent parameters stay fp32 under autocast.
        assert seen["compute"] == {torch.bfloat16, torch.float32}, seen["compute"]
        assert seen["gathered"] == {torch.float32}
        if rank == 0:
            assert seen["state_dict"] == {torch.float32}
        # fp32 shard (= master) + fp32 grad shard + Adam m, v: 16 bytes per sharded
        # parameter / N; persistent parameters stay whole with whole gradients, as under DDP
        # (4 + 4 + 8/N bytes); Adam's step counts 4 bytes per tensor. Measured equal to the
        # estimate, to the byte.
        assert seen["model_state_bytes"] == seen["estimated"], seen
        n, p, world = seen["n_params"], seen["persistent"], 2
        bound = 16 * (n - p) / world + (8 + 8 / world) * p + 4 * seen["n_tensors"]
        assert seen["model_state_bytes"] <= bound * 1.01, (seen["model_state_bytes"], bound)


def _persistent_only_body(rank: int, world: int, spec: TrainSpec) -> dict[str, TrainResult]:
    from tests.distributed.reference import train_accel_zero_rank, train_ddp_in_group

    # Every parameter under the persistence threshold: nothing is gathered, everything is
    # fp32 under Accelerate's autocast, exactly as DDP with mixed_precision="bf16".
    zero = {"stage": 3, "param_persistence_threshold": "1G"}
    out = {"accel_zero": train_accel_zero_rank(rank, world, spec, zero)}
    out["ddp"] = train_ddp_in_group(rank, world, spec)
    return out if rank == 0 else {}


def test_a_model_of_persistent_parameters_trains_like_accelerate_ddp_in_bf16(
    rank_pool: Any,
) -> None:
    spec = TrainSpec(model="gpt2", mixed_precision="bf16", grad_accum=2, max_grad_norm=0.5)
    res = run_ranks(_persistent_only_body, 2, spec, timeout=300, pool=rank_pool(2))[0]
    assert_parity(res["ddp"], res["accel_zero"], spec, rtol=1e-6, atol=1e-6)


def _twice_body(rank: int, world: int) -> dict[str, Any]:
    """A block used twice per forward, released between its uses, under bf16: per-parameter
    gradient norms after one backward, from accel_zero and from DDP on the same data."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from accel_zero import Accelerator
    from tests.distributed.models import build_model, make_batches

    accelerator = Accelerator(
        mixed_precision="bf16",
        zero_config={
            "stage": 3,
            "param_persistence_threshold": 0,
            "max_reuse_distance": 0,  # released after its first use, gathered again
            "reduce_bucket_size": 1,  # each unit reduced alone, as soon as it completes
        },
    )
    x = make_batches(5, 1, world, 2, 16, 96).for_rank(rank)[0]
    model = build_model("twice", seed=0)
    ddp = DDP(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ddp(input_ids=x, labels=x).loss.backward()
    expected = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
    del ddp
    model = build_model("twice", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.backward(model(input_ids=x, labels=x).loss)
    leaked = [n for n, p in model.named_parameters() if p.grad is not None]
    got = {n: float(v) for n, v in accelerator.get_grad_norms(model).items()}
    return {"expected": expected, "got": got, "leaked": leaked}


def test_a_unit_used_twice_keeps_its_whole_gradient_under_bf16(rank_pool: Any) -> None:
    """Releasing a unit between two uses must not split its gradient (a placeholder of
    another dtype would reset torch's accumulator: [Note: placeholder dtype])."""
    for res in run_ranks(_twice_body, 2, timeout=300, pool=rank_pool(2)):
        assert res["leaked"] == [], res["leaked"]  # every gradient was reduced
        for name, norm in res["expected"].items():
            # bf16 gathers vs fp32 weights under autocast: the same gradient within bf16
            # resolution; a lost use halves the norm of the shared block's gradients.
            assert abs(res["got"][name] - norm) <= 0.03 * norm + 1e-6, (name, res)


def _checkpointing_body(rank: int, world: int, stage: int) -> dict[str, TrainResult]:
    """transformers' gradient checkpointing (activations recomputed in backward, where the
    engine gathers units on demand) against DDP running the same checkpointed model."""
    from tests.distributed.reference import train_accel_zero_rank, train_ddp_in_group

    spec = TrainSpec(
        model="llama", steps=2, grad_accum=2, max_grad_norm=1.0, gradient_checkpointing=True
    )
    zero = {"stage": stage, "param_persistence_threshold": 0, "max_reuse_distance": 0}
    out = {"accel_zero": train_accel_zero_rank(rank, world, spec, zero)}
    out["ddp"] = train_ddp_in_group(rank, world, spec)
    return out if rank == 0 else {}


@pytest.mark.parametrize("stage", [2, 3])
def test_gradient_checkpointing_trains_like_ddp(rank_pool: Any, stage: int) -> None:
    res = run_ranks(_checkpointing_body, 2, stage, timeout=300, pool=rank_pool(2))[0]
    assert_parity(res["ddp"], res["accel_zero"], TrainSpec(model="llama"), label=f"stage {stage}")
