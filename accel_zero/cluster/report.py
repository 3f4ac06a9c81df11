"""``accel-zero estimate --cluster``: its options and the report it prints."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

from accel_zero.cluster.costs import Cluster, ScaleRow, scale_row
from accel_zero.cluster.layout import ModelLayout, family_numel, layout_from_module, llama_family
from accel_zero.config import ZeroConfig, parse_count

__all__ = ["add_cluster_arguments", "cluster_main", "cluster_report"]

_KIND_TEXT = {
    "gather_forward": "all-gather params (forward)",
    "gather_backward": "all-gather params (backward)",
    "reduce_scatter": "reduce-scatter grads",
    "all_reduce_replicas": "all-reduce grad shards across groups",
    "all_reduce_whole": "all-reduce whole grads",
    "regather_after_step": "all-gather updated params (after step)",
    "grad_norm": "all-reduce grad norms (clip)",
    "overflow_check": "all-reduce fp16 overflow flag",
    "order_check": "execution-order check",
}


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _bytes(n: float) -> str:
    """Decimal units, as link bandwidths are quoted."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def cluster_report(row: ScaleRow) -> str:
    """The text ``accel-zero estimate --cluster`` prints."""
    c = row.cluster
    per_node = min(c.ranks_per_node, c.world_size)
    nodes = math.ceil(c.world_size / c.ranks_per_node)
    g = row.shard_group_size
    sharding = (
        f"sharded over all {c.world_size} ranks"
        if g == c.world_size
        else f"hybrid: sharded within groups of {g}, {c.world_size // g} replicas"
    )
    s = row.state
    lines = [
        f"Cluster view: {row.layout.name}, {row.numel:,} parameters; {c.world_size} ranks "
        f"({nodes} node(s) x {per_node}), ZeRO-{row.stage} {sharding}; offload optimizer "
        f"{row.offload_optimizer}, params {row.offload_param}",
        f"Model states per rank: params {_gb(s.param_bytes)}, grads {_gb(s.grad_bytes)}, "
        f"optimizer {_gb(s.optimizer_bytes)}; on the device {_gb(s.device_bytes)}, host "
        f"{_gb(s.cpu_bytes)}, NVMe {_gb(s.nvme_bytes)}",
        f"Model states per node: device {_gb(s.device_bytes * per_node)}, host "
        f"{_gb(s.cpu_bytes * per_node)}, NVMe {_gb(s.nvme_bytes * per_node)}",
        f"Beyond model states per rank: working set {_gb(row.working_set_bytes)} (gathered "
        f"params at peak, one unit's gradient and reduce buffers), activations "
        f"{_gb(row.activation_bytes)} (assumed: every unit checkpointed); total "
        f"{_gb(row.device_bytes)} of {_gb(c.device_memory)}: "
        + ("fits" if row.fits else "does NOT fit"),
        "",
        "Per optimizer step, per rank (steady state; sent = received, ring algorithm):",
        f"  {'collective':<40} {'calls':>6} {'ranks':>6} {'input':>12} {'sent':>12} "
        f"{'link':>8} {'time >=':>10}",
    ]
    for k in row.kinds:
        link = "network" if k.crosses_nodes else "NVLink"
        lines.append(
            f"  {_KIND_TEXT[k.kind]:<40} {k.calls:>6} {k.ranks:>6} "
            f"{_bytes(k.input_bytes):>12} {_bytes(k.sent_bytes):>12} {link:>8} "
            f"{k.seconds * 1e3:>8.1f} ms"
        )
    lines += [
        f"  {'total':<40} {sum(k.calls for k in row.kinds):>6} {'':>6} {'':>12} "
        f"{_bytes(row.comm_bytes):>12} {'':>8} {row.comm_seconds * 1e3:>8.1f} ms",
        "",
        f"Lower bound on communication time per step: {row.comm_seconds:.3f} s with "
        f"collectives one after another ({row.overlapped_seconds:.3f} s if in-node and "
        f"cross-node collectives overlap perfectly); links: NVLink {c.intra_node_gbs:g} GB/s, "
        f"network {c.inter_node_gbps:g} Gb/s per rank.",
    ]
    if row.host_link_bytes or row.disk_bytes:
        lines.append(
            f"Offload traffic per rank per step: host link {_gb(row.host_link_bytes)} at "
            f"{c.host_link_gbs:g} GB/s, NVMe {_gb(row.disk_bytes)} at {c.disk_gbs:g} GB/s "
            f"per node: >= {row.offload_seconds:.3f} s."
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- CLI
def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``accel-zero estimate --cluster`` options (the model, --params, --world-size and
    --mixed-precision are the estimator's own)."""
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="Cluster view: memory per rank and node, communication per step and its time.",
    )
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), help="ZeRO stage (default 3).")
    parser.add_argument(
        "--zero-config",
        "--zero_config",
        help="A launch YAML / zero_config block / DeepSpeed JSON for the other zero_config keys.",
    )
    parser.add_argument("--ranks-per-node", "--ranks_per_node", type=int, default=8)
    parser.add_argument(
        "--shard-group-size",
        "--shard_group_size",
        help="Hybrid sharding: shard within groups of this many ranks ('node' = ranks per "
        "node); default: all ranks.",
    )
    for name in ("optimizer", "param"):
        parser.add_argument(
            f"--offload-{name}",
            f"--offload_{name}",
            choices=("none", "cpu", "nvme") if name == "optimizer" else ("none", "cpu"),
            help=f"zero_config.offload_{name}.device (default: the config's, else none).",
        )
    for flag, kind, default, text in (
        ("micro-batch", int, 1, "Sequences per rank per step, for the activation assumption."),
        ("seq-len", int, 4096, "Tokens per sequence, for the activation assumption."),
        ("intra-node-gbs", float, 900.0, "GB/s between ranks of a node (NVLink)."),
        ("inter-node-gbps", float, 400.0, "Gb/s from each rank to other nodes (its NIC)."),
        ("host-link-gbs", float, 50.0, "GB/s between a rank's device and host (offload)."),
        ("disk-gbs", float, 25.0, "GB/s of a node's NVMe drives, shared (NVMe offload)."),
        ("device-memory-gb", float, 80.0, "GB of memory per rank."),
        ("host-memory-gb", float, 2000.0, "GB of host memory per node."),
    ):
        parser.add_argument(
            f"--{flag}",
            f"--{flag.replace('-', '_')}",
            type=kind,
            default=default,
            help=f"{text} (default {default:g})",
        )
    parser.add_argument(
        "--no-clip", "--no_clip", action="store_true", help="The loop does not clip gradients."
    )


def _zero_from_args(args: argparse.Namespace) -> ZeroConfig:
    base = ZeroConfig.from_yaml(args.zero_config) if args.zero_config else ZeroConfig()
    block = base.to_dict()
    if args.stage is not None:
        block["stage"] = args.stage
    for name in ("optimizer", "param"):
        device = getattr(args, f"offload_{name}")
        if device is not None:
            block[f"offload_{name}"] = {**block[f"offload_{name}"], "device": device}
            if device == "nvme" and not block[f"offload_{name}"].get("nvme_path"):
                block[f"offload_{name}"]["nvme_path"] = "/nvme"  # where does not matter here
    threshold = parse_count(args.param_persistence_threshold, "--param-persistence-threshold")
    if args.zero_config is None or threshold != ZeroConfig().param_persistence_threshold:
        block["param_persistence_threshold"] = threshold  # given on the command line
    return ZeroConfig.from_dict(block)


def _layout_from_args(args: argparse.Namespace) -> ModelLayout:
    if args.params is not None:
        target = parse_count(args.params, "--params", minimum=1)
        # The family member closest in size: a count alone says nothing about units.
        best = min(range(1, 1025), key=lambda n: abs(family_numel(n) - target))
        layout = llama_family(best)
        return replace(layout, name=f"--params {args.params} as {layout.name}")
    from accel_zero.estimator import meta_model_from_hf_config

    path = Path(args.model)
    if not path.exists():
        raise ValueError(f"{path} does not exist (give a config.json or its folder)")
    model = meta_model_from_hf_config(path)
    return layout_from_module(model, name=f"{type(model).__name__} from {path}")


def cluster_main(args: argparse.Namespace) -> int:
    """``accel-zero estimate --cluster``: print the cluster view; returns 0."""
    try:
        zero = _zero_from_args(args)
        layout = _layout_from_args(args)
        group: int | None = None
        if args.shard_group_size == "node":
            group = args.ranks_per_node
        elif args.shard_group_size is not None:
            group = int(parse_count(args.shard_group_size, "--shard-group-size", minimum=1))
        cluster = Cluster(
            world_size=args.world_size,
            ranks_per_node=args.ranks_per_node,
            intra_node_gbs=args.intra_node_gbs,
            inter_node_gbps=args.inter_node_gbps,
            host_link_gbs=args.host_link_gbs,
            disk_gbs=args.disk_gbs,
            device_memory=int(args.device_memory_gb * 1e9),
            host_memory=int(args.host_memory_gb * 1e9),
        )
        row = scale_row(
            layout,
            cluster,
            zero,
            shard_group_size=group,
            mixed_precision=args.mixed_precision,
            micro_batch=args.micro_batch,
            seq_len=args.seq_len,
            clip=not args.no_clip,
        )
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"accel-zero estimate --cluster: {exc}") from exc
    print(cluster_report(row))
    return 0
