"""``accel_zero.Trainer``: transformers' ``Trainer`` on :class:`accel_zero.Accelerator`.

The Trainer's own loop runs unchanged (accumulation, ``max_grad_norm`` clipping through
``accelerator.clip_grad_norm_``, ``model.zero_grad()``, logging, evaluation, prediction);
only the places where transformers picks a backend are redirected:

- ``create_accelerator_and_postprocess`` builds an ``accel_zero.Accelerator`` where
  transformers builds ``accelerate.Accelerator``, with the same arguments minus the DeepSpeed,
  FSDP and DDP settings that accel_zero replaces;
- ``save_model`` writes a consolidated ``from_pretrained`` checkpoint through
  ``accelerator.save_model`` (the plain Trainer's ``model.state_dict()`` is refused by a
  ZeRO-3 model outside forward, since its parameters are sharded);
- a Trainer checkpoint holds the sharded model and optimizer state written by
  ``accelerator.save_state`` (upstream's ``optimizer.pt`` from rank 0 would hold one shard),
  and ``train(resume_from_checkpoint=...)`` / ``load_best_model_at_end`` restore it with
  ``accelerator.load_state`` after ``prepare`` (see [Note: Trainer resume]).

``TrainingArguments`` that select another backend (``deepspeed``, ``fsdp``,
``fsdp_config``) or that would act on a whole unsharded model are refused with the
argument and the fix named.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
)
from torch import nn
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import AcceleratorConfig, reissue_pt_warnings
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from accel_zero.accelerator import Accelerator
from accel_zero.checkpoint import is_complete, layout, open_checkpoint
from accel_zero.checkpoint.accelerate_state import rng_state, set_rng_state
from accel_zero.config import ZeroConfig

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)

# upstream's checkpoint folder names (transformers.trainer_utils.get_last_checkpoint).
_CHECKPOINT_RE = re.compile(re.escape(PREFIX_CHECKPOINT_DIR) + r"-(\d+)")


def _refuse_conflicting_arguments(args: transformers.TrainingArguments) -> None:
    """Raise for ``TrainingArguments`` that select another backend or act on a whole model."""
    if args.deepspeed or getattr(args, "deepspeed_plugin", None) is not None:
        raise ValueError(
            "accel_zero.Trainer: TrainingArguments(deepspeed=...) (or accelerate launch "
            "--use_deepspeed / ACCELERATE_USE_DEEPSPEED=true) selects DeepSpeed, which accel_zero "
            "replaces. Remove it and pass the ZeRO settings as accel_zero.Trainer(..., "
            "zero_config=...) or in the launch YAML's zero_config block; a DeepSpeed JSON is "
            "accepted there as is (zero_config='ds_config.json')."
        )
    if args.fsdp or args.fsdp_config or getattr(args, "fsdp_plugin_args", None):
        raise ValueError(
            "accel_zero.Trainer: TrainingArguments(fsdp=..., fsdp_config=...) selects PyTorch "
            "FSDP, which accel_zero replaces. Remove them; accel_zero shards parameters, "
            "gradients and optimizer state itself (zero_config.stage 3; 2 keeps whole "
            "parameters)."
        )
    if getattr(args, "parallelism_config", None) is not None:
        raise ValueError(
            "accel_zero.Trainer: TrainingArguments(parallelism_config=...) (tensor / context "
            "parallelism) is not supported by accel_zero, which is data-parallel only; remove it."
        )
    if args.fp16_full_eval or args.bf16_full_eval:
        raise ValueError(
            "accel_zero.Trainer: TrainingArguments(fp16_full_eval / bf16_full_eval) casts the "
            "whole model before evaluation, which a sharded model cannot do. Remove it: with "
            "mixed_precision (bf16=True / fp16=True) evaluation already computes in that dtype."
        )
    if args.load_best_model_at_end and args.save_only_model:
        raise ValueError(
            "accel_zero.Trainer: TrainingArguments(load_best_model_at_end=True) reloads the best "
            "checkpoint's sharded state, which save_only_model=True leaves out of every "
            "checkpoint. Remove save_only_model (or load_best_model_at_end and pick the best "
            "checkpoint's model.safetensors export yourself)."
        )
    if args.auto_find_batch_size:
        raise ValueError(
            "accel_zero.Trainer: TrainingArguments(auto_find_batch_size=True) retries training "
            "after releasing the prepared model, which would drop its shards. Remove it and set "
            "per_device_train_batch_size (accel-zero estimate MODEL --world-size N helps size it)."
        )


def _refuse_lone_cpu_ranks(args: transformers.TrainingArguments) -> None:
    """A multi-rank launch on a machine without a GPU needs ``use_cpu``: TrainingArguments
    has already set each rank up alone otherwise (before any Accelerator exists)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = args.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if world > 1 and not use_cpu and not torch.cuda.is_available():
        raise ValueError(
            f"accel_zero.Trainer: rank {os.environ.get('RANK', '?')} of a {world}-rank launch "
            "runs on a machine without a GPU, but TrainingArguments(use_cpu=False) set this "
            "process up to train alone. Pass TrainingArguments(use_cpu=True) (gloo ranks on "
            "CPU); accel-zero launch with use_cpu: true in its YAML sets it for you."
        )


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` trained by accel_zero (ZeRO stages 1, 2 and 3).

    The constructor is transformers.Trainer's, plus ``zero_config``: a :class:`ZeroConfig`,
    a dict of the block's keys, or a path to a YAML / DeepSpeed JSON. Without it the block
    of the YAML given to ``accel-zero launch`` or the file named by ``$ACCEL_ZERO_CONFIG``
    is used, exactly as ``accel_zero.Accelerator()`` resolves it. Runs under
    ``accel-zero launch``, ``torchrun`` and ``accelerate launch``.

    Every rank must call ``train``, ``evaluate``, ``predict`` and ``save_model`` (ZeRO-3
    gathers parameters collectively). ``save_model`` writes consolidated safetensors that
    ``from_pretrained`` loads. Checkpoints during training (``save_strategy``) hold the
    sharded ``accelerator.save_state`` beside that export; ``train(resume_from_checkpoint=
    folder | True)`` continues from one with the losses, weights and random draws of the
    uninterrupted run (bit for bit at the same world size), and ``load_best_model_at_end``
    restores the best one's sharded state.
    """

    accelerator: Accelerator

    def __init__(
        self,
        *args: Any,
        zero_config: ZeroConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        # Read by create_accelerator_and_postprocess, which transformers.Trainer.__init__ calls.
        self._zero_config_arg = zero_config
        # This rank's random generators as the checkpoint being resumed left them (set by
        # _load_optimizer_and_scheduler, applied by _load_rng_state). See [Note: Trainer resume].
        self._resumed_rng_state: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------ accelerator
    def create_accelerator_and_postprocess(self) -> None:
        """transformers' own method, building ``accel_zero.Accelerator`` instead."""
        args = self.args
        _refuse_conflicting_arguments(args)
        _refuse_lone_cpu_ranks(args)

        accelerator_config = args.accelerator_config
        assert isinstance(accelerator_config, AcceleratorConfig)  # TrainingArguments converts it
        grad_acc_kwargs = dict(accelerator_config.gradient_accumulation_kwargs or {})
        if "num_steps" in grad_acc_kwargs:
            if args.gradient_accumulation_steps > 1:
                raise ValueError(
                    "accel_zero.Trainer: both accelerator_config.gradient_accumulation_kwargs"
                    "['num_steps'] and TrainingArguments(gradient_accumulation_steps) are set; "
                    "keep one"
                )
            args.gradient_accumulation_steps = grad_acc_kwargs["num_steps"]
        # The Trainer divides the loss and chooses the sync steps itself (as upstream).
        grad_acc_kwargs["num_steps"] = 1

        config = accelerator_config.to_dict()
        dataloader_config = DataLoaderConfiguration(
            split_batches=config["split_batches"],
            dispatch_batches=config["dispatch_batches"],
            even_batches=config["even_batches"],
            use_seedable_sampler=config["use_seedable_sampler"],
        )
        dataloader_config.data_seed = args.data_seed
        dataloader_config.non_blocking = config["non_blocking"]

        kwargs = self._build_accelerator_args(
            dataloader_config=dataloader_config,
            gradient_accumulation_plugin=GradientAccumulationPlugin(**grad_acc_kwargs),
        )
        # accel_zero replaces these backends; it never wraps the model in DDP.
        kwargs.pop("deepspeed_plugin", None)
        kwargs.pop("fsdp_plugin", None)
        kwargs["kwargs_handlers"] = [
            h
            for h in kwargs.get("kwargs_handlers", [])
            if not isinstance(h, DistributedDataParallelKwargs)
        ]
        if kwargs.get("mixed_precision") in (None, "no"):
            # Not asked for by bf16=/fp16= nor by the launcher: let zero_config.mixed_precision
            # decide, as accel_zero.Accelerator() does.
            kwargs.pop("mixed_precision", None)

        self.accelerator = Accelerator(zero_config=self._zero_config_arg, **kwargs)
        self._check_against_zero_config()

        self.gather_function = self.accelerator.gather_for_metrics
        if "use_gather_object" in inspect.signature(self.gather_function).parameters:
            self.gather_function = functools.partial(
                self.gather_function, use_gather_object=args.eval_use_gather_object
            )
        self.is_deepspeed_enabled = False
        self.is_fsdp_enabled = False
        if args.n_gpu > 1:
            raise ValueError(
                f"accel_zero.Trainer: this single process sees {args.n_gpu} GPUs and the Trainer "
                "would wrap the model in nn.DataParallel. Launch one process per GPU instead: "
                "accel-zero launch --config_file CONFIG.yaml train.py (or torchrun "
                f"--nproc_per_node {args.n_gpu} train.py)."
            )

    def _check_against_zero_config(self) -> None:
        """Settings that both TrainingArguments and zero_config hold must agree."""
        zero = self.accelerator.zero_config
        args = self.args
        if zero.mixed_precision is not None and zero.mixed_precision != (
            self.accelerator.mixed_precision
        ):
            raise ValueError(
                f"accel_zero.Trainer: zero_config.mixed_precision={zero.mixed_precision!r} "
                f"conflicts with TrainingArguments' mixed precision {args.mixed_precision!r} "
                "(bf16= / fp16= or ACCELERATE_MIXED_PRECISION from the launcher); set only one"
            )
        clip = zero.gradient_clipping
        if clip is not None and clip != args.max_grad_norm:
            # The Trainer clips every step itself (with max_grad_norm, or with inf to log the
            # norm), which turns accel_zero's automatic clipping off for that step.
            raise ValueError(
                f"accel_zero.Trainer: zero_config.gradient_clipping={clip} conflicts with "
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}); the Trainer clips "
                f"itself: remove gradient_clipping and set max_grad_norm={clip}"
            )

    # ----------------------------------------------------------------- train
    # [Note: Trainer resume]
    # transformers.Trainer resumes in three places, each redirected here:
    # - train() loads whole weights into the model *before* prepare (_load_from_checkpoint).
    #   A ZeRO-3 (or lazily built) model cannot take whole weights, and the sharded state
    #   holds the exact fp32 masters anyway, so nothing is loaded there: the folder is only
    #   checked to hold a published sharded state and trainer_state.json, so that a wrong
    #   folder fails before anything is prepared.
    # - after prepare, _load_optimizer_and_scheduler calls accelerator.load_state(folder):
    #   each rank reads its rows of the fp32 masters and optimizer moments (from any world
    #   size), the dataloader positions and its RNG state; then the Trainer's scheduler.pt.
    # - _run_epoch skips the batches already trained (from trainer_state.json's global_step)
    #   and then calls _load_rng_state, *after* creating the data iterator (which draws a
    #   seed from the global generator). The RNG state comes from one source: the sharded
    #   state's per-rank entry, which load_state restored and which is kept here until that
    #   moment; upstream's pickled rng_state_<rank>.pth files are neither written nor read.
    #   So the resumed run draws exactly what the uninterrupted run drew after the save.
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> transformers.trainer_utils.TrainOutput:
        """transformers' ``train``. ``resume_from_checkpoint``: a ``checkpoint-N`` folder this
        Trainer wrote, or True for the newest complete one in ``args.output_dir`` (newer
        folders that a crash left incomplete are skipped, with a warning); it must hold the
        sharded state (not ``save_only_model=True``). Every rank must call it."""
        checkpoint: str | None = None
        if resume_from_checkpoint is True:
            checkpoint = self._last_resumable_checkpoint(str(self.args.output_dir))
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            checkpoint = os.fspath(resume_from_checkpoint)
        self._resumed_rng_state = None
        return super().train(
            resume_from_checkpoint=checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
        )

    @staticmethod
    def _is_resumable(folder: str | os.PathLike[str]) -> bool:
        return is_complete(Path(folder)) and os.path.isfile(
            os.path.join(folder, TRAINER_STATE_NAME)
        )

    @classmethod
    def _checkpoints_newest_first(cls, parent: str | os.PathLike[str]) -> list[Path]:
        found = []
        with contextlib.suppress(OSError):
            for child in Path(parent).iterdir():
                match = _CHECKPOINT_RE.fullmatch(child.name)
                if match is not None and child.is_dir():
                    found.append((int(match.group(1)), child))
        return [path for _, path in sorted(found, reverse=True)]

    @classmethod
    def _last_resumable_checkpoint(cls, output_dir: str) -> str:
        """upstream's get_last_checkpoint, minus the folders a crash left incomplete."""
        candidates = cls._checkpoints_newest_first(output_dir)
        for i, folder in enumerate(candidates):
            if cls._is_resumable(folder):
                if i:
                    logger.warning(
                        "accel_zero.Trainer: resuming from %s; skipping the newer %s (saves "
                        "that were interrupted: no published sharded state or no %s)",
                        folder,
                        ", ".join(p.name for p in candidates[:i]),
                        TRAINER_STATE_NAME,
                    )
                return str(folder)
        raise ValueError(
            f"accel_zero.Trainer: train(resume_from_checkpoint=True) found no complete "
            f"checkpoint in {output_dir} (folders {PREFIX_CHECKPOINT_DIR}-N holding the sharded "
            f"state and {TRAINER_STATE_NAME}; found: "
            f"{', '.join(p.name for p in candidates) or 'none'}). Pass the folder to resume "
            "from, or train without resume_from_checkpoint."
        )

    def _check_resumable(self, folder: str, what: str = "resume_from_checkpoint") -> None:
        """Raise, naming ``folder`` and the fix, unless it holds a published sharded state
        and ``trainer_state.json``. See [Note: Trainer resume]."""
        path = Path(folder)
        if not path.is_dir():
            raise ValueError(f"accel_zero.Trainer: {what}={folder!r}: no such folder")
        if not is_complete(path):
            names = {p.name for p in path.iterdir()}
            if names & {layout.POINTER, layout.STAGING} or any(
                layout.version_number(name) is not None for name in names
            ):
                # A save into it was interrupted or a file is damaged: the reader's error
                # names the file at fault and the last complete checkpoint beside it.
                with open_checkpoint(path):
                    pass
            else:
                raise ValueError(
                    f"accel_zero.Trainer: {what}: {path} holds no accel_zero sharded state (no "
                    "LATEST from accelerator.save_state), which resuming needs for the sharded "
                    "model and optimizer: it was written by transformers.Trainer, or by "
                    "accel_zero.Trainer with save_only_model=True. Resume from a "
                    f"{PREFIX_CHECKPOINT_DIR}-N folder that accel_zero.Trainer wrote without "
                    "save_only_model, or start from its weights instead: "
                    "from_pretrained(folder), then train() without resume_from_checkpoint."
                )
        if not os.path.isfile(path / TRAINER_STATE_NAME):
            parent = path.parent
            older = [p for p in self._checkpoints_newest_first(parent) if p != path]
            last = next((str(p) for p in older if self._is_resumable(p)), None)
            hint = f"resume from {last}" if last else f"no complete checkpoint is in {parent}"
            raise ValueError(
                f"accel_zero.Trainer: {what}: {path} has no {TRAINER_STATE_NAME} (the save "
                f"was interrupted after the sharded state was published); {hint}."
            )

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        """Loads nothing: the weights come from the sharded state after prepare. Refuses a
        folder without one, before anything is prepared. See [Note: Trainer resume]."""
        del model
        self._check_resumable(resume_from_checkpoint)
        logger.info(
            "accel_zero.Trainer: resuming from %s: the sharded model and optimizer state load "
            "after prepare",
            resume_from_checkpoint,
        )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The sharded fp32 masters, optimizer state, dataloader positions and RNG through
        ``accelerator.load_state`` (every rank), then the learning-rate scheduler."""
        if checkpoint is None:
            return
        self.accelerator.load_state(checkpoint)
        self._resumed_rng_state = rng_state()
        if self.lr_scheduler is None:
            return
        scheduler_file = os.path.join(checkpoint, SCHEDULER_NAME)
        if not os.path.isfile(scheduler_file):
            raise ValueError(
                f"accel_zero.Trainer: {scheduler_file} is missing, so the learning-rate "
                "schedule cannot continue; resume from a complete checkpoint folder"
            )
        with warnings.catch_warnings(record=True) as caught:
            # weights_only: a checkpoint never runs pickled code (as upstream loads it).
            state = torch.load(scheduler_file, map_location="cpu", weights_only=True)
            self.lr_scheduler.load_state_dict(state)
        reissue_pt_warnings(caught)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """This rank's RNG state from the checkpoint's sharded state (restored by
        ``load_state`` and kept until upstream's moment). See [Note: Trainer resume]."""
        if checkpoint is None:
            return
        if self._resumed_rng_state is None:
            logger.warning(
                "accel_zero.Trainer: no RNG state was restored from %s; random draws after "
                "resuming differ from the uninterrupted run",
                checkpoint,
            )
            return
        set_rng_state(self._resumed_rng_state)

    def _load_best_model(self) -> None:
        """The best checkpoint's sharded state through ``accelerator.load_state``: its fp32
        masters and (as transformers' DeepSpeed path does) its optimizer state. The run's
        random generators are kept as they are. Every rank calls it."""
        best = self.state.best_model_checkpoint
        assert best is not None  # _finalize_training checks it
        self._check_resumable(best, what="load_best_model_at_end")
        logger.info(
            "accel_zero.Trainer: loading the best model from %s (score: %s)",
            best,
            self.state.best_metric,
        )
        kept = rng_state()
        self.accelerator.load_state(best)
        set_rng_state(kept)

    # ------------------------------------------------------------------ save
    def _is_prepared(self, model: nn.Module) -> bool:
        try:
            self.accelerator.zero_engine(model)
        except ValueError:
            return False
        return True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Consolidated safetensors (plus config, tokenizer and training arguments) that
        ``from_pretrained`` loads, gathered unit by unit. Every rank must call it."""
        target = str(output_dir if output_dir is not None else self.args.output_dir)
        model = self.model
        if model is None or not self._is_prepared(model):
            # Never prepared (no train/evaluate yet): a whole plain model, saved as upstream.
            super().save_model(target, _internal_call=_internal_call)
            return
        self.accelerator.save_model(model, target)
        if self.args.should_save:
            tokenizer = self.processing_class
            if tokenizer is None:
                tokenizer = getattr(self.data_collator, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(target)
            torch.save(self.args, os.path.join(target, TRAINING_ARGS_NAME))
        # Every rank returns with the folder complete (tokenizer files are written last).
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """A Trainer checkpoint whose optimizer state is whole: the sharded model and
        optimizer state through ``accelerator.save_state`` (each rank writes its own rows;
        ``LATEST`` and ``v000001/`` in the folder), written first, so that a failure there
        leaves no Trainer files that look complete; then upstream's files: the consolidated
        export (``save_model``), scheduler, RNG states and ``trainer_state.json``."""
        if not self.args.save_only_model:
            run_dir = self._get_output_dir(trial=trial)
            step = self.state.global_step
            self.accelerator.save_state(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}"))
        super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The optimizer state went to accelerator.save_state in _save_checkpoint: upstream's
        # optimizer.pt from the main process would hold only that rank's shard.
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save_rng_state(self, output_dir: str) -> None:
        # accelerator.save_state in _save_checkpoint holds every rank's RNG state, taken at
        # the same moment; resuming reads it from there. See [Note: Trainer resume].
        del output_dir
