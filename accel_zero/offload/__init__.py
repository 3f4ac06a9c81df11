"""Offload of model state out of accelerator memory: the NVMe swap space.

Re-exports only: :mod:`~accel_zero.offload.nvme_path` (validating ``nvme_path``),
:mod:`~accel_zero.offload.swap` (the swap space and its pipeline),
:mod:`~accel_zero.offload.swap_buffer` (a pool buffer),
:mod:`~accel_zero.offload.swap_format` (file format, checksum, errors) and
:mod:`~accel_zero.offload.swap_stats` (IO accounting).
"""

from accel_zero.offload.nvme_path import NvmePath, new_run_id, validate_nvme_path
from accel_zero.offload.swap import SwapSpace
from accel_zero.offload.swap_buffer import SwapBuffer
from accel_zero.offload.swap_format import (
    FieldLayout,
    RecordLayout,
    SwapCorruptError,
    SwapError,
    SwapForeignError,
    SwapIntegrityError,
    SwapIOError,
    SwapRecordInvalidError,
    SwapStaleError,
    SwapTruncatedError,
)
from accel_zero.offload.swap_stats import SwapStats

__all__ = [
    "FieldLayout",
    "NvmePath",
    "RecordLayout",
    "SwapBuffer",
    "SwapCorruptError",
    "SwapError",
    "SwapForeignError",
    "SwapIOError",
    "SwapIntegrityError",
    "SwapRecordInvalidError",
    "SwapSpace",
    "SwapStaleError",
    "SwapStats",
    "SwapTruncatedError",
    "new_run_id",
    "validate_nvme_path",
]
