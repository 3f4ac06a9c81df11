"""DeepSpeed JSON -> accel_zero ``zero_config`` block (``ZeroConfig.from_deepspeed``).

So DeepSpeed users can migrate by pointing accel_zero at their JSON. Decisions
(documented in the README's configuration reference):

* Mapped keys are listed in _DS_ZERO_MAP / _DS_OFFLOAD_KEYS / _DS_FP16_MAP / _DS_AIO_MAP.
* "auto" (Hugging Face's DeepSpeed templates) on a mapped key means "accel_zero's default".
* Keys naming behaviour accel_zero always has are accepted only with that value
  (_DS_FIXED), e.g. contiguous_gradients must be true.
* Batch-size keys are Accelerate's: accepted only as "auto" (the script's dataloader and
  Accelerator(gradient_accumulation_steps=...) decide them).
* Every other key is an error naming all of them at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from accel_zero.config import ROOT, ConfigValueError, _parse_int, _type_error

__all__ = ["deepspeed_to_dict", "origin_of"]

_DS_ZERO_MAP = {
    "stage": "stage",
    "stage3_prefetch_bucket_size": "prefetch_bucket_size",
    "stage3_max_live_parameters": "max_live_parameters",
    "stage3_max_reuse_distance": "max_reuse_distance",
    "stage3_param_persistence_threshold": "param_persistence_threshold",
    "reduce_bucket_size": "reduce_bucket_size",
    "overlap_comm": "overlap_comm",
    "sub_group_size": "sub_group_size",
}
_DS_AIO_MAP = {"block_size": "block_size", "queue_depth": "queue_depth", "thread_count": "threads"}
_DS_OFFLOAD_KEYS = ("device", "nvme_path", "pin_memory", "buffer_count")
_DS_FP16_MAP = {
    "loss_scale_window": "growth_interval",
    "hysteresis": "hysteresis",
    "min_loss_scale": "min_scale",
}
_DS_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "zero_optimization.contiguous_gradients": (
        (True,),
        "gradients are always reduced into flat buffers",
    ),
    "zero_optimization.reduce_scatter": ((True,), "gradients are always reduce-scattered"),
    "zero_optimization.allgather_partitions": ((True,), "parameters are always all-gathered"),
    "zero_optimization.round_robin_gradients": ((False,), "there is no round-robin mode"),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": (
        (True,),
        "save_model always gathers the full weights",
    ),
    "fp16.loss_scale": ((0, 0.0), "the loss scale is always dynamic (0)"),
    "fp16.consecutive_hysteresis": ((False,), "hysteresis counts all overflows"),
    "fp16.auto_cast": ((False,), "autocast is Accelerate's mixed_precision"),
    "wall_clock_breakdown": ((False,), "use accelerator.zero_stats() for timings"),
    "aio.single_submit": ((False,), "requests are submitted in batches"),
    "aio.overlap_events": ((True,), "submission and completion always overlap"),
    "aio.use_gds": ((False,), "GPUDirect Storage is not supported"),
    "train_batch_size": (("auto",), "Accelerate owns batch sizes: set them in your dataloader"),
    "train_micro_batch_size_per_gpu": (
        ("auto",),
        "Accelerate owns batch sizes: set them in your dataloader",
    ),
    "gradient_accumulation_steps": (
        ("auto",),
        "use Accelerator(gradient_accumulation_steps=...) or the Accelerate config",
    ),
}


def deepspeed_to_dict(ds: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Map a DeepSpeed config onto a ``zero_config`` block; also return accel key -> DS key."""
    block: dict[str, Any] = {}
    origin: dict[str, str] = {}
    unsupported: list[str] = []

    def fixed(ds_key: str, value: Any) -> None:
        allowed, why = _DS_FIXED[ds_key]
        if isinstance(value, bool) != isinstance(allowed[0], bool) or value not in allowed:
            shown = ", ".join(json.dumps(a) for a in allowed)
            raise ConfigValueError(
                ds_key,
                f"DeepSpeed key {ds_key}={json.dumps(value)} has no accel_zero equivalent "
                f"({why}; allowed: {shown}, or remove the key)",
            )

    def put(ds_key: str, accel_key: str, value: Any, target: dict[str, Any], prefix: str) -> None:
        if value == "auto":
            return  # "auto" = accel_zero's default
        target[accel_key] = value
        origin[f"{prefix}.{accel_key}"] = ds_key

    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        raise _type_error("zero_optimization", zero, "a mapping")
    if zero.get("stage") == 0:
        raise ConfigValueError(
            "zero_optimization.stage",
            "DeepSpeed key zero_optimization.stage=0 (no ZeRO) has no accel_zero equivalent "
            "(allowed: 1, 2, 3); for plain data parallelism use accelerate without accel_zero",
        )
    for key, value in zero.items():
        ds_key = f"zero_optimization.{key}"
        if key in _DS_ZERO_MAP:
            put(ds_key, _DS_ZERO_MAP[key], value, block, ROOT)
        elif key in ("offload_optimizer", "offload_param"):
            if not isinstance(value, Mapping):
                raise _type_error(ds_key, value, "a mapping")
            sub: dict[str, Any] = {}
            for sub_key, sub_value in value.items():
                if sub_key in _DS_OFFLOAD_KEYS:
                    put(f"{ds_key}.{sub_key}", sub_key, sub_value, sub, f"{ROOT}.{key}")
                else:
                    unsupported.append(f"{ds_key}.{sub_key}")
            block[key] = sub
            origin[f"{ROOT}.{key}"] = ds_key
        elif ds_key in _DS_FIXED:
            fixed(ds_key, value)
        else:
            unsupported.append(ds_key)

    fp16 = ds.get("fp16", {})
    bf16 = ds.get("bf16", {})
    for name, section in (("fp16", fp16), ("bf16", bf16)):
        if not isinstance(section, Mapping):
            raise _type_error(name, section, "a mapping")
    fp16_on, bf16_on = fp16.get("enabled", False), bf16.get("enabled", False)
    for name, flag in (("fp16.enabled", fp16_on), ("bf16.enabled", bf16_on)):
        if flag != "auto" and not isinstance(flag, bool):
            raise _type_error(name, flag, 'a boolean or "auto"')
    if fp16_on is True and bf16_on is True:
        raise ConfigValueError(
            "fp16.enabled", "DeepSpeed fp16.enabled and bf16.enabled are both true; pick one"
        )
    if fp16_on is True:
        block["mixed_precision"] = "fp16"
        origin[f"{ROOT}.mixed_precision"] = "fp16.enabled"
    elif bf16_on is True:
        block["mixed_precision"] = "bf16"
        origin[f"{ROOT}.mixed_precision"] = "bf16.enabled"
    # "auto" or false on both: leave mixed_precision to Accelerate.
    loss_scale: dict[str, Any] = {}
    for key, value in fp16.items():
        ds_key = f"fp16.{key}"
        if key == "enabled":
            continue
        if key == "initial_scale_power":
            if value == "auto":
                continue
            power = _parse_int(value, ds_key, minimum=0)
            loss_scale["initial_scale"] = float(2**power)
            origin[f"{ROOT}.loss_scale.initial_scale"] = ds_key
        elif key in _DS_FP16_MAP:
            put(ds_key, _DS_FP16_MAP[key], value, loss_scale, f"{ROOT}.loss_scale")
        elif ds_key in _DS_FIXED:
            fixed(ds_key, value)
        else:
            unsupported.append(ds_key)
    if loss_scale:
        block["loss_scale"] = loss_scale
    unsupported.extend(f"bf16.{key}" for key in bf16 if key != "enabled")

    aio = ds.get("aio", {})
    if not isinstance(aio, Mapping):
        raise _type_error("aio", aio, "a mapping")
    aio_block: dict[str, Any] = {}
    for key, value in aio.items():
        ds_key = f"aio.{key}"
        if key in _DS_AIO_MAP:
            put(ds_key, _DS_AIO_MAP[key], value, aio_block, f"{ROOT}.aio")
        elif ds_key in _DS_FIXED:
            fixed(ds_key, value)
        else:
            unsupported.append(ds_key)
    if aio_block:
        block["aio"] = aio_block
        origin[f"{ROOT}.aio"] = "aio"

    for key, value in ds.items():
        if key in ("zero_optimization", "fp16", "bf16", "aio"):
            continue
        if key == "gradient_clipping":
            if value not in ("auto", 0, 0.0) or isinstance(value, bool):
                block["gradient_clipping"] = value  # DeepSpeed's 0 means "no clipping"
                origin[f"{ROOT}.gradient_clipping"] = key
        elif key in _DS_FIXED:
            fixed(key, value)
        else:
            unsupported.append(key)
    if unsupported:
        hints = {
            "optimizer": "create the torch optimizer in your script",
            "scheduler": "create the scheduler in your script",
        }
        notes = [f"{k} ({hints[k]})" if k in hints else k for k in unsupported]
        raise ConfigValueError(
            unsupported[0],
            "DeepSpeed keys with no accel_zero equivalent: "
            + ", ".join(notes)
            + ". Remove them; mapped keys are zero_optimization.{"
            + ", ".join([*_DS_ZERO_MAP, "offload_optimizer", "offload_param"])
            + "}, fp16.{enabled, initial_scale_power, loss_scale_window, hysteresis, "
            "min_loss_scale}, bf16.enabled, aio.{block_size, queue_depth, thread_count}, "
            "gradient_clipping",
        )
    return block, origin


def origin_of(key: str, origin: Mapping[str, str]) -> str | None:
    """The DeepSpeed key an accel_zero key path (or its prefix) came from."""
    while key:
        if key in origin:
            return origin[key]
        if "." not in key:
            return None
        key = key.rsplit(".", 1)[0]
    return None
