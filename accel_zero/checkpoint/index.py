"""Per-rank shard indexes: which rows of which key live in which file, and their checks.

Each rank writes ``shards/rNNNNN.index.json``::

    {"format": "accel_zero.shards", "format_version": 1, "rank": 0, "world_size": 2,
     "files": {"shards/r00000-00001.safetensors": 1048968},
     "tensors": {"model/lm_head.weight": {"dtype": "float32", "global_shape": [96, 32],
                                          "rows": [0, 48], "replicated": false,
                                          "file": "shards/r00000-00001.safetensors"}}}

``rows`` are global rows ``[start, end)``; a replicated tensor has ``replicated: true`` and
is written by one rank only. A rank with no rows of a key records ``file: null``. The union
over all ranks must cover every key's rows exactly once (``merge_indexes``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from accel_zero.checkpoint.stream import parse_dtype

__all__ = ["KeyLayout", "Piece", "fingerprint", "merge_indexes"]

INDEX_FORMAT = "accel_zero.shards"
INDEX_FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Piece:
    """Rows ``[start, end)`` of one key, stored whole in ``file`` under the key's name."""

    start: int
    end: int
    file: str
    rank: int


@dataclass(frozen=True, kw_only=True)
class KeyLayout:
    """Everything known about one key across all ranks."""

    key: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    replicated: bool
    pieces: tuple[Piece, ...]
    """Sorted by ``start``; tile ``[0, rows)`` exactly (one piece for a replicated key)."""

    @property
    def rows(self) -> int:
        return self.global_shape[0] if self.global_shape else 1


def index_document(
    *, rank: int, world_size: int, files: Mapping[str, int], tensors: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "rank": rank,
        "world_size": world_size,
        "files": dict(files),
        "tensors": dict(tensors),
    }


class ShardIndexError(ValueError):
    """A problem in one rank's index; ``file`` names the index file at fault."""

    def __init__(self, message: str, file: str) -> None:
        super().__init__(message)
        self.file = file


def merge_indexes(indexes: Mapping[str, Mapping[str, Any]]) -> dict[str, KeyLayout]:
    """Check every rank's index (``{index file name: parsed JSON}``) and merge them.

    Raises ``ShardIndexError`` naming the index file for: a malformed entry, a key whose shape or
    dtype differs between ranks, rows outside the tensor, rows written twice or never, a
    replicated key written by two ranks or also as rows, a file not listed in its rank's files.
    """
    entries: dict[str, list[tuple[str, int, dict[str, Any]]]] = {}
    for name, index in indexes.items():
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise ShardIndexError(f"{name} is not an accel_zero shard index", name)
        if index.get("format_version", 0) > INDEX_FORMAT_VERSION:
            raise ShardIndexError(f"{name} was written by a newer accel_zero; upgrade it", name)
        files = index.get("files", {})
        rank = int(index["rank"])
        for key, entry in index.get("tensors", {}).items():
            if entry.get("file") is not None and entry["file"] not in files:
                raise ShardIndexError(
                    f"{name}: key {key!r} is in {entry['file']}, which the index does not list",
                    name,
                )
            entries.setdefault(key, []).append((name, rank, entry))

    layouts: dict[str, KeyLayout] = {}
    for key, found in entries.items():
        first_name, _, first = found[0]
        try:
            shape = tuple(int(d) for d in first["global_shape"])
            dtype = parse_dtype(first["dtype"])
            replicated = bool(first.get("replicated", False))
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardIndexError(
                f"{first_name}: malformed entry for key {key!r} ({exc})", first_name
            ) from exc
        pieces: list[Piece] = []
        for name, rank, entry in found:
            if tuple(entry["global_shape"]) != shape or entry["dtype"] != first["dtype"]:
                raise ShardIndexError(
                    f"key {key!r}: {name} records shape {tuple(entry['global_shape'])} "
                    f"{entry['dtype']}, {first_name} records {shape} {first['dtype']}",
                    name,
                )
            if bool(entry.get("replicated", False)) != replicated:
                raise ShardIndexError(
                    f"key {key!r} is replicated in one rank's index and row-sharded in {name}",
                    name,
                )
            start, end = (int(r) for r in entry["rows"])
            if entry.get("file") is None:
                if start != end:
                    raise ShardIndexError(f"{name}: key {key!r} has rows but no file", name)
                continue
            pieces.append(Piece(start=start, end=end, file=entry["file"], rank=rank))
        pieces.sort(key=lambda p: p.start)
        layout = KeyLayout(
            key=key, global_shape=shape, dtype=dtype, replicated=replicated, pieces=tuple(pieces)
        )
        _check_cover(layout, first_name)
        layouts[key] = layout
    return layouts


def _check_cover(layout: KeyLayout, where: str) -> None:
    key, pieces = layout.key, layout.pieces
    if layout.replicated:
        if len(pieces) != 1:
            ranks = sorted(p.rank for p in pieces)
            raise ShardIndexError(
                f"replicated key {key!r} is stored by ranks {ranks}; exactly one rank must "
                "store it",
                where,
            )
        return
    rows = layout.global_shape[0]
    at = 0
    for piece in pieces:
        if piece.start > at:
            raise ShardIndexError(
                f"key {key!r}: rows [{at}, {piece.start}) are in no rank's shard (a rank's "
                "files are missing from this checkpoint?)",
                where,
            )
        if piece.start < at or piece.end > rows or piece.end < piece.start:
            raise ShardIndexError(
                f"key {key!r}: rank {piece.rank}'s rows [{piece.start}, {piece.end}) overlap "
                f"another rank's or lie outside 0..{rows}",
                where,
            )
        at = piece.end
    if at != rows:
        raise ShardIndexError(
            f"key {key!r}: rows [{at}, {rows}) are in no rank's shard (a rank's files are "
            "missing from this checkpoint?)",
            where,
        )


def fingerprint(shapes: Iterable[tuple[str, tuple[int, ...], str]]) -> str:
    """sha256 of the sorted ``(key, global shape, dtype name)`` triples: same model, same
    fingerprint (checked on load to refuse another model's checkpoint)."""
    canonical = sorted([key, list(shape), dtype] for key, shape, dtype in shapes)
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


def layouts_fingerprint(layouts: Mapping[str, KeyLayout], prefix: str = "model/") -> str:
    return fingerprint(
        (k, v.global_shape, str(v.dtype).removeprefix("torch."))
        for k, v in layouts.items()
        if k.startswith(prefix)
    )
