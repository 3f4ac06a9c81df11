"""The reference runs and the data slicing that every parity test relies on.

Single-process training on the global batch and DDP on per-rank slices must
agree: that validates ``make_batches``' slicing (each rank's slice, averaged,
is the global batch), the reference loop and ``assert_parity`` itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from tests.distributed.models import MODEL_NAMES, build_model, make_batches, unit_class_names
from tests.distributed.reference import (
    TrainResult,
    TrainSpec,
    assert_parity,
    train_ddp,
    train_single,
)


@pytest.mark.parametrize("world_size", [2, 4])
def test_single_process_and_ddp_agree_fp32(world_size: int, rank_pool: Callable) -> None:
    spec = TrainSpec(model="gpt2", steps=3)
    single = train_single(spec, world_size)
    ddp = train_ddp(spec, world_size, pool=rank_pool(world_size))
    assert_parity(single, ddp, spec, label=f"gpt2 fp32 world {world_size}")
    assert single.losses[-1] < single.losses[0]  # the data is learnable


def test_single_and_ddp_agree_with_accumulation_clipping_and_a_sometimes_used_module(
    rank_pool: Callable,
) -> None:
    # span=2: the extra block runs on every other optimizer step (micro-steps 2-3, 6-7).
    spec = TrainSpec(
        model="sometimes", model_kwargs={"span": 2}, steps=3, grad_accum=2, max_grad_norm=0.05
    )
    single = train_single(spec, 2)
    ddp = train_ddp(spec, 2, pool=rank_pool(2))
    assert len(single.losses) == 6
    assert len(single.grad_norms) == 3
    assert all(n > 0.05 for n in single.grad_norms)  # the clip really clips
    assert_parity(single, ddp, spec, label="sometimes, accum 2, clip")


def test_single_and_ddp_agree_bf16_llama(rank_pool: Callable) -> None:
    spec = TrainSpec(model="llama", steps=3, mixed_precision="bf16")
    single = train_single(spec, 2)
    assert_parity(single, train_ddp(spec, 2, pool=rank_pool(2)), spec, label="llama bf16")
    fp32 = train_single(dataclasses.replace(spec, mixed_precision="no"), 2)
    assert single.losses != fp32.losses  # autocast really ran in bf16


def test_assert_parity_catches_a_wrong_weight_a_wrong_loss_and_a_missing_update() -> None:
    spec = TrainSpec(model="plain", steps=2)
    ref = train_single(spec, 2)

    bad_weight = dict(ref.state_dict)
    bad_weight["blocks.1.fc2.weight"] = bad_weight["blocks.1.fc2.weight"] + 1e-4
    with pytest.raises(AssertionError, match=r"blocks\.1\.fc2\.weight"):
        assert_parity(ref, dataclasses.replace(ref, state_dict=bad_weight), spec)

    bad_loss = [*ref.losses[:-1], ref.losses[-1] * (1 + 1e-5)]
    with pytest.raises(AssertionError, match="loss at micro-step 1"):
        assert_parity(ref, dataclasses.replace(ref, losses=bad_loss), spec)

    bf16 = dataclasses.replace(spec, mixed_precision="bf16")
    ref16 = train_single(bf16, 2)
    initial = build_model("plain").state_dict()
    not_updated = {**ref16.state_dict, "head.weight": initial["head.weight"].clone()}
    with pytest.raises(AssertionError, match=r"head\.weight: update differs: cos 0\.000"):
        assert_parity(ref16, dataclasses.replace(ref16, state_dict=not_updated), bf16)

    missing = {k: v for k, v in ref.state_dict.items() if k != "norm.bias"}
    with pytest.raises(AssertionError, match="missing"):
        assert_parity(ref, dataclasses.replace(ref, state_dict=missing), spec)


def test_rank_slices_tile_the_global_batch_and_are_deterministic() -> None:
    a = make_batches(7, n_steps=3, world_size=4, micro_batch=2, seq_len=8, grad_accum=2)
    b = make_batches(7, n_steps=3, world_size=4, micro_batch=2, seq_len=8, grad_accum=2)
    c = make_batches(8, n_steps=3, world_size=4, micro_batch=2, seq_len=8, grad_accum=2)
    assert len(a) == 6
    for i, g in enumerate(a.global_batches):
        assert g.shape == (8, 8)
        assert torch.equal(g, b.global_batches[i])
        assert torch.equal(torch.cat([a.for_rank(r)[i] for r in range(4)]), g)
    assert not torch.equal(a.global_batches[0], c.global_batches[0])
    with pytest.raises(ValueError, match="rank 4 outside world size 4"):
        a.for_rank(4)


def test_models_are_seeded_and_have_their_edge_cases() -> None:
    for name in MODEL_NAMES:
        m1, m2, m3 = build_model(name, seed=3), build_model(name, seed=3), build_model(name, seed=4)
        s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
        assert all(torch.equal(s1[k], s2[k]) for k in s1), name
        assert not all(torch.equal(s1[k], s3[k]) for k in s1), name
        assert unit_class_names(m1), name
        unit_classes = {type(m).__name__ for m in m1.modules()}
        assert set(unit_class_names(m1)) <= unit_classes, name

    gpt2 = build_model("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight

    frozen = build_model("frozen")
    assert [n for n, p in frozen.named_parameters() if not p.requires_grad] == [
        "blocks.0.fc1.weight",
        "blocks.0.fc1.bias",
    ]
    with pytest.raises(ValueError, match="unknown tiny model 'nope'"):
        build_model("nope")


def test_frozen_and_sometimes_used_parameters_behave_in_the_reference() -> None:
    def changed(res: TrainResult, spec: TrainSpec) -> set[str]:
        init = spec.build_model().state_dict()
        return {k for k, v in res.state_dict.items() if not torch.equal(v, init[k])}

    frozen = TrainSpec(model="frozen", steps=2)
    moved = changed(train_single(frozen, 2), frozen)
    assert "blocks.0.fc1.weight" not in moved and "blocks.0.fc1.bias" not in moved
    assert "blocks.0.fc2.weight" in moved

    # One micro-step: call 0 does not use `extra`, so its grads stay None and AdamW skips it.
    once = TrainSpec(model="sometimes", steps=1)
    assert not any(k.startswith("extra.") for k in changed(train_single(once, 2), once))
    twice = dataclasses.replace(once, steps=2)
    assert "extra.fc1.weight" in changed(train_single(twice, 2), twice)
