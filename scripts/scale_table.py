"""Print the README's scale table: Llama-2 7B and 70B on 8, 64 and 512 GPUs.

    python scripts/scale_table.py            # the README table (Markdown)

Both models are built on the meta device from a ``LlamaConfig`` (no download, no memory):
7B = hidden 4096, 32 layers, 32 heads, FFN 11008; 70B = hidden 8192, 80 layers, 64 heads
with 8 KV heads, FFN 28672; vocabulary 32000, untied head. Each is estimated with
``accel_zero.cluster.scale_row`` (the model ``accel-zero estimate --cluster`` prints, whose
collectives tests/distributed/test_comm_model.py checks against real steps) under ZeRO-3
with accel_zero's default ``zero_config`` and bf16 mixed precision, three ways: sharded over
all GPUs, hybrid (sharded within each 8-GPU node, replicated across nodes), and each of
these with the optimizer offloaded to host memory. The second table gives the largest model of a
Llama-architecture family (``accel_zero.cluster.llama_family``) that fits each setting.
"""

from __future__ import annotations

import argparse
from typing import Any

from accel_zero.cluster import Cluster, ScaleRow, largest_fitting, layout_from_module, scale_row
from accel_zero.cluster.layout import ModelLayout
from accel_zero.config import ZeroConfig

WORLDS = (8, 64, 512)
PER_NODE = 8
SETTINGS: tuple[tuple[str, dict[str, Any], int | None], ...] = (
    ("ZeRO-3", {}, None),
    ("hybrid (node)", {}, PER_NODE),
    ("ZeRO-3 + CPU optimizer", {"offload_optimizer": {"device": "cpu"}}, None),
    ("hybrid + CPU optimizer", {"offload_optimizer": {"device": "cpu"}}, PER_NODE),
)
MICRO_BATCH, SEQ_LEN = 1, 4096

NOTES = """
Assumptions. bf16 mixed precision with accel_zero's default `zero_config` (the settings in
the table change only the sharding group and the optimizer's place): parameters gathered in
bf16, gradients reduced in fp32, fp32 master weights and AdamW, norm weights whole on every
GPU (`param_persistence_threshold` 100K), `max_live_parameters` and `max_reuse_distance` 1e9,
gradient clipping, one micro-batch per optimizer step. 8 GPUs per node, 80 GB each, 2 TB of
host memory per node; NVLink 900 GB/s per GPU (NVLink 4's two directions together, so the
in-node times are optimistic), one 400 Gb/s (50 GB/s) NIC per GPU. *Sent / GPU / step*: ring
algorithms, so each GPU sends, and receives, (n-1)/n of an all-gather's output or of a
reduce-scatter's input, and twice that for an all-reduce, over the n GPUs of the collective
(the counts and sizes of the collectives are accel_zero's own, tests/distributed/
test_comm_model.py). *Comm. time*: a lower bound from bandwidth alone, each collective at the
rate of the slowest link it crosses, one after another (in parentheses: with hybrid's
in-node and cross-node collectives overlapped), no latency, no compute: a step takes at least
the larger of this and its compute. *Host link*: with the optimizer in host memory, each GPU
sends its fp32 gradient shard down and gets its updated fp32 parameter shard back over a
50 GB/s PCIe link per GPU. *Model states / GPU*: `accel-zero estimate`'s bytes on the
GPU (16 bytes per parameter over the sharding group; with the optimizer offloaded, its state
and the gradient shard live in host memory). *Total / GPU* adds the working set, from the same
simulation of the prefetch coordinator: the gathered parameters at their peak (the root's
embedding and head, gathered for the whole pass, and the current blocks), the bf16 gradients
of the root and of one block waiting for their reduction and two fp32 reduce buffers of one
block; and the activations, with every block checkpointed at micro-batch 1 x 4096 tokens:
2·s·h bytes per block (its input), 34·s·h for the block being recomputed (FlashAttention) and
10·s·V for the logits, their fp32 copy and its gradient. The largest model is the largest of a
Llama family with hidden = 128 x layers (Llama-2 7B's ratio), 128-wide heads, 8 KV heads from
hidden 8192 on, FFN 8/3 x hidden rounded up to 256, vocabulary 32000, whose total fits in
80 GB per GPU and whose host memory fits in 2 TB per node.
"""


def llama(name: str, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> ModelLayout:
    """A Llama-2 shape built on the meta device from its ``LlamaConfig``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32_000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return layout_from_module(model, name=name)


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def seconds(row: ScaleRow) -> str:
    text = f"{row.comm_seconds:.2f}"
    if row.overlapped_seconds < row.comm_seconds * 0.995:
        text += f" ({row.overlapped_seconds:.2f})"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    models = [
        llama("Llama-2 7B", hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008),
        llama("Llama-2 70B", hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672),
    ]
    print(
        "| model | GPUs | setting | model states / GPU | host / node | total / GPU "
        "| sent / GPU / step | comm. time / step >= (s) | host link / step >= (s) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for layout in models:
        for world in WORLDS:
            cluster = Cluster(world_size=world, ranks_per_node=PER_NODE)
            for name, zero, group in SETTINGS:
                row = scale_row(
                    layout,
                    cluster,
                    ZeroConfig.from_dict(zero),
                    shard_group_size=group,
                    micro_batch=MICRO_BATCH,
                    seq_len=SEQ_LEN,
                )
                total = gb(row.device_bytes) + ("" if row.fits else " (does not fit)")
                host = gb(row.host_bytes_per_node) if row.host_bytes_per_node else "-"
                print(
                    f"| {layout.name} ({layout.numel / 1e9:.2f}B) | {world} | {name} "
                    f"| {gb(row.state.device_bytes)} | {host} | {total} "
                    f"| {gb(row.comm_bytes)} | {seconds(row)} "
                    f"| {f'{row.offload_seconds:.2f}' if row.host_link_bytes else '-'} |"
                )
    print()
    print("Largest Llama-architecture model that fits (parameters; layers x hidden):")
    print()
    print("| setting | " + " | ".join(f"{w} GPUs" for w in WORLDS) + " |")
    print("|---|" + "---:|" * len(WORLDS))
    for name, zero, group in SETTINGS:
        cells = []
        for world in WORLDS:
            best = largest_fitting(
                Cluster(world_size=world, ranks_per_node=PER_NODE),
                ZeroConfig.from_dict(zero),
                shard_group_size=group,
                micro_batch=MICRO_BATCH,
                seq_len=SEQ_LEN,
            )
            if best is None:
                cells.append("none")
                continue
            layers, hidden = len(best.layout.modules), best.layout.params[0].shape[1]
            cells.append(f"{best.numel / 1e9:,.0f}B ({layers} x {hidden})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print(NOTES.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
