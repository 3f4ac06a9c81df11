"""A model of memory and communication per optimizer step on a cluster (``accel-zero estimate
--cluster``), exact where it can be checked: on CPU ranks its collective counts and bytes
equal what ``Comm`` counts after a real step (tests/distributed/test_comm_model.py).

What it models, for one micro-batch per optimizer step (no gradient accumulation):

* **Units** exactly as the engine builds them (``Engine._owners`` / ``_build``): one unit per
  top-level ``units`` module (default ``_no_split_modules``), the root's parameters (and
  any shared between units) in a root unit, ZeRO-3 parameters under
  ``param_persistence_threshold`` in one persistent unit, each split by dtype; a
  parameter is cut into ``ceil(rows / G)``-row chunks over its shard group of ``G`` ranks.
* **Which gathers happen** by driving the real :class:`~accel_zero.coordinator.Coordinator`
  with the event order of a forward and backward, through a replica of the hooks' state
  machine (accel_zero/hooks.py): prefetch within ``prefetch_bucket_size`` and
  ``max_live_parameters``, keep-gathered within ``max_reuse_distance``, the root units
  gathered once per pass, the next pass's first units prefetched after the optimizer step.
  Backward visits unit modules in the reverse of their forward calls, and a unit's
  gradients are complete right after the backward of its first forward call (autograd
  runs ``AccumulateGrad`` first), before the next unit's pre-backward hook.
* **Collectives** (``Comm``'s accounting: ``input_bytes`` is the input tensor on one rank):
  ZeRO-3 all-gathers a unit's flat shard in the compute dtype (bf16/fp16 under mixed
  precision unless ``param_dtype: fp32``); ZeRO-2/3 reduce-scatter gradients in
  ``reduce_dtype`` in buckets of ``reduce_bucket_size`` elements (filled in completion
  order, the rest flushed at the end of backward); ZeRO-1 and ZeRO-3's persistent parameters
  all-reduce whole gradients; ZeRO-1/2 (and ZeRO-3's persistent unit) re-gather updated
  fp32 rows after the step; clipping sums sharded gradients' norms with one all-reduce of
  4 bytes per sharded parameter; fp16 agrees on overflow with one 4-byte all-reduce;
  ZeRO-3 checks the execution order with one 8-byte all-gather per pass.
* **Hybrid sharding** (``shard_group_size`` = G < N, groups of consecutive ranks): gathers,
  reduce-scatters, the post-step re-gather and the norm stay in the group; each
  reduce-scatter's output (the gradient shard) is then all-reduced across the N/G groups
  (ranks with the same position in their group); whole gradients are all-reduced over
  all N ranks.

Bytes on the wire and a lower bound on time. A ring collective over ``n`` ranks of a
tensor of ``B`` bytes (all-gather: ``B`` = output = ``n`` x input; reduce-scatter: ``B`` =
input) makes every rank send, and receive, ``(n - 1) / n * B`` bytes; an all-reduce of ``B``
bytes (reduce-scatter + all-gather) ``2 (n - 1) / n * B``. A collective whose ranks all
sit on one node crosses NVLink only, else also the inter-node network; its time is at
least its per-rank bytes over the slowest link it crosses. Summed over the step's
collectives (those of one process group run one after another) that is the
``comm_seconds`` lower bound; ``overlapped_seconds`` is the weaker bound that lets
in-node and cross-node collectives of a hybrid setup run at the same time (the busiest
link class). Both ignore latency and compute: a step takes at least max(compute,
communication). Offload adds host-link traffic (gradient shard down, updated parameter
shard up, per rank) and, for NVMe, reading and writing the optimizer state once per step,
each rank's share of the node's disk bandwidth.

Memory: model states are the estimator's (``accel_zero.estimator.estimate`` over the shard
group); the working set adds the gathered parameters at their simulated peak, the full
gradients waiting for their reduction (the root's, whose head gradient waits for the
embedding's, and one unit's) and two reduce buffers of one unit. Activations are not
modelled from the code: the fit check assumes activation checkpointing of every unit (see
:func:`activation_bytes`).

Files: ``layout.py`` (a model's parameters and unit order; Llama shapes), ``steps.py``
(the engine's units and the step simulation), ``costs.py`` (bytes on the wire, time,
memory, what fits), ``report.py`` (the ``--cluster`` options and report).
"""

from accel_zero.cluster.costs import (
    Cluster,
    KindCost,
    ScaleRow,
    activation_bytes,
    largest_fitting,
    ring_bytes,
    scale_row,
)
from accel_zero.cluster.layout import (
    ModelLayout,
    ParamInfo,
    layout_from_module,
    llama_family,
    llama_layout,
)
from accel_zero.cluster.report import add_cluster_arguments, cluster_main, cluster_report
from accel_zero.cluster.steps import KINDS, Collective, CommStep, simulate_steps

__all__ = [
    "KINDS",
    "Cluster",
    "Collective",
    "CommStep",
    "KindCost",
    "ModelLayout",
    "ParamInfo",
    "ScaleRow",
    "activation_bytes",
    "add_cluster_arguments",
    "cluster_main",
    "cluster_report",
    "largest_fitting",
    "layout_from_module",
    "llama_family",
    "llama_layout",
    "ring_bytes",
    "scale_row",
    "simulate_steps",
]
