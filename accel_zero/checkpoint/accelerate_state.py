"""Accelerate's non-model checkpoint state and folder naming, without unsafe pickle.

``save_accelerator_objects(save, accelerator)`` / ``load_accelerator_objects(reader,
accelerator)`` store and restore what ``accelerate.checkpointing.save_accelerator_state`` and
``save_custom_state`` store, reading the same ``Accelerator`` attributes (``_schedulers``,
``_dataloaders``, ``_custom_objects``, ``scaler``, ``step``), but as JSON + safetensors
(see [Note: state without pickle] in state.py):

- ``accelerate/progress`` (shared): ``step``, ``save_iteration``, the number of processes
  and of each kind of object (a count mismatch on load is an error, as in Accelerate);
- ``accelerate/rng`` (per rank): python ``random``, numpy, torch CPU, and CUDA when
  available; a rank the checkpoint has no RNG state for (more ranks than at save) keeps its
  own, with a warning;
- ``accelerate/scheduler_<i>``, ``accelerate/scaler``, ``accelerate/custom_<i>`` (shared):
  ``state_dict()`` of each;
- ``accelerate/dataloader_<i>`` (per rank): the position, not the pickled sampler: the
  loader's epoch counter ``iteration`` (Accelerate re-seeds its sampler with it at every
  epoch), a ``SeedableRandomSampler``'s ``epoch`` and ``initial_seed``, and a torchdata
  ``StatefulDataLoader``'s ``state_dict()``. Restoring ``iteration`` goes beyond Accelerate
  (which leaves it at 0 after ``load_state``): it makes the resumed epoch shuffle as the
  uninterrupted run did.

Folder naming follows ``Accelerator.save_state``/``load_state``: with
``ProjectConfiguration(automatic_checkpoint_naming=True)`` a save goes to
``<project_dir>/checkpoints/checkpoint_<save_iteration>``, and ``total_limit`` bounds how many
are kept; but the oldest are deleted *after* the new one is published
(``prune_checkpoints``), so a crash never leaves fewer complete checkpoints, and a load
without a folder takes the newest *complete* one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel_zero.checkpoint import layout
from accel_zero.checkpoint.reader import CheckpointReader
from accel_zero.checkpoint.save import CheckpointSave

__all__ = [
    "checkpoint_dir_for_load",
    "checkpoint_dir_for_save",
    "dataloader_position",
    "load_accelerator_objects",
    "prune_checkpoints",
    "restore_dataloader_position",
    "rng_state",
    "save_accelerator_objects",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

_PREFIX = "accelerate"
_CHECKPOINTS = "checkpoints"
# Accelerate's own key: the first number in the folder's name orders checkpoints.
_NUMBER_RE = re.compile(r"([0-9]+)")


# ---------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's random generators (the ones Accelerate saves on CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``; CUDA states only for the devices both sides have."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        count = min(len(saved), torch.cuda.device_count())
        if count != len(saved):
            logger.warning(
                "load_state: %d CUDA RNG states saved, %d devices here", len(saved), count
            )
        for device in range(count):
            torch.cuda.set_rng_state(saved[device], device)


# --------------------------------------------------------------- dataloaders
def _sampler(dataloader: Any) -> Any:
    get = getattr(dataloader, "get_sampler", None)
    if get is not None:
        return get()
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    return getattr(batch_sampler, "sampler", None)


def dataloader_position(dataloader: Any) -> dict[str, Any]:
    """Where an (Accelerate-prepared) dataloader is: epoch counter, sampler seed/epoch and a
    stateful loader's ``state_dict()``. Plain values only: no pickled sampler."""
    position: dict[str, Any] = {}
    iteration = getattr(dataloader, "iteration", None)
    if isinstance(iteration, int):
        position["iteration"] = iteration
    sampler = _sampler(dataloader)
    if sampler is not None and isinstance(getattr(sampler, "epoch", None), int):
        position["sampler"] = {"epoch": sampler.epoch}
        if isinstance(getattr(sampler, "initial_seed", None), int):
            position["sampler"]["initial_seed"] = sampler.initial_seed
    if getattr(dataloader, "use_stateful_dataloader", False):
        position["state_dict"] = dataloader.state_dict()
    return position


def restore_dataloader_position(dataloader: Any, position: dict[str, Any]) -> None:
    """Inverse of ``dataloader_position``."""
    if "iteration" in position:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(position["iteration"])  # also tells the samplers
        else:
            dataloader.iteration = position["iteration"]
    sampler = _sampler(dataloader)
    if "sampler" in position and sampler is not None:
        for name, value in position["sampler"].items():
            setattr(sampler, name, value)
    if "state_dict" in position:
        dataloader.load_state_dict(position["state_dict"])


# --------------------------------------------------------------- save / load
def save_accelerator_objects(save: CheckpointSave, accelerator: Any) -> None:
    """Write the accelerator's non-model state into ``save`` (every rank calls it)."""
    schedulers = list(accelerator._schedulers)
    dataloaders = list(accelerator._dataloaders)
    custom = list(accelerator._custom_objects)
    scaler = getattr(accelerator, "scaler", None)
    save.write_state(
        f"{_PREFIX}/progress",
        {
            "step": int(accelerator.step),
            "save_iteration": int(accelerator.save_iteration),
            "num_processes": int(accelerator.num_processes),
            "schedulers": len(schedulers),
            "dataloaders": len(dataloaders),
            "custom_objects": len(custom),
            "scaler": scaler is not None,
        },
    )
    save.write_state(f"{_PREFIX}/rng", rng_state(), per_rank=True)
    for i, scheduler in enumerate(schedulers):
        save.write_state(f"{_PREFIX}/scheduler_{i}", scheduler.state_dict())
    for i, dataloader in enumerate(dataloaders):
        save.write_state(
            f"{_PREFIX}/dataloader_{i}", dataloader_position(dataloader), per_rank=True
        )
    if scaler is not None:
        save.write_state(f"{_PREFIX}/scaler", scaler.state_dict())
    for i, obj in enumerate(custom):
        save.write_state(f"{_PREFIX}/custom_{i}", obj.state_dict())


def load_accelerator_objects(reader: CheckpointReader, accelerator: Any) -> None:
    """Restore what ``save_accelerator_objects`` wrote (every rank calls it); sets
    ``accelerator.step`` as Accelerate's ``load_state`` does."""
    where = reader.directory
    progress = reader.read_state(f"{_PREFIX}/progress")
    schedulers = list(accelerator._schedulers)
    dataloaders = list(accelerator._dataloaders)
    custom = list(accelerator._custom_objects)
    for what, have, saved in (
        ("learning-rate schedulers", len(schedulers), progress["schedulers"]),
        (
            "objects registered with register_for_checkpointing",
            len(custom),
            progress["custom_objects"],
        ),
    ):
        if have != saved:
            raise ValueError(
                f"load_state: {where} holds {saved} {what}, this accelerator has {have}; "
                "prepare/register the same objects (in the same order) as when it was saved"
            )
    for i, scheduler in enumerate(schedulers):
        scheduler.load_state_dict(reader.read_state(f"{_PREFIX}/scheduler_{i}"))
    rank = int(accelerator.process_index)
    if len(dataloaders) != progress["dataloaders"]:
        logger.warning(
            "load_state: %s holds the positions of %d dataloaders, this accelerator has %d; "
            "restoring the first %d",
            where,
            progress["dataloaders"],
            len(dataloaders),
            min(len(dataloaders), progress["dataloaders"]),
        )
    for i, dataloader in enumerate(dataloaders[: progress["dataloaders"]]):
        name = f"{_PREFIX}/dataloader_{i}"
        source = rank if reader.has_state(name, rank=rank) else 0
        restore_dataloader_position(dataloader, reader.read_state(name, rank=source))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        if not progress["scaler"]:
            raise ValueError(
                f"load_state: {where} was saved without a gradient scaler, this accelerator "
                "uses one (fp16); resume with the mixed precision it was saved with"
            )
        scaler.load_state_dict(reader.read_state(f"{_PREFIX}/scaler"))
    for i, obj in enumerate(custom):
        obj.load_state_dict(reader.read_state(f"{_PREFIX}/custom_{i}"))
    if reader.has_state(f"{_PREFIX}/rng", rank=rank):
        set_rng_state(reader.read_state(f"{_PREFIX}/rng", rank=rank))
    else:
        logger.warning(
            "load_state: %s has no RNG state for rank %d (saved by %d ranks); this rank keeps "
            "its current random generators",
            where,
            rank,
            reader.world_size,
        )
    accelerator.step = int(progress["step"])


# -------------------------------------------------------------------- naming
def _number(path: Path) -> int | None:
    match = _NUMBER_RE.search(path.name)
    return int(match.group(1)) if match else None


def checkpoint_dir_for_save(accelerator: Any, output_dir: str | os.PathLike[str] | None) -> Path:
    """The folder ``save_state(output_dir)`` writes to, by Accelerate's rules (every rank
    computes the same). Raises, as Accelerate does, if automatic naming would reuse a folder
    that holds a complete checkpoint; an interrupted one there is replaced."""
    config = accelerator.project_configuration
    if config.automatic_checkpoint_naming:
        if accelerator.project_dir is None:
            raise ValueError(
                "save_state: automatic_checkpoint_naming needs "
                "ProjectConfiguration(project_dir=...)"
            )
        target = (
            Path(accelerator.project_dir)
            / _CHECKPOINTS
            / f"checkpoint_{accelerator.save_iteration}"
        )
        if target.exists() and layout.is_complete(target):
            raise ValueError(
                f"Checkpoint directory {target} ({accelerator.save_iteration}) already exists. "
                "Please manually override `self.save_iteration` with what iteration to start with."
            )
        if target.exists():
            logger.warning("save_state: %s holds an interrupted save; replacing it", target)
        return target
    if output_dir is None:
        raise ValueError(
            "save_state: pass a folder, or use "
            "ProjectConfiguration(automatic_checkpoint_naming=True)"
        )
    return Path(output_dir).expanduser()


def checkpoint_dir_for_load(accelerator: Any, input_dir: str | os.PathLike[str] | None) -> Path:
    """The folder ``load_state(input_dir)`` reads: ``input_dir``, or with automatic naming
    the newest *complete* ``checkpoints/checkpoint_<i>`` (Accelerate takes the newest, even
    one a crash left incomplete)."""
    if input_dir is not None:
        path = Path(input_dir).expanduser()
        if not path.is_dir():
            raise ValueError(f"Tried to find {path} but folder does not exist")
        return path
    config = accelerator.project_configuration
    if not config.automatic_checkpoint_naming or accelerator.project_dir is None:
        raise ValueError("No input_dir provided and automatic checkpoint naming is disabled.")
    parent = Path(accelerator.project_dir) / _CHECKPOINTS
    last = layout.find_last_complete(parent)
    if last is None:
        raise ValueError(f"load_state: no complete checkpoint in {parent}")
    last_number = _number(last)
    newer = [
        p
        for p in parent.iterdir()
        if p.is_dir()
        and (n := _number(p)) is not None
        and last_number is not None
        and n > last_number
    ]
    if newer:
        logger.warning(
            "load_state: skipping %s (interrupted saves, not loadable); loading %s",
            ", ".join(sorted(p.name for p in newer)),
            last,
        )
    return last


def _remove_checkpoint(path: Path) -> None:
    """Unpublish first (one atomic unlink), then delete: a crash mid-way leaves an
    incomplete folder, never a damaged one that looks complete."""
    with contextlib.suppress(FileNotFoundError):
        (path / layout.POINTER).unlink()
        layout.fsync_path(path)
    shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(accelerator: Any, saved: Path) -> list[Path]:
    """Rank 0, after ``saved`` was published: apply ``total_limit`` (keep ``saved`` and the
    ``total_limit - 1`` newest complete checkpoints beside it) and remove older interrupted
    saves. Returns the folders removed."""
    config = accelerator.project_configuration
    if not config.automatic_checkpoint_naming or config.total_limit is None:
        return []
    parent, number = saved.parent, _number(saved)
    others = [
        p
        for p in parent.iterdir()
        if p.is_dir() and p.resolve() != saved.resolve() and _number(p) is not None
    ]
    removed = [p for p in others if not layout.is_complete(p) and (_number(p) or 0) < (number or 0)]
    complete = sorted((p for p in others if layout.is_complete(p)), key=lambda p: _number(p) or 0)
    keep = max(config.total_limit - 1, 0)
    removed += complete[: max(len(complete) - keep, 0)]
    if removed:
        logger.warning(
            "Deleting %d checkpoints to make room for new checkpoint: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    for path in removed:
        _remove_checkpoint(path)
    return removed
