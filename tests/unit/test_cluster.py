"""The cluster model (accel_zero/cluster) against hand-computed figures.

Its collectives are checked against real steps in tests/distributed/test_comm_model.py;
here: the layout of a meta-built Llama, the ring and link formulas, the coordinator-driven
gather counts, hybrid placement and memory, offload traffic, the fit search and the CLI.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from accel_zero import cli
from accel_zero.cluster import (
    Cluster,
    activation_bytes,
    largest_fitting,
    layout_from_module,
    llama_family,
    llama_layout,
    ring_bytes,
    scale_row,
    simulate_steps,
)
from accel_zero.cluster.layout import family_numel
from accel_zero.config import ZeroConfig
from accel_zero.estimator import estimate
from tests.distributed.models import build_model

SEVEN_B: dict[str, Any] = {
    "hidden": 4096,
    "layers": 32,
    "heads": 32,
    "kv_heads": 32,
    "intermediate": 11008,
}
SEVEN_B_NUMEL = 6_738_415_616  # Llama-2 7B
PERSISTENT = 65 * 4096  # 2 norms per layer + the final norm: under the 100K threshold


def _meta_llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> Any:
    config = LlamaConfig(
        vocab_size=32_000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "shape",
    [
        dict(SEVEN_B, layers=3),
        {"hidden": 8192, "layers": 2, "heads": 64, "kv_heads": 8, "intermediate": 28672},
    ],
    ids=["7B-shaped", "70B-shaped"],
)
def test_llama_layout_is_the_meta_built_model(shape: dict[str, Any]) -> None:
    built = layout_from_module(_meta_llama(**shape))
    drawn = llama_layout(**shape)
    assert built.params == drawn.params
    blocks = tuple(f"model.layers.{i}" for i in range(shape["layers"]))
    assert built.modules == drawn.modules == blocks


def test_family_member_32_is_llama2_7b() -> None:
    assert llama_family(32).params == llama_layout(**SEVEN_B).params
    assert llama_family(32).numel == family_numel(32) == SEVEN_B_NUMEL
    for layers in (1, 63, 64, 100):  # both sides of the switch to 8 KV heads
        assert llama_family(layers).numel == family_numel(layers)


def test_ring_bytes() -> None:
    # All-gather: input 10 per rank, output 40; each rank sends 3 of the 4 shards.
    assert ring_bytes("all_gather", 10, 4) == 30
    assert ring_bytes("reduce_scatter", 40, 4) == 30
    assert ring_bytes("all_reduce", 40, 4) == 60
    assert ring_bytes("all_reduce", 40, 1) == 0


def test_which_groups_leave_the_node() -> None:
    c = Cluster(world_size=64, ranks_per_node=8)
    assert c.spans_nodes("world", 64)
    assert not c.spans_nodes("shard", 8) and not c.spans_nodes("shard", 4)
    assert c.spans_nodes("shard", 16) and c.spans_nodes("shard", 64)
    assert c.spans_nodes("replica", 8) and c.spans_nodes("replica", 2)
    one_node = Cluster(world_size=8, ranks_per_node=8)
    assert not one_node.spans_nodes("world", 8) and not one_node.spans_nodes("replica", 2)
    assert c.link_gbs(True) == 50.0 and c.link_gbs(False) == 900.0


def _gathers(zero: dict[str, Any]) -> list[dict[str, int]]:
    layout = layout_from_module(build_model("gpt2", seed=0))
    config = ZeroConfig.from_dict({"param_persistence_threshold": 0, **zero})
    steps = simulate_steps(layout, config, world_size=2, steps=2)
    kinds = ("gather_forward", "gather_backward")
    return [{k: sum(1 for c in s.collectives if c.kind == k) for k in kinds} for s in steps]


def test_gathers_follow_the_coordinator() -> None:
    # tiny GPT-2: root (embeddings, final norm, tied head) + 2 blocks. Step 1 records the order:
    # everything on demand, every block gathered again in backward; after its optimizer step
    # only the root and the first block are gathered for the next forward (counted in the step
    # that issues them; Coordinator.plan_pass_start), whose pre-forward prefetches the rest.
    first, steady = _gathers({"stage": 3})
    assert first == {"gather_forward": 3 + 2, "gather_backward": 2}
    # Then the default reuse distance keeps each block from forward to backward.
    assert steady == {"gather_forward": 3, "gather_backward": 0}
    # Reuse distance 0 keeps only the last block, whose next use is the next event (the
    # engine's own count: tests/distributed/test_engine.py).
    _, steady = _gathers({"stage": 3, "max_reuse_distance": 0, "prefetch_bucket_size": 0})
    assert steady == {"gather_forward": 3, "gather_backward": 1}
    # A live window smaller than the root and one block: nothing is kept.
    _, steady = _gathers({"stage": 3, "max_live_parameters": 100})
    assert steady == {"gather_forward": 3, "gather_backward": 2}


def test_seven_b_on_eight_gpus_by_hand() -> None:
    row = scale_row(llama_layout(**SEVEN_B), Cluster(world_size=8), ZeroConfig())
    kinds = {k.kind: k for k in row.kinds}
    sharded = SEVEN_B_NUMEL - PERSISTENT  # every dim divides by 8: no padding
    # Every sharded parameter is gathered in bf16 once for forward (input = 1/8 per rank).
    assert kinds["gather_forward"].input_bytes == 2 * sharded // 8
    assert kinds["gather_forward"].sent_bytes == 2 * sharded * 7 / 8
    # Gradients reduce-scattered in fp32 (input = the full gradient), whole norms all-reduced.
    assert kinds["reduce_scatter"].input_bytes == 4 * sharded
    assert kinds["reduce_scatter"].sent_bytes == 4 * sharded * 7 / 8
    assert kinds["all_reduce_whole"].input_bytes == 4 * PERSISTENT
    # Norms' fp32 rows re-gathered after the step; one norm value per sharded tensor (7 per
    # layer, embedding, head) for clipping; the order check.
    assert kinds["regather_after_step"].input_bytes == 4 * PERSISTENT // 8
    assert kinds["grad_norm"].input_bytes == 4 * (7 * 32 + 2)
    assert kinds["order_check"].input_bytes == 8
    assert not any(k.crosses_nodes for k in row.kinds)  # one node: all on NVLink
    assert row.comm_seconds == pytest.approx(row.comm_bytes / 900e9)
    # Model states: the estimator's own (16 bytes per sharded parameter / 8, norms whole).
    (state,) = [
        r
        for r in estimate(row.layout.shapes(), world_size=8, mixed_precision="bf16")
        if (r.stage, r.offload_optimizer, r.offload_param) == (3, "none", "none")
    ]
    assert row.state == state
    assert activation_bytes(row.layout, micro_batch=1, seq_len=4096) == (
        4096 * 4096 * (2 * 32 + 34) + 10 * 4096 * 32_000
    )


def test_hybrid_shards_in_the_node_and_all_reduces_across() -> None:
    layout = llama_layout(**SEVEN_B)
    plain = scale_row(layout, Cluster(world_size=64), ZeroConfig())
    hybrid = scale_row(layout, Cluster(world_size=64), ZeroConfig(), shard_group_size=8)
    on_one_node = scale_row(layout, Cluster(world_size=8), ZeroConfig())
    assert hybrid.state == on_one_node.state  # memory as for 8 GPUs
    assert plain.state.device_bytes < hybrid.state.device_bytes / 7
    kinds = {k.kind: k for k in hybrid.kinds}
    for kind in ("gather_forward", "reduce_scatter", "regather_after_step", "grad_norm"):
        assert (kinds[kind].ranks, kinds[kind].crosses_nodes) == (8, False)
    # The reduce-scatter's output (this rank's fp32 gradient shard) all-reduced by 8 replicas.
    across = kinds["all_reduce_replicas"]
    assert (across.ranks, across.crosses_nodes) == (8, True)
    assert across.calls == kinds["reduce_scatter"].calls
    assert across.input_bytes == kinds["reduce_scatter"].input_bytes // 8
    assert kinds["all_reduce_whole"].ranks == 64
    assert hybrid.comm_seconds < plain.comm_seconds / 5
    assert hybrid.overlapped_seconds < hybrid.comm_seconds


def test_offload_moves_state_to_the_host_and_counts_its_traffic() -> None:
    layout = llama_layout(**SEVEN_B)
    cpu = ZeroConfig.from_dict({"offload_optimizer": {"device": "cpu"}})
    row = scale_row(layout, Cluster(world_size=8), cpu)
    shard = sum(p.shard_numel(8) for p in layout.params)
    assert row.host_link_bytes == 8 * shard and row.disk_bytes == 0
    assert row.host_bytes_per_node == 8 * row.state.cpu_bytes
    nvme = ZeroConfig.from_dict({"offload_optimizer": {"device": "nvme", "nvme_path": "/x"}})
    row = scale_row(layout, Cluster(world_size=8), nvme)
    assert row.disk_bytes == 2 * row.state.nvme_bytes > 0
    # 8 ranks share the node's 25 GB/s.
    assert row.offload_seconds == pytest.approx(8 * shard / 50e9 + row.disk_bytes / (25e9 / 8))


def test_largest_fitting_is_the_edge_of_fitting() -> None:
    cluster, zero = Cluster(world_size=8), ZeroConfig()
    best = largest_fitting(cluster, zero)
    assert best is not None and best.fits
    layers = len(best.layout.modules)
    assert not scale_row(llama_family(layers + 1), cluster, zero).fits
    assert best.device_bytes <= 80e9
    tiny = Cluster(world_size=1, device_memory=10**6)
    assert largest_fitting(tiny, zero) is None


def test_bad_settings_are_named() -> None:
    layout = llama_family(2)
    with pytest.raises(ValueError, match="shard_group_size=3 must divide world_size=8"):
        scale_row(layout, Cluster(world_size=8), ZeroConfig(), shard_group_size=3)
    with pytest.raises(ValueError, match="inter_node_gbps=0"):
        Cluster(world_size=8, inter_node_gbps=0)


def test_cli_cluster_view(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["estimate", "--params", "7e9", "--cluster", "--world-size", "64",
                     "--shard-group-size", "node"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "--params 7e9 as Llama 32 x 4096 (6.7B), 6,738,415,616 parameters" in out
    assert "hybrid: sharded within groups of 8, 8 replicas" in out
    assert "all-reduce grad shards across groups" in out
    assert "Lower bound on communication time per step" in out
    with pytest.raises(SystemExit, match="must divide"):
        cli.main(["estimate", "--params", "1e9", "--cluster", "--world-size", "8",
                  "--shard-group-size", "3"])  # fmt: skip


def test_cli_cluster_view_of_a_config(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(tmp_path)
    assert cli.main(["estimate", str(tmp_path), "--cluster", "--world-size", "16",
                     "--offload-optimizer", "nvme"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    numel = 2 * 1000 * 256 + 256 + 2 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 256 * 512 + 2 * 256)
    assert f"LlamaForCausalLM from {tmp_path}, {numel:,} parameters" in out
    assert "Offload traffic per rank per step" in out
