"""On-disk layout of a sharded checkpoint, durable file operations, and the errors.

[Note: checkpoint layout]
A checkpoint folder ``DIR`` (what ``save_state(DIR)`` names) holds::

    DIR/LATEST                  pointer: {"format", "format_version", "version": "v000003"}
    DIR/v000003/                the published version (the only one the pointer names)
        MANIFEST.json           every file of the version with its size, world size, fingerprint
        meta.json               JSON metadata (world size, model class, the caller's metadata)
        shards/r00000.index.json        rank 0's index: key -> global shape, dtype, rows, file
        shards/r00000-00001.safetensors rank 0's rows (files rotate at a size limit)
        shards/r00001.index.json ...    one index and one or more files per rank
        state/<name>.json (+ .safetensors)        non-tensor state (schedulers, RNG, ...)
        state/<name>.rank00001.json               per-rank state (RNG)
        hf/config.json, hf/generation_config.json  a transformers model's config
    DIR/.staging/               the save in progress (same layout), ignored by readers

A save writes everything into ``.staging``, then rank 0 writes the manifest, renames
``.staging`` to the next ``vNNNNNN``, and publishes it by atomically replacing ``LATEST``;
only then are older versions deleted. A reader follows ``LATEST`` only, so a crash at any
moment leaves the old or the new checkpoint (see [Note: crash-safe publish] in save.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "find_last_complete",
    "is_complete",
    "published_version",
    "read_pointer",
]

FORMAT = "accel_zero.checkpoint"
FORMAT_VERSION = 1
POINTER = "LATEST"
POINTER_TMP = "LATEST.tmp"
STAGING = ".staging"
MANIFEST = "MANIFEST.json"
META = "meta.json"
SHARDS_DIR = "shards"
STATE_DIR = "state"
HF_DIR = "hf"
_VERSION_RE = re.compile(r"v(\d{6,})")
_NUMBER_RE = re.compile(r"(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: incomplete, damaged, or another model's.

    ``path`` is the file or folder at fault; ``last_complete`` the newest complete checkpoint
    in the same parent folder, if there is one (it is named in the message too).
    """

    def __init__(self, message: str, *, path: Path, last_complete: Path | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.last_complete = last_complete


def version_name(number: int) -> str:
    return f"v{number:06d}"


def version_number(name: str) -> int | None:
    match = _VERSION_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def rank_index_name(rank: int) -> str:
    return f"{SHARDS_DIR}/r{rank:05d}.index.json"


def rank_file_name(rank: int, number: int) -> str:
    return f"{SHARDS_DIR}/r{rank:05d}-{number:05d}.safetensors"


# ------------------------------------------------------------------ durability
def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes its entries' names durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: Any) -> int:
    """Write ``value`` as JSON to ``path`` and fsync it; returns the file's size."""
    data = (json.dumps(value, indent=1) + "\n").encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -------------------------------------------------------------------- pointer
def read_pointer(directory: Path) -> str | None:
    """The version ``DIR/LATEST`` names, or None when there is no pointer.

    Raises ``CheckpointError`` when the pointer exists but is not ours or unreadable.
    """
    path = directory / POINTER
    try:
        pointer = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint pointer {path} is unreadable ({exc}); it is written atomically, so "
            "something other than accel_zero changed it",
            path=path,
        ) from exc
    version = pointer.get("version") if isinstance(pointer, dict) else None
    if (
        not isinstance(pointer, dict)
        or pointer.get("format") != FORMAT
        or not isinstance(version, str)
        or version_number(version) is None
    ):
        raise CheckpointError(
            f"{path} is not an accel_zero checkpoint pointer (content: {str(pointer)[:200]})",
            path=path,
        )
    if pointer.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer accel_zero (checkpoint format "
            f"{pointer.get('format_version')}, this one reads {FORMAT_VERSION}); upgrade it",
            path=path,
        )
    return version


def write_pointer(directory: Path, version: str) -> None:
    """Stage ``LATEST.tmp`` (fsynced); ``publish_pointer`` makes it ``LATEST``."""
    write_json(
        directory / POINTER_TMP,
        {"format": FORMAT, "format_version": FORMAT_VERSION, "version": version},
    )


def publish_pointer(directory: Path) -> None:
    """Atomically replace ``LATEST`` with ``LATEST.tmp`` and make the rename durable."""
    os.replace(directory / POINTER_TMP, directory / POINTER)
    fsync_path(directory)


def published_version(directory: Path) -> Path | None:
    """The folder of the published version of checkpoint ``directory`` (None if none)."""
    version = read_pointer(directory)
    return None if version is None else directory / version


# ---------------------------------------------------------------- completeness
def is_complete(directory: Path) -> bool:
    """Cheap test: a published version whose manifest's files all exist with their sizes."""
    try:
        version = published_version(directory)
        if version is None:
            return False
        manifest = read_json(version / MANIFEST)
        files = manifest["files"]
        return all(os.stat(version / name).st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _order_key(path: Path) -> tuple[int, float]:
    """Accelerate orders ``checkpoint_<i>`` folders by the number in the name; then mtime."""
    match = _NUMBER_RE.search(path.name)
    mtime = 0.0
    with contextlib.suppress(OSError):
        mtime = (path / POINTER).stat().st_mtime
    return (int(match.group(1)) if match else -1, mtime)


def find_last_complete(parent: Path, *, exclude: Path | None = None) -> Path | None:
    """The newest complete checkpoint folder directly inside ``parent`` (Accelerate's order:
    the number in the folder name, e.g. ``checkpoint_3``, then the publish time)."""
    try:
        children = [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return None
    if exclude is not None:
        children = [p for p in children if p.resolve() != exclude.resolve()]
    complete = [p for p in children if is_complete(p)]
    return max(complete, key=_order_key) if complete else None


def last_complete_hint(directory: Path) -> tuple[str, Path | None]:
    """A sentence naming the last complete checkpoint beside ``directory``, and its path."""
    last = find_last_complete(directory.parent, exclude=directory)
    if last is None:
        return f" No complete checkpoint found in {directory.parent}.", None
    return f" The last complete checkpoint in {directory.parent} is {last}.", last


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
