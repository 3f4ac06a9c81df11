"""Checkpoints: the consolidated export (``save_model``).

[Note: streamed export]
``save_model`` writes a checkpoint that plain ``from_pretrained(dir)`` loads, without ever
holding the full model on the main rank: the engine yields the full tensors one unit at a
time (every rank iterates, the main rank receives), and ``ConsolidatedWriter`` appends them to
the current safetensors shard file, writing the shard out as soon as the next tensor would
push it past ``max_shard_size``. Peak extra memory on the main rank is one unit plus one shard.

What ``save_pretrained`` does to the weights is done per unit (``accel_zero.hf``): aliases of
tied parameters are dropped and transformers' load-time renames/conversions are reverted
(a unit holds every tensor of one conversion, e.g. all experts of a layer).

Atomicity: everything is written into a hidden temporary folder beside the target, then
published: a new folder is one ``rename``; an existing folder first loses its old weight
entry points (``model.safetensors``, the index), then receives the shards and config, and
the new entry point last. A crash at any moment leaves either the old checkpoint, no loadable
weights, or the new one, never a half-written checkpoint that ``from_pretrained`` would load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ConsolidatedWriter", "parse_size", "save_model", "write_consolidated"]

logger = logging.getLogger(__name__)

_SAFE_WEIGHTS = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_BIN_WEIGHTS = "pytorch_model.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"
_SHARD_RE = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "B": 1})


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or ``"10GB"`` / ``"500MB"`` / ``"2GiB"`` (as transformers)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
        if match is None:
            raise ValueError(
                f"max_shard_size={size!r} is not a size; use an int (bytes) or e.g. '10GB', '500MB'"
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2) or "B"])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


@dataclass(kw_only=True)
class ConsolidatedWriter:
    """Appends full tensors to shard files in ``directory``; see [Note: streamed export]."""

    directory: Path
    """The temporary folder the shards go to (published by ``write_consolidated``)."""
    max_shard_bytes: int
    safe_serialization: bool = True
    _pending: dict[str, Tensor] = field(default_factory=dict)
    _pending_bytes: int = 0
    _shards: list[tuple[str, list[str]]] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)
    total_bytes: int = 0
    total_numel: int = 0
    first_float_dtype: torch.dtype | None = None

    def add(self, key: str, tensor: Tensor) -> None:
        """Queue one full tensor; writes the current shard first if ``tensor`` would overflow it."""
        if key in self._seen:
            return  # a name yielded twice (e.g. by two units) is written once
        self._seen.add(key)
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[key] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self.total_numel += tensor.numel()
        if self.first_float_dtype is None and tensor.is_floating_point():
            self.first_float_dtype = tensor.dtype

    def flush(self) -> None:
        """Write the pending tensors as the next shard file."""
        if not self._pending:
            return
        ext = "safetensors" if self.safe_serialization else "bin"
        name = f"shard-{len(self._shards) + 1:05d}.{ext}.partial"
        path = self.directory / name
        if self.safe_serialization:
            from safetensors.torch import save_file

            save_file(self._pending, str(path), metadata={"format": "pt"})
        else:
            torch.save(self._pending, path)
        self._shards.append((name, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> list[str]:
        """Flush, give shards their final names, write the index; returns files in publish order.

        The entry point (single weights file or the index) is last in the list.
        """
        self.flush()
        stem, single, index_name = (
            ("model", _SAFE_WEIGHTS, _SAFE_INDEX)
            if self.safe_serialization
            else ("pytorch_model", _BIN_WEIGHTS, _BIN_INDEX)
        )
        ext = "safetensors" if self.safe_serialization else "bin"
        if not self._shards:
            raise ValueError("save_model: the model has no tensors to write")
        if len(self._shards) == 1:
            (self.directory / self._shards[0][0]).rename(self.directory / single)
            return [single]
        total = len(self._shards)
        names, weight_map = [], {}
        for i, (partial, keys) in enumerate(self._shards, start=1):
            final = f"{stem}-{i:05d}-of-{total:05d}.{ext}"
            (self.directory / partial).rename(self.directory / final)
            names.append(final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {
            "metadata": {"total_size": self.total_bytes, "total_parameters": self.total_numel},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / index_name).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, index_name]


def _prepare_tmp_dir(save_directory: Path) -> Path:
    """Create the hidden temporary folder beside ``save_directory`` (clear error if we can't)."""
    if save_directory.exists() and not save_directory.is_dir():
        raise ValueError(
            f"save_model: {save_directory} exists and is not a directory; pass a folder path"
        )
    try:
        save_directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=save_directory.parent, prefix=f".{save_directory.name}.partial-")
        if save_directory.exists() and not os.access(save_directory, os.W_OK):
            raise PermissionError(f"no write permission on {save_directory}")
    except OSError as exc:
        raise ValueError(
            f"save_model: cannot write to {save_directory}: {exc}. Pass a directory whose "
            "parent exists (or can be created) and is writable by this process."
        ) from exc
    return Path(tmp)


def _publish(tmp: Path, save_directory: Path, weight_files: list[str]) -> None:
    """Move the finished checkpoint in place; see [Note: streamed export] (atomicity)."""
    if not save_directory.exists():
        tmp.rename(save_directory)
        return
    for name in os.listdir(save_directory):  # old entry points first, then old shards
        if name in (_SAFE_INDEX, _BIN_INDEX, _SAFE_WEIGHTS, _BIN_WEIGHTS):
            (save_directory / name).unlink()
    for name in os.listdir(save_directory):
        if _SHARD_RE.fullmatch(name) and name not in weight_files:
            (save_directory / name).unlink()
    entry = weight_files[-1]
    for name in sorted(os.listdir(tmp)):
        if name != entry:
            os.replace(tmp / name, save_directory / name)
    os.replace(tmp / entry, save_directory / entry)
    shutil.rmtree(tmp, ignore_errors=True)


def write_consolidated(
    units: Iterable[Mapping[str, Tensor]],
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    is_main: bool,
    max_shard_size: int | str = "10GB",
    safe_serialization: bool = True,
    agree: Callable[[str | None], str | None] | None = None,
) -> Path:
    """Stream ``units`` (dicts of full tensors, one per unit) into a consolidated checkpoint.

    Every rank calls this and iterates ``units`` to the end (the engine's iterator runs
    collectives); only the main rank writes. ``agree(main_error)`` must return the main rank's
    value on every rank (a broadcast; identity for one process): it is called once before the
    first unit (so no rank iterates when the main rank cannot write) and once at the end, so
    every rank raises if the main rank failed. Returns ``save_directory``.
    """
    from accel_zero import hf

    target = Path(save_directory)
    agree = agree or (lambda value: value)
    max_bytes = parse_size(max_shard_size)
    error: BaseException | None = None
    tmp: Path | None = None
    if is_main:
        try:
            tmp = _prepare_tmp_dir(target)
        except ValueError as exc:
            error = exc
    preflight = agree(str(error) if error is not None else None)
    if preflight is not None:
        if error is not None:
            raise error
        raise RuntimeError(f"save_model failed on the main rank: {preflight}")

    keep = hf.export_state_filter(model)
    writer = (
        ConsolidatedWriter(
            directory=tmp, max_shard_bytes=max_bytes, safe_serialization=safe_serialization
        )
        if tmp is not None
        else None
    )
    try:
        for unit in units:  # every rank drains the iterator, even after a main-rank failure
            if writer is None or error is not None:
                continue
            kept: dict[str, Tensor] = {}
            try:
                kept = {key: tensor for key, tensor in unit.items() if keep(key)}
                for key, tensor in hf.revert_weight_renames(model, kept).items():
                    writer.add(key, tensor)
            except Exception as exc:
                error = exc
            # Drop this unit before the engine gathers the next one (one unit + one shard).
            del unit, kept
        if writer is not None and tmp is not None and error is None:
            try:
                weight_files = writer.finish()
                hf.save_model_files(model, tmp, dtype=writer.first_float_dtype)
                _publish(tmp, target, weight_files)
            except Exception as exc:
                error = exc
    finally:  # the iterator itself may raise (a failed collective): never leave tmp behind
        if tmp is not None and (error is not None or tmp.exists()):
            shutil.rmtree(tmp, ignore_errors=True)
    outcome = agree(f"{type(error).__name__}: {error}" if error is not None else None)
    if error is not None:
        raise error
    if outcome is not None:
        raise RuntimeError(f"save_model failed on the main rank: {outcome}")
    if is_main:
        logger.info("save_model: wrote %s", target)
    return target


def save_model(
    accelerator: Any,
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "10GB",
    safe_serialization: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Consolidated checkpoint of a ZeRO-sharded ``model`` that ``from_pretrained`` loads.

    Every rank must call it. See [Note: streamed export].
    """
    from accel_zero.comm import Comm

    engine = accelerator.zero_engine(model)
    comm = Comm()

    def agree(value: str | None) -> str | None:
        if not comm.distributed:
            return value
        return comm.all_gather_object(value, what="save_model status")[0]  # type: ignore[no-any-return]

    return write_consolidated(
        engine.iter_full_state_dict(dtype=dtype),
        model,
        save_directory,
        is_main=bool(accelerator.is_main_process),
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
        agree=agree,
    )
