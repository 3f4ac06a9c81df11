"""Tiny seeded models and deterministic data for parity tests.

Every builder is reachable by name through ``build_model(name, seed=...)`` so a
test can pass a plain string to spawned ranks. Same name + seed gives bit-equal
weights in every process. All models take ``model(input_ids=x, labels=x)`` and
return an HF ``CausalLMOutput`` (a pytree node, so hooks can walk it) whose
``loss`` is the mean next-token cross-entropy, like transformers' causal LMs.

Each model names its units (module classes gathered together) in the class
attribute ``_no_split_modules``, as transformers models do.

The shapes that matter for parity edge cases:

- ``gpt2``: ``lm_head.weight`` *is* ``transformer.wte.weight`` (tied).
- ``llama``: untied head, GQA, RMSNorm, rotary buffers.
- ``frozen``: ``blocks.0.fc1`` weight and bias have ``requires_grad=False``.
- ``twice``: ``shared`` block runs twice in every forward.
- ``sometimes``: ``extra`` block runs only on some forward calls (by a call
  counter, so it is the same on every rank); on the other optimizer steps its
  parameters have ``grad is None`` and torch optimizers skip them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODEL_NAMES",
    "Batches",
    "FrozenParamLM",
    "SometimesUsedLM",
    "TinyLM",
    "TwiceUsedLM",
    "build_model",
    "make_batches",
    "tiny_gpt2",
    "tiny_llama",
    "unit_class_names",
]

VOCAB = 96
"""Vocabulary of every tiny model (and the default of ``make_batches``)."""
MAX_POSITIONS = 64


def tiny_gpt2(
    seed: int = 0,
    *,
    vocab: int = VOCAB,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    n_positions: int = MAX_POSITIONS,
) -> nn.Module:
    """GPT2LMHeadModel with tied ``lm_head`` <-> ``wte``, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight, "tiny_gpt2 must be tied"
    return model.train()


def tiny_llama(
    seed: int = 0,
    *,
    vocab: int = VOCAB,
    n_layer: int = 2,
    hidden: int = 32,
    n_head: int = 4,
    n_kv_head: int = 2,
) -> nn.Module:
    """LlamaForCausalLM (untied head, grouped-query attention, rotary buffers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).train()


class Block(nn.Module):
    """Pre-norm MLP block with a residual: the unit of the plain models."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _causal_lm_output(logits: Tensor, labels: Tensor | None) -> Any:
    from transformers.modeling_outputs import CausalLMOutput

    loss = None
    if labels is not None:
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(),
            labels[:, 1:].reshape(-1),
        )
    return CausalLMOutput(loss=loss, logits=logits)


class TinyLM(nn.Module):
    """Embedding -> blocks -> norm -> untied head; the base of the plain models."""

    _no_split_modules: ClassVar[list[str]] = ["Block"]

    def __init__(self, *, vocab: int = VOCAB, dim: int = 32, n_blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def body(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> Any:
        h = self.body(self.embed(input_ids))
        return _causal_lm_output(self.head(self.norm(h)), labels)


class FrozenParamLM(TinyLM):
    """``blocks.0.fc1`` is frozen (weight and bias ``requires_grad=False``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        first = self.blocks[0]
        assert isinstance(first, Block)
        first.fc1.weight.requires_grad_(False)
        first.fc1.bias.requires_grad_(False)


class TwiceUsedLM(TinyLM):
    """``shared`` runs twice per forward (its gradient is the sum of both uses)."""

    def __init__(self, *, dim: int = 32, **kwargs: Any) -> None:
        super().__init__(dim=dim, **kwargs)
        self.shared = Block(dim)

    def body(self, x: Tensor) -> Tensor:
        x = self.shared(x)
        x = super().body(x)
        return self.shared(x)


class SometimesUsedLM(TinyLM):
    """``extra`` runs only on some forward calls while training.

    Forward call ``c`` (0-based, training mode only) uses ``extra`` iff
    ``(c // span) % period == period - 1``. With ``span`` = the gradient
    accumulation steps, whole optimizer steps alternate between using and not
    using it; with ``span=1`` it flips every micro-step. The counter is a
    plain Python int, so every rank that runs the same loop agrees.
    """

    def __init__(self, *, dim: int = 32, period: int = 2, span: int = 1, **kwargs: Any) -> None:
        super().__init__(dim=dim, **kwargs)
        self.extra = Block(dim)
        self.period = period
        self.span = span
        self.calls = 0

    def uses_extra(self, call: int) -> bool:
        return (call // self.span) % self.period == self.period - 1

    def body(self, x: Tensor) -> Tensor:
        x = super().body(x)
        if self.training:
            use = self.uses_extra(self.calls)
            self.calls += 1
            if use:
                x = self.extra(x)
        return x


def _plain(cls: type[TinyLM]) -> Callable[..., nn.Module]:
    def build(seed: int = 0, **kwargs: Any) -> nn.Module:
        torch.manual_seed(seed)
        return cls(**kwargs).train()

    build.__name__ = f"build_{cls.__name__}"
    return build


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "plain": _plain(TinyLM),
    "frozen": _plain(FrozenParamLM),
    "twice": _plain(TwiceUsedLM),
    "sometimes": _plain(SometimesUsedLM),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build a tiny model by name (one of ``MODEL_NAMES``), fp32, training mode."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {MODEL_NAMES}") from None
    return builder(seed, **kwargs)


def unit_class_names(model: nn.Module) -> tuple[str, ...]:
    """The model's unit classes (``_no_split_modules``), as a tuple of names."""
    names = getattr(model, "_no_split_modules", None) or ()
    return tuple(names)


@dataclass(frozen=True, kw_only=True)
class Batches:
    """Token batches for every micro-step, global and per rank.

    ``global_batches[i]`` has shape ``[world_size * micro_batch, seq_len]``;
    rank ``r`` sees rows ``[r * micro_batch, (r + 1) * micro_batch)`` of it.
    Each rank slice holds the same number of tokens, so the mean of the ranks'
    mean losses is the global mean loss and DDP's gradient average equals the
    single-process gradient on the global batch.
    """

    global_batches: tuple[Tensor, ...]
    world_size: int
    micro_batch: int

    def __len__(self) -> int:
        return len(self.global_batches)

    def rank_slice(self, batch: Tensor, rank: int) -> Tensor:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        return batch[rank * self.micro_batch : (rank + 1) * self.micro_batch]

    def for_rank(self, rank: int) -> list[Tensor]:
        """This rank's micro-batches, one per micro-step, shape ``[micro_batch, seq_len]``."""
        return [self.rank_slice(b, rank) for b in self.global_batches]


def make_batches(
    seed: int,
    n_steps: int,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    vocab: int = VOCAB,
    *,
    grad_accum: int = 1,
) -> Batches:
    """Deterministic, learnable token sequences: ``n_steps * grad_accum`` micro-steps.

    Each row is an arithmetic progression modulo ``vocab`` with a random start
    and stride, so next-token prediction is learnable and the loss falls: a
    run whose updates are wrong shows it in the losses, not only the weights.
    Independent of torch's global RNG.
    """
    if min(n_steps, world_size, micro_batch, grad_accum) < 1 or seq_len < 2:
        raise ValueError(
            f"need n_steps, world_size, micro_batch, grad_accum >= 1 and seq_len >= 2; got "
            f"{n_steps=}, {world_size=}, {micro_batch=}, {grad_accum=}, {seq_len=}"
        )
    gen = torch.Generator().manual_seed(seed)
    n_micro = n_steps * grad_accum
    rows = world_size * micro_batch
    start = torch.randint(0, vocab, (n_micro, rows, 1), generator=gen)
    stride = torch.randint(1, 8, (n_micro, rows, 1), generator=gen)
    tokens = (start + stride * torch.arange(seq_len)) % vocab
    return Batches(
        global_batches=tuple(t.clone() for t in tokens),
        world_size=world_size,
        micro_batch=micro_batch,
    )
