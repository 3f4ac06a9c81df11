"""What the cluster model knows of a model: its parameters, grouped as the engine groups them,
and the order its unit modules run (see accel_zero/cluster/__init__.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from accel_zero.estimator import ModelShapes
from accel_zero.partition import group_by_unit

__all__ = [
    "ModelLayout",
    "ParamInfo",
    "family_numel",
    "layout_from_module",
    "llama_family",
    "llama_layout",
]


@dataclass(frozen=True, kw_only=True)
class ParamInfo:
    """One distinct parameter as the engine sees it."""

    name: str
    shape: tuple[int, ...]
    owner: str
    """The unit module owning it (its qualified name), or "" for the root."""
    itemsize: int = 4
    """Bytes per element of the parameter as built (4: fp32)."""
    requires_grad: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shard_numel(self, group: int) -> int:
        """Elements of one rank's padded chunk: ceil(rows / group) rows (0-d: one element)."""
        rows = self.shape[0] if self.shape else 1
        row_numel = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        return max(1, math.ceil(rows / group)) * row_numel


@dataclass(frozen=True, kw_only=True)
class ModelLayout:
    """Parameters grouped by owner (in the engine's order) and the order unit modules run."""

    name: str
    params: tuple[ParamInfo, ...]
    """Distinct parameters (tied ones once), in the order the engine visits them."""
    modules: tuple[str, ...]
    """Unit modules, in definition order (the engine's unit order)."""
    forward_order: tuple[str, ...]
    """Unit modules in the order their forward runs (a module may appear more than once)."""

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def shapes(self) -> ModelShapes:
        """The estimator's view of the same model (for model-state bytes)."""
        largest = max(
            (sum(p.numel for p in self.params if p.owner == m) for m in self.modules), default=0
        )
        return ModelShapes(
            shapes=tuple(p.shape for p in self.params), largest_unit_numel=largest, name=self.name
        )


def layout_from_module(
    module: Any,
    *,
    units: Sequence[str] | None = None,
    forward_order: Sequence[str] | None = None,
    name: str | None = None,
) -> ModelLayout:
    """The layout of an ``nn.Module`` (meta device is fine), grouped by the engine's own
    ``partition.group_by_unit``: unit modules are the outermost instances of ``units``
    (default ``_no_split_modules``); a parameter used by two owners belongs to the root.
    ``forward_order`` defaults to the unit modules in definition order, each once (a plain
    stack of blocks)."""
    unit_names = set(units if units is not None else (module._no_split_modules or ()))
    grouped, _ = group_by_unit(module, unit_names)
    owner_of = {id(p): owner.name for owner in grouped for _, p in owner.params}
    params = [  # in the model's order, each parameter once under its first name
        ParamInfo(
            name=fqn,
            shape=tuple(p.shape),
            owner=owner_of[id(p)],
            itemsize=p.element_size(),
            requires_grad=bool(p.requires_grad),
        )
        for fqn, p in module.named_parameters()
    ]
    owners = [owner.name for owner in grouped if owner.name]
    return ModelLayout(
        name=name or type(module).__name__,
        params=tuple(params),
        modules=tuple(owners),
        forward_order=tuple(forward_order if forward_order is not None else owners),
    )


def llama_layout(
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int = 32_000,
    name: str | None = None,
) -> ModelLayout:
    """``LlamaForCausalLM``'s layout (untied head, no biases) without building it: the same
    parameters in the same order as transformers registers them (tests/unit/test_cluster.py
    compares it with one built on the meta device)."""
    head_dim = hidden // heads
    params = [ParamInfo(name="model.embed_tokens.weight", shape=(vocab, hidden), owner="")]
    modules = []
    for i in range(layers):
        m = f"model.layers.{i}"
        modules.append(m)
        for pname, shape in (
            ("self_attn.q_proj", (heads * head_dim, hidden)),
            ("self_attn.k_proj", (kv_heads * head_dim, hidden)),
            ("self_attn.v_proj", (kv_heads * head_dim, hidden)),
            ("self_attn.o_proj", (hidden, heads * head_dim)),
            ("mlp.gate_proj", (intermediate, hidden)),
            ("mlp.up_proj", (intermediate, hidden)),
            ("mlp.down_proj", (hidden, intermediate)),
            ("input_layernorm", (hidden,)),
            ("post_attention_layernorm", (hidden,)),
        ):
            params.append(ParamInfo(name=f"{m}.{pname}.weight", shape=shape, owner=m))
    params.append(ParamInfo(name="model.norm.weight", shape=(hidden,), owner=""))
    params.append(ParamInfo(name="lm_head.weight", shape=(vocab, hidden), owner=""))
    n = sum(p.numel for p in params)
    return ModelLayout(
        name=name or f"Llama {layers} x {hidden} ({n / 1e9:.1f}B)",
        params=tuple(params),
        modules=tuple(modules),
        forward_order=tuple(modules),
    )


def llama_family(layers: int) -> ModelLayout:
    """One member of a Llama-architecture family with a fixed aspect ratio, for "the largest
    model that fits": hidden = 128 x layers (Llama-2 7B's and 13B's ratio), 128-wide heads,
    8 KV heads from hidden 8192 on (as Llama-2 70B), FFN = Llama's 8/3 x hidden rounded up
    to a multiple of 256 (11008 at 4096: exactly Llama-2 7B), vocabulary 32000."""
    hidden = 128 * layers
    heads = layers
    return llama_layout(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads if hidden < 8192 else 8,
        intermediate=256 * math.ceil(8 * hidden / 3 / 256),
    )


def family_numel(layers: int) -> int:
    h = 128 * layers
    kv = h if h < 8192 else 8 * 128
    ffn = 256 * math.ceil(8 * h / 3 / 256)
    return 2 * 32_000 * h + h + layers * (2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h)
