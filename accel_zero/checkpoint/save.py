"""A multi-rank save session: every rank writes its part, rank 0 publishes atomically.

[Note: crash-safe publish]
``begin_save`` (every rank): rank 0 clears what an interrupted save left (``.staging``,
``LATEST.tmp``, unpublished ``v*`` folders; never the published one) and creates
``.staging``; barrier. Then every rank writes its shards and state into ``.staging`` and
fsyncs its own files (each rank's own: on a shared file system only the writer can make
its writes durable). ``commit`` (every rank): barrier; rank 0 checks the ranks' indexes
(every key's rows covered exactly once), writes ``meta.json`` and ``MANIFEST.json`` (every
file with its size), fsyncs the folders, renames ``.staging`` to ``vN`` (N = one more than
any existing version), stages ``LATEST.tmp``, and publishes with ``os.replace(LATEST.tmp,
LATEST)`` + fsync of the folder; only then deletes older versions; barrier.

A ``kill -9`` of any rank at any moment therefore leaves: before the ``os.replace``, the old
pointer (old checkpoint, or none); after it, the new one. Debris (staging, an unpublished
``vN``, ``LATEST.tmp``, an old version not yet deleted) is never read, and is removed by the
next save. A failure on rank 0 after the first barrier still reaches the second one, and the
other ranks then see that ``.staging`` was not published and raise too.

The events passed to ``on_event`` (for progress and for the crash tests), in order:
``staging-ready`` (after the first barrier), ``shard-file-opened``, ``tensor-written``,
``shard-file-closed``, ``state-written``, ``rank-files-done`` (before the commit barrier);
rank 0 only: ``manifest-written``, ``version-renamed``, ``pointer-staged``, ``published``,
``old-removed``; every rank: ``done``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import nn

from accel_zero.checkpoint import layout
from accel_zero.checkpoint.export import parse_size
from accel_zero.checkpoint.index import ShardIndexError, layouts_fingerprint, merge_indexes
from accel_zero.checkpoint.state import write_state_file
from accel_zero.checkpoint.stream import DirectWriter, supports_direct_io
from accel_zero.checkpoint.writer import RankShardWriter
from accel_zero.shards import RowShard

__all__ = ["CheckpointSave", "SaveOptions", "begin_save"]

logger = logging.getLogger(__name__)

_STATE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


@dataclass(frozen=True, kw_only=True)
class SaveOptions:
    """How a sharded checkpoint is written."""

    max_file_size: int | str = "2GB"
    """A rank starts a new shard file once the current one would grow past this."""
    header_reserve: int = 256 * 1024
    """Bytes reserved for each shard file's safetensors header (about 2,500 keys of 100
    bytes); a file whose header is full is rotated early."""
    fsync: bool = True
    """fsync files and folders (off only for tests of the format itself)."""
    direct_io: bool = True
    """Write shard files with O_DIRECT (around the page cache: faster on a real disk, and a
    big checkpoint does not evict everything else); buffered where the file system refuses
    O_DIRECT (tmpfs)."""
    io_buffer_bytes: int = 8 << 20
    """Each of the two aligned buffers O_DIRECT writes go through (host memory per rank)."""

    def __post_init__(self) -> None:
        parse_size(self.max_file_size)  # ValueError naming the bad size
        if self.header_reserve < 1024:
            raise ValueError(f"SaveOptions.header_reserve={self.header_reserve} must be >= 1024")


class CheckpointSave:
    """One rank's side of one save; create with ``begin_save``. See [Note: crash-safe publish]."""

    def __init__(
        self,
        directory: Path,
        *,
        rank: int,
        world_size: int,
        barrier: Callable[[], None],
        options: SaveOptions,
        on_event: Callable[[str], None] | None,
    ) -> None:
        self.directory = directory
        self.rank = rank
        self.world_size = world_size
        self.staging = directory / layout.STAGING
        self.options = options
        self._barrier = barrier
        self._on_event = on_event or (lambda _event: None)
        direct = None
        if options.direct_io and supports_direct_io(self.staging / layout.SHARDS_DIR):
            direct = DirectWriter(buffer_bytes=options.io_buffer_bytes)
        self._writer = RankShardWriter(
            self.staging,
            rank=rank,
            world_size=world_size,
            max_file_bytes=parse_size(options.max_file_size),
            header_reserve=options.header_reserve,
            direct=direct,
            on_event=self._on_event,
        )
        self._meta: dict[str, Any] = {}
        self._state_names: set[str] = set()
        self._done = False

    # ------------------------------------------------------------------ writing
    def write_shards(self, shards: Iterable[RowShard]) -> None:
        """Stream this rank's shards into its files; may be called several times (model,
        then each optimizer). Each shard is written before the next is requested."""
        self._check_open()
        try:
            self._writer.write(shards)
        except BaseException:
            self._writer.abort()
            raise

    def write_state(self, name: str, value: Any, *, per_rank: bool = False) -> None:
        """Store ``value`` (a nest of dicts/lists/tensors/numbers, see state.py) as ``name``.

        ``per_rank=False``: one copy for all ranks, written by rank 0 (other ranks return);
        ``per_rank=True``: every rank writes its own (RNG states).
        """
        self._check_open()
        if not _STATE_NAME_RE.fullmatch(name) or ".." in name.split("/"):
            raise ValueError(
                f"state name {name!r}: use letters, digits, '_', '-', '.' and '/' separators"
            )
        if not per_rank and self.rank != 0:
            return
        stem = f"{name}.rank{self.rank:05d}" if per_rank else name
        if stem in self._state_names:
            raise ValueError(f"rank {self.rank}: state {name!r} written twice in one save")
        self._state_names.add(stem)
        write_state_file(self.staging / layout.STATE_DIR, stem, value, what=name)
        self._on_event("state-written")

    def write_model_files(self, model: nn.Module) -> None:
        """Rank 0: the model's class, and for a transformers model its config.json and
        generation_config.json (what the offline export needs to rebuild names and config)."""
        self._check_open()
        if self.rank != 0:
            return
        from accel_zero import hf

        cls = type(model)
        self._meta["model_class"] = f"{cls.__module__}.{cls.__qualname__}"
        self._meta["transformers"] = hf.is_transformers_model(model)
        if self._meta["transformers"]:
            folder = self.staging / layout.HF_DIR
            hf.save_model_files(model, folder)
            if self.options.fsync:
                for path in folder.iterdir():
                    layout.fsync_path(path)

    # --------------------------------------------------------------- publishing
    def commit(self, metadata: Mapping[str, Any] | None = None) -> Path:
        """Finish this rank's files, then publish (every rank calls it); returns the
        published version folder. ``metadata`` (JSON-able, rank 0's is kept) lands in
        ``meta.json``."""
        self._check_open()
        self._writer.close()
        self._done = True
        self._on_event("rank-files-done")
        self._barrier()
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self._publish(dict(metadata or {}))
            except BaseException as exc:  # reach the barrier: the others must not hang
                error = exc
        try:
            self._barrier()
        except BaseException:
            if error is None:
                raise
        if error is not None:  # rank 0's own error says more than a broken barrier
            raise error
        if self.staging.exists():
            raise RuntimeError(
                f"rank {self.rank}: rank 0 did not publish the checkpoint in {self.directory} "
                "(see rank 0's error); the previous checkpoint there, if any, is unchanged"
            )
        version = layout.published_version(self.directory)
        assert version is not None, f"{self.directory}: no pointer after a successful publish"
        self._on_event("done")
        return version

    def _publish(self, metadata: dict[str, Any]) -> None:
        staging, sync = self.staging, self.options.fsync
        indexes = {}
        for rank in range(self.world_size):
            name = layout.rank_index_name(rank)
            try:
                indexes[name] = layout.read_json(staging / name)
            except (OSError, ValueError) as exc:
                raise RuntimeError(
                    f"rank 0: rank {rank}'s shard index {staging / name} is missing or "
                    f"unreadable after the barrier ({exc}); is {self.directory} on a file "
                    "system every rank shares?"
                ) from exc
        try:
            layouts = merge_indexes(indexes)
        except ShardIndexError as exc:
            raise RuntimeError(f"rank 0: refusing to publish {self.directory}: {exc}") from exc
        meta = {
            "format": layout.FORMAT,
            "format_version": layout.FORMAT_VERSION,
            "world_size": self.world_size,
            "created": layout.utc_now(),
            **self._meta,
            "metadata": metadata,
        }
        layout.write_json(staging / layout.META, meta)
        files: dict[str, int] = {}
        folders = [staging]
        for root, dirs, names in os.walk(staging):
            folders.extend(Path(root) / d for d in dirs)
            for name in names:
                path = Path(root) / name
                files[path.relative_to(staging).as_posix()] = path.stat().st_size
        for index in indexes.values():  # each rank recorded the sizes it wrote
            for name, size in index["files"].items():
                if files.get(name) != size:
                    raise RuntimeError(
                        f"rank 0: {staging / name} has {files.get(name)} bytes, its rank "
                        f"wrote {size}; is {self.directory} on a file system every rank shares?"
                    )
        manifest = {
            "format": layout.FORMAT,
            "format_version": layout.FORMAT_VERSION,
            "world_size": self.world_size,
            "fingerprint": layouts_fingerprint(layouts),
            "indexes": sorted(indexes),
            "files": dict(sorted(files.items())),
        }
        layout.write_json(staging / layout.MANIFEST, manifest)
        if sync:
            for folder in folders:
                layout.fsync_path(folder)
        self._on_event("manifest-written")

        existing = [layout.version_number(p.name) for p in self.directory.iterdir()]
        number = max([n for n in existing if n is not None], default=0) + 1
        version = layout.version_name(number)
        os.rename(staging, self.directory / version)
        if sync:
            layout.fsync_path(self.directory)
        self._on_event("version-renamed")
        layout.write_pointer(self.directory, version)
        self._on_event("pointer-staged")
        layout.publish_pointer(self.directory)
        self._on_event("published")
        for path in self.directory.iterdir():
            if path.name != version and layout.version_number(path.name) is not None:
                shutil.rmtree(path, ignore_errors=True)
        self._on_event("old-removed")
        logger.info(
            "checkpoint %s: published %s (%d ranks, %d files)",
            self.directory,
            version,
            self.world_size,
            len(files),
        )

    # ---------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("this CheckpointSave is already committed or aborted")

    def abort(self) -> None:
        """Close this rank's open files; the staging folder stays (never published) and the
        next save removes it. No barrier: safe to call on a failing rank."""
        self._writer.abort()
        self._done = True

    def __enter__(self) -> CheckpointSave:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not self._done:
            self.abort()


def begin_save(
    directory: str | os.PathLike[str],
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    options: SaveOptions | None = None,
    on_event: Callable[[str], None] | None = None,
) -> CheckpointSave:
    """Start a save into checkpoint folder ``directory`` (every rank calls it, with the same
    folder on a file system all ranks share). ``barrier()`` must block until every rank has
    called it (the caller's gloo barrier; a no-op for one process). A folder that already
    holds a checkpoint keeps it until the new one is published, then loses it."""
    if not 0 <= rank < world_size:
        raise ValueError(f"begin_save: rank {rank} outside world size {world_size}")
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_state: {target} exists and is not a folder; pass a folder path")
    options = options or SaveOptions()
    error: BaseException | None = None
    if rank == 0:
        try:
            _prepare_staging(target, fsync=options.fsync)
        except BaseException as exc:  # reach the barrier: the others must not hang
            error = exc
    try:
        barrier()
    except BaseException:
        if error is None:
            raise
    if error is not None:
        raise error
    if not (target / layout.STAGING / layout.SHARDS_DIR).is_dir():
        raise RuntimeError(
            f"rank {rank}: {target / layout.STAGING} is missing after the start barrier: rank "
            f"0 could not create it, or {target} is not on a file system every rank shares"
        )
    save = CheckpointSave(
        target,
        rank=rank,
        world_size=world_size,
        barrier=barrier,
        options=options,
        on_event=on_event,
    )
    save._on_event("staging-ready")
    return save


def _prepare_staging(target: Path, *, fsync: bool) -> None:
    """Rank 0: remove an interrupted save's debris, create an empty ``.staging``."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"save_state: cannot create {target}: {exc}") from exc
    try:
        published = layout.read_pointer(target)
    except layout.CheckpointError:
        published = None  # an unreadable pointer: keep every version, overwrite the pointer
        keep_all = True
    else:
        keep_all = False
    for path in target.iterdir():
        if path.name == layout.STAGING:
            shutil.rmtree(path)
        elif path.name == layout.POINTER_TMP:
            path.unlink()
        elif (
            not keep_all
            and layout.version_number(path.name) is not None
            and path.name != published
            and path.is_dir()
        ):
            shutil.rmtree(path)  # never published (or published earlier, then replaced)
    (target / layout.STAGING / layout.SHARDS_DIR).mkdir(parents=True)
    (target / layout.STAGING / layout.STATE_DIR).mkdir()
    if fsync:
        layout.fsync_path(target)
    if any(
        (target / name).exists()
        for name in ("model.safetensors", "pytorch_model.bin", "optimizer.bin")
    ):
        logger.warning(
            "save_state: %s also holds files of a plain Accelerate checkpoint; they are left "
            "alone and never read by accel_zero's load_state",
            target,
        )
