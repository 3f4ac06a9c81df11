"""Per-rank model-state memory for ZeRO stages 1/2/3 and each offload setting.

The accounting is accel_zero's own layout, so ``accel-zero estimate`` agrees
byte for byte with ``accelerator.memory_report()`` after a step
(tests/distributed/test_engine.py checks it for every stage, fp32 and bf16).
For a model of Ψ fp32 parameters on N ranks, with ``S`` = the sum of the
per-rank shards (each parameter split along dim 0 into ceil(dim0 / N)-row
chunks, padding counted; the figures are rank 0's, which always holds full
chunks; 0-d parameters belong to rank 0):

* parameters: stage 3 keeps one fp32 shard, 4·S, which *is* the master the
  optimizer steps (the compute dtype, bf16/fp16, exists only in gathers: see
  [Note: masters and precision] in partition.py), plus the whole fp32
  parameters under ``param_persistence_threshold``; stages 1/2 keep whole fp32
  parameters, 4·Ψ, whose rows are the masters;
* gradients: an fp32 shard, 4·S, in stages 2 and 3 (the reduced, averaged
  gradient the optimizer steps on; full-size gradients live only until their
  unit is reduced); stage 1 keeps DDP's whole averaged gradients, 4·Ψ, and so
  does stage 3 for its persistent parameters;
* optimizer state (Adam): m and v over this rank's rows, 8·S, plus 4 bytes per
  parameter tensor for Adam's step count.

So stage 3 holds 16 bytes per parameter / N with Adam under any mixed
precision, as FSDP2 does; DDP holds 16 per parameter. The ZeRO paper
(Rajbhandari et al. 2020, section 3.1) counts a 2-byte parameter copy and a
12-byte optimizer state instead, which is the same total in stage 3.

Offload (ZeRO-Offload / ZeRO-Infinity): ``offload_optimizer=cpu`` moves the optimizer
state to host memory, and in stages 2/3 also the gradient shard (the update runs on
the CPU); ``nvme`` puts the optimizer state on disk and keeps the gradient shard in host
memory. ``offload_param=cpu`` (stage 3) keeps the parameter shards in host memory.
Activations, communication buffers and the gathered working set are not model states:
the largest unit, gathered, is reported separately as the minimum stage-3 working set.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accel_zero.config import parse_count

_COMPUTE_BYTES = {"no": 4, "fp32": 4, "bf16": 2, "fp16": 2}
_PARAM = 4  # parameters (and their masters) are fp32 whatever the compute dtype
_ADAM = 8  # m + v; the fp32 parameter rows are the masters
_ADAM_STEP = 4  # torch.optim.Adam(W)'s per-tensor fp32 step count
_GRAD = 4  # gradients are reduced into fp32
KIND_NAMES = ("params", "grads", "optimizer_state")
PLACES = ("device", "cpu", "nvme")


@dataclass(frozen=True, kw_only=True)
class ModelShapes:
    """What the estimate needs to know about a model: parameter shapes and its largest unit."""

    shapes: tuple[tuple[int, ...], ...]
    """Shape of every distinct parameter (tied parameters counted once)."""
    largest_unit_numel: int = 0
    """Elements of the largest unit (a ``_no_split_modules`` block); 0 if unknown."""
    name: str = "model"
    """How the model was given, for the report."""

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


@dataclass(frozen=True, kw_only=True)
class StateEstimate:
    """Model-state bytes one rank holds for one stage/offload setting."""

    stage: int
    """ZeRO stage (1, 2, 3)."""
    offload_optimizer: str
    """none, cpu or nvme."""
    offload_param: str
    """none or cpu (stage 3 only)."""
    param_bytes: int
    """Parameter shards, plus the whole parameters (stages 1/2) or persistent ones (stage 3)."""
    grad_bytes: int
    """Gradient shards, accumulated in fp32 (every stage)."""
    optimizer_bytes: int
    """fp32 master copy and Adam moments (always a shard), and Adam's step counts."""
    device_bytes: int
    """Bytes on the compute device."""
    cpu_bytes: int
    """Bytes in host memory."""
    nvme_bytes: int
    """Bytes on NVMe."""
    by_place: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """Bytes per (kind, place): kind is params / grads / optimizer_state (the tracer's
    names), place device / cpu / nvme."""

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def shard_numel(shape: Sequence[int], world_size: int) -> int:
    """Elements one rank stores for a parameter: a ceil(dim0/N)-row chunk (0-d: replicated)."""
    if len(shape) == 0:
        return 1
    rows = math.ceil(shape[0] / world_size)
    return rows * math.prod(shape[1:])


def estimate(
    model: ModelShapes,
    *,
    world_size: int,
    mixed_precision: str = "bf16",
    param_persistence_threshold: int = 100_000,
    host_is_device: bool = False,
) -> list[StateEstimate]:
    """Estimates for stages 1/2/3 x offload none/cpu/nvme (+ stage 3 with parameters on CPU
    or NVMe). ``host_is_device``: the compute device is the CPU (no GPU), so host memory
    and device memory are one, and optimizer offload to ``cpu`` moves nothing."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if mixed_precision not in _COMPUTE_BYTES:
        raise ValueError(
            f"mixed_precision={mixed_precision!r} (allowed: {', '.join(_COMPUTE_BYTES)})"
        )
    compute = _COMPUTE_BYTES[mixed_precision]
    sharded = sum(shard_numel(shape, world_size) for shape in model.shapes)
    full = model.numel
    small = [shape for shape in model.shapes if math.prod(shape) < param_persistence_threshold]
    persistent = sum(math.prod(shape) for shape in small)
    persistent_shard = sum(shard_numel(shape, world_size) for shape in small)
    # Stage 3: persistent parameters stay whole (their rows are their masters) with whole,
    # all-reduced gradients, as under DDP; the rest is one fp32 shard with an fp32 gradient
    # shard.
    resharded = sharded - persistent_shard
    steps = _ADAM_STEP * len(model.shapes)
    host = "device" if host_is_device else "cpu"

    results = []
    settings = [(s, o, "none") for s in (1, 2, 3) for o in ("none", "cpu", "nvme")]
    settings += [(3, "cpu", "cpu"), (3, "nvme", "cpu"), (3, "nvme", "nvme")]
    for stage, off_opt, off_param in settings:
        b: dict[tuple[str, str], int] = {}

        def put(kind: str, place: str, n: int) -> None:
            b[(kind, place)] = b.get((kind, place), 0) + n  # noqa: B023 (used at once)

        # Where in-memory masters and optimizer state go (see [Note: masters and
        # precision] in partition.py and accel_zero/offload/engine_offload.py).
        state_place = "device" if off_opt == "none" else host
        moved = off_opt != "none" and not host_is_device
        if stage == 3:
            if off_opt == "nvme":
                put("optimizer_state", "nvme", (_PARAM + _ADAM) * resharded)
                put("grads", "nvme", _GRAD * resharded)
                working = {"none": "device", "cpu": host, "nvme": "nvme"}[off_param]
                put("params", working, compute * resharded)
                put("optimizer_state", state_place, _ADAM * persistent_shard)
                put("optimizer_state", state_place, _ADAM_STEP * len(small))
            else:
                if moved:  # fp32 master on the host, compute-dtype working shard for gathers
                    put("optimizer_state", "cpu", _PARAM * resharded)
                    put("params", "cpu" if off_param == "cpu" else "device", compute * resharded)
                else:  # the fp32 shard is the master and the gather source
                    put("params", "device", _PARAM * resharded)
                put("grads", state_place, _GRAD * resharded)
                put("optimizer_state", state_place, _ADAM * sharded + steps)
            put("params", "device", _PARAM * persistent)
            put("grads", "device", _GRAD * persistent)
            if moved:
                put("optimizer_state", "cpu", _PARAM * persistent_shard)
        else:
            put("params", "device", _PARAM * full)
            if moved:  # masters: a host copy of this rank's rows
                put("optimizer_state", "cpu", _PARAM * sharded)
            if stage == 1:
                put("grads", "device", _GRAD * full)
            else:
                put("grads", state_place, _GRAD * sharded)
            if off_opt == "nvme":
                put("optimizer_state", "nvme", _ADAM * sharded)  # steps are counters, not state
            else:
                put("optimizer_state", state_place, _ADAM * sharded + steps)
        total = {kind: sum(v for (k, _), v in b.items() if k == kind) for kind in KIND_NAMES}
        where = {place: sum(v for (_, pl), v in b.items() if pl == place) for place in PLACES}
        results.append(
            StateEstimate(
                stage=stage,
                offload_optimizer=off_opt,
                offload_param=off_param,
                param_bytes=total["params"],
                grad_bytes=total["grads"],
                optimizer_bytes=total["optimizer_state"],
                device_bytes=where["device"],
                cpu_bytes=where["cpu"],
                nvme_bytes=where["nvme"],
                by_place=dict(b),
            )
        )
    return results


def ddp_bytes(model: ModelShapes, *, mixed_precision: str = "bf16") -> int:
    """Model-state bytes per rank under plain data parallelism (everything replicated):
    fp32 parameters and gradients and Adam's two moments, whatever autocast computes in."""
    del mixed_precision
    return (_PARAM + _GRAD + _ADAM) * model.numel


def shapes_from_params(count: int) -> ModelShapes:
    """A model known only by its parameter count: one flat parameter."""
    return ModelShapes(shapes=((count,),), name="--params")


def shapes_from_module(module: Any, *, name: str = "model") -> ModelShapes:
    """Shapes of an ``nn.Module``'s distinct parameters and the size of its largest unit."""
    shapes = tuple(tuple(p.shape) for p in module.parameters())
    unit_classes = set(getattr(module, "_no_split_modules", None) or ())
    largest = 0
    for sub in module.modules():
        if type(sub).__name__ in unit_classes:
            largest = max(largest, sum(p.numel() for p in sub.parameters()))
    return ModelShapes(shapes=shapes, largest_unit_numel=largest, name=name)


def shapes_from_hf_config(path: str | Path) -> ModelShapes:
    """Build a transformers model from its config on the meta device (no weights, no RAM)."""
    model = meta_model_from_hf_config(path)
    return shapes_from_module(model, name=f"{type(model).__name__} from {path}")


def meta_model_from_hf_config(path: str | Path) -> Any:
    """A transformers model built from a config.json (or a folder holding one) on the meta
    device: the saved architecture, else a causal LM, else the base model."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = Path(path)
    if path.is_file():  # a config.json of any name
        data = json.loads(path.read_text(encoding="utf-8"))
        if "model_type" not in data:
            raise ValueError(f"{path} has no 'model_type'; is it a transformers config.json?")
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    else:
        config = AutoConfig.from_pretrained(str(path))
    # The architecture the checkpoint was saved from, else a causal LM, else the base model.
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if model_class is not None:
            return model_class(config)
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM architecture
            return AutoModel.from_config(config)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(
    model: ModelShapes, rows: Iterable[StateEstimate], *, world_size: int, mixed_precision: str
) -> str:
    """The report ``accel-zero estimate`` prints."""
    rows = list(rows)
    lines = [
        f"Model states per rank: {model.name}, {model.numel:,} parameters, "
        f"world size {world_size}, mixed precision {mixed_precision}, Adam",
        f"DDP (replicated): {human_bytes(ddp_bytes(model, mixed_precision=mixed_precision))}"
        " per rank",
        "",
        f"{'stage':>5}  {'offload_opt':>11}  {'offload_param':>13}  {'params':>11}  {'grads':>11}  "
        f"{'optimizer':>11}  {'device':>11}  {'cpu':>11}  {'nvme':>11}",
    ]
    for r in rows:
        lines.append(
            f"{r.stage:>5}  {r.offload_optimizer:>11}  {r.offload_param:>13}  "
            f"{human_bytes(r.param_bytes):>11}  {human_bytes(r.grad_bytes):>11}  "
            f"{human_bytes(r.optimizer_bytes):>11}  {human_bytes(r.device_bytes):>11}  "
            f"{human_bytes(r.cpu_bytes):>11}  {human_bytes(r.nvme_bytes):>11}"
        )
    if model.largest_unit_numel:
        unit = model.largest_unit_numel * _COMPUTE_BYTES[mixed_precision]
        lines += [
            "",
            f"Stage 3 also gathers whole units on the device: the largest unit is "
            f"{model.largest_unit_numel:,} parameters = {human_bytes(unit)} "
            f"(x2 while the next one is prefetched), plus activations.",
        ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``accel-zero estimate`` options."""
    # Not a mutually exclusive group: Accelerate's CustomArgumentParser (the parser class
    # of every accel-zero subcommand) replaces action objects, which breaks group checks.
    parser.add_argument(
        "model",
        nargs="?",
        help="A Hugging Face config.json or a folder holding one (built on the meta device).",
    )
    parser.add_argument("--params", help="Parameter count instead of a model, e.g. 7e9, 135M.")
    parser.add_argument(
        "--world-size", "--world_size", type=int, default=2, help="Ranks (default 2)."
    )
    parser.add_argument(
        "--mixed-precision",
        "--mixed_precision",
        choices=("no", "bf16", "fp16"),
        default="bf16",
        help="Compute dtype: 'no' is fp32 training (default bf16).",
    )
    parser.add_argument(
        "--param-persistence-threshold",
        "--param_persistence_threshold",
        default="100000",
        help="Stage-3 params with fewer elements stay whole on every rank (default 100000).",
    )
    _add_cluster_arguments(parser)


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--cluster`` view's options (accel_zero/cluster.py)."""
    from accel_zero.cluster import add_cluster_arguments

    add_cluster_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run ``accel-zero estimate``; prints the table and returns 0."""
    if getattr(args, "cluster", False):
        return _cluster_main(args)
    if args.world_size < 1:
        raise SystemExit(f"accel-zero estimate: --world-size={args.world_size} must be >= 1")
    if (args.model is None) == (args.params is None):
        raise SystemExit("accel-zero estimate: give either a model config (path) or --params N")
    try:
        threshold = parse_count(args.param_persistence_threshold, "--param-persistence-threshold")
        params = None if args.params is None else parse_count(args.params, "--params", minimum=1)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"accel-zero estimate: {exc}") from exc
    if params is not None:
        model = shapes_from_params(params)
    else:
        path = Path(args.model)
        if not path.exists():
            raise SystemExit(
                f"accel-zero estimate: {path} does not exist (give a config.json or its folder)"
            )
        model = shapes_from_hf_config(path)
    rows = estimate(
        model,
        world_size=args.world_size,
        mixed_precision=args.mixed_precision,
        param_persistence_threshold=threshold,
    )
    print(
        format_table(model, rows, world_size=args.world_size, mixed_precision=args.mixed_precision)
    )
    return 0


def _cluster_main(args: argparse.Namespace) -> int:
    """``accel-zero estimate --cluster`` (accel_zero/cluster.py)."""
    if args.world_size < 1:
        raise SystemExit(f"accel-zero estimate: --world-size={args.world_size} must be >= 1")
    if (args.model is None) == (args.params is None):
        raise SystemExit("accel-zero estimate: give either a model config (path) or --params N")
    from accel_zero.cluster import cluster_main

    return cluster_main(args)
