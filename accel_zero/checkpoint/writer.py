"""One rank's RowShards -> rotating safetensors files + the rank's index (see index.py).

Shards arrive one at a time from the engine; each is written before the next is asked for
(the engine may hand out views of one reused buffer), so the writer holds no tensor memory:
see [Note: streamed safetensors].
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from accel_zero.checkpoint import layout
from accel_zero.checkpoint.index import index_document
from accel_zero.checkpoint.stream import DirectWriter, SafetensorsStream, dtype_name
from accel_zero.shards import RowShard

__all__ = ["RankShardWriter"]

logger = logging.getLogger(__name__)


class RankShardWriter:
    """Writes one rank's shards under ``version_dir/shards``; ``close`` writes its index."""

    def __init__(
        self,
        version_dir: Path,
        *,
        rank: int,
        world_size: int,
        max_file_bytes: int,
        header_reserve: int,
        direct: DirectWriter | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.version_dir = version_dir
        self._direct = direct
        self.rank = rank
        self.world_size = world_size
        self.max_file_bytes = max_file_bytes
        self.header_reserve = header_reserve
        self._on_event = on_event or (lambda _event: None)
        self._stream: SafetensorsStream | None = None
        self._stream_name = ""
        self._file_count = 0
        self.files: dict[str, int] = {}
        """Closed files (relative to the version folder) and their sizes."""
        self.tensors: dict[str, dict[str, Any]] = {}
        self.bytes_written = 0
        self.closed = False

    def write(self, shards: Iterable[RowShard]) -> None:
        """Write every shard of ``shards`` (replicated ones only on rank 0)."""
        for shard in shards:
            self.add(shard)

    def add(self, shard: RowShard) -> None:
        """Write one shard now (its tensor can be reused as soon as this returns)."""
        assert not self.closed, "RankShardWriter.add after close"
        if shard.key in self.tensors:
            raise ValueError(
                f"rank {self.rank}: key {shard.key!r} yielded twice in one checkpoint; keys "
                "must be unique (model/<fqn>, optim/<fqn>/<state>)"
            )
        if shard.replicated and self.rank != 0:
            return  # every rank holds the same whole tensor: rank 0 keeps the one copy
        tensor = shard.tensor
        rows = 0 if shard.replicated else tensor.shape[0]
        entry: dict[str, Any] = {
            "dtype": dtype_name(tensor.dtype),
            "global_shape": list(shard.global_shape),
            "rows": [shard.row_start, shard.row_start + rows],
            "replicated": shard.replicated,
            "file": None,
        }
        if shard.replicated or rows:
            entry["file"] = self._put(shard.key, tensor)
        self.tensors[shard.key] = entry

    def _put(self, key: str, tensor: Any) -> str:
        nbytes = tensor.numel() * tensor.element_size()
        stream = self._stream
        if (
            stream is not None
            and stream.count
            and (stream.data_bytes + nbytes > self.max_file_bytes or not stream.fits(key, tensor))
        ):
            self._close_stream()
            stream = None
        if stream is None:
            self._file_count += 1
            self._stream_name = layout.rank_file_name(self.rank, self._file_count)
            stream = SafetensorsStream(
                self.version_dir / self._stream_name,
                header_reserve=self.header_reserve,
                metadata={"format": "pt", "accel_zero_rank": str(self.rank)},
                direct=self._direct,
            )
            self._stream = stream
            self._on_event("shard-file-opened")
        stream.add(key, tensor)
        self.bytes_written += nbytes
        self._on_event("tensor-written")
        return self._stream_name

    def _close_stream(self) -> None:
        if self._stream is None:
            return
        self.files[self._stream_name] = self._stream.close()
        self._stream = None
        self._on_event("shard-file-closed")

    def close(self) -> tuple[str, int]:
        """Close the last file, write the rank's index (fsynced); ``(index name, size)``."""
        self._close_stream()
        name = layout.rank_index_name(self.rank)
        size = layout.write_json(
            self.version_dir / name,
            index_document(
                rank=self.rank, world_size=self.world_size, files=self.files, tensors=self.tensors
            ),
        )
        self.closed = True
        logger.debug(
            "rank %d: wrote %d tensors, %d bytes in %d files",
            self.rank,
            len(self.tensors),
            self.bytes_written,
            len(self.files),
        )
        return name, size

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        self.closed = True
