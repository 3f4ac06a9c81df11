"""ZeroConfig and friends: what the user asks the ZeRO engine for, validated once.

The three dataclasses are frozen and keyword-only; every field is documented once,
right under it, and validated in ``__post_init__``. They are built from a Python
dict (``from_dict``), a YAML or JSON file (``from_yaml``), a DeepSpeed JSON
(``from_deepspeed``, translated by ``accel_zero.deepspeed_config``), or from wherever the
user put them (``resolve``).

Parsing rules shared by every constructor:

* Element counts (``prefetch_bucket_size``, ``max_live_parameters``, ...) accept an
  int, an integral float (``5e7`` in JSON) or a string: ``"50_000_000"``, ``"5e7"``,
  ``"50M"``, ``"1.5G"``. Suffixes are *decimal* element counts, case-insensitive:
  ``K`` = 1e3, ``M`` = 1e6, ``G`` or ``B`` = 1e9, ``T`` = 1e12. They count elements,
  not bytes, so byte units (``"50MB"``, ``"1GiB"``) are rejected.
* Float fields accept ints and numeric strings (YAML 1.1 reads ``1e-3`` as a string).
* Booleans must be booleans (``true``/``false``), never strings or 0/1.
* Errors are ``TypeError`` (wrong type) or ``ValueError`` (bad value, unknown key)
  and name the full key path (``zero_config.offload_optimizer.device``), the allowed
  values or range, and for an unknown key the closest valid key.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

logger = logging.getLogger(__name__)

LAUNCH_CONFIG_ENV = "ACCEL_ZERO_LAUNCH_CONFIG"
"""Env var with the YAML's ``zero_config`` block as JSON (set by ``accel-zero launch``)."""
CONFIG_PATH_ENV = "ACCEL_ZERO_CONFIG"
"""Environment variable holding the path of a YAML/JSON file with a ``zero_config`` block."""

ROOT = "zero_config"

_STAGES = (1, 2, 3)
_OFFLOAD_DEVICES = ("none", "cpu", "nvme")
_REDUCE_DTYPES = ("fp32", "bf16", "fp16")
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}
_MIXED_PRECISIONS = ("no", "bf16", "fp16")
_SIZE_RE = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9_]*)?(?:e[+-]?[0-9]+)?)\s*([kmgbt]?)\s*$", re.I)
_SIZE_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


# ----------------------------------------------------------------------------------------------
# Errors and value parsers. Each takes the full key path so messages name it.


class ConfigValueError(ValueError):
    """A configuration value or key is invalid; ``key`` is its full dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across ranks
        return (type(self), (self.key, str(self)))


class ConfigTypeError(TypeError):
    """A configuration value has the wrong type; ``key`` is its full dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across ranks
        return (type(self), (self.key, str(self)))


def _type_error(key: str, value: Any, expected: str) -> ConfigTypeError:
    return ConfigTypeError(key, f"{key} must be {expected}, got {type(value).__name__} {value!r}")


def _closest(key: str, valid: list[str]) -> str | None:
    matches = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return matches[0] if matches else None


def _check_keys(
    data: Mapping[str, Any], valid: list[str], path: str, hints: Mapping[str, str] | None = None
) -> None:
    """Reject unknown keys, naming the closest valid key (or an explicit hint)."""
    for key in data:
        if not isinstance(key, str):
            raise _type_error(f"{path}.<key {key!r}>", key, "a string key")
        if key in valid:
            continue
        hint = (hints or {}).get(key)
        if hint is None:
            guess = _closest(key, valid)
            hint = f"did you mean '{guess}'?" if guess else ""
        raise ConfigValueError(
            f"{path}.{key}",
            f"unknown key {path}.{key}; {hint + ' ' if hint else ''}"
            f"valid keys: {', '.join(sorted(valid))}",
        )


def parse_count(value: Any, key: str, *, minimum: int = 0) -> int:
    """An element count: int, integral float, or a string such as ``"50M"`` / ``"5e7"``."""
    if isinstance(value, bool):
        raise _type_error(key, value, "an element count (int or a string like '50M')")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ConfigValueError(key, f"{key}={value!r} must be a whole number of elements")
        number = int(value)
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            raise ConfigValueError(
                key,
                f"{key}={value!r} is not an element count; write an int or a number with a "
                "decimal suffix K/M/G/T (e.g. '50M', '5e7'); byte units like 'MB' are not counts",
            )
        amount = float(match.group(1).replace("_", "")) * _SIZE_SUFFIX[match.group(2).lower()]
        if not amount.is_integer():
            raise ConfigValueError(key, f"{key}={value!r} must be a whole number of elements")
        number = int(amount)
    else:
        raise _type_error(key, value, "an element count (int or a string like '50M')")
    if number < minimum:
        raise ConfigValueError(key, f"{key}={value!r} must be >= {minimum}")
    return number


def _parse_int(value: Any, key: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(key, value, "an int")
    if value < minimum:
        raise ConfigValueError(key, f"{key}={value!r} must be >= {minimum}")
    return value


def _parse_float(
    value: Any,
    key: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite float in ``[low, high]`` (``(`` / ``)`` when open)."""
    if isinstance(value, bool):
        raise _type_error(key, value, "a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _type_error(key, value, "a number") from None
    if not isinstance(value, (int, float)):
        raise _type_error(key, value, "a number")
    number = float(value)
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    opening = "(" if low_open or low is None else "["
    closing = ")" if high_open or high is None else "]"
    interval = f"{opening}{lo}, {hi}{closing}"
    bad = not math.isfinite(number)
    if low is not None:
        bad |= number <= low if low_open else number < low
    if high is not None:
        bad |= number >= high if high_open else number > high
    if bad:
        raise ConfigValueError(key, f"{key}={value!r} must be a finite number in {interval}")
    return number


def _parse_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(key, value, "a boolean (true or false)")
    return value


def _parse_choice(
    value: Any, key: str, choices: tuple[Any, ...], aliases: Mapping[str, str] | None = None
) -> Any:
    if isinstance(value, str) and aliases:
        value = aliases.get(value.lower(), value)
    if isinstance(value, bool) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        guess = (
            _closest(value, [c for c in choices if isinstance(c, str)])
            if isinstance(value, str)
            else None
        )
        hint = f"; did you mean {guess!r}?" if guess else ""
        raise ConfigValueError(key, f"{key}={value!r} is not allowed (allowed: {allowed}){hint}")
    return value


def _load_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON file (JSON is YAML) into a dict, naming the file on failure."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigValueError(str(file), f"config file {file} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigValueError(
            str(file), f"config file {file} is not valid YAML/JSON: {exc}"
        ) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigTypeError(
            str(file), f"config file {file} must hold a mapping, got {type(data).__name__}"
        )
    return data


_C = TypeVar("_C", bound="_ConfigBase")


def _default_of(f: Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


class _ConfigBase:
    """Shared construction: ``__post_init__`` normalises and validates every field."""

    _DEFAULT_PATH = ROOT

    @classmethod
    def _normalise(cls, values: dict[str, Any], path: str, *, warn: bool = True) -> dict[str, Any]:
        raise NotImplementedError

    def __post_init__(self) -> None:
        current = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        for name, value in self._normalise(current, self._DEFAULT_PATH).items():
            if value is not current[name]:
                object.__setattr__(self, name, value)

    @classmethod
    def _from_mapping(cls: type[_C], data: Any, path: str) -> _C:
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise _type_error(path, data, f"a mapping of {cls.__name__} keys")
        valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        _check_keys(data, valid, path, _KEY_HINTS)
        values = {f.name: _default_of(f) for f in fields(cls)}  # type: ignore[arg-type]
        values.update(data)
        # Validate here for errors that carry the full key path; the constructor then
        # re-checks (a no-op on valid values) and emits any warnings, once.
        return cls(**cls._normalise(values, path, warn=False))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that ``from_dict`` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _ConfigBase):
                value = value.to_dict()
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass(frozen=True, kw_only=True)
class LossScaleConfig(_ConfigBase):
    """Dynamic loss scaling for fp16 (ignored for bf16/fp32)."""

    _DEFAULT_PATH = f"{ROOT}.loss_scale"

    initial_scale: float = 2.0**16
    """Loss scale at the first step (DeepSpeed ``fp16.initial_scale_power`` = log2 of it)."""
    growth_factor: float = 2.0
    """Multiply the scale by this after ``growth_interval`` steps without overflow; > 1."""
    backoff_factor: float = 0.5
    """Multiply the scale by this on overflow (once hysteresis is used up); in (0, 1)."""
    growth_interval: int = 1000
    """Overflow-free steps before the scale grows (DeepSpeed ``fp16.loss_scale_window``); >= 1."""
    hysteresis: int = 2
    """Overflows tolerated before the scale backs off (DeepSpeed ``fp16.hysteresis``); >= 1."""
    min_scale: float = 1.0
    """The scale never backs off below this (DeepSpeed ``fp16.min_loss_scale``); > 0."""

    @classmethod
    def _normalise(cls, values: dict[str, Any], path: str, *, warn: bool = True) -> dict[str, Any]:
        out = dict(values)
        out["initial_scale"] = _parse_float(
            values["initial_scale"], f"{path}.initial_scale", low=0.0, low_open=True
        )
        out["growth_factor"] = _parse_float(
            values["growth_factor"], f"{path}.growth_factor", low=1.0, low_open=True
        )
        out["backoff_factor"] = _parse_float(
            values["backoff_factor"],
            f"{path}.backoff_factor",
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
        )
        out["growth_interval"] = _parse_int(
            values["growth_interval"], f"{path}.growth_interval", minimum=1
        )
        out["hysteresis"] = _parse_int(values["hysteresis"], f"{path}.hysteresis", minimum=1)
        out["min_scale"] = _parse_float(
            values["min_scale"], f"{path}.min_scale", low=0.0, low_open=True
        )
        if out["min_scale"] > out["initial_scale"]:
            raise ConfigValueError(
                f"{path}.min_scale",
                f"{path}.min_scale={out['min_scale']!r} must be <= "
                f"{path}.initial_scale={out['initial_scale']!r}",
            )
        return out


@dataclass(frozen=True, kw_only=True)
class AioConfig(_ConfigBase):
    """How the NVMe swapper drives the disk (DeepSpeed's ``aio`` section)."""

    _DEFAULT_PATH = f"{ROOT}.aio"

    block_size: int = 1 << 20
    """Bytes per IO request a record is cut into; a multiple of 4096 (O_DIRECT)."""
    queue_depth: int = 32
    """IO requests in flight per swap buffer; >= 1."""
    threads: int = 1
    """Threads submitting each buffer's requests; >= 1."""

    @classmethod
    def _normalise(cls, values: dict[str, Any], path: str, *, warn: bool = True) -> dict[str, Any]:
        out = dict(values)
        out["block_size"] = _parse_int(values["block_size"], f"{path}.block_size", minimum=4096)
        if out["block_size"] % 4096:
            raise ConfigValueError(
                f"{path}.block_size",
                f"{path}.block_size={out['block_size']} must be a multiple of 4096 (O_DIRECT)",
            )
        out["queue_depth"] = _parse_int(values["queue_depth"], f"{path}.queue_depth", minimum=1)
        out["threads"] = _parse_int(values["threads"], f"{path}.threads", minimum=1)
        return out


@dataclass(frozen=True, kw_only=True)
class OffloadConfig(_ConfigBase):
    """Where one kind of model state lives between uses (offload_optimizer / offload_param)."""

    _DEFAULT_PATH = "OffloadConfig"

    device: Literal["none", "cpu", "nvme"] = "none"
    """``none``: on the compute device; ``cpu``: in (pinned) host memory; ``nvme``: on disk."""
    nvme_path: Path | None = None
    """Folder on a fast local disk for ``device: nvme`` (one sub-folder per rank goes there)."""
    pin_memory: bool = True
    """Use page-locked host buffers so copies to and from the accelerator are asynchronous."""
    buffer_count: int = 4
    """Swap buffers per kind of state (NVMe), each the size of the largest record: the
    optimizer reads record i+1 and writes i-1 while stepping i, the parameters are read this
    many units ahead; >= 2. (4: scripts/bench_swap.py stalled least per byte of RAM.)"""

    @classmethod
    def _normalise(cls, values: dict[str, Any], path: str, *, warn: bool = True) -> dict[str, Any]:
        out = dict(values)
        out["device"] = _parse_choice(
            values["device"], f"{path}.device", _OFFLOAD_DEVICES, {"None": "none"}
        )
        nvme_path = values["nvme_path"]
        if nvme_path is not None:
            if not isinstance(nvme_path, (str, os.PathLike)) or str(nvme_path) == "":
                raise _type_error(f"{path}.nvme_path", nvme_path, "a non-empty folder path")
            out["nvme_path"] = Path(nvme_path)
        out["pin_memory"] = _parse_bool(values["pin_memory"], f"{path}.pin_memory")
        out["buffer_count"] = _parse_int(values["buffer_count"], f"{path}.buffer_count", minimum=2)
        if out["device"] == "nvme" and out["nvme_path"] is None:
            raise ConfigValueError(
                f"{path}.nvme_path",
                f"{path}.device='nvme' needs {path}.nvme_path (a folder on a local NVMe disk)",
            )
        return out


@dataclass(frozen=True, kw_only=True)
class ZeroConfig(_ConfigBase):
    """Everything the ZeRO engine can be asked for; see the README's configuration reference."""

    stage: int = 3
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    prefetch_bucket_size: int = 50_000_000
    """Elements of upcoming units gathered ahead of use (stage 3); 0 disables prefetch."""
    max_live_parameters: int = 1_000_000_000
    """Most elements gathered (full) at once per rank (stage 3); >= 1."""
    max_reuse_distance: int = 1_000_000_000
    """Keep a unit gathered if it is used again within this many elements of other units."""
    param_persistence_threshold: int = 100_000
    """Parameters with fewer elements stay whole on every rank (never gathered); 0 = none."""
    reduce_bucket_size: int = 2_000_000
    """Elements per coalesced gradient collective; >= 1. Units complete in backward one
    after another; a bucket is sent once it holds this many elements, so small units
    share a collective while a transformer block (millions of elements) is reduced on
    its own, overlapping the rest of backward. (DeepSpeed's 5e8 default sends a small
    model's gradients in one collective at the end of backward: measured 1.069x DDP's
    step time against 1.025x with per-block buckets, scripts/bench_train.py.)"""
    overlap_comm: bool = True
    """Run gathers and gradient reductions asynchronously, overlapping compute."""
    reduce_dtype: str | None = None
    """dtype gradients are reduced in: None (= fp32), 'fp32', 'bf16' or 'fp16'."""
    param_dtype: str | None = None
    """dtype parameters are stored, gathered and computed in under bf16/fp16 mixed precision:
    None (= the mixed-precision dtype: half the gather traffic and gathered memory, as
    DeepSpeed and FSDP2's param_dtype) or 'fp32' (fp32 parameters under autocast, exactly
    Accelerate's mixed precision). fp32 master weights are kept either way."""
    units: tuple[str, ...] | None = None
    """Module class names gathered together as one unit; None = ``model._no_split_modules``."""
    mixed_precision: str | None = None
    """None takes Accelerate's setting; else 'no', 'bf16' or 'fp16' (overrides it)."""
    gradient_clipping: float | None = None
    """Default ``max_norm`` carried over from a DeepSpeed JSON; informational, > 0 or None."""
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    """fp16 dynamic loss scaling."""
    offload_optimizer: OffloadConfig = field(default_factory=OffloadConfig)
    """Where fp32 master weights and optimizer state live (none, cpu or nvme)."""
    offload_param: OffloadConfig = field(default_factory=OffloadConfig)
    """Where parameter shards live between uses (none, cpu or nvme; stage 3 only)."""
    sub_group_size: int = 10_000_000
    """Elements of optimizer state moved as one record with offload_optimizer nvme
    (DeepSpeed's key): master, exp_avg and exp_avg_sq of 1e7 elements make a 120 MB record,
    which reaches full disk speed here while buffer_count of them stay a small part of RAM
    (scripts/bench_swap.py; DeepSpeed's 1e9 makes 12 GB records); >= 1."""
    aio: AioConfig = field(default_factory=AioConfig)
    """How the NVMe swapper drives the disk."""
    timeout: float = 1800.0
    """Seconds before a collective or the rendezvous gives up with an error; > 0."""
    shard_group_size: int | Literal["node"] | None = None
    """Hybrid sharding (FSDP2's HSDP): shard parameters, gradients and optimizer state within
    groups of this many consecutive ranks and replicate them across groups; 'node' = the
    ranks of one machine (LOCAL_WORLD_SIZE); None = all ranks. Must divide the world size
    (checked when the groups are built, accel_zero/comm.py)."""

    @classmethod
    def _normalise(cls, values: dict[str, Any], path: str, *, warn: bool = True) -> dict[str, Any]:
        out = dict(values)
        out["stage"] = _parse_choice(values["stage"], f"{path}.stage", _STAGES)
        out["prefetch_bucket_size"] = parse_count(
            values["prefetch_bucket_size"], f"{path}.prefetch_bucket_size"
        )
        out["max_live_parameters"] = parse_count(
            values["max_live_parameters"], f"{path}.max_live_parameters", minimum=1
        )
        out["max_reuse_distance"] = parse_count(
            values["max_reuse_distance"], f"{path}.max_reuse_distance"
        )
        out["param_persistence_threshold"] = parse_count(
            values["param_persistence_threshold"], f"{path}.param_persistence_threshold"
        )
        out["reduce_bucket_size"] = parse_count(
            values["reduce_bucket_size"], f"{path}.reduce_bucket_size", minimum=1
        )
        out["overlap_comm"] = _parse_bool(values["overlap_comm"], f"{path}.overlap_comm")
        if values["reduce_dtype"] is not None:
            out["reduce_dtype"] = _parse_choice(
                values["reduce_dtype"], f"{path}.reduce_dtype", _REDUCE_DTYPES, _DTYPE_ALIASES
            )
        if values["param_dtype"] is not None:
            out["param_dtype"] = _parse_choice(
                values["param_dtype"], f"{path}.param_dtype", _REDUCE_DTYPES, _DTYPE_ALIASES
            )
        out["units"] = _parse_units(values["units"], f"{path}.units")
        if values["mixed_precision"] is not None:
            out["mixed_precision"] = _parse_choice(
                values["mixed_precision"],
                f"{path}.mixed_precision",
                _MIXED_PRECISIONS,
                _DTYPE_ALIASES,
            )
        if values["gradient_clipping"] is not None:
            out["gradient_clipping"] = _parse_float(
                values["gradient_clipping"], f"{path}.gradient_clipping", low=0.0, low_open=True
            )
        out["loss_scale"] = LossScaleConfig._from_mapping(
            values["loss_scale"], f"{path}.loss_scale"
        )
        for name in ("offload_optimizer", "offload_param"):
            out[name] = OffloadConfig._from_mapping(values[name], f"{path}.{name}")
        out["timeout"] = _parse_float(values["timeout"], f"{path}.timeout", low=0.0, low_open=True)
        out["sub_group_size"] = parse_count(
            values["sub_group_size"], f"{path}.sub_group_size", minimum=1
        )
        out["aio"] = AioConfig._from_mapping(values["aio"], f"{path}.aio")
        out["shard_group_size"] = _parse_shard_group_size(
            values["shard_group_size"], f"{path}.shard_group_size"
        )

        offload_param = out["offload_param"]
        offload_opt = out["offload_optimizer"]
        if offload_param.device != "none" and offload_opt.device == "none":
            raise ConfigValueError(
                f"{path}.offload_param.device",
                f"{path}.offload_param.device={offload_param.device!r} needs "
                f"{path}.offload_optimizer.device 'cpu' or 'nvme': a parameter shard is the fp32 "
                "master the optimizer steps, so it leaves the device with the optimizer state",
            )
        if offload_param.device == "nvme" and offload_opt.device != "nvme":
            raise ConfigValueError(
                f"{path}.offload_param.device",
                f"{path}.offload_param.device='nvme' needs {path}.offload_optimizer.device="
                "'nvme': with the fp32 masters in memory the parameter shards are those "
                f"masters, so there is nothing smaller to put on disk (got {offload_opt.device!r})",
            )
        if offload_param.device != "none" and out["stage"] != 3:
            raise ConfigValueError(
                f"{path}.offload_param.device",
                f"{path}.offload_param.device={offload_param.device!r} needs {path}.stage=3 "
                f"(stages 1 and 2 keep whole parameters on every rank), got stage {out['stage']}",
            )
        for name in ("offload_optimizer", "offload_param"):
            block = out[name]
            if warn and block.device != "nvme" and block.nvme_path is not None:
                key = f"{path}.{name}"
                logger.warning(
                    "%s.nvme_path=%s is ignored because %s.device=%r (only 'nvme' uses it)",
                    key,
                    block.nvme_path,
                    key,
                    block.device,
                )
        return out

    # ------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, path: str = ROOT) -> ZeroConfig:
        """Build from the ``zero_config`` block as a dict; ``path`` prefixes key names in errors."""
        return cls._from_mapping(data, path)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ZeroConfig:
        """Read a YAML (or JSON) file.

        The file may be a launch YAML (Accelerate's keys plus a ``zero_config:`` block; only
        the block is read), a file holding just the block's keys, or a DeepSpeed JSON (it
        has a ``zero_optimization`` section; see ``from_deepspeed``).
        """
        data = _load_mapping(path)
        try:
            if ROOT in data:
                return cls.from_dict(data[ROOT] if data[ROOT] is not None else {})
            if "zero_optimization" in data:
                return cls.from_deepspeed(data)
        except (ConfigValueError, ConfigTypeError) as exc:
            raise _in_source(exc, str(path)) from exc
        accelerate_keys = {
            "compute_environment",
            "distributed_type",
            "num_processes",
            "mixed_precision",
        }
        if "distributed_type" in data or "compute_environment" in data:
            raise ConfigValueError(
                ROOT,
                f"{path} looks like an Accelerate config but has no '{ROOT}:' block; add one "
                f"(e.g. '{ROOT}: {{stage: 3}}') or point at a file holding the block's keys "
                f"(Accelerate keys seen: {', '.join(sorted(accelerate_keys & set(data)))})",
            )
        try:
            return cls.from_dict(data)
        except (ConfigValueError, ConfigTypeError) as exc:
            raise _in_source(exc, str(path)) from exc

    @classmethod
    def from_deepspeed(cls, path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> ZeroConfig:
        """Translate a DeepSpeed JSON config (the mapping is in accel_zero/deepspeed_config.py)."""
        from accel_zero.deepspeed_config import deepspeed_to_dict, origin_of

        ds = path_or_dict if isinstance(path_or_dict, Mapping) else _load_mapping(path_or_dict)
        block, origin = deepspeed_to_dict(ds)
        try:
            return cls.from_dict(block)
        except (ConfigValueError, ConfigTypeError) as exc:
            ds_key = origin_of(exc.key, origin)
            if ds_key is None:
                raise
            message = f"DeepSpeed key {ds_key} (accel_zero {exc.key}): {exc}"
            raise type(exc)(exc.key, message) from exc

    @classmethod
    def resolve(
        cls, explicit: ZeroConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None
    ) -> ZeroConfig:
        """Find the config: explicit > $ACCEL_ZERO_LAUNCH_CONFIG > $ACCEL_ZERO_CONFIG > defaults.

        The first source present is used whole; sources are never merged key by key, so a
        config always reads the same as the one place it came from. A lower-precedence
        source that is also set is reported with a warning, since it is being ignored.
        ``explicit`` may be a ZeroConfig, a dict (the block) or a path to a YAML/JSON file.
        """
        sources = []
        if explicit is not None:
            sources.append("the explicit zero_config argument")
        if os.environ.get(LAUNCH_CONFIG_ENV):
            sources.append(f"${LAUNCH_CONFIG_ENV} (set by accel-zero launch)")
        if os.environ.get(CONFIG_PATH_ENV):
            sources.append(f"${CONFIG_PATH_ENV}={os.environ[CONFIG_PATH_ENV]}")
        if len(sources) > 1:
            logger.warning(
                "zero_config taken from %s; ignoring %s", sources[0], " and ".join(sources[1:])
            )

        if explicit is not None:
            if isinstance(explicit, ZeroConfig):
                return explicit
            if isinstance(explicit, Mapping):
                return cls.from_dict(explicit)
            if isinstance(explicit, (str, os.PathLike)):
                return cls.from_yaml(explicit)
            raise _type_error(ROOT, explicit, "a ZeroConfig, a dict, or a path to a YAML/JSON file")
        launch_block = os.environ.get(LAUNCH_CONFIG_ENV)
        if launch_block:
            try:
                data = json.loads(launch_block)
            except json.JSONDecodeError as exc:
                raise ConfigValueError(
                    LAUNCH_CONFIG_ENV,
                    f"${LAUNCH_CONFIG_ENV} is not valid JSON ({exc}); "
                    "it is set by accel-zero launch",
                ) from exc
            try:
                return cls.from_dict(data if data is not None else {})
            except (ConfigValueError, ConfigTypeError) as exc:
                raise _in_source(exc, f"${LAUNCH_CONFIG_ENV} (from accel-zero launch)") from exc
        config_path = os.environ.get(CONFIG_PATH_ENV)
        if config_path:
            return cls.from_yaml(config_path)
        return cls()


def _in_source(
    exc: ConfigValueError | ConfigTypeError, source: str
) -> ConfigValueError | ConfigTypeError:
    """The same error, saying which file or variable the bad value came from."""
    return type(exc)(exc.key, f"{source}: {exc}")


def _parse_units(value: Any, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _type_error(
            key, value, "a list of module class names (e.g. [LlamaDecoderLayer]) or null"
        )
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigValueError(
                f"{key}[{i}]", f"{key}[{i}]={name!r} must be a module class name"
            )
    if len(set(value)) != len(value):
        raise ConfigValueError(key, f"{key}={list(value)!r} lists a class twice")
    return tuple(value)


def _parse_shard_group_size(value: Any, key: str) -> int | str | None:
    """Hybrid sharding's group: None, a positive int, or 'node' (divisibility of the world
    size is checked where the world is known, when the groups are built)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "node":
        return "node"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(key, value, "a positive int (ranks per group), 'node' or null")
    if value < 1:
        raise ConfigValueError(
            key, f"{key}={value!r} must be >= 1 (ranks per group), 'node' or null (all ranks)"
        )
    return value


# Keys users carry over from DeepSpeed or mistype, with the accel_zero spelling.
_KEY_HINTS = {
    "stage3_prefetch_bucket_size": "accel_zero calls it 'prefetch_bucket_size';",
    "stage3_max_live_parameters": "accel_zero calls it 'max_live_parameters';",
    "stage3_max_reuse_distance": "accel_zero calls it 'max_reuse_distance';",
    "stage3_param_persistence_threshold": "accel_zero calls it 'param_persistence_threshold';",
    "zero_optimization": "a DeepSpeed section; use ZeroConfig.from_deepspeed for a DeepSpeed JSON;",
}

__all__ = [
    "CONFIG_PATH_ENV",
    "LAUNCH_CONFIG_ENV",
    "AioConfig",
    "ConfigTypeError",
    "ConfigValueError",
    "LossScaleConfig",
    "OffloadConfig",
    "ZeroConfig",
    "parse_count",
]
