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
  ``accelerator.save_state`` (upstream's ``optimizer.pt`` from rank 0 would hold one shard).

``TrainingArguments`` that select another backend (``deepspeed``, ``fsdp``,
``fsdp_config``) or that would act on a whole unsharded model are refused with the
argument and the fix named.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
)
from torch import nn
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import AcceleratorConfig
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from accel_zero.accelerator import Accelerator
from accel_zero.config import ZeroConfig

__all__ = ["Trainer"]


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
    if args.load_best_model_at_end:
        raise ValueError(
            "accel_zero.Trainer: TrainingArguments(load_best_model_at_end=True) reloads a "
            "checkpoint into the sharded model, which accel_zero.Trainer does not do yet. Remove "
            "it, or evaluate the exports written by trainer.save_model(dir) with "
            "from_pretrained."
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
    sharded ``accelerator.save_state`` beside that export; resuming from them
    (``resume_from_checkpoint``) is not implemented yet.
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
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> transformers.trainer_utils.TrainOutput:
        if resume_from_checkpoint not in (None, False):
            raise NotImplementedError(
                "accel_zero.Trainer: resume_from_checkpoint is not implemented yet. Start from "
                "a save_model() export instead (from_pretrained(export_dir), then train()), or "
                "restore a checkpoint's sharded state in your own loop with "
                "accelerator.load_state(checkpoint_dir)."
            )
        return super().train(trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)

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
