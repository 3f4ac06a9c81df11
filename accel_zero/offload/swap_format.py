"""The on-disk format of one swap record, its checksum, and the errors of swapping.

A *record* is a named group of 1-D tensors ("fields") swapped together, one file
each (``opt/3`` = master, ``exp_avg``, ``exp_avg_sq`` of sub-group 3). The file
is the exact image of the in-memory swap buffer, so a record moves in one IO::

    [0, 4096)                  header block (below)
    [offset_i, +slot_bytes_i)  field i; offsets are multiples of ``align``,
                               slots multiples of 4096 (O_DIRECT needs both)

Header block: ``MAGIC`` (8 bytes), format version, JSON length and the CRC32 of
the JSON (three little-endian uint32), then UTF-8 JSON with the run id, the
record key, the generation (the caller's step number), the record's size and,
per field, name, dtype, numel, offset, byte count and checksum; zero padded.

[Note: swap checksum]
The checksum touches every swapped byte twice per step (once before the write,
once after the read), tens of GB per step for a 3B model, so it was chosen by
measurement (``python`` one-liners on this 2-core AMD EPYC VM, 512 MiB buffer,
one thread, median of 5; memory bandwidth is ~30 GB/s here):

    ============================================  ========
    candidate                                      GB/s
    ============================================  ========
    hashlib.md5 / hashlib.blake2b                  0.75 / 0.9
    zlib.crc32 (zlib 1.2.13)                       3.9
    numpy uint64 add.reduce                        11.4
    xxhash.xxh64 / xxh3_64 (not a direct dep)      10.2 / 28.0
    torch int32 blocks summed in int64             1.0
    torch int64 wrapping sum, whole buffer         28.4
    torch int64 sum per 4 KiB block + blake2b      21.8-27.2
    numpy int64 sum per 4 KiB block (+ blake2b)    22.1-26.1
    ============================================  ========

``blocksum64`` (the last rows) is used, computed with numpy: single threaded,
it runs from the swap worker threads without starting OpenMP teams there (torch's
2-thread reduction fell to 1.3-4.9 GB/s while other processes loaded the 2 cores,
numpy stayed at 10-22 GB/s). Each 4096-byte block is summed as 512
wrapping int64 words (one memory-bound pass), and the vector of block sums
(1/512 of the data) is hashed with blake2b to 64 bits. Any change inside a
block changes that block's sum (a single altered word always does); a block
moved, duplicated, zeroed (truncation, a hole) or left from an older write
changes the hash of the vector. It only misses changes that cancel inside one
block, which disk faults (lost, torn or misdirected sector writes) do not make.
Staleness is caught first by the header's run id and generation.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from accel_zero.ops import IO_ALIGN

MAGIC = b"AZSWAP\x00\x01"
"""First 8 bytes of every swap file."""
FORMAT_VERSION = 1
"""Bumped whenever the layout or the header changes."""
HEADER_BYTES = IO_ALIGN
"""The header block: one O_DIRECT block before the first field."""
CHECKSUM_NAME = "blocksum64"
"""Recorded in each header, so a future checksum can coexist with this one."""

_PREFIX = struct.Struct("<8sIII")  # magic, version, json length, json crc32
_WORDS_PER_BLOCK = IO_ALIGN // 8

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
class SwapError(RuntimeError):
    """Base of every swap failure; ``path`` is the swap file (or folder) concerned."""

    def __init__(self, message: str, *, path: str | Path) -> None:
        super().__init__(message)
        self.path = str(path)


class SwapIOError(SwapError):
    """A read or write of a swap file failed (disk full, IO error, permissions).

    ``errno`` is the OS error number, ``nbytes`` the size of the IO that failed.
    """

    def __init__(self, message: str, *, path: str | Path, errno: int, nbytes: int) -> None:
        super().__init__(message, path=path)
        self.errno = errno
        self.nbytes = nbytes


class SwapRecordInvalidError(SwapError):
    """The record has no valid copy on disk: never written, or its last write failed."""


class SwapIntegrityError(SwapError):
    """What was read back is not what this run last wrote; never returned as data."""


class SwapTruncatedError(SwapIntegrityError):
    """The swap file is shorter than its record."""


class SwapCorruptError(SwapIntegrityError):
    """Bad magic, header, layout or field checksum: the bytes were altered."""


class SwapForeignError(SwapIntegrityError):
    """The file belongs to another run (run id) or another record (key)."""


class SwapStaleError(SwapIntegrityError):
    """The file holds another generation of this record than the one expected."""


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------
def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True, kw_only=True)
class FieldLayout:
    """Where one field of a record lives, in the file and in the swap buffer alike."""

    name: str
    dtype: torch.dtype
    numel: int
    offset: int
    """Byte offset in the file and the buffer (a multiple of the record's alignment)."""
    nbytes: int
    """Bytes of data: ``numel * itemsize``."""
    slot_bytes: int
    """``nbytes`` rounded up to 4096: what is written, read and checksummed."""


@dataclass(frozen=True, kw_only=True)
class RecordLayout:
    """The file layout of one record; built by :meth:`RecordLayout.build`."""

    key: str
    fields: tuple[FieldLayout, ...]
    nbytes: int
    """Size of the file and of the IO: header block plus field slots (a multiple of 4096)."""

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data (without header and padding)."""
        return sum(f.nbytes for f in self.fields)

    @classmethod
    def build(
        cls, key: str, fields: Sequence[tuple[str, int, torch.dtype]], *, align: int
    ) -> RecordLayout:
        """Lay ``fields`` (``(name, numel, dtype)``) out after the header, ``align``-aligned."""
        if align < IO_ALIGN or align % IO_ALIGN:
            raise ValueError(f"record alignment must be a multiple of {IO_ALIGN}, got {align}")
        if not fields:
            raise ValueError(f"swap record {key!r} needs at least one field")
        out: list[FieldLayout] = []
        at = _round_up(HEADER_BYTES, align)
        for spec in fields:
            if len(spec) != 3:
                raise ValueError(
                    f"swap record {key!r}: field {spec!r} must be (name, numel, dtype)"
                )
            name, numel, dtype = spec
            if not isinstance(name, str) or not name or any(f.name == name for f in out):
                raise ValueError(f"swap record {key!r}: field names must be unique, got {name!r}")
            if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
                raise ValueError(f"swap record {key!r}: field {name!r} numel must be >= 0")
            if dtype not in _DTYPES.values():
                raise ValueError(
                    f"swap record {key!r}: field {name!r} has unsupported dtype {dtype}"
                )
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            slot = _round_up(nbytes, IO_ALIGN)
            out.append(
                FieldLayout(
                    name=name, dtype=dtype, numel=numel, offset=at, nbytes=nbytes, slot_bytes=slot
                )
            )
            at = _round_up(at + slot, align) if slot else at
        last = out[-1]
        nbytes = max(_round_up(last.offset + last.slot_bytes, IO_ALIGN), HEADER_BYTES)
        layout = cls(key=key, fields=tuple(out), nbytes=nbytes)
        # An over-long key or too many fields must fail at register, not at the first write.
        encode_header(layout, run_id="x" * 64, generation=2**62, checksums=["0" * 16] * len(out))
        return layout

    def to_json(self) -> list[dict[str, object]]:
        return [
            {
                "name": f.name,
                "dtype": str(f.dtype).removeprefix("torch."),
                "numel": f.numel,
                "offset": f.offset,
                "nbytes": f.nbytes,
            }
            for f in self.fields
        ]


# --------------------------------------------------------------------------------------
# Checksum
# --------------------------------------------------------------------------------------
def field_checksums(buffer: torch.Tensor, layout: RecordLayout) -> list[str]:
    """``blocksum64`` of each field slot of ``buffer`` (uint8, the record image).

    See [Note: swap checksum].
    """
    out = []
    for f in layout.fields:
        slot = buffer[f.offset : f.offset + f.slot_bytes].numpy()
        # numpy, not torch: one thread, no OpenMP team started from the swap worker
        # threads (under load, torch's 2-thread reduction ran at 1/4 the speed here).
        # Wrapping int64 adds are associative: any summation order gives the same sums.
        sums = slot.view(np.int64).reshape(-1, _WORDS_PER_BLOCK).sum(axis=1)
        digest = hashlib.blake2b(sums.data, digest_size=8)
        digest.update(f.slot_bytes.to_bytes(8, "little"))
        out.append(digest.hexdigest())
    return out


# --------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------
def encode_header(
    layout: RecordLayout, *, run_id: str, generation: int, checksums: Sequence[str]
) -> bytes:
    """The 4096-byte header block of ``layout`` written at ``generation``."""
    fields = layout.to_json()
    for entry, checksum in zip(fields, checksums, strict=True):
        entry["checksum"] = checksum
    body = json.dumps(
        {
            "run_id": run_id,
            "key": layout.key,
            "generation": generation,
            "record_bytes": layout.nbytes,
            "checksum": CHECKSUM_NAME,
            "fields": fields,
        },
        separators=(",", ":"),
    ).encode()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), zlib.crc32(body))
    if len(prefix) + len(body) > HEADER_BYTES:
        raise ValueError(
            f"swap record {layout.key!r}: header needs {len(prefix) + len(body)} bytes, more "
            f"than the {HEADER_BYTES}-byte header block; use a shorter key or fewer fields"
        )
    return (prefix + body).ljust(HEADER_BYTES, b"\x00")


def verify_record(
    buffer: torch.Tensor, layout: RecordLayout, *, run_id: str, generation: int, path: Path
) -> None:
    """Raise a :class:`SwapIntegrityError` unless ``buffer`` (just read from ``path``)
    is generation ``generation`` of ``layout`` written by run ``run_id``, intact."""
    raw = buffer[:HEADER_BYTES].numpy().tobytes()
    magic, version, length, crc = _PREFIX.unpack_from(raw)
    where = f"swap file {path} (record {layout.key!r})"
    if magic != MAGIC:
        what = "all zeros" if not raw.strip(b"\x00") else f"starts with {magic!r}"
        raise SwapCorruptError(
            f"{where}: no swap header (the first block is {what}, expected magic {MAGIC!r}); "
            "the file was overwritten or never completely written",
            path=path,
        )
    if version != FORMAT_VERSION:
        raise SwapCorruptError(
            f"{where}: format version {version}, this accel_zero reads {FORMAT_VERSION}",
            path=path,
        )
    body = raw[_PREFIX.size : _PREFIX.size + length]
    if length > HEADER_BYTES - _PREFIX.size or zlib.crc32(body) != crc:
        raise SwapCorruptError(f"{where}: header checksum mismatch (altered header)", path=path)
    head = json.loads(body)
    if head["run_id"] != run_id:
        raise SwapForeignError(
            f"{where}: written by run {head['run_id']!r}, not this run {run_id!r} "
            "(a file of another run in this folder)",
            path=path,
        )
    if head["key"] != layout.key:
        raise SwapForeignError(
            f"{where}: holds record {head['key']!r} instead (files swapped or renamed)", path=path
        )
    if head["generation"] != generation:
        raise SwapStaleError(
            f"{where}: holds generation {head['generation']}, expected {generation} "
            "(a stale copy: an older or newer write of this record)",
            path=path,
        )
    stored = [{k: v for k, v in f.items() if k != "checksum"} for f in head["fields"]]
    if head["record_bytes"] != layout.nbytes or stored != layout.to_json():
        raise SwapCorruptError(
            f"{where}: header layout {stored} ({head['record_bytes']} bytes) differs from the "
            f"registered one {layout.to_json()} ({layout.nbytes} bytes)",
            path=path,
        )
    if head.get("checksum") != CHECKSUM_NAME:
        raise SwapCorruptError(
            f"{where}: checksum {head.get('checksum')!r}, expected {CHECKSUM_NAME!r}", path=path
        )
    actual = field_checksums(buffer, layout)
    for f, entry, got in zip(layout.fields, head["fields"], actual, strict=True):
        if entry["checksum"] != got:
            raise SwapCorruptError(
                f"{where}: field {f.name!r} ({f.nbytes} bytes at offset {f.offset}) fails its "
                f"checksum (stored {entry['checksum']}, computed {got}): the data was altered "
                "or only partly written",
                path=path,
            )
