"""Checkpoints: sharded, reshardable, crash-safe ``save_state`` storage and the exports.

- ``export``: the consolidated ``save_model`` export (from a live sharded model).
- ``save`` / ``reader``: the sharded checkpoint (see [Note: checkpoint layout] in layout.py
  and [Note: crash-safe publish] in save.py).
- ``accelerate_state``: Accelerate's non-model state (RNG, schedulers, samplers, scaler,
  registered objects) and its checkpoint folder naming, without unsafe pickle.
- ``consolidate``: ``accel-zero export CKPT_DIR OUT_DIR`` (sharded checkpoint ->
  ``from_pretrained`` folder), one tensor at a time.
"""

from accel_zero.checkpoint.accelerate_state import (
    checkpoint_dir_for_load,
    checkpoint_dir_for_save,
    load_accelerator_objects,
    prune_checkpoints,
    save_accelerator_objects,
)
from accel_zero.checkpoint.consolidate import export_checkpoint
from accel_zero.checkpoint.export import (
    ConsolidatedWriter,
    parse_size,
    save_model,
    write_consolidated,
)
from accel_zero.checkpoint.layout import CheckpointError, find_last_complete, is_complete
from accel_zero.checkpoint.reader import CheckpointReader, open_checkpoint
from accel_zero.checkpoint.save import CheckpointSave, SaveOptions, begin_save

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "CheckpointSave",
    "ConsolidatedWriter",
    "SaveOptions",
    "begin_save",
    "checkpoint_dir_for_load",
    "checkpoint_dir_for_save",
    "export_checkpoint",
    "find_last_complete",
    "is_complete",
    "load_accelerator_objects",
    "open_checkpoint",
    "parse_size",
    "prune_checkpoints",
    "save_accelerator_objects",
    "save_model",
    "write_consolidated",
]
