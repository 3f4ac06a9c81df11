"""The cluster model's collectives equal what a real step issues, to the call and the byte.

Each case runs three optimizer steps of a tiny model on gloo ranks and reads, around the
forward, the backward and the step (clipping included), the calls and input bytes per
collective that ``Comm`` counted, and ``zero_stats()``'s deltas (bytes gathered and
reduced, calls, the coordinator's counters). ``accel_zero.cluster.simulate_steps``
predicts every one of them from the model's layout and the zero_config alone: step 1
records the execution order, steps 2 and 3 follow it (prefetch, keep-gathered).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from accel_zero.cluster import layout_from_module, simulate_steps
from accel_zero.config import ZeroConfig
from tests.distributed.harness import run_ranks
from tests.distributed.models import build_model, make_batches

WINDOWS = ("forward", "backward", "step")
COORDINATOR = ("prefetch_hits", "prefetch_misses", "prefetches_issued", "kept_gathered")


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}


def _measure_body(
    rank: int, world: int, name: str, kwargs: dict[str, Any], zero: dict[str, Any], clip: bool
) -> list[dict[str, Any]]:
    from accel_zero import Accelerator

    accelerator = Accelerator(zero_config=zero)
    model = build_model(name, seed=0, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    comm = accelerator.zero_engine(model).comm

    def snap() -> dict[str, Any]:
        stats = accelerator.zero_stats()
        return {
            "calls": dict(comm.stats.calls),
            "bytes": dict(comm.stats.bytes),
            "engine": {k: stats[k] for k in ("bytes_gathered", "bytes_reduced", *COORDINATOR)},
            "collective_calls": dict(stats["collective_calls"]),  # type: ignore[call-overload]
        }

    steps = []
    for x in make_batches(5, 3, world, 2, 16).for_rank(rank):
        marks = [snap()]
        loss = model(input_ids=x, labels=x).loss
        marks.append(snap())
        accelerator.backward(loss)
        marks.append(snap())
        if clip:
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        assert not getattr(optimizer, "step_was_skipped", False), "fp16 overflow: pick a scale"
        optimizer.zero_grad()
        marks.append(snap())
        step: dict[str, Any] = {}
        for i, window in enumerate(WINDOWS):
            for key in ("calls", "bytes"):
                step[f"{window} {key}"] = _delta(marks[i + 1][key], marks[i][key])
        step["zero_stats"] = _delta(marks[-1]["engine"], marks[0]["engine"])
        step["zero_stats calls"] = _delta(
            marks[-1]["collective_calls"], marks[0]["collective_calls"]
        )
        steps.append(step)
    return steps


def _predict(
    world: int, name: str, kwargs: dict[str, Any], zero: dict[str, Any], clip: bool, order: Any
) -> list[dict[str, Any]]:
    layout = layout_from_module(build_model(name, seed=0, **kwargs), forward_order=order)
    out = []
    for s in simulate_steps(
        layout, ZeroConfig.from_dict(zero), world_size=world, clip=clip, steps=3
    ):
        step: dict[str, Any] = {}
        for window in WINDOWS:
            step[f"{window} calls"] = s.calls(window)
            step[f"{window} bytes"] = {k: v for k, v in s.input_bytes(window).items() if v}
        engine = {**s.engine_stats(), **{k: s.coordinator[k] for k in COORDINATOR}}
        step["zero_stats"] = {k: v for k, v in engine.items() if v}
        step["zero_stats calls"] = s.calls()
        out.append(step)
    return out


@dataclasses.dataclass(frozen=True)
class Case:
    world: int
    model: str
    zero: dict[str, Any]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    clip: bool = True
    order: tuple[str, ...] | None = None

    @property
    def id(self) -> str:
        keys = ",".join(f"{k}={v}" for k, v in self.zero.items() if k != "stage")
        return f"stage{self.zero['stage']}-{self.world}ranks-{self.model}-{keys}"


CASES = [
    Case(2, "llama", {"stage": 1, "mixed_precision": "no"}),
    Case(4, "gpt2", {"stage": 1, "mixed_precision": "bf16", "reduce_bucket_size": 1}),
    # fp16: the overflow flag's all-reduce (CPU autocast leaves fp16 alone: fp32 compute).
    Case(2, "gpt2", {"stage": 2, "mixed_precision": "fp16"}),
    Case(4, "llama", {"stage": 2, "mixed_precision": "no", "reduce_bucket_size": 1}),
    # Persistent norms (whole, all-reduced, re-gathered after the step), bf16 gathers.
    Case(2, "llama", {"stage": 3, "mixed_precision": "bf16", "param_persistence_threshold": 100}),
    Case(
        4,
        "gpt2",
        {
            "stage": 3,
            "mixed_precision": "no",
            "reduce_bucket_size": 1,
            "param_persistence_threshold": 0,
        },
    ),
    # The coordinator at its limits: small live window and prefetch bucket, short reuse.
    Case(
        4,
        "llama",
        {
            "stage": 3,
            "mixed_precision": "bf16",
            "max_live_parameters": 30_000,
            "prefetch_bucket_size": 12_000,
            "max_reuse_distance": 10_000,
            "param_persistence_threshold": 100,
            "reduce_bucket_size": 20_000,
        },
        kwargs={"n_layer": 4},
    ),
    # A block used twice per forward, kept gathered between its uses or not; no clipping.
    Case(
        2,
        "twice",
        {
            "stage": 3,
            "mixed_precision": "no",
            "max_reuse_distance": 5_000,
            "reduce_bucket_size": 1,
            "param_persistence_threshold": 100,
        },
        clip=False,
        order=("shared", "blocks.0", "blocks.1", "shared"),
    ),
]

# A unit used twice per forward and released between its uses, under bf16: the engine once
# split its gradient over two accumulators (a placeholder dtype change resets torch's
# accumulator) and reduced it after the first backward use. [Note: placeholder dtype] in
# partition.py; this case checks the collectives of the fixed behaviour.
LOST_GRADIENT = Case(
    2,
    "twice",
    {
        "stage": 3,
        "mixed_precision": "bf16",
        "max_reuse_distance": 0,
        "reduce_bucket_size": 1,
        "param_persistence_threshold": 0,
    },
    clip=False,
    order=("shared", "blocks.0", "blocks.1", "shared"),
)
CASES.append(LOST_GRADIENT)


@pytest.mark.parametrize("case", CASES, ids=[getattr(c, "id", "") for c in CASES])
def test_model_equals_measured_collectives(rank_pool: Any, case: Case) -> None:
    measured = run_ranks(
        _measure_body,
        case.world,
        case.model,
        case.kwargs,
        case.zero,
        case.clip,
        timeout=240,
        pool=rank_pool(case.world),
    )
    predicted = _predict(case.world, case.model, case.kwargs, case.zero, case.clip, case.order)
    for rank, steps in enumerate(measured):
        for i, (got, want) in enumerate(zip(steps, predicted, strict=True)):
            assert got == want, f"rank {rank}, step {i + 1}:\nmeasured  {got}\npredicted {want}"


# Hybrid sharding (another branch): ``zero_config.shard_group_size`` = 2 on 4 ranks, i.e. two
# groups of 2. The model takes the group size from the config (``simulate_steps``); what it
# predicts: gathers, reduce-scatters, the post-step re-gather and the clip norm within the
# group; each reduce-scatter's output all-reduced across the 2 groups; whole gradients
# (ZeRO-1, persistent parameters) all-reduced over all 4 ranks. Compared here through
# ``zero_stats()`` (summed over the engine's groups), per step.
_HAS_HYBRID = "shard_group_size" in {f.name for f in dataclasses.fields(ZeroConfig)}


def _hybrid_body(rank: int, world: int, zero: dict[str, Any]) -> list[dict[str, Any]]:
    from accel_zero import Accelerator

    accelerator = Accelerator(zero_config=zero)
    model = build_model("llama", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    keys = ("bytes_gathered", "bytes_reduced", *COORDINATOR)
    steps = []
    for x in make_batches(5, 3, world, 2, 16).for_rank(rank):
        before = accelerator.zero_stats()
        accelerator.backward(model(input_ids=x, labels=x).loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        after = accelerator.zero_stats()
        calls: Any = (after["collective_calls"], before["collective_calls"])
        step = {"zero_stats": _delta({k: after[k] for k in keys}, {k: before[k] for k in keys})}
        step["zero_stats calls"] = _delta(*calls)
        steps.append(step)
    return steps


@pytest.mark.skipif(not _HAS_HYBRID, reason="hybrid sharding (shard_group_size) has not landed")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_hybrid_model_equals_measured(rank_pool: Any, stage: int) -> None:
    zero = {
        "stage": stage,
        "shard_group_size": 2,
        "mixed_precision": "bf16",
        "param_persistence_threshold": 100,
        "reduce_bucket_size": 1,
    }
    measured = run_ranks(_hybrid_body, 4, zero, timeout=240, pool=rank_pool(4))
    predicted = [
        {"zero_stats": p["zero_stats"], "zero_stats calls": p["zero_stats calls"]}
        for p in _predict(4, "llama", {}, zero, True, None)
    ]
    for rank, steps in enumerate(measured):
        for i, (got, want) in enumerate(zip(steps, predicted, strict=True)):
            assert got == want, f"rank {rank}, step {i + 1}:\nmeasured  {got}\npredicted {want}"
