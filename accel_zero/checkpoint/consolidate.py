"""``accel-zero export CKPT_DIR OUT_DIR``: a sharded checkpoint -> a ``from_pretrained`` folder.

[Note: offline export]
One process, no process group. Each ``model/<fqn>`` key is reassembled from every rank's rows
(``CheckpointReader.read``: one preallocated tensor, each rank's rows read into it), then
handed to the same pipeline as ``save_model``: tied aliases dropped and transformers'
load-time renames reverted (``accel_zero.hf``), one module's tensors at a time (a reverse
conversion needs all tensors of one fused weight, which live in one module), written by
``StreamingConsolidatedWriter`` (a ``ConsolidatedWriter`` that writes each tensor to the
shard file as it comes, see [Note: streamed safetensors]) and published atomically like
``save_model``. Peak memory is therefore about one module's tensors (one tensor for dense
models), not a shard, let alone the model.

A transformers model is rebuilt on the meta device from the config the save stored
(``hf/config.json``, class from ``architectures``): names, ties and conversions come from it,
and ``config.json``/``generation_config.json`` are written beside the weights. A plain
``nn.Module`` checkpoint exports its state-dict names as saved, without a config.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from accel_zero.checkpoint import layout
from accel_zero.checkpoint.export import (
    ConsolidatedWriter,
    _prepare_tmp_dir,
    _publish,
    parse_size,
)
from accel_zero.checkpoint.reader import CheckpointReader, open_checkpoint
from accel_zero.checkpoint.stream import DirectWriter, SafetensorsStream, supports_direct_io

__all__ = ["StreamingConsolidatedWriter", "add_arguments", "export_checkpoint", "main"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class StreamingConsolidatedWriter(ConsolidatedWriter):
    """``ConsolidatedWriter`` that writes each tensor to the current shard file at once
    (memory: none held) instead of collecting a shard in memory. safetensors only."""

    header_reserve: int = 256 * 1024
    direct: DirectWriter | None = None
    """O_DIRECT writes (see stream.DirectWriter); None writes through the page cache."""
    _stream: SafetensorsStream | None = None
    _stream_name: str = ""
    _stream_keys: list[str] = field(default_factory=list)

    def add(self, key: str, tensor: Tensor) -> None:
        assert self.safe_serialization, "StreamingConsolidatedWriter writes safetensors only"
        if key in self._seen:
            return
        self._seen.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        stream = self._stream
        if stream is not None and (
            stream.data_bytes + nbytes > self.max_shard_bytes or not stream.fits(key, tensor)
        ):
            self.flush()
            stream = None
        if stream is None:
            self._stream_name = f"shard-{len(self._shards) + 1:05d}.safetensors.partial"
            stream = SafetensorsStream(
                self.directory / self._stream_name,
                header_reserve=self.header_reserve,
                metadata={"format": "pt"},
                direct=self.direct,
            )
            self._stream = stream
        stream.add(key, tensor)
        self._stream_keys.append(key)
        self.total_bytes += nbytes
        self.total_numel += tensor.numel()
        if self.first_float_dtype is None and tensor.is_floating_point():
            self.first_float_dtype = tensor.dtype

    def flush(self) -> None:
        if self._stream is None:
            return
        self._stream.close()
        self._shards.append((self._stream_name, self._stream_keys))
        self._stream = None
        self._stream_keys = []

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.abort()
            self._stream = None


def _meta_model(config_dir: Path) -> nn.Module:
    """The saved transformers model, built on the meta device from its stored config."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"accel-zero export: {config_dir / 'config.json'} names architectures="
            f"{architectures}, not a transformers model class this install provides"
        )
    with torch.device("meta"):
        return cls(config)  # type: ignore[no-any-return]


def _export_names(reader: CheckpointReader, prefix: str, model: nn.Module | None) -> list[str]:
    """State-dict names to export, in checkpoint order (``prefix`` stripped). For a model:
    only its persistent state, each tied group under the name ``save_pretrained`` keeps."""
    names = [key[len(prefix) :] for key in reader.keys(prefix)]
    if model is None:
        return names
    alias = _tied_aliases(model, set(names))
    persistent = set(model.state_dict().keys())
    skipped = [alias.get(n, n) for n in names if alias.get(n, n) not in persistent]
    if skipped:
        logger.info("export: not in %s's state dict, skipped: %s", type(model).__name__, skipped)
    return [n for n in names if alias.get(n, n) in persistent]


def _units(names: list[str]) -> list[list[str]]:
    """Consecutive names of one module (everything a reverse conversion needs together)."""
    units: list[list[str]] = []
    parent = None
    for name in names:
        here = name.rpartition(".")[0]
        if not units or here != parent:
            units.append([])
            parent = here
        units[-1].append(name)
    return units


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    prefix: str = "model/",
) -> Path:
    """Write the ``prefix`` keys of sharded checkpoint ``checkpoint`` as consolidated
    safetensors (+ config) to ``out_dir``; see [Note: offline export]. ``dtype`` casts
    floating-point tensors (None keeps the saved dtype, fp32 master weights)."""
    target = Path(out_dir).expanduser()
    max_bytes = parse_size(max_shard_size)
    with open_checkpoint(checkpoint) as reader:
        if not reader.keys(prefix):
            raise ValueError(
                f"accel-zero export: {reader.directory} holds no {prefix!r} keys (saved keys "
                f"start with: {sorted({k.split('/', 1)[0] for k in reader.keys()})})"
            )
        config_dir = reader.model_files_dir
        model = _meta_model(config_dir) if config_dir is not None else None
        names = _export_names(reader, prefix, model)
        alias = _tied_aliases(model, set(names)) if model is not None else {}
        tmp = _prepare_tmp_dir(target)
        direct = DirectWriter() if supports_direct_io(tmp) else None
        writer = StreamingConsolidatedWriter(
            directory=tmp, max_shard_bytes=max_bytes, direct=direct
        )
        try:
            keep = _keep_filter(model)
            arena = _Arena()
            for unit_names in _units(names):
                _write_unit(
                    reader,
                    writer,
                    model,
                    [(prefix + n, alias.get(n, n)) for n in unit_names],
                    keep,
                    dtype,
                    arena,
                )
            files = writer.finish()
            if model is not None and config_dir is not None:
                _write_model_files(model, config_dir, tmp, writer.first_float_dtype)
            _publish(tmp, target, files)
        except BaseException:
            writer.abort()
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    logger.info("export: wrote %s (%d tensors, %d bytes)", target, len(names), writer.total_bytes)
    return target


class _Arena:
    """One grow-only buffer the tensors of one module are read into, reused for the next:
    the export allocates (and frees) nothing per tensor, so its peak memory is the largest
    module whatever the C allocator does with freed blocks."""

    _ALIGN = 64

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._used = 0

    def reserve(self, nbytes: int) -> None:
        """Make room for ``nbytes`` (plus alignment) and start over; earlier views die."""
        self._used = 0
        if nbytes > self._buffer.numel():
            self._buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        start = -(-self._used // self._ALIGN) * self._ALIGN
        self._used = start + nbytes
        return self._buffer[start : start + nbytes].view(dtype).view(shape)


def _write_unit(
    reader: CheckpointReader,
    writer: StreamingConsolidatedWriter,
    model: nn.Module | None,
    keys: list[tuple[str, str]],
    keep: Any,
    dtype: torch.dtype | None,
    arena: _Arena,
) -> None:
    """Read one module's ``(checkpoint key, export name)`` tensors into ``arena`` and write
    them (transformers' renames reverted) before the next module is read."""
    keys = [(key, name) for key, name in keys if keep(name)]
    shapes = [(reader.layout(key).global_shape, reader.layout(key).dtype) for key, _ in keys]
    arena.reserve(sum(math.prod(s) * d.itemsize + _Arena._ALIGN for s, d in shapes))
    unit: dict[str, Tensor] = {}
    for (key, name), (shape, saved) in zip(keys, shapes, strict=True):
        rows = shape[0] if shape and not reader.layout(key).replicated else 0
        tensor = reader.read_rows(key, 0, rows, out=arena.take(shape, saved))
        unit[name] = (
            tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        )
    if model is not None:
        from accel_zero import hf

        unit = hf.revert_weight_renames(model, unit)
    for name, tensor in unit.items():
        writer.add(name, tensor)


def _tied_aliases(model: nn.Module, names: set[str]) -> dict[str, str]:
    from accel_zero import hf

    alias = {}
    for group in hf.tied_parameter_groups(model):
        found = [n for n in group if n in names]
        if found and group[0] not in names:
            alias[found[0]] = group[0]
    return alias


def _keep_filter(model: nn.Module | None) -> Any:
    if model is None:
        return lambda _key: True
    from accel_zero import hf

    return hf.export_state_filter(model)


def _write_model_files(
    model: nn.Module, config_dir: Path, directory: Path, dtype: torch.dtype | None
) -> None:
    """config.json with the exported dtype; the generation config exactly as saved."""
    from accel_zero import hf

    hf.save_model_files(model, directory, dtype=dtype)
    saved = config_dir / "generation_config.json"
    if saved.is_file():
        shutil.copyfile(saved, directory / "generation_config.json")


# ------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``accel-zero export`` arguments."""
    parser.add_argument("checkpoint", help="A folder written by save_state (sharded checkpoint).")
    parser.add_argument("out_dir", help="Where to write the from_pretrained folder.")
    parser.add_argument(
        "--max-shard-size",
        "--max_shard_size",
        default="5GB",
        help="Largest safetensors file, e.g. 5GB, 500MB (default 5GB).",
    )
    parser.add_argument(
        "--dtype",
        choices=("saved", *_DTYPES),
        default="saved",
        help="Cast floating-point weights (default: as saved, the fp32 master weights).",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``accel-zero export``; returns the exit code."""
    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out_dir,
            max_shard_size=args.max_shard_size,
            dtype=_DTYPES.get(args.dtype),
        )
    except (layout.CheckpointError, ValueError) as exc:
        print(f"accel-zero export: {exc}", file=sys.stderr)
        return 1
    print(f"accel-zero export: wrote {out}")
    return 0
