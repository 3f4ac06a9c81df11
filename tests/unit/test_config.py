"""ZeroConfig: validation messages, YAML / DeepSpeed JSON round trips, resolve() precedence."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from accel_zero.config import (
    CONFIG_PATH_ENV,
    LAUNCH_CONFIG_ENV,
    LossScaleConfig,
    OffloadConfig,
    ZeroConfig,
    parse_count,
)

# (block, error type, text the message must contain: the key path, then the hint if any)
BAD_CONFIGS: list[tuple[str, dict[str, Any], type[Exception], list[str]]] = [
    ("stage out of range", {"stage": 4}, ValueError, ["zero_config.stage", "allowed: 1, 2, 3"]),
    ("stage zero", {"stage": 0}, ValueError, ["zero_config.stage", "allowed: 1, 2, 3"]),
    ("stage as text", {"stage": "three"}, ValueError, ["zero_config.stage", "allowed"]),
    ("misspelled top key", {"stag": 3}, ValueError, ["zero_config.stag", "did you mean 'stage'"]),
    (
        "DeepSpeed spelling",
        {"stage3_max_live_parameters": 10},
        ValueError,
        ["zero_config.stage3_max_live_parameters", "'max_live_parameters'"],
    ),
    (
        "misspelled nested key",
        {"offload_optimizer": {"devise": "cpu"}},
        ValueError,
        ["zero_config.offload_optimizer.devise", "did you mean 'device'"],
    ),
    (
        "bad offload device",
        {"offload_optimizer": {"device": "gpu"}},
        ValueError,
        ["zero_config.offload_optimizer.device", "'none', 'cpu', 'nvme'"],
    ),
    (
        "nvme without path",
        {"offload_optimizer": {"device": "nvme"}},
        ValueError,
        ["zero_config.offload_optimizer.nvme_path"],
    ),
    (
        "param offload to nvme without a path",
        {"offload_param": {"device": "nvme"}},
        ValueError,
        ["zero_config.offload_param.nvme_path", "needs"],
    ),
    (
        "aio block size not a multiple of 4096",
        {"aio": {"block_size": 5000}},
        ValueError,
        ["zero_config.aio.block_size", "multiple of 4096"],
    ),
    (
        "sub group size zero",
        {"sub_group_size": 0},
        ValueError,
        ["zero_config.sub_group_size", ">= 1"],
    ),
    (
        "param offload below stage 3",
        {"stage": 2, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}},
        ValueError,
        ["zero_config.offload_param.device", "stage=3"],
    ),
    (
        "param offload without optimizer offload",
        {"offload_param": {"device": "cpu"}},
        ValueError,
        ["zero_config.offload_param.device", "offload_optimizer.device"],
    ),
    (
        "param nvme with optimizer on cpu",
        {
            "offload_param": {"device": "nvme", "nvme_path": "/tmp/x"},
            "offload_optimizer": {"device": "cpu"},
        },
        ValueError,
        ["zero_config.offload_param.device='nvme' needs", "'nvme'"],
    ),
    (
        "negative bucket",
        {"prefetch_bucket_size": -1},
        ValueError,
        ["zero_config.prefetch_bucket_size", ">= 0"],
    ),
    (
        "byte unit for a count",
        {"reduce_bucket_size": "500MB"},
        ValueError,
        ["zero_config.reduce_bucket_size", "K/M/G/T"],
    ),
    (
        "fractional count",
        {"max_live_parameters": 1.5},
        ValueError,
        ["zero_config.max_live_parameters", "whole number"],
    ),
    ("zero live params", {"max_live_parameters": 0}, ValueError, ["max_live_parameters", ">= 1"]),
    ("bool as count", {"reduce_bucket_size": True}, TypeError, ["zero_config.reduce_bucket_size"]),
    ("string bool", {"overlap_comm": "yes"}, TypeError, ["zero_config.overlap_comm", "boolean"]),
    (
        "bad reduce dtype",
        {"reduce_dtype": "fp8"},
        ValueError,
        ["zero_config.reduce_dtype", "'fp32', 'bf16', 'fp16'", "did you mean"],
    ),
    (
        "bad mixed precision",
        {"mixed_precision": "fp8"},
        ValueError,
        ["zero_config.mixed_precision", "'no', 'bf16', 'fp16'"],
    ),
    ("units as a string", {"units": "GPT2Block"}, TypeError, ["zero_config.units", "list"]),
    ("units not names", {"units": ["GPT2 Block"]}, ValueError, ["zero_config.units[0]"]),
    ("zero timeout", {"timeout": 0}, ValueError, ["zero_config.timeout", "(0.0, inf)"]),
    ("infinite timeout", {"timeout": float("inf")}, ValueError, ["zero_config.timeout", "finite"]),
    (
        "backoff above one",
        {"loss_scale": {"backoff_factor": 1.5}},
        ValueError,
        ["zero_config.loss_scale.backoff_factor", "(0.0, 1.0)"],
    ),
    (
        "growth factor one",
        {"loss_scale": {"growth_factor": 1}},
        ValueError,
        ["zero_config.loss_scale.growth_factor"],
    ),
    (
        "min above initial scale",
        {"loss_scale": {"initial_scale": 8, "min_scale": 16}},
        ValueError,
        ["zero_config.loss_scale.min_scale", "zero_config.loss_scale.initial_scale"],
    ),
    (
        "zero hysteresis",
        {"loss_scale": {"hysteresis": 0}},
        ValueError,
        ["zero_config.loss_scale.hysteresis", ">= 1"],
    ),
    (
        "buffer count zero",
        {"offload_optimizer": {"device": "cpu", "buffer_count": 1}},
        ValueError,
        ["zero_config.offload_optimizer.buffer_count", ">= 2"],
    ),
    (
        "block not a mapping",
        {"offload_optimizer": "cpu"},
        TypeError,
        ["zero_config.offload_optimizer", "mapping"],
    ),
    (
        "negative clipping",
        {"gradient_clipping": -1.0},
        ValueError,
        ["zero_config.gradient_clipping"],
    ),
]


@pytest.mark.parametrize(
    ("block", "error", "fragments"),
    [case[1:] for case in BAD_CONFIGS],
    ids=[case[0] for case in BAD_CONFIGS],
)
def test_bad_config_names_key(
    block: dict[str, Any], error: type[Exception], fragments: list[str]
) -> None:
    with pytest.raises(error) as info:
        ZeroConfig.from_dict(block)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_at_least_fifteen_distinct_bad_configs() -> None:
    assert len({case[0] for case in BAD_CONFIGS}) >= 15


def test_direct_constructor_validates() -> None:
    with pytest.raises(ValueError, match=r"zero_config\.stage=5"):
        ZeroConfig(stage=5)
    with pytest.raises(
        ValueError, match=r"OffloadConfig\.device='nvme' needs OffloadConfig\.nvme_path"
    ):
        OffloadConfig(device="nvme")
    with pytest.raises(TypeError, match=r"zero_config\.loss_scale\.growth_interval must be an int"):
        LossScaleConfig(growth_interval=1.5)  # type: ignore[arg-type]


def test_frozen_and_normalised() -> None:
    config = ZeroConfig(
        units=["LlamaDecoderLayer"],  # type: ignore[arg-type]
        timeout=60,
        offload_optimizer={"device": "nvme", "nvme_path": "/scratch"},  # type: ignore[arg-type]
    )
    assert config.units == ("LlamaDecoderLayer",)
    assert isinstance(config.timeout, float)
    assert config.offload_optimizer == OffloadConfig(device="nvme", nvme_path=Path("/scratch"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.stage = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (50_000_000, 50_000_000),
        (5e7, 50_000_000),
        ("5e7", 50_000_000),
        ("50M", 50_000_000),
        ("50m", 50_000_000),
        ("1.5G", 1_500_000_000),
        ("2B", 2_000_000_000),
        ("100k", 100_000),
        ("1_000_000", 1_000_000),
        ("0", 0),
    ],
)
def test_human_counts(text: Any, expected: int) -> None:
    assert parse_count(text, "k") == expected
    assert ZeroConfig.from_dict({"prefetch_bucket_size": text}).prefetch_bucket_size == expected


def test_to_dict_is_json_and_round_trips() -> None:
    config = ZeroConfig.from_dict(
        {
            "stage": 2,
            "prefetch_bucket_size": "10M",
            "reduce_dtype": "bfloat16",
            "units": ["Block"],
            "mixed_precision": "fp16",
            "gradient_clipping": 1,
            "loss_scale": {"initial_scale": 1024, "growth_interval": 100},
            "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp/nvme", "buffer_count": 2},
            "timeout": 30,
        }
    )
    assert config.reduce_dtype == "bf16"
    dumped = json.loads(json.dumps(config.to_dict()))
    assert dumped["offload_optimizer"]["nvme_path"] == "/tmp/nvme"
    assert ZeroConfig.from_dict(dumped) == config


def test_yaml_round_trip(tmp_path: Path) -> None:
    launch_yaml = tmp_path / "launch.yaml"
    launch_yaml.write_text(
        """
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_processes: 2
zero_config:
  stage: 3
  prefetch_bucket_size: 20M
  param_persistence_threshold: 1e4
  units: [GPT2Block]
  offload_optimizer:
    device: cpu
    pin_memory: false
  loss_scale:
    initial_scale: 4096
"""
    )
    config = ZeroConfig.from_yaml(launch_yaml)
    assert config.prefetch_bucket_size == 20_000_000
    assert config.param_persistence_threshold == 10_000
    assert config.units == ("GPT2Block",)
    assert config.offload_optimizer == OffloadConfig(device="cpu", pin_memory=False)
    assert config.loss_scale.initial_scale == 4096.0

    block_only = tmp_path / "block.yaml"
    block_only.write_text(yaml.safe_dump(config.to_dict()))
    assert ZeroConfig.from_yaml(block_only) == config
    wrapped = tmp_path / "wrapped.yaml"
    wrapped.write_text(yaml.safe_dump({"zero_config": config.to_dict(), "num_processes": 2}))
    assert ZeroConfig.from_yaml(wrapped) == config


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text("num_processes: 2\nzero_config:\n  stage: 9\n")
    with pytest.raises(ValueError, match=r"bad_value\.yaml: zero_config\.stage=9"):
        ZeroConfig.from_yaml(bad_value)
    accelerate_only = tmp_path / "acc.yaml"
    accelerate_only.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\n")
    with pytest.raises(ValueError, match="has no 'zero_config:' block"):
        ZeroConfig.from_yaml(accelerate_only)
    with pytest.raises(ValueError, match="does not exist"):
        ZeroConfig.from_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("zero_config: [unclosed\n")
    with pytest.raises(ValueError, match=r"broken\.yaml is not valid YAML"):
        ZeroConfig.from_yaml(broken)


# A Hugging Face-style DeepSpeed ZeRO-3 template, trimmed to the mapped keys plus the
# keys accepted because accel_zero always behaves that way.
DS_CONFIG: dict[str, Any] = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 1.0,
    "fp16": {
        "enabled": True,
        "initial_scale_power": 12,
        "loss_scale_window": 500,
        "hysteresis": 3,
        "min_loss_scale": 2,
        "loss_scale": 0,
    },
    "bf16": {"enabled": False},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "buffer_count": 4},
        "offload_param": {"device": "cpu", "pin_memory": False},
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": 1e4,
        "stage3_max_live_parameters": 1e8,
        "stage3_max_reuse_distance": 2e8,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def test_deepspeed_mapping(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(DS_CONFIG))
    config = ZeroConfig.from_deepspeed(path)
    assert config == ZeroConfig(
        stage=3,
        prefetch_bucket_size=ZeroConfig().prefetch_bucket_size,  # "auto" = accel_zero default
        max_live_parameters=100_000_000,
        max_reuse_distance=200_000_000,
        param_persistence_threshold=10_000,
        reduce_bucket_size=50_000_000,
        overlap_comm=False,
        mixed_precision="fp16",
        gradient_clipping=1.0,
        loss_scale=LossScaleConfig(
            initial_scale=4096.0, growth_interval=500, hysteresis=3, min_scale=2.0
        ),
        offload_optimizer=OffloadConfig(
            device="nvme", nvme_path=Path("/local_nvme"), buffer_count=4
        ),
        offload_param=OffloadConfig(device="cpu", pin_memory=False),
    )
    assert ZeroConfig.from_deepspeed(DS_CONFIG) == config  # dict and file agree
    assert ZeroConfig.from_yaml(path) == config  # a JSON with zero_optimization is detected
    assert ZeroConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_deepspeed_bf16_and_auto() -> None:
    config = ZeroConfig.from_deepspeed(
        {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}, "gradient_clipping": 0}
    )
    assert (config.stage, config.mixed_precision, config.gradient_clipping) == (2, "bf16", None)
    auto = ZeroConfig.from_deepspeed({"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}})
    assert auto.mixed_precision is None


@pytest.mark.parametrize(
    ("ds", "fragments"),
    [
        (
            {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}, "steps_per_print": 1},
            [
                "zero_optimization.zero_hpz_partition_size",
                "steps_per_print",
                "no accel_zero equivalent",
            ],
        ),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 0.3}}},
            ["zero_optimization.offload_optimizer.ratio"],
        ),
        ({"optimizer": {"type": "AdamW"}}, ["optimizer (create the torch optimizer"]),
        ({"train_batch_size": 32}, ["train_batch_size=32", '"auto"']),
        ({"zero_optimization": {"contiguous_gradients": False}}, ["contiguous_gradients=false"]),
        ({"zero_optimization": {"stage": 0}}, ["zero_optimization.stage=0", "allowed: 1, 2, 3"]),
        (
            {"fp16": {"enabled": True}, "bf16": {"enabled": True}},
            ["fp16.enabled and bf16.enabled are both true"],
        ),
        (
            {"zero_optimization": {"stage3_max_live_parameters": -5}},
            ["zero_optimization.stage3_max_live_parameters", "zero_config.max_live_parameters"],
        ),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
            ["zero_optimization.offload_optimizer", "nvme_path"],
        ),
    ],
)
def test_deepspeed_errors_name_keys(ds: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        ZeroConfig.from_deepspeed(ds)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(LAUNCH_CONFIG_ENV, raising=False)
    monkeypatch.delenv(CONFIG_PATH_ENV, raising=False)
    return monkeypatch


def test_resolve_precedence(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert ZeroConfig.resolve(None) == ZeroConfig()

    path_config = tmp_path / "z.yaml"
    path_config.write_text("zero_config:\n  stage: 1\n")
    clean_env.setenv(CONFIG_PATH_ENV, str(path_config))
    assert ZeroConfig.resolve(None).stage == 1

    clean_env.setenv(LAUNCH_CONFIG_ENV, json.dumps({"stage": 2}))
    with caplog.at_level(logging.WARNING, logger="accel_zero.config"):
        assert ZeroConfig.resolve(None).stage == 2
    assert CONFIG_PATH_ENV in caplog.text  # the ignored source is reported

    assert ZeroConfig.resolve({"stage": 3, "timeout": 5}).timeout == 5.0
    assert ZeroConfig.resolve(ZeroConfig(stage=1, overlap_comm=False)).overlap_comm is False
    explicit_file = tmp_path / "explicit.yaml"
    explicit_file.write_text("stage: 3\nreduce_bucket_size: 1M\n")
    assert ZeroConfig.resolve(explicit_file).reduce_bucket_size == 1_000_000

    # Sources are not merged: the launch block alone decides, unspecified keys are defaults.
    clean_env.setenv(LAUNCH_CONFIG_ENV, json.dumps({"timeout": 9}))
    resolved = ZeroConfig.resolve(None)
    assert (resolved.stage, resolved.timeout) == (3, 9.0)


def test_resolve_bad_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(LAUNCH_CONFIG_ENV, "{not json")
    with pytest.raises(ValueError, match=LAUNCH_CONFIG_ENV):
        ZeroConfig.resolve(None)
    clean_env.setenv(LAUNCH_CONFIG_ENV, json.dumps({"stage": 7}))
    with pytest.raises(ValueError, match=r"ACCEL_ZERO_LAUNCH_CONFIG.*: zero_config\.stage=7"):
        ZeroConfig.resolve(None)
    with pytest.raises(TypeError, match="zero_config must be a ZeroConfig"):
        ZeroConfig.resolve(42)  # type: ignore[arg-type]


def test_ignored_nvme_path_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="accel_zero.config"):
        ZeroConfig.from_dict({"offload_optimizer": {"device": "cpu", "nvme_path": "/nvme"}})
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "zero_config.offload_optimizer.nvme_path=/nvme is ignored" in warnings[0]


def test_errors_pickle_with_their_key() -> None:
    # Errors raised on a rank travel back to the launcher/harness by pickle.
    import pickle

    with pytest.raises(ValueError) as info:
        ZeroConfig.from_dict({"offload_optimizer": {"device": "tape"}})
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is type(info.value)
    assert clone.key == "zero_config.offload_optimizer.device"  # type: ignore[attr-defined]
    assert str(clone) == str(info.value)


def test_deepspeed_sub_group_size_and_aio_are_mapped() -> None:
    cfg = ZeroConfig.from_deepspeed(
        {
            "zero_optimization": {
                "stage": 3,
                "sub_group_size": 1e8,
                "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp/x"},
                "offload_param": {"device": "nvme", "nvme_path": "/tmp/x", "buffer_count": 6},
            },
            "aio": {"block_size": 262144, "queue_depth": 8, "thread_count": 2, "use_gds": False},
        }
    )
    assert cfg.sub_group_size == 100_000_000
    assert (cfg.aio.block_size, cfg.aio.queue_depth, cfg.aio.threads) == (262144, 8, 2)
    assert cfg.offload_param.device == "nvme" and cfg.offload_param.buffer_count == 6
    with pytest.raises(ValueError, match=r"aio\.use_gds"):
        ZeroConfig.from_deepspeed({"aio": {"use_gds": True}})
