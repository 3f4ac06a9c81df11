"""Engine behaviour on 2 gloo ranks: collective counts, memory, counters, bad input.

Counts are read from the engine's ``Comm`` (DESIGN D11: every collective goes
through accel_zero/comm.py), per optimizer step, after the first (recording)
step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.distributed.harness import RankFailure, run_ranks
from tests.distributed.models import TinyLM, build_model, make_batches

VOCAB = 96


def _accelerator(**zero: Any) -> Any:
    from accel_zero import Accelerator

    # reduce_bucket_size 1: every unit is its own bucket, so counts are per unit.
    base = {"param_persistence_threshold": 0, "reduce_bucket_size": 1}
    return Accelerator(zero_config={**base, **zero})


def _step(accelerator: Any, model: nn.Module, optimizer: Any, x: torch.Tensor, clip: bool) -> None:
    loss = model(input_ids=x, labels=x).loss
    accelerator.backward(loss)
    if clip:
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


def _counts_body(rank: int, world: int, zero: dict[str, Any], clip: bool) -> dict[str, Any]:
    accelerator = _accelerator(**zero)
    model = build_model("gpt2", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = accelerator.zero_engine(model)
    batches = make_batches(3, 3, world, 2, 16, VOCAB).for_rank(rank)
    per_step = []
    for x in batches:
        before = dict(engine.comm.stats.calls)
        _step(accelerator, model, optimizer, x, clip)
        after = dict(engine.comm.stats.calls)
        per_step.append({k: after.get(k, 0) - before.get(k, 0) for k in after})
    units = [(u.name, u.resharded, u.module is model) for u in engine.units]
    return {"per_step": per_step, "units": units, "stats": accelerator.zero_stats()}


def test_collective_counts_stage3_default_reuse(rank_pool: Any) -> None:
    """Default reuse distance: one all-gather per unit per step, one reduce-scatter per unit."""
    out = run_ranks(_counts_body, 2, {"stage": 3}, True, timeout=180, pool=rank_pool(2))[0]
    units = out["units"]
    resharded = sum(1 for _, r, _ in units if r)
    assert resharded == 3, units  # root (embeddings, final norm, tied head) + 2 GPT2Blocks
    for step in out["per_step"][1:]:
        assert step == {
            "all_gather": resharded,
            "reduce_scatter": len(units),
            "check": 1,  # execution-order check, one per pass
            "all_reduce": 1,  # global grad norm for clipping
        }, step
    stats = out["stats"]
    assert stats["prefetch_hits"] > 0
    assert stats["trace_invalidations"] == 0


def test_collective_counts_stage3_no_reuse_no_prefetch(rank_pool: Any) -> None:
    """Reuse distance 0: blocks are released after forward and gathered again in backward,
    except the last block, whose next use is the very next event."""
    out = run_ranks(
        _counts_body,
        2,
        {"stage": 3, "max_reuse_distance": 0, "prefetch_bucket_size": 0},
        False,
        timeout=180,
        pool=rank_pool(2),
    )[0]
    blocks = sum(1 for _, r, root in out["units"] if r and not root)
    first, later = out["per_step"][0], out["per_step"][1:]
    # First step records the trace: everything released after forward, all re-gathered.
    assert first["all_gather"] == 1 + 2 * blocks
    for step in later:
        assert step["all_gather"] == 1 + blocks + (blocks - 1), step
        assert step["reduce_scatter"] == len(out["units"])
    assert out["stats"]["prefetch_hits"] == 0


def test_small_units_share_one_reduce_bucket(rank_pool: Any) -> None:
    """With the default reduce_bucket_size the tiny model's units are coalesced into one
    reduce-scatter per step."""
    out = run_ranks(
        _counts_body,
        2,
        {"stage": 3, "reduce_bucket_size": "500M"},
        False,
        timeout=180,
        pool=rank_pool(2),
    )[0]
    for step in out["per_step"]:
        assert step["reduce_scatter"] == 1, step


def test_collective_counts_stage2(rank_pool: Any) -> None:
    """ZeRO-2: no gathers in forward; one reduce-scatter per unit and one all-gather per
    unit after the step (the updated shards)."""
    out = run_ranks(_counts_body, 2, {"stage": 2}, False, timeout=180, pool=rank_pool(2))[0]
    n = len(out["units"])
    for step in out["per_step"]:
        assert step.get("all_gather", 0) == n
        assert step["reduce_scatter"] == n
        assert "check" not in step


def _memory_body(rank: int, world: int, stage: int) -> dict[str, Any]:
    accelerator = _accelerator(stage=stage)
    model = build_model("gpt2", seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    for x in make_batches(3, 2, world, 2, 16, VOCAB).for_rank(rank):
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        optimizer.step()
        # Measured after the step, before zero_grad: params, grads and optimizer state all live,
        # which is when DDP holds its 16 bytes per parameter too.
        report = accelerator.memory_report()
        optimizer.zero_grad()
    # Between steps only the next pass's first units are in flight (prefetched after the
    # step); dropping them leaves nothing gathered.
    engine = accelerator.zero_engine(model)
    in_flight = sum(
        u.comm.world_size * u.numel * u.dtype.itemsize
        for u in engine.units
        if u.resharded and u.state.value != "sharded"
    )
    engine.hooks.invalidate()
    after = accelerator.memory_report()["per_device"]["cpu"]["gathered_params"]
    return {"report": report, "n_params": n_params, "in_flight": in_flight, "after": after}


def test_model_state_bytes_half_of_ddp_at_two_ranks(rank_pool: Any) -> None:
    out = run_ranks(_memory_body, 2, 3, timeout=180, pool=rank_pool(2))
    for rank_out in out:
        n = rank_out["n_params"]
        ddp = 16 * n  # fp32 params + grads + Adam exp_avg + exp_avg_sq on every DDP rank
        state = rank_out["report"]["model_state_bytes"]
        assert state <= 0.52 * ddp, (state, ddp, rank_out["report"])
        # And not vanishingly small: each rank holds its half of all four.
        assert state >= 0.45 * ddp
        cpu = rank_out["report"]["per_device"]["cpu"]
        assert rank_out["in_flight"] > 0  # the next pass's first units, prefetched
        assert cpu["gathered_params"] == rank_out["in_flight"]
        assert rank_out["after"] == 0  # and nothing else is left gathered between steps
        assert cpu["peak_gathered_params"] > 0


def _estimate_body(rank: int, world: int, stage: int, mixed: str) -> dict[str, Any]:
    from accel_zero.estimator import estimate, shapes_from_module

    # Threshold 100: GPT-2's LayerNorm weights and biases (32 elements) stay whole in stage 3.
    accelerator = _accelerator(stage=stage, mixed_precision=mixed, param_persistence_threshold=100)
    model = build_model("gpt2", seed=0)
    shapes = shapes_from_module(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = make_batches(1, 2, world, 2, 16, VOCAB).for_rank(rank)[0]
    accelerator.backward(model(input_ids=x, labels=x).loss)
    optimizer.step()
    cpu = accelerator.memory_report()["per_device"]["cpu"]
    (row,) = [
        r
        for r in estimate(
            shapes, world_size=world, mixed_precision=mixed, param_persistence_threshold=100
        )
        if (r.stage, r.offload_optimizer, r.offload_param) == (stage, "none", "none")
    ]
    return {
        "traced": (cpu["params"], cpu["grads"], cpu["optimizer_state"]),
        "estimated": (row.param_bytes, row.grad_bytes, row.optimizer_bytes),
    }


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_estimator_matches_memory_report(rank_pool: Any, stage: int, mixed: str) -> None:
    """``accel-zero estimate`` predicts what the tracer counts after a step, to the byte."""
    for out in run_ranks(_estimate_body, 2, stage, mixed, timeout=180, pool=rank_pool(2)):
        assert out["traced"] == out["estimated"], out


def _stage3_state_dict_guard_body(rank: int, world: int) -> str:
    accelerator = _accelerator(stage=3)
    model = build_model("gpt2", seed=0)
    model = accelerator.prepare(model)
    try:
        model.state_dict()
    except RuntimeError as exc:
        msg = str(exc)
    else:
        msg = "no error"
    with accelerator.gathered_parameters(model):
        full = {k: v.clone() for k, v in model.state_dict().items()}
    ref = build_model("gpt2", seed=0).state_dict()
    for k, v in ref.items():
        assert torch.equal(full[k], v), k
    return msg


def test_state_dict_outside_forward_is_a_clear_error_and_gathered_parameters_works(
    rank_pool: Any,
) -> None:
    msgs = run_ranks(_stage3_state_dict_guard_body, 2, timeout=180, pool=rank_pool(2))
    for rank, msg in enumerate(msgs):
        assert f"rank {rank}" in msg and "sharded" in msg and "get_state_dict" in msg, msg


def _no_params_body(rank: int, world: int) -> str:
    accelerator = _accelerator(stage=3)
    try:
        accelerator.prepare(nn.ReLU())
    except ValueError as exc:
        return str(exc)
    return "no error"


def _foreign_param_body(rank: int, world: int) -> str:
    accelerator = _accelerator(stage=3)
    model = build_model("gpt2", seed=0)
    stray = nn.Parameter(torch.zeros(7, 3))
    optimizer = torch.optim.AdamW([*model.parameters(), stray], lr=1e-3)
    try:
        accelerator.prepare(model, optimizer)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_model_without_parameters_is_rejected(rank_pool: Any) -> None:
    msg = run_ranks(_no_params_body, 2, timeout=120, pool=rank_pool(2))[0]
    assert "ReLU has no parameters" in msg


def test_optimizer_with_parameter_outside_model_is_rejected(rank_pool: Any) -> None:
    msg = run_ranks(_foreign_param_body, 2, timeout=120, pool=rank_pool(2))[0]
    assert "not in any prepared model" in msg and "(7, 3)" in msg and "rank 0" in msg


class _Swapped(TinyLM):
    """Two identical blocks whose order depends on the rank: same sizes, different order."""

    _no_split_modules = ["Block"]  # noqa: RUF012

    def body(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        order = self.blocks if dist.get_rank() == 0 else list(reversed(self.blocks))
        for block in order:
            x = block(x)
        return x


def _order_body(rank: int, world: int) -> str:
    accelerator = _accelerator(stage=3)
    torch.manual_seed(0)
    model = _Swapped(vocab=VOCAB)
    model = accelerator.prepare(model)
    x = torch.randint(0, VOCAB, (2, 8))
    try:
        with torch.no_grad():
            model(input_ids=x)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_ranks_running_different_order_get_a_clear_error(rank_pool: Any) -> None:
    msgs = run_ranks(_order_body, 2, timeout=120, pool=rank_pool(2))
    for rank, msg in enumerate(msgs):
        assert f"rank {rank}" in msg and "ranks ran different modules" in msg, msg


_HANG_TIMEOUT_S = 3.0


def _hung_rank_body(rank: int, world: int) -> tuple[str, float, str]:
    """Rank 1 stops taking part (hangs in Python); rank 0's next gather must time out."""
    import time

    accelerator = _accelerator(stage=3, timeout=_HANG_TIMEOUT_S)
    torch.manual_seed(0)
    model = accelerator.prepare(build_model("plain", seed=0))
    x = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        model(input_ids=x)  # both ranks: a normal pass
    if rank == 1:
        time.sleep(_HANG_TIMEOUT_S + 20)  # hung well past the timeout, then leaves
        return ("hung", 0.0, "")
    start = time.monotonic()
    try:
        with torch.no_grad():
            model(input_ids=x)
    except RuntimeError as exc:
        return ("error", time.monotonic() - start, str(exc))
    return ("no error", time.monotonic() - start, "")


def test_a_hung_rank_surfaces_as_an_error_after_the_timeout(rank_pool: Any) -> None:
    """README: a rank that hangs surfaces as an error after ``timeout``, naming rank and op."""
    outcome, elapsed, msg = run_ranks(_hung_rank_body, 2, timeout=120, pool=rank_pool(2))[0]
    assert outcome == "error", (outcome, elapsed)
    # it was the timeout that ended the wait, not rank 1 leaving 20 s later
    assert _HANG_TIMEOUT_S * 0.9 <= elapsed < _HANG_TIMEOUT_S + 15, elapsed
    # The first collective rank 1 never joins: a gather, or the end-of-pass order check when
    # the pass's gathers were prefetched before rank 1 stopped.
    assert "rank 0/2" in msg and "failed (timeout 3 s)" in msg, msg
    assert "all_gather of unit" in msg or "execution-order check" in msg, msg
    assert "Timed out" in msg, msg  # gloo's own timeout, not a closed connection


def _trace_change_body(rank: int, world: int) -> dict[str, Any]:
    accelerator = _accelerator(stage=3)
    model = build_model("sometimes", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    for x in make_batches(3, 4, world, 2, 16, VOCAB).for_rank(rank):
        _step(accelerator, model, optimizer, x, False)
    # Evaluation in between (no gradients) is another kind of pass, with its own trace.
    with torch.no_grad():
        model(input_ids=x)
    return accelerator.zero_stats()


def test_changing_execution_order_invalidates_the_trace_without_hanging(rank_pool: Any) -> None:
    stats = run_ranks(_trace_change_body, 2, timeout=180, pool=rank_pool(2))[0]
    assert stats["trace_invalidations"] >= 1
    assert stats["traces_recorded"] >= 2


def _fp16_overflow_body(rank: int, world: int) -> dict[str, Any]:
    from accel_zero import Accelerator

    accelerator = Accelerator(
        mixed_precision="fp16",
        zero_config={"stage": 3, "param_persistence_threshold": 0, "loss_scale": {"hysteresis": 1}},
    )
    model = build_model("plain", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {k: v.clone() for k, v in accelerator.get_state_dict(model).items()}
    scale0 = accelerator._zero_scaler.scale
    x = torch.randint(0, VOCAB, (2, 8))
    loss = model(input_ids=x, labels=x).loss
    if rank == 1:
        loss = loss * float("inf")  # overflow on one rank only
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    skipped = optimizer.step_was_skipped
    after = accelerator.get_state_dict(model)
    unchanged = all(torch.equal(before[k], after[k]) for k in before) if rank == 0 else True
    return {
        "skipped": skipped,
        "scale0": scale0,
        "scale1": accelerator._zero_scaler.scale,
        "unchanged": unchanged,
    }


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(rank_pool: Any) -> None:
    out = run_ranks(_fp16_overflow_body, 2, timeout=180, pool=rank_pool(2))
    for rank_out in out:
        assert rank_out["skipped"] is True
        assert rank_out["scale1"] == rank_out["scale0"] / 2
    assert out[0]["unchanged"]


def test_bad_stage_is_rejected_before_any_process_group() -> None:
    from accel_zero import ZeroConfig

    with pytest.raises(ValueError, match="stage"):
        ZeroConfig.from_dict({"stage": 4})


def test_rank_failure_names_the_rank(rank_pool: Any) -> None:
    """A rank that errors inside the engine surfaces with its rank (harness + Comm errors)."""
    with pytest.raises(RankFailure, match="rank 0"):
        run_ranks(_no_params_raise_body, 2, timeout=120, pool=rank_pool(2))


def _no_params_raise_body(rank: int, world: int) -> None:
    accelerator = _accelerator(stage=3)
    accelerator.prepare(nn.ReLU())
