"""Open a published checkpoint, validate it, and read any rows of any key (resharding).

``open_checkpoint(DIR)`` follows ``DIR/LATEST`` (see [Note: checkpoint layout]) and refuses,
with a ``CheckpointError`` naming the file at fault and the last complete checkpoint beside
``DIR``: a folder without a published version (a save was interrupted), a missing file or one
whose size differs from the manifest (truncated), indexes that do not cover every key's rows
exactly once, and, through ``check_compatible``, another model's checkpoint.

``CheckpointReader`` is a ``ShardReader`` (accel_zero.shards): ``read_rows(key, a, b)``
returns rows ``[a, b)`` whichever ranks wrote them, reading only those bytes, so a
checkpoint written by N ranks loads on M.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from accel_zero.checkpoint import layout
from accel_zero.checkpoint.index import KeyLayout, Piece, ShardIndexError, layouts_fingerprint
from accel_zero.checkpoint.index import merge_indexes as _merge
from accel_zero.checkpoint.state import read_state_file
from accel_zero.checkpoint.stream import (
    DirectReader,
    code_dtype,
    pread_into,
    read_header,
    supports_direct_io,
    tensor_bytes,
)

__all__ = ["CheckpointReader", "open_checkpoint"]

_MAX_OPEN_FILES = 64
_DIRECT_MIN_BYTES = 64 << 10  # smaller reads go through the page cache
_PLAIN_ACCELERATE = ("model.safetensors", "pytorch_model.bin", "optimizer.bin")


def _fail(root: Path, message: str, path: Path) -> layout.CheckpointError:
    hint, last = layout.last_complete_hint(root)
    return layout.CheckpointError(message + hint, path=path, last_complete=last)


def _safe_relative(name: str) -> bool:
    pure = PurePosixPath(name)
    return not pure.is_absolute() and ".." not in pure.parts and bool(pure.parts)


class CheckpointReader:
    """A validated, published checkpoint version; create with ``open_checkpoint``."""

    def __init__(
        self,
        directory: Path,
        version_dir: Path,
        *,
        manifest: dict[str, Any],
        meta: dict[str, Any],
        layouts: dict[str, KeyLayout],
        direct_io: bool = True,
    ) -> None:
        self.directory = directory
        """The checkpoint folder (the one ``save_state`` was given)."""
        self.version_dir = version_dir
        """The published version folder inside it."""
        self.manifest = manifest
        self.meta = meta
        self._layouts = layouts
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._direct_io = direct_io and supports_direct_io(version_dir / layout.SHARDS_DIR)
        self._direct: DirectReader | None = None

    # ----------------------------------------------------------------- facts
    @property
    def world_size(self) -> int:
        """Ranks that wrote the checkpoint."""
        return int(self.manifest["world_size"])

    @property
    def metadata(self) -> dict[str, Any]:
        """The ``metadata`` the saving rank 0 passed to ``commit``."""
        return dict(self.meta.get("metadata", {}))

    @property
    def fingerprint(self) -> str:
        """sha256 of the ``model/`` keys' names, shapes and dtypes (see index.fingerprint)."""
        return str(self.manifest["fingerprint"])

    @property
    def model_files_dir(self) -> Path | None:
        """Folder with the saved model's config.json (transformers models only)."""
        folder = self.version_dir / layout.HF_DIR
        listed = any(name.startswith(layout.HF_DIR + "/") for name in self.manifest["files"])
        return folder if listed else None

    def keys(self, prefix: str = "") -> list[str]:
        """Keys in the checkpoint (in rank 0's write order), optionally under ``prefix``."""
        return [k for k in self._layouts if k.startswith(prefix)]

    def layout(self, key: str) -> KeyLayout:
        try:
            return self._layouts[key]
        except KeyError:
            raise KeyError(f"checkpoint {self.directory} has no key {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...] | None:
        entry = self._layouts.get(key)
        return None if entry is None else entry.global_shape

    def dtype(self, key: str) -> torch.dtype | None:
        entry = self._layouts.get(key)
        return None if entry is None else entry.dtype

    # ------------------------------------------------------------------ reads
    def read_rows(self, key: str, start: int, end: int, *, out: Tensor | None = None) -> Tensor:
        """Rows ``[start, end)`` of ``key`` as a CPU tensor in the saved dtype; the whole
        tensor for a replicated or 0-d key. Reads only the bytes of those rows, into ``out``
        when given (contiguous, CPU, that shape and dtype)."""
        entry = self.layout(key)
        rows = 0 if entry.replicated else entry.global_shape[0]
        if not entry.replicated and not 0 <= start <= end <= rows:
            raise ValueError(f"read_rows({key!r}, {start}, {end}): rows must lie in 0..{rows}")
        shape = entry.global_shape if entry.replicated else (end - start, *entry.global_shape[1:])
        if out is None:
            out = torch.empty(shape, dtype=entry.dtype)
        elif (
            tuple(out.shape) != tuple(shape)
            or out.dtype != entry.dtype
            or out.device.type != "cpu"
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"read_rows({key!r}): out must be a contiguous CPU {entry.dtype} tensor of "
                f"shape {tuple(shape)}, got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        if entry.replicated:
            self._read_piece(entry, entry.pieces[0], 0, 1, out)
            return out
        for piece in entry.pieces:
            lo, hi = max(start, piece.start), min(end, piece.end)
            if lo < hi:
                self._read_piece(
                    entry, piece, lo - piece.start, hi - piece.start, out[lo - start :]
                )
        return out

    def read(self, key: str) -> Tensor:
        """The whole tensor ``key``."""
        entry = self.layout(key)
        return self.read_rows(key, 0, 0 if entry.replicated else entry.global_shape[0])

    def _read_piece(self, entry: KeyLayout, piece: Piece, a: int, b: int, out: Tensor) -> None:
        """Rows ``[a, b)`` of ``piece`` (relative to it) into the first ``b - a`` rows of
        ``out``; a replicated key is one "row" of the whole tensor."""
        path = self.version_dir / piece.file
        fd = self._fd(piece.file)
        data_start, header = self._header(piece.file, fd)
        stored = header.get(entry.key)
        if entry.replicated:
            shape = list(entry.global_shape)
            row_numel = out.numel()
        else:
            shape = [piece.end - piece.start, *entry.global_shape[1:]]
            row_numel = math.prod(entry.global_shape[1:])
        if stored is None or code_dtype(stored["dtype"]) != entry.dtype or stored["shape"] != shape:
            raise _fail(
                self.directory,
                f"checkpoint {self.directory} is damaged: {path} does not hold {entry.key!r} "
                f"as its index says ({shape} {entry.dtype}); found {stored}.",
                path,
            )
        numel = (b - a) * row_numel
        if numel == 0:
            return
        offset = data_start + stored["data_offsets"][0] + a * row_numel * entry.dtype.itemsize
        target = tensor_bytes(out.reshape(-1)[:numel])
        try:
            if self._direct_io and len(target) >= _DIRECT_MIN_BYTES:
                if self._direct is None:
                    self._direct = DirectReader()
                size = int(self.manifest["files"][piece.file])
                self._direct.read(fd, path, size, offset, target)
            else:
                pread_into(fd, target, offset, path)
        except (ValueError, OSError) as exc:
            raise _fail(
                self.directory, f"checkpoint {self.directory} is damaged: {exc}.", path
            ) from exc

    def _fd(self, name: str) -> int:
        fd = self._fds.pop(name, None)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN_FILES:
                _, oldest = self._fds.popitem(last=False)
                os.close(oldest)
            path = self.version_dir / name
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise _fail(
                    self.directory, f"checkpoint {self.directory}: cannot open {path}: {exc}.", path
                ) from exc
        self._fds[name] = fd
        return fd

    def _header(self, name: str, fd: int) -> tuple[int, dict[str, Any]]:
        if name not in self._headers:
            path = self.version_dir / name
            try:
                self._headers[name] = read_header(fd, path)
            except (ValueError, KeyError, TypeError) as exc:
                raise _fail(
                    self.directory, f"checkpoint {self.directory} is damaged: {exc}.", path
                ) from exc
        return self._headers[name]

    # ------------------------------------------------------------------ state
    def _state_path(self, name: str, rank: int | None) -> Path:
        stem = name if rank is None else f"{name}.rank{rank:05d}"
        return Path(layout.STATE_DIR) / f"{stem}.json"

    def has_state(self, name: str, *, rank: int | None = None) -> bool:
        """Was state ``name`` saved (per-rank state: pass the rank that saved it)?"""
        return self._state_path(name, rank).as_posix() in self.manifest["files"]

    def read_state(self, name: str, *, rank: int | None = None) -> Any:
        """A state written by ``CheckpointSave.write_state`` (never unpickles unsafely)."""
        relative = self._state_path(name, rank)
        if relative.as_posix() not in self.manifest["files"]:
            which = "" if rank is None else f" of rank {rank}"
            raise KeyError(f"checkpoint {self.directory} holds no state {name!r}{which}")
        return read_state_file(self.version_dir / relative)

    # ----------------------------------------------------------- compatibility
    def check_compatible(
        self,
        expected: Mapping[str, Sequence[int]],
        *,
        prefixes: Sequence[str] | None = None,
    ) -> None:
        """Refuse another model's checkpoint: every ``expected`` key (global shape) must be
        here with that shape, and no key under ``prefixes`` (default: the first path segment
        of each expected key, e.g. ``model/``) may be here that is not expected."""
        if prefixes is None:
            prefixes = sorted({key.split("/", 1)[0] + "/" for key in expected})
        missing = [k for k in expected if k not in self._layouts]
        wrong = [
            f"{k}: checkpoint {self._layouts[k].global_shape}, model {tuple(shape)}"
            for k, shape in expected.items()
            if k in self._layouts and self._layouts[k].global_shape != tuple(shape)
        ]
        unexpected = [
            k for k in self._layouts if k.startswith(tuple(prefixes)) and k not in expected
        ]
        if not (missing or wrong or unexpected):
            return
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {'; '.join(wrong[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        saved = self.meta.get("model_class", "an unknown model")
        path = self.version_dir / layout.MANIFEST
        raise _fail(
            self.directory,
            f"checkpoint {self.directory} was saved from another model ({saved}, "
            f"{self.world_size} ranks): {'; '.join(parts)}. Load it into the model it was "
            "saved from.",
            path,
        )

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may be gone
            pass


def _locate_version(root: Path) -> Path:
    if (root / layout.MANIFEST).is_file():
        return root  # a version folder given directly
    try:
        version = layout.read_pointer(root)
    except layout.CheckpointError as exc:
        raise _fail(root, str(exc) + ".", exc.path) from exc
    if version is None:
        names = {p.name for p in root.iterdir()}
        pointer = root / layout.POINTER
        if layout.STAGING in names or any(layout.version_number(n) is not None for n in names):
            message = (
                f"checkpoint {root} is incomplete: a save into it was interrupted before it "
                f"was published ({pointer} is missing)."
            )
        elif names & set(_PLAIN_ACCELERATE):
            message = (
                f"{root} holds a plain Accelerate checkpoint, not an accel_zero sharded one "
                f"({pointer} is missing); load it with accelerate's Accelerator.load_state."
            )
        else:
            message = f"{root} holds no accel_zero checkpoint ({pointer} is missing)."
        raise _fail(root, message, pointer)
    version_dir = root / version
    if not version_dir.is_dir():
        raise _fail(
            root,
            f"checkpoint {root} is damaged: {root / layout.POINTER} names {version}, which "
            "does not exist.",
            version_dir,
        )
    return version_dir


def open_checkpoint(
    directory: str | os.PathLike[str],
    *,
    expected: Mapping[str, Sequence[int]] | None = None,
    direct_io: bool = True,
) -> CheckpointReader:
    """Open and validate the checkpoint in ``directory`` (a ``save_state`` folder, or one
    of its version folders); ``expected`` = ``check_compatible`` right away. ``direct_io``:
    reads of 1 MiB and more use O_DIRECT where the file system allows it."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise _fail(root, f"no checkpoint folder at {root}.", root)
    version_dir = _locate_version(root)
    manifest_path = version_dir / layout.MANIFEST
    try:
        manifest = layout.read_json(manifest_path)
        files = manifest["files"]
        if manifest.get("format") != layout.FORMAT or not isinstance(files, dict):
            raise ValueError("not an accel_zero checkpoint manifest")
        if manifest.get("format_version", 0) > layout.FORMAT_VERSION:
            raise ValueError("written by a newer accel_zero; upgrade it")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _fail(
            root, f"checkpoint {root} is damaged: {manifest_path}: {exc}.", manifest_path
        ) from exc
    for name, size in files.items():
        path = version_dir / name
        if not _safe_relative(name):
            raise _fail(root, f"{manifest_path} lists an unsafe path {name!r}.", manifest_path)
        try:
            actual = os.stat(path).st_size
        except FileNotFoundError:
            raise _fail(root, f"checkpoint {root} is damaged: {path} is missing.", path) from None
        if actual != size:
            raise _fail(
                root,
                f"checkpoint {root} is damaged: {path} has {actual} bytes, the manifest "
                f"recorded {size} (truncated or modified after the save).",
                path,
            )
    indexes = {}
    for name in manifest.get("indexes", []):
        if name not in files:
            raise _fail(
                root, f"{manifest_path}: index {name} is not in its file list.", manifest_path
            )
        try:
            indexes[name] = layout.read_json(version_dir / name)
        except (OSError, ValueError) as exc:
            path = version_dir / name
            raise _fail(root, f"checkpoint {root} is damaged: {path}: {exc}.", path) from exc
    try:
        layouts = _merge(indexes)
    except ShardIndexError as exc:
        path = version_dir / exc.file
        raise _fail(root, f"checkpoint {root} is damaged: {exc}.", path) from exc
    if layouts_fingerprint(layouts) != manifest.get("fingerprint"):
        raise _fail(
            root,
            f"checkpoint {root} is damaged: its indexes do not match the fingerprint in "
            f"{manifest_path}.",
            manifest_path,
        )
    try:
        meta = layout.read_json(version_dir / layout.META) if layout.META in files else {}
    except (OSError, ValueError) as exc:
        path = version_dir / layout.META
        raise _fail(root, f"checkpoint {root} is damaged: {path}: {exc}.", path) from exc
    reader = CheckpointReader(
        root, version_dir, manifest=manifest, meta=meta, layouts=layouts, direct_io=direct_io
    )
    if expected is not None:
        reader.check_compatible(expected)
    return reader
