"""Bytes on the wire, time lower bounds, memory per rank and node, and what fits
(see accel_zero/cluster/__init__.py for the formulas)."""

from __future__ import annotations

from dataclasses import dataclass

from accel_zero.cluster.layout import ModelLayout, llama_family
from accel_zero.cluster.steps import (
    KINDS,
    Group,
    build_units,
    dtype_sizes,
    group_size,
    simulate_steps,
)
from accel_zero.config import ZeroConfig
from accel_zero.estimator import StateEstimate, estimate

__all__ = [
    "Cluster",
    "KindCost",
    "ScaleRow",
    "activation_bytes",
    "largest_fitting",
    "ring_bytes",
    "scale_row",
]


_REDUCE_BUFFERS_IN_FLIGHT = 2
"""Reduce-scatter inputs alive at once (one reducing, one filling). The engine of this
writing keeps every bucket's input until the end of backward under ``overlap_comm`` (a full
fp32 gradient per rank); this models the fix, which waits for older buckets as new ones go."""


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """Machines and links. Bandwidths are per rank and per direction unless said otherwise."""

    world_size: int
    ranks_per_node: int = 8
    intra_node_gbs: float = 900.0
    """GB/s between two ranks of a node (NVLink 4: 900 GB/s counts both directions)."""
    inter_node_gbps: float = 400.0
    """Gb/s from a rank to other nodes (one 400 Gb/s NIC per GPU, rail-optimised)."""
    host_link_gbs: float = 50.0
    """GB/s between a rank's device and host memory (PCIe 5 x16: 64 GB/s peak)."""
    disk_gbs: float = 25.0
    """GB/s of a node's NVMe drives, shared by its ranks."""
    device_memory: int = 80 * 10**9
    """Bytes of memory per rank (an 80 GB GPU)."""
    host_memory: int = 2 * 10**12
    """Bytes of host memory per node."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.ranks_per_node < 1:
            raise ValueError(
                f"world_size={self.world_size} and ranks_per_node={self.ranks_per_node} "
                "must be >= 1"
            )
        for name in ("intra_node_gbs", "inter_node_gbps", "host_link_gbs", "disk_gbs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")

    def spans_nodes(self, group: Group, shard_group_size: int) -> bool:
        """Does a group of this kind hold ranks of more than one node (consecutive ranks per
        node, shard groups of consecutive ranks)?"""
        n, per = self.world_size, self.ranks_per_node
        if n <= per:
            return False  # one node
        if group == "world":
            return True
        if group == "shard":  # consecutive ranks: inside a node iff groups tile the nodes
            return shard_group_size > per or per % shard_group_size != 0
        # Replica group (ranks r, r + G, r + 2G, ...): more than one node once n > per.
        return n // shard_group_size > 1

    def link_gbs(self, crosses_nodes: bool) -> float:
        return self.inter_node_gbps / 8 if crosses_nodes else self.intra_node_gbs


def ring_bytes(op: str, input_bytes: int, ranks: int) -> float:
    """Bytes one rank sends (and receives) in a ring collective over ``ranks`` ranks."""
    if ranks <= 1:
        return 0.0
    frac = (ranks - 1) / ranks
    if op in ("all_gather", "check"):
        return frac * input_bytes * ranks
    if op == "reduce_scatter":
        return frac * input_bytes
    if op == "all_reduce":
        return 2 * frac * input_bytes
    raise ValueError(f"unknown collective {op!r}")


@dataclass(frozen=True, kw_only=True)
class KindCost:
    kind: str
    calls: int
    input_bytes: int
    sent_bytes: float
    """Per rank, each direction (ring)."""
    ranks: int
    crosses_nodes: bool
    seconds: float
    """Lower bound: sent bytes over the slowest link crossed."""


@dataclass(frozen=True, kw_only=True)
class ScaleRow:
    """Everything ``accel-zero estimate --cluster`` reports for one setting."""

    layout: ModelLayout
    cluster: Cluster
    stage: int
    shard_group_size: int
    offload_optimizer: str
    offload_param: str
    state: StateEstimate
    """Model-state bytes of one rank (rank 0, which holds full chunks)."""
    working_set_bytes: int
    """Gathered parameters at their peak (stage 3) plus full gradients waiting to be reduced
    and reduce buffers (stages 2 and 3); see :func:`scale_row`."""
    activation_bytes: int
    kinds: tuple[KindCost, ...]
    host_link_bytes: int
    """Per rank per step, both directions summed (optimizer offload)."""
    disk_bytes: int
    """Per rank per step, read + write (NVMe offload)."""

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def comm_bytes(self) -> float:
        return sum(k.sent_bytes for k in self.kinds)

    @property
    def comm_seconds(self) -> float:
        return sum(k.seconds for k in self.kinds)

    @property
    def overlapped_seconds(self) -> float:
        by_link: dict[bool, float] = {}
        for k in self.kinds:
            by_link[k.crosses_nodes] = by_link.get(k.crosses_nodes, 0.0) + k.seconds
        return max(by_link.values(), default=0.0)

    @property
    def offload_seconds(self) -> float:
        c = self.cluster
        per_rank_disk = c.disk_gbs / min(c.ranks_per_node, c.world_size)
        return self.host_link_bytes / (c.host_link_gbs * 1e9) + self.disk_bytes / (
            per_rank_disk * 1e9
        )

    @property
    def device_bytes(self) -> int:
        return self.state.device_bytes + self.working_set_bytes + self.activation_bytes

    @property
    def host_bytes_per_node(self) -> int:
        return self.state.cpu_bytes * min(self.cluster.ranks_per_node, self.cluster.world_size)

    @property
    def fits(self) -> bool:
        return (
            self.device_bytes <= self.cluster.device_memory
            and self.host_bytes_per_node <= self.cluster.host_memory
        )


def activation_bytes(layout: ModelLayout, *, micro_batch: int, seq_len: int) -> int:
    """Activation memory assumed per rank: every unit checkpointed (its bf16 input kept,
    ``b s h`` x 2 bytes per unit), one unit recomputed at a time (``34 b s h`` bytes,
    Korthikanti et al. 2022, with FlashAttention: no ``s^2`` term), and the logits in bf16,
    their fp32 copy for the loss and its gradient (``10 b s V`` bytes). ``h`` and ``V`` are
    read off the embedding (the root's first 2-D parameter: ``(V, h)``)."""
    embed = next((p for p in layout.params if p.owner == "" and len(p.shape) == 2), None)
    if embed is None:
        return 0
    vocab, hidden = embed.shape
    tokens = micro_batch * seq_len
    units = len(layout.modules)
    return tokens * hidden * (2 * units + 34) + 10 * tokens * vocab


def scale_row(
    layout: ModelLayout,
    cluster: Cluster,
    zero: ZeroConfig,
    *,
    shard_group_size: int | None = None,
    mixed_precision: str = "bf16",
    micro_batch: int = 1,
    seq_len: int = 4096,
    clip: bool = True,
) -> ScaleRow:
    """Memory, steady-state communication and its time lower bound for one setting.
    ``shard_group_size`` None takes ``zero.shard_group_size`` where the config has it."""
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch={micro_batch} and seq_len={seq_len} must be >= 1")
    n = cluster.world_size
    if shard_group_size is None:
        shard_group_size = getattr(zero, "shard_group_size", None)
    group = group_size(n, shard_group_size)
    step = simulate_steps(
        layout,
        zero,
        world_size=n,
        shard_group_size=group,
        mixed_precision=mixed_precision,
        clip=clip,
    )[-1]
    compute, reduce_size = dtype_sizes(zero, mixed_precision)
    shapes = layout.shapes()
    mixed = zero.mixed_precision or mixed_precision
    off_opt, off_param = zero.offload_optimizer.device, zero.offload_param.device
    (state,) = [
        r
        for r in estimate(
            shapes,
            world_size=group,
            mixed_precision=mixed,
            param_persistence_threshold=zero.param_persistence_threshold,
        )
        if (r.stage, r.offload_optimizer, r.offload_param) == (zero.stage, off_opt, off_param)
    ]
    units = build_units(layout, zero, group=group, compute_itemsize=compute)
    kinds = []
    for kind in KINDS:
        mine = [c for c in step.collectives if c.kind == kind]
        if not mine:
            continue
        ranks = mine[0].ranks
        crosses = cluster.spans_nodes(mine[0].group, group)
        sent = sum(ring_bytes(c.op, c.input_bytes, c.ranks) for c in mine)
        kinds.append(
            KindCost(
                kind=kind,
                calls=len(mine),
                input_bytes=sum(c.input_bytes for c in mine),
                sent_bytes=sent,
                ranks=ranks,
                crosses_nodes=crosses,
                seconds=sent / (cluster.link_gbs(crosses) * 1e9),
            )
        )
    # Working set beyond model states (stage 2/3): full gradients in the compute dtype of
    # the root (its head's gradient waits for the embedding's, at the end of backward) and of
    # the largest unit module, and two reduce buffers of the latter (one reducing, one
    # filling); plus the gathered parameters at their peak.
    grad_ws = 0
    if zero.stage >= 2:
        modules = [u for u in units if u.module]
        root = sum(u.full_numel for u in units if u.module == "")
        biggest = max(modules, key=lambda u: u.full_numel, default=None)
        grad_ws = root * (compute or 4)
        if biggest is not None:
            grad_ws += biggest.full_numel * (compute or 4)
            grad_ws += _REDUCE_BUFFERS_IN_FLIGHT * group * biggest.numel * reduce_size
    host = disk = 0
    if off_opt != "none":
        # This rank's fp32 gradient rows down after backward, its updated fp32 parameter
        # rows up after the step (the step runs where the optimizer state is).
        host = 2 * 4 * sum(p.shard_numel(group) for p in layout.params)
    if off_opt == "nvme":
        disk = 2 * state.nvme_bytes
    return ScaleRow(
        layout=layout,
        cluster=cluster,
        stage=zero.stage,
        shard_group_size=group,
        offload_optimizer=off_opt,
        offload_param=off_param,
        state=state,
        working_set_bytes=step.peak_gathered_bytes + grad_ws,
        activation_bytes=activation_bytes(layout, micro_batch=micro_batch, seq_len=seq_len),
        kinds=tuple(kinds),
        host_link_bytes=host,
        disk_bytes=disk,
    )


def largest_fitting(
    cluster: Cluster,
    zero: ZeroConfig,
    *,
    shard_group_size: int | None = None,
    mixed_precision: str = "bf16",
    micro_batch: int = 1,
    seq_len: int = 4096,
    max_layers: int = 1024,
) -> ScaleRow | None:
    """The largest member of :func:`llama_family` that fits (device and host memory), found
    by bisection on the layer count (memory grows with it); None if not even one layer fits."""

    def row(layers: int) -> ScaleRow:
        return scale_row(
            llama_family(layers),
            cluster,
            zero,
            shard_group_size=shard_group_size,
            mixed_precision=mixed_precision,
            micro_batch=micro_batch,
            seq_len=seq_len,
        )

    lo, hi = 0, max_layers + 1  # fits(lo) (or lo = 0), not fits(hi)
    best: ScaleRow | None = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = row(mid)
        if r.fits:
            lo, best = mid, r
        else:
            hi = mid
    return best
