"""save_state / load_state on real ranks (issue 10): exact resume, resharding, refusal, export.

- Exact resume: stopping after a checkpoint and continuing in fresh objects gives the
  losses, final weights and random draws of the uninterrupted run, bit for bit (stages 1-3,
  fp32 and bf16, with a learning-rate scheduler, accumulation and clipping).
- Resharding: a checkpoint written by 2 ranks continues on 1 and on 4 ranks (same global
  batch): the same losses and weights within fp32 tolerance.
- Another model's checkpoint is refused, naming the file.
- ``accel-zero export`` of a real checkpoint loads with ``from_pretrained`` and equals
  ``get_state_dict``.

The storage layer (format, damaged files, kill -9 during a save) has its own tests in
tests/unit/test_checkpoint_format.py and tests/integration/test_checkpoint_crash.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.reference import TrainResult, TrainSpec, assert_parity, global_mean

GLOBAL_ROWS = 4
"""Rows of every global micro-batch, whatever the world size (so runs reshard cleanly)."""
MICRO_STEPS = 8
SAVE_AFTER = 3
"""The checkpoint is taken after this micro-step (an optimizer step: accumulation 2)."""


def _spec(mixed: str, world: int) -> TrainSpec:
    return TrainSpec(
        model="gpt2",
        steps=MICRO_STEPS // 2,
        grad_accum=2,
        micro_batch=GLOBAL_ROWS // world,
        mixed_precision=mixed,  # type: ignore[arg-type]
        max_grad_norm=1.0,
    )


def _run(
    rank: int,
    world: int,
    spec: TrainSpec,
    zero: dict[str, Any],
    micro: range,
    *,
    save: str | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """Train the given micro-steps in fresh objects; optionally save after SAVE_AFTER or
    load before starting."""
    from accel_zero import Accelerator

    accelerator = Accelerator(
        zero_config=zero,
        mixed_precision=spec.mixed_precision,
        gradient_accumulation_steps=spec.grad_accum,
    )
    torch.manual_seed(123)
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.1 * s))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if resume is not None:
        accelerator.load_state(resume)
    batches = spec.batches(world).for_rank(rank)
    losses, draws = [], []
    for i in micro:
        x = batches[i]
        with accelerator.accumulate(model):
            loss = model(input_ids=x, labels=x).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), spec.max_grad_norm or 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(global_mean(loss))
        draws.append(float(torch.rand(())))  # the RNG state must resume too
        if save is not None and i == SAVE_AFTER:
            accelerator.save_state(save)
    state = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    return {
        "losses": losses,
        "draws": draws,
        "state": {k: v.detach().cpu().clone() for k, v in (state or {}).items()},
    }


def _exact_body(rank: int, world: int, stage: int, mixed: str, folder: str) -> dict[str, Any]:
    spec = _spec(mixed, world)
    zero = {"stage": stage, "param_persistence_threshold": 100}
    ckpt = str(Path(folder) / f"stage{stage}-{mixed}")
    whole = _run(rank, world, spec, zero, range(MICRO_STEPS))
    _run(rank, world, spec, zero, range(SAVE_AFTER + 1), save=ckpt)
    resumed = _run(rank, world, spec, zero, range(SAVE_AFTER + 1, MICRO_STEPS), resume=ckpt)
    return {"whole": whole, "resumed": resumed}


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_resume_is_bit_exact(rank_pool: Any, tmp_path: Path, stage: int, mixed: str) -> None:
    out = run_ranks(_exact_body, 2, stage, mixed, str(tmp_path), timeout=300, pool=rank_pool(2))
    for rank, res in enumerate(out):
        whole, resumed = res["whole"], res["resumed"]
        assert resumed["losses"] == whole["losses"][SAVE_AFTER + 1 :], (rank, whole, resumed)
        assert resumed["draws"] == whole["draws"][SAVE_AFTER + 1 :], rank
        for key, value in whole["state"].items():
            assert torch.equal(resumed["state"][key], value), (rank, key)
    assert out[0]["whole"]["state"], "rank 0 returns the full state dict"


def _save_body(rank: int, world: int, folder: str, model: str = "gpt2") -> dict[str, Any]:
    spec = _spec("no", world)
    if model != "gpt2":
        spec = TrainSpec(model=model, steps=spec.steps, grad_accum=2, micro_batch=2)
    zero = {"stage": 3, "param_persistence_threshold": 100}
    return _run(rank, world, spec, zero, range(MICRO_STEPS), save=folder)


def _resume_body(rank: int, world: int, folder: str) -> dict[str, Any]:
    spec = _spec("no", world)
    zero = {"stage": 3, "param_persistence_threshold": 100}
    return _run(rank, world, spec, zero, range(SAVE_AFTER + 1, MICRO_STEPS), resume=folder)


@pytest.mark.parametrize("new_world", [1, 4])
def test_a_checkpoint_of_two_ranks_continues_on_another_world_size(
    rank_pool: Any, tmp_path: Path, new_world: int
) -> None:
    ckpt = str(tmp_path / "ckpt")
    whole = run_ranks(_save_body, 2, ckpt, timeout=300, pool=rank_pool(2))[0]
    resumed = run_ranks(_resume_body, new_world, ckpt, timeout=300, pool=rank_pool(new_world))[0]
    # Losses as tight as two world sizes allow (fp32: 1e-6 relative, see reference.tolerance).
    expected = TrainResult(losses=whole["losses"][SAVE_AFTER + 1 :], grad_norms=[], state_dict={})
    actual = TrainResult(losses=resumed["losses"], grad_norms=[], state_dict={})
    assert_parity(expected, actual, _spec("no", 2), label=f"2 ranks -> {new_world}")
    # Weights: 1 or 4 ranks sum gradients in another order than 2, and AdamW moves an element
    # whose gradient is rounding noise by up to ~lr (reference.tolerance): each weight within
    # 0.1 lr of the uninterrupted run, and the update since the checkpoint within 10%.
    # Measured (2 -> 1): 3% from the uninterrupted 2-rank run, while an uninterrupted 1-rank
    # run ends 26% away from it (and its losses differ at 1e-4): resharding adds nothing but
    # the arithmetic order of the new world size.
    at_save = run_ranks(_state_at_checkpoint, 1, ckpt, timeout=300, pool=rank_pool(1))[0]
    err = total = 0.0
    for key, exp in whole["state"].items():
        act = resumed["state"][key]
        torch.testing.assert_close(act, exp, rtol=0, atol=1e-4, msg=f"{new_world} ranks: {key}")
        start = at_save[key].double()
        err += float((act.double() - exp.double()).pow(2).sum())
        total += float((exp.double() - start).pow(2).sum())
    assert total > 0 and err**0.5 <= 0.1 * total**0.5, (err**0.5, total**0.5)


def _wrong_model_body(rank: int, world: int, folder: str) -> str:
    from accel_zero import Accelerator
    from tests.distributed.models import build_model

    accelerator = Accelerator(zero_config={"stage": 3})
    model = build_model("llama", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    try:
        accelerator.load_state(folder)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_another_models_checkpoint_is_refused_naming_the_file(
    rank_pool: Any, tmp_path: Path
) -> None:
    ckpt = str(tmp_path / "gpt2-ckpt")
    run_ranks(_save_body, 2, ckpt, timeout=300, pool=rank_pool(2))
    for msg in run_ranks(_wrong_model_body, 2, ckpt, timeout=300, pool=rank_pool(2)):
        assert "another model" in msg and "gpt2-ckpt" in msg and "GPT2LMHeadModel" in msg, msg


def test_export_of_a_checkpoint_loads_with_from_pretrained(rank_pool: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from accel_zero import cli

    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    saved = run_ranks(_save_body, 2, str(ckpt), timeout=300, pool=rank_pool(2))[0]
    # The checkpoint holds the state after SAVE_AFTER; rebuild that reference by resuming
    # on one rank and running no step.
    assert cli.main(["export", str(ckpt), str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    at_save = run_ranks(_state_at_checkpoint, 1, str(ckpt), timeout=300, pool=rank_pool(1))[0]
    assert set(at_save) <= set(reloaded) | {"lm_head.weight"}
    for key, value in at_save.items():
        assert torch.equal(reloaded[key], value), key
    assert saved["state"], "the saving run produced a state dict"


def _state_at_checkpoint(rank: int, world: int, folder: str) -> dict[str, torch.Tensor]:
    spec = _spec("no", world)
    zero = {"stage": 3, "param_persistence_threshold": 100}
    return _run(rank, world, spec, zero, range(0), resume=folder)["state"]
