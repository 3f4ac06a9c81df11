"""Hybrid sharding (``zero_config.shard_group_size``) on 4 gloo ranks.

2 groups of 2 (ranks {0, 1} and {2, 3} each hold every row once; ranks 0 and 2, 1 and 3
are replicas) against DDP at 4 ranks, and 1 group of 4 (= plain sharding), for stages
1-3, fp32 and bf16, with accumulation and clipping; collective counts and bytes per step
per group; per-rank model-state memory; ``lazy_init`` reading each row once per group;
the small collectives that must span the world (fp16 overflow flag, execution-order
check). See [Note: hybrid sharding] in accel_zero/comm.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch

from tests.distributed.harness import gloo_threads, run_ranks
from tests.distributed.models import TinyLM, build_model, make_batches
from tests.distributed.reference import (
    TrainResult,
    TrainSpec,
    assert_parity,
    train_accel_zero_rank,
    train_ddp_in_group,
)

WORLD = 4
VOCAB = 96
STAGES = (1, 2, 3)


# ------------------------------------------------------------------------------- parity
def _parity_body(rank: int, world: int, spec: TrainSpec) -> dict[str, TrainResult]:
    results: dict[str, TrainResult] = {}
    for group in (2, 4):
        for stage in STAGES:
            cfg: dict[str, Any] = {
                "stage": stage,
                "param_persistence_threshold": 0,
                "shard_group_size": group,
            }
            if spec.mixed_precision == "bf16":
                cfg["param_dtype"] = "fp32"  # Accelerate's own bf16: what DDP runs
            results[f"{group}/stage{stage}"] = train_accel_zero_rank(rank, world, spec, cfg)
    if spec.mixed_precision == "bf16":
        cfg = {"stage": 3, "param_persistence_threshold": 0, "shard_group_size": 2}
        results["2/stage3-bf16-params"] = train_accel_zero_rank(rank, world, spec, cfg)
    results["ddp"] = train_ddp_in_group(rank, world, spec)
    return results if rank == 0 else {}


def _max_diffs(expected: TrainResult, actual: TrainResult) -> tuple[float, float]:
    loss = max(abs(a - e) for a, e in zip(actual.losses, expected.losses, strict=True))
    weight = max(
        float((actual.state_dict[k].double() - v.double()).abs().max())
        for k, v in expected.state_dict.items()
    )
    return loss, weight


@pytest.mark.parametrize("mp", ["no", "bf16"])
def test_hybrid_parity_with_ddp(rank_pool: Any, mp: Literal["no", "bf16"]) -> None:
    """2 x 2 and 1 x 4 train like DDP at 4 ranks, every stage, accumulation and clipping."""
    spec = TrainSpec(model="gpt2", mixed_precision=mp, grad_accum=2, max_grad_norm=0.5)
    results = run_ranks(_parity_body, WORLD, spec, timeout=420, pool=rank_pool(WORLD))[0]
    ddp = results.pop("ddp")
    for name, result in results.items():
        assert_parity(ddp, result, spec, label=f"shard_group_size {name}, {mp}")
        loss, weight = _max_diffs(ddp, result)
        print(
            f"{mp} shard_group_size {name}: max |loss diff| {loss:.2e}, |weight diff| {weight:.2e}"
        )
    # ZeRO-1 reduces whole gradients with the same one world all-reduce as a plain world,
    # whatever the groups: bit for bit the same run.
    assert_parity(results["4/stage1"], results["2/stage1"], spec, rtol=0, atol=0)


# ---------------------------------------------------------------------- counts and bytes
def _counts_body(rank: int, world: int, stage: int, group: Any) -> dict[str, Any]:
    from accel_zero import Accelerator

    # reduce_bucket_size 1: every unit is its own bucket, so counts are per unit.
    accelerator = Accelerator(
        zero_config={
            "stage": stage,
            "param_persistence_threshold": 0,
            "reduce_bucket_size": 1,
            "shard_group_size": group,
        }
    )
    model = build_model("gpt2", seed=0)
    whole_numel = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = accelerator.zero_engine(model)
    comm = engine.comm
    per_step = []
    for x in make_batches(3, 3, world, 2, 16, VOCAB).for_rank(rank):
        comm.stats.reset()
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        per_step.append(
            {
                "calls": dict(comm.stats.calls),
                "bytes": dict(comm.stats.bytes),
                "traffic": accelerator.zero_stats(),
            }
        )
    units = [
        {"numel": u.numel, "itemsize": u.dtype.itemsize, "resharded": u.resharded}
        for u in engine.units
    ]
    accelerator.end_training()  # no prefetch left in flight to outlive the task's groups
    sharded_params = sum(len(u.slots) for u in engine.units)
    return {
        "per_step": per_step,
        "units": units,
        "sharded_params": sharded_params,
        "whole_numel": whole_numel,
        "rank": (comm.rank, comm.world_size, comm.replicate_rank, comm.replicate_size),
    }


def _expected(stage: int, out: dict[str, Any], shard: int) -> tuple[dict, dict]:
    """Calls and input bytes per key for one step after the first, from the unit sizes."""
    units = out["units"]
    n = len(units)
    fp32 = 4
    gathered = [u for u in units if u["resharded"]] if stage == 3 else units
    calls: dict[str, int] = {"all_gather": len(gathered)}
    nbytes: dict[str, int] = {
        # stage 3: forward/backward gathers of the compute-dtype shard; 1/2: the updated rows
        "all_gather": sum(u["numel"] * (u["itemsize"] if stage == 3 else fp32) for u in gathered)
    }
    if stage == 1:
        # whole gradients: one world all-reduce per bucket; their clip norm needs none
        calls["all_reduce[world]"] = n
        nbytes["all_reduce[world]"] = out["whole_numel"] * fp32
    else:
        calls["reduce_scatter"] = n
        nbytes["reduce_scatter"] = sum(shard * u["numel"] * fp32 for u in units)
        calls["all_reduce[replicate]"] = n
        nbytes["all_reduce[replicate]"] = sum(u["numel"] * fp32 for u in units)
        calls["all_reduce"] = 1  # clip norm over the shard group: one float per parameter
        nbytes["all_reduce"] = out["sharded_params"] * fp32
    if stage == 3:
        calls["check[world]"] = 1  # the execution-order check, once per pass, over the world
        nbytes["check[world]"] = 8
    return calls, nbytes


@pytest.mark.parametrize("stage", STAGES)
def test_collectives_per_step_per_group(rank_pool: Any, stage: int) -> None:
    """Gathers and reduce-scatters in the shard group, one replica all-reduce per gradient
    bucket, small collectives in the right group; zero_stats' bytes to the byte."""
    # "node" = LOCAL_WORLD_SIZE ranks per group: 2 machines of 2 ranks, as torchrun sets it.
    group = "node" if stage == 3 else 2
    outs = run_ranks(
        _counts_body,
        WORLD,
        stage,
        group,
        timeout=180,
        env={"LOCAL_WORLD_SIZE": "2"},
        pool=rank_pool(WORLD),
    )
    shard = 2
    for global_rank, out in enumerate(outs):
        assert out["rank"] == (global_rank % 2, 2, global_rank // 2, 2), out["rank"]
        calls, nbytes = _expected(stage, out, shard)
        for step in out["per_step"][1:]:
            assert step["calls"] == calls, (stage, step["calls"], calls)
            assert step["bytes"] == nbytes, (stage, step["bytes"], nbytes)
            traffic = step["traffic"]
            assert traffic["groups"] == {"shard": 2, "replicate": 2, "world": 4}
            assert traffic["collective_bytes"] == nbytes
            assert traffic["collective_calls"] == calls
            gathered = nbytes["all_gather"] * shard
            assert traffic["bytes_gathered"] == gathered
            assert traffic["bytes_gathered_by_group"] == {"shard": gathered}
            by_group = {
                "shard": nbytes.get("reduce_scatter", 0) + nbytes.get("all_reduce", 0),
                "replicate": nbytes.get("all_reduce[replicate]", 0),
                "world": nbytes.get("all_reduce[world]", 0),
            }
            assert traffic["bytes_reduced_by_group"] == {k: v for k, v in by_group.items() if v}
            assert traffic["bytes_reduced"] == sum(by_group.values())
    print(f"stage {stage}, 2 groups of 2, per step: {outs[0]['per_step'][-1]['calls']}")


def test_plain_world_keeps_unqualified_keys(rank_pool: Any) -> None:
    """shard_group_size = world size is plain sharding: one group, the world, no suffixes."""
    out = run_ranks(_counts_body, WORLD, 3, 4, timeout=180, pool=rank_pool(WORLD))[0]
    step = out["per_step"][-1]
    assert step["calls"] == {
        "all_gather": sum(1 for u in out["units"] if u["resharded"]),
        "reduce_scatter": len(out["units"]),
        "check": 1,
        "all_reduce": 1,
    }, step["calls"]
    assert step["traffic"]["groups"] == {"shard": 4, "replicate": 1, "world": 4}
    assert set(step["traffic"]["bytes_reduced_by_group"]) == {"world"}


# ------------------------------------------------------------------------------- memory
def _memory_body(rank: int, world: int) -> list[dict[str, Any]]:
    from accel_zero import Accelerator
    from accel_zero.estimator import estimate, shapes_from_module

    out = []
    for stage in STAGES:
        accelerator = Accelerator(
            zero_config={"stage": stage, "param_persistence_threshold": 100, "shard_group_size": 2}
        )
        model = build_model("gpt2", seed=0)
        shapes = shapes_from_module(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)
        x = make_batches(1, 1, world, 2, 16, VOCAB).for_rank(rank)[0]
        accelerator.backward(model(input_ids=x, labels=x).loss)
        optimizer.step()
        cpu = accelerator.memory_report()["per_device"]["cpu"]

        def row(ws: int, stage: int = stage, shapes: Any = shapes) -> tuple[int, int, int]:
            (r,) = [
                r
                for r in estimate(
                    shapes, world_size=ws, mixed_precision="no", param_persistence_threshold=100
                )
                if (r.stage, r.offload_optimizer, r.offload_param) == (stage, "none", "none")
            ]
            return (r.param_bytes, r.grad_bytes, r.optimizer_bytes)

        out.append(
            {
                "traced": (cpu["params"], cpu["grads"], cpu["optimizer_state"]),
                "plain2": row(2),
                "plain4": row(4),
            }
        )
        optimizer.zero_grad()
        accelerator.zero_engine(model).hooks.invalidate()  # no prefetch left in flight
    return out


def test_model_state_per_rank_is_a_plain_world_of_the_group_size(rank_pool: Any) -> None:
    """2 x 2: every rank holds what a rank of a plain 2-rank world holds (the estimate that
    test_engine checks against a real 2-rank run), not a 4-rank world's quarter."""
    for rank, stages in enumerate(run_ranks(_memory_body, WORLD, timeout=240, pool=rank_pool(4))):
        for stage, out in zip(STAGES, stages, strict=True):
            assert out["traced"] == out["plain2"], (rank, stage, out)
            assert sum(out["plain2"]) > sum(out["plain4"]), (rank, stage, out)


# -------------------------------------------------------------------- readable gradients
def _grads_body(rank: int, world: int) -> dict[str, Any]:
    from accel_zero import Accelerator

    x = make_batches(5, 1, world, 2, 16, VOCAB).for_rank(rank)[0]
    out: dict[str, Any] = {}
    for stage in (1, 3):
        accelerator = Accelerator(
            zero_config={"stage": stage, "param_persistence_threshold": 0, "shard_group_size": 2}
        )
        model = accelerator.prepare(build_model("gpt2", seed=0))
        accelerator.backward(model(input_ids=x, labels=x).loss)
        names = dict(model.named_parameters())
        full = {n: accelerator.get_full_grad(p) for n, p in names.items()}
        norms = accelerator.get_grad_norms(model)
        out[f"stage{stage}"] = (full, norms)
        accelerator.zero_engine(model).hooks.invalidate()
    return out


def test_full_gradients_and_norms_are_the_world_average(rank_pool: Any) -> None:
    """ZeRO-1's whole gradients are DDP's (one world all-reduce); ZeRO-3's shards, summed in
    the group and across replicas, gather to the same; per-parameter norms sum rows over the
    shard group only (over the world they would be sqrt(2) too large)."""
    for rank, out in enumerate(run_ranks(_grads_body, WORLD, timeout=180, pool=rank_pool(4))):
        whole, whole_norms = out["stage1"]
        full, norms = out["stage3"]
        assert whole.keys() == full.keys() and norms.keys() == whole_norms.keys()
        for name, grad in whole.items():
            torch.testing.assert_close(full[name], grad, rtol=1e-5, atol=1e-7, msg=name)
            expected = grad.double().norm()
            for got in (norms[name], whole_norms[name]):
                assert abs(float(got) - float(expected)) <= 1e-5 * float(expected), (rank, name)


# ------------------------------------------------------------- world-spanning collectives
def _fp16_overflow_body(rank: int, world: int) -> dict[str, Any]:
    from accel_zero import Accelerator

    accelerator = Accelerator(
        mixed_precision="fp16",
        zero_config={
            "stage": 3,
            "param_persistence_threshold": 0,
            "shard_group_size": 2,
            "loss_scale": {"hysteresis": 1},
        },
    )
    model = build_model("plain", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    scale0 = accelerator._zero_scaler.scale
    x = torch.randint(0, VOCAB, (2, 8))
    loss = model(input_ids=x, labels=x).loss
    if rank == 3:
        loss = loss * float("inf")  # overflow on one rank of the second group only
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    return {
        "skipped": optimizer.step_was_skipped,
        "halved": accelerator._zero_scaler.scale * 2 == scale0,
    }


def test_fp16_overflow_in_one_group_skips_the_step_on_every_rank(rank_pool: Any) -> None:
    for out in run_ranks(_fp16_overflow_body, WORLD, timeout=180, pool=rank_pool(WORLD)):
        assert out == {"skipped": True, "halved": True}, out


class _GroupSwapped(TinyLM):
    """The second shard group runs the blocks in reverse: each group agrees within itself."""

    _no_split_modules = ["Block"]  # noqa: RUF012

    def body(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        order = self.blocks if dist.get_rank() < 2 else list(reversed(self.blocks))
        for block in order:
            x = block(x)
        return x


def _order_body(rank: int, world: int) -> str:
    from accel_zero import Accelerator

    accelerator = Accelerator(
        zero_config={"stage": 3, "param_persistence_threshold": 0, "shard_group_size": 2}
    )
    torch.manual_seed(0)
    model = accelerator.prepare(_GroupSwapped(vocab=VOCAB))
    x = torch.randint(0, VOCAB, (2, 8))
    try:
        with torch.no_grad():
            model(input_ids=x)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_execution_order_check_spans_the_groups(rank_pool: Any) -> None:
    """Replicas reduce gradients together, so the order must agree across groups too."""
    msgs = run_ranks(_order_body, WORLD, timeout=180, pool=rank_pool(WORLD))
    for rank, msg in enumerate(msgs):
        assert f"rank {rank}:" in msg and "[[0, 1], [2, 3]]" in msg, msg


# ---------------------------------------------------------------------------- lazy_init
def _lazy_body(rank: int, world: int, path: str) -> dict[str, Any]:
    import transformers.modeling_utils as mu
    from transformers import AutoModelForCausalLM

    from accel_zero import Accelerator, lazy_init
    from tests.distributed.test_lazy_common import ReadCounter, check_layout

    threads_before = gloo_threads()  # an earlier task in this pooled rank may have left some
    accelerator = Accelerator(
        zero_config={"stage": 3, "param_persistence_threshold": 0, "shard_group_size": 2}
    )
    plain = AutoModelForCausalLM.from_pretrained(path)
    real_safe_open = mu.safe_open
    counter = ReadCounter()
    counter.install()
    try:
        with lazy_init(accelerator):
            lazy = AutoModelForCausalLM.from_pretrained(path)
    finally:
        mu.safe_open = real_safe_open  # type: ignore[misc]  # a pooled rank runs other tests next
    check_layout(lazy, rank % 2, 2)
    model = accelerator.prepare(lazy)
    state = accelerator.get_state_dict(model)
    equal = rank != 0 or all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    # A model built over the whole world cannot be prepared over shard groups of 2.
    with lazy_init(None):
        world_built = AutoModelForCausalLM.from_pretrained(path)
    try:
        Accelerator(
            zero_config={"stage": 3, "param_persistence_threshold": 0, "shard_group_size": 2}
        ).prepare(world_built)
    except ValueError as exc:
        mismatch = str(exc)
    else:
        mismatch = "no error"
    accelerator.end_training()
    return {
        "read": counter.bytes,
        "equal": equal,
        "mismatch": mismatch,
        # every group (world, shard, replicate) is freed, though the Accelerator is alive
        "gloo_threads": (threads_before, gloo_threads()),
    }


def test_lazy_init_reads_each_row_once_per_group(rank_pool: Any, tmp_path: Path) -> None:
    from tests.distributed.test_lazy_common import checkpoint_tensor_bytes, make_checkpoint

    path = make_checkpoint("llama", tmp_path / "llama")
    total = checkpoint_tensor_bytes(path)
    outs = run_ranks(_lazy_body, WORLD, str(path), timeout=240, pool=rank_pool(WORLD))
    reads = [o["read"] for o in outs]
    for group in ((0, 1), (2, 3)):
        assert sum(reads[r] for r in group) == total, (reads, total)
    for rank, out in enumerate(outs):
        assert abs(out["read"] - total / 2) <= 0.05 * total, (reads, total)
        assert out["equal"], rank
        assert "sharded over 4 ranks" in out["mismatch"], out["mismatch"]
        assert "shard_group_size" in out["mismatch"], out["mismatch"]
        before, after = out["gloo_threads"]
        assert len(after) <= len(before), (rank, before, after)
    print(f"llama: checkpoint tensors {total} B, read per rank at 2 x 2: {reads}")


def test_resolve_shard_group_size_names_key_world_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from accel_zero.comm import resolve_shard_group_size

    assert resolve_shard_group_size(None, 8) == 8
    assert resolve_shard_group_size(8, 1) == 1  # a single process: nothing to shard, ignored
    assert resolve_shard_group_size(4, 8) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_shard_group_size("node", 8) == 2
    with pytest.raises(ValueError) as info:
        resolve_shard_group_size(3, 8)
    msg = str(info.value)
    assert "zero_config.shard_group_size=3" in msg and "world size 8" in msg, msg
    assert "1, 2, 4, 8" in msg and "null" in msg, msg
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"'node' \(LOCAL_WORLD_SIZE=3\) does not divide"):
        resolve_shard_group_size("node", 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        resolve_shard_group_size("node", 8)


def test_config_accepts_int_node_or_null_only() -> None:
    from accel_zero import ZeroConfig

    assert ZeroConfig().shard_group_size is None
    assert ZeroConfig.from_dict({"shard_group_size": 8}).shard_group_size == 8
    assert ZeroConfig.from_dict({"shard_group_size": "Node"}).shard_group_size == "node"
    for bad, kind in ((0, ValueError), (True, TypeError), ("nodes", TypeError), (2.0, TypeError)):
        with pytest.raises(kind, match=r"zero_config\.shard_group_size"):
            ZeroConfig.from_dict({"shard_group_size": bad})
