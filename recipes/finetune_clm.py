"""Fine-tune SmolLM2-135M-Instruct on the English chatterbot dialogues with ZeRO-3.

Launch (2 CPU ranks, ZeRO stage 3; the README's main job):

    bash scripts/setup.sh && \
        accel-zero launch --config_file recipes/configs/zero3_cpu.yaml recipes/finetune_clm.py

The YAML holds Accelerate's own launch keys (2 local CPU processes) plus a ``zero_config:``
block that ``accel-zero launch`` hands to every rank, so ``Accelerator()`` below needs no
arguments for ZeRO. The same script runs under ``accelerate launch`` (with
``ACCEL_ZERO_CONFIG=recipes/configs/zero3_cpu.yaml``) and ``torchrun --nproc_per_node 2``.

What one optimizer step sees (defaults):
    per_device_batch_size 4 x grad_accum 1 x 2 ranks = 8 dialogue pairs per step,
    ~55 tokens each (padded to the longest pair of the micro-batch, at most seq_len 128),
    about 440 tokens per step. 60 steps = 480 pairs, 0.21 of an epoch of the 2,242 pairs
    that fit in 128 tokens: enough for the loss to fall from ~3.6 to ~1 and the answers to
    take the corpus' style. Measured: 3.7 s/step and 4.3 minutes in all on the 2-core
    machine, ~10 minutes when other jobs share its cores (recipes/README.md).

The loss is computed on the assistant's answer only (prompt tokens are labelled -100),
with the model's own chat template. One greedy answer to a fixed prompt is generated
before and after training; under ZeRO-3 every rank runs ``generate`` together because each
forward gathers the parameters from all ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import torch
import transformers
from common import (
    SMOLLM2_DIR,
    TINY_DIR,
    PadCollator,
    asset_path,
    build_sft_dataset,
    format_bytes_tree,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from accel_zero import Accelerator, lazy_init


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
    p.add_argument("--prompt", default="What is AI?", help="answered before and after")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--output_dir", type=Path, default=Path("outputs/smollm2-chatterbot"))
    p.add_argument("--no_save", action="store_true", help="skip the final save_model")
    p.add_argument(
        "--reference_ddp",
        action="store_true",
        help="run the same loop under Accelerate's own Accelerator (DDP, whole model on every "
        "rank): the reference scripts/bench_main_job.py compares with",
    )
    return p.parse_args(argv)


@torch.no_grad()
def answer(accelerator: Accelerator, model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to ``prompt``. Called on every rank: under ZeRO-3 a forward gathers
    each unit's parameters from all ranks, so all ranks must step through ``generate``
    together; greedy decoding of the same input gives every rank the same tokens and so
    the same number of forwards."""
    chat = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    enc = {k: v.to(accelerator.device) for k, v in enc.items()}
    model.eval()
    out = accelerator.unwrap_model(model).generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train()
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_path = args.model_path or asset_path(TINY_DIR if args.tiny else SMOLLM2_DIR)

    # ZeRO settings come from the launch YAML's zero_config block (or ACCEL_ZERO_CONFIG);
    # mixed precision from its mixed_precision key. Accumulation is an Accelerate setting.
    if args.reference_ddp:  # the loop below is unchanged: that is the contract
        import accelerate

        accelerator = accelerate.Accelerator(gradient_accumulation_steps=args.grad_accum)
    else:
        accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
    torch.manual_seed(args.seed)
    main_proc = accelerator.is_main_process
    world = accelerator.num_processes
    if not main_proc:  # one set of progress bars is enough
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Each rank reads only its own rows of every tensor from model.safetensors.
    with contextlib.nullcontext() if args.reference_ddp else lazy_init(accelerator):
        model = AutoModelForCausalLM.from_pretrained(model_path)
    n_params = sum(p.numel() for p in model.parameters())

    dataset = build_sft_dataset(tokenizer, args.seq_len)
    loader = DataLoader(
        dataset,
        batch_size=args.per_device_batch_size,
        shuffle=True,
        collate_fn=PadCollator(tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Accelerate's prepared scheduler advances once per rank at every optimizer step
    # (it assumes the schedule was written for one process seeing the global batch), so
    # the schedule is sized in steps x ranks.
    scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=args.warmup_steps * world,
        num_training_steps=args.max_steps * world,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    pairs_per_step = args.per_device_batch_size * args.grad_accum * world
    accelerator.print(
        f"model {model_path} ({n_params / 1e6:.1f} M params), {len(dataset)} pairs <= "
        f"{args.seq_len} tokens; {args.per_device_batch_size} per micro-batch x "
        f"{args.grad_accum} accumulation x {world} ranks = {pairs_per_step} pairs per step, "
        f"{args.max_steps} steps ({args.max_steps * pairs_per_step / len(dataset):.2f} epochs)"
    )

    before = answer(accelerator, model, tokenizer, args.prompt, args.max_new_tokens)
    accelerator.print(f"before training | {args.prompt!r} -> {before!r}")

    progress = tqdm(total=args.max_steps, disable=not main_proc, desc="train", unit="step")
    step, epoch, micro = 0, 0, 0
    grad_norm = None
    step_loss = torch.zeros((), device=accelerator.device)
    start = time.perf_counter()
    model.train()
    while step < args.max_steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)  # a new shuffle each pass, the same on every rank
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                step_loss += loss.detach() / args.grad_accum
                micro += 1
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            # One optimizer step done: log the loss of every rank (gather is a collective,
            # so every rank takes part; only the main process prints).
            rank_losses = accelerator.gather(step_loss.reshape(1)).tolist()
            step_loss.zero_()
            step += 1
            if main_proc:
                mean = sum(rank_losses) / len(rank_losses)
                per_rank = " ".join(f"{x:.4f}" for x in rank_losses)
                norm = float(grad_norm) if grad_norm is not None else math.nan
                progress.write(
                    f"step {step}/{args.max_steps} loss {mean:.4f} (ranks: {per_rank}) "
                    f"grad_norm {norm:.3f} lr {scheduler.get_last_lr()[0]:.3e}"
                )
                progress.set_postfix(loss=f"{mean:.3f}")
                progress.update(1)
            if step >= args.max_steps:
                break
        epoch += 1
    progress.close()
    seconds = time.perf_counter() - start
    accelerator.print(
        f"trained {step} steps ({micro} micro-batches per rank) in {seconds:.1f} s, "
        f"{seconds / max(step, 1):.2f} s/step"
    )

    after = answer(accelerator, model, tokenizer, args.prompt, args.max_new_tokens)
    accelerator.print(f"after training  | {args.prompt!r} -> {after!r}")

    # Model-state bytes this rank holds (params, grads, optimizer state) per device, with
    # peaks. Ranks print in turn so the reports do not interleave.
    report = {} if args.reference_ddp else accelerator.memory_report()
    for rank in range(world):
        if rank == accelerator.process_index:
            print(f"memory report (rank {rank}):", flush=True)
            for line in format_bytes_tree(report, indent="  "):
                print(f"  {line}", flush=True)
            # Whole-process peak (activations, logits, allocator caches, libraries too).
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB
            print(f"  peak RSS of this process: {peak_rss:.0f} MiB", flush=True)
        accelerator.wait_for_everyone()

    # The coordinator's counters (prefetch hits/misses, bytes gathered/reduced, seconds
    # spent waiting on communication) for this rank.
    if not args.reference_ddp:
        accelerator.print(f"zero stats (rank 0): {accelerator.zero_stats()}")

    if not args.no_save:
        # Consolidated safetensors gathered unit by unit; every rank takes part.
        accelerator.save_model(model, args.output_dir)
        if main_proc:
            tokenizer.save_pretrained(args.output_dir)
            if not (args.output_dir / "config.json").is_file():
                accelerator.unwrap_model(model).config.save_pretrained(args.output_dir)
        accelerator.wait_for_everyone()
        accelerator.print(f"saved {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
