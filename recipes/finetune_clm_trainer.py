"""The main job's fine-tune through ``accel_zero.Trainer``: SmolLM2 on chatterbot, ZeRO-3.

Launch (2 CPU ranks, ZeRO stage 3, the main job's YAML):

    accel-zero launch --config_file recipes/configs/zero3_cpu.yaml recipes/finetune_clm_trainer.py

``--tiny`` runs the 2-layer test model (plumbing only). The same script runs under
``ACCEL_ZERO_CONFIG=recipes/configs/zero3_cpu.yaml torchrun --nproc_per_node 2``.

This is ``recipes/finetune_clm.py`` with transformers' ``Trainer`` loop in place of the
hand-written one: the same data (the English chatterbot pairs in SmolLM2's chat template,
pairs longer than ``seq_len`` dropped, ``recipes/common.py::build_sft_dataset``), the same
loss (next-token cross-entropy on the answer only: prompt tokens are labelled -100), the
same defaults (4 pairs per micro-batch x 1 accumulation x 2 ranks = 8 pairs, ~440 tokens per
step; 60 steps; AdamW, linear warm-up over 6 steps to 5e-5 then decay to 0; clipping to 1.0),
with the model built under ``lazy_init`` so each rank reads only its rows of the checkpoint.

One difference in the numbers: the Trainer averages the loss over all answer tokens of the
step, on all ranks and accumulated micro-batches (``num_items_in_batch``), where
``finetune_clm.py`` averages each micro-batch over its own tokens and then over ranks; the
two agree when every micro-batch holds as many answer tokens. Each logged line is one
optimizer step (``logging_steps=1``): its ``loss``, ``grad_norm`` (before clipping) and
``learning_rate``. After training every rank answers a fixed prompt together (ZeRO-3
forwards gather parameters collectively), and the model is exported with
``trainer.save_model`` (consolidated safetensors + tokenizer, for ``from_pretrained``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import torch
import transformers
from common import SMOLLM2_DIR, TINY_DIR, PadCollator, asset_path, build_sft_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from accel_zero import lazy_init

# accel_zero.trainer imports transformers' Trainer (and torch._dynamo with it) before
# TrainingArguments creates the process group; see the README on dynamo and gloo groups.
from accel_zero.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", type=Path, default=None, help="default: prepared SmolLM2")
    p.add_argument("--tiny", action="store_true", help="use the tiny test model (plumbing only)")
    p.add_argument("--max_steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--seq_len", type=int, default=128, help="longest pair kept, in tokens")
    p.add_argument("--per_device_batch_size", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW)")
    p.add_argument("--warmup_steps", type=int, default=6, help="linear warm-up, in steps")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--prompt", default="What is AI?", help="answered after training")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--output_dir", type=Path, default=Path("outputs/smollm2-chatterbot-trainer"))
    p.add_argument("--no_save", action="store_true", help="skip the final save_model")
    return p.parse_args(argv)


@torch.no_grad()
def answer(trainer: Trainer, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer, on every rank together (each ZeRO-3 forward gathers from all ranks;
    the same input gives every rank the same tokens, so the same number of forwards)."""
    chat = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    enc = {k: v.to(trainer.args.device) for k, v in enc.items()}
    model: Any = trainer.model
    model.eval()
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return str(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    model_path = args.model_path or asset_path(TINY_DIR if args.tiny else SMOLLM2_DIR)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        use_cpu=not torch.cuda.is_available(),  # gloo ranks on a machine without a GPU
        per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        logging_steps=1,
        save_strategy="no",  # the export at the end; resumable checkpoints come later
        report_to=[],
        seed=args.seed,
    )
    main_proc = training_args.process_index == 0
    if not main_proc:  # one set of progress bars is enough
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = build_sft_dataset(tokenizer, args.seq_len)
    # TrainingArguments started the process group: each rank reads only its own rows of
    # every tensor from model.safetensors (the engine takes them over at prepare).
    with lazy_init(training_args):
        model = AutoModelForCausalLM.from_pretrained(model_path)
    n_params = sum(p.numel() for p in model.parameters())

    # ZeRO settings from the launch YAML's zero_config block (or ACCEL_ZERO_CONFIG), mixed
    # precision from its mixed_precision key, as for Accelerator().
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    world = trainer.accelerator.num_processes
    pairs_per_step = args.per_device_batch_size * args.grad_accum * world
    trainer.accelerator.print(
        f"model {model_path} ({n_params / 1e6:.1f} M params), ZeRO stage "
        f"{trainer.accelerator.zero_config.stage}, mixed precision "
        f"{trainer.accelerator.mixed_precision}; {len(dataset)} pairs <= {args.seq_len} tokens; "
        f"{args.per_device_batch_size} per micro-batch x {args.grad_accum} accumulation x "
        f"{world} ranks = {pairs_per_step} pairs per step, {args.max_steps} steps "
        f"({args.max_steps * pairs_per_step / len(dataset):.2f} epochs)"
    )

    train_start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - train_start
    trainer.accelerator.print(
        f"trained {result.global_step} steps in {seconds:.1f} s "
        f"({seconds / max(result.global_step, 1):.2f} s/step), mean loss {result.training_loss:.4f}"
    )
    after = answer(trainer, tokenizer, args.prompt, args.max_new_tokens)
    trainer.accelerator.print(f"after training  | {args.prompt!r} -> {after!r}")

    if not args.no_save:
        trainer.save_model(str(args.output_dir))  # every rank takes part
        trainer.accelerator.print(f"saved {args.output_dir}")
    trainer.accelerator.print(f"wall time {time.perf_counter() - start:.1f} s")
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
