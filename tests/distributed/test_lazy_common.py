"""Shared pieces of the lazy-init and export tests: tiny checkpoints, comparisons, read counts.

Bytes read are counted at the safetensors API: the loader's ``safe_open`` is wrapped (in the
rank process under test only) so every slice or tensor that safetensors actually materialises
from the checkpoint adds its bytes. That is what a rank pulls from the files, rows and all,
not a figure derived from shapes. (OS-level ``read_bytes`` is reported by
scripts/bench_load.py; on this machine the 8 MB block-device readahead makes it meaningless
for megabyte-sized checkpoints.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

TINY = dict(vocab_size=96, max_position_embeddings=64)


def make_checkpoint(kind: str, path: Path, *, seed: int = 0) -> Path:
    """A tiny seeded checkpoint written by save_pretrained (safetensors)."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        BertConfig,
        GPT2Config,
        LlamaConfig,
        MixtralConfig,
    )

    torch.manual_seed(seed)
    model: nn.Module
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        cfg.bos_token_id = cfg.eos_token_id = 0
        model = AutoModelForCausalLM.from_config(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=0,
            eos_token_id=0,
            **TINY,
        )
        model = AutoModelForCausalLM.from_config(cfg)
    elif kind == "bert":
        cfg = BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            pad_token_id=3,
            **TINY,
        )
        model = AutoModel.from_config(cfg)
    elif kind == "mixtral":
        cfg = MixtralConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            bos_token_id=0,
            eos_token_id=0,
            **TINY,
        )
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    return path


def check_layout(model: nn.Module, rank: int, world_size: int) -> None:
    """Every parameter is a DTensor Shard(0) (Replicate if 0-d) holding rows by torch.chunk."""
    for name, param in model.named_parameters():
        assert isinstance(param, nn.Parameter) and isinstance(param, DTensor), name
        assert param.device_mesh.size() == world_size, name
        if param.dim() == 0:
            assert param.placements == (Replicate(),), name
            continue
        assert param.placements == (Shard(0),), name
        chunk = -(-param.shape[0] // world_size)
        rows = max(0, min(param.shape[0], (rank + 1) * chunk) - rank * chunk)
        assert param.to_local().shape == (rows, *param.shape[1:]), name
    for name, buf in model.named_buffers():
        assert not isinstance(buf, DTensor), name


def compare_with_plain(lazy: nn.Module, plain: nn.Module) -> list[str]:
    """Names whose full value (DTensors gathered) differs from plain loading; ties checked."""
    bad = []
    lazy_params = dict(lazy.named_parameters(remove_duplicate=False))
    plain_params = dict(plain.named_parameters(remove_duplicate=False))
    assert lazy_params.keys() == plain_params.keys()
    for name, param in lazy_params.items():
        ref = plain_params[name]
        full = param.full_tensor() if isinstance(param, DTensor) else param
        if full.dtype != ref.dtype or not torch.equal(full.detach(), ref.detach()):
            bad.append(name)
        if param.requires_grad != ref.requires_grad:
            bad.append(f"{name}.requires_grad")
    lazy_buffers = dict(lazy.named_buffers())
    for name, ref in plain.named_buffers():
        if name not in lazy_buffers or not torch.equal(lazy_buffers[name], ref):
            bad.append(name)

    # ties: same groups of names share one Parameter object
    def groups(m: nn.Module) -> set[tuple[str, ...]]:
        by_id: dict[int, list[str]] = {}
        for n, p in m.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(n)
        return {tuple(v) for v in by_id.values() if len(v) > 1}

    if groups(lazy) != groups(plain):
        bad.append(f"ties {groups(lazy)} != {groups(plain)}")
    return bad


def gather_to_plain(lazy: nn.Module, plain: nn.Module) -> nn.Module:
    """Copy the lazily built model's full weights into ``plain`` (test-side gather)."""
    with torch.no_grad():
        for name, param in lazy.named_parameters():
            plain.get_parameter(name).copy_(param.full_tensor())
    return plain


class ReadCounter:
    """Wraps safetensors' ``safe_open`` and counts the bytes materialised from the files."""

    def __init__(self) -> None:
        self.bytes = 0
        self.tensors = 0

    def install(self) -> None:
        import transformers.modeling_utils as mu

        real = mu.safe_open
        counter = self

        class Slice:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __getitem__(self, index: Any) -> torch.Tensor:
                tensor = self._inner[index]
                counter.bytes += tensor.numel() * tensor.element_size()
                counter.tensors += 1
                return tensor

            def __getattr__(self, name: str) -> Any:
                return getattr(self._inner, name)

        class File:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._inner = real(*args, **kwargs)

            def get_slice(self, key: str) -> Slice:
                return Slice(self._inner.get_slice(key))

            def get_tensor(self, key: str) -> torch.Tensor:
                tensor = self._inner.get_tensor(key)
                counter.bytes += tensor.numel() * tensor.element_size()
                return tensor

            def __enter__(self) -> File:
                self._inner.__enter__()
                return self

            def __exit__(self, *exc: Any) -> Any:
                return self._inner.__exit__(*exc)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._inner, name)

        mu.safe_open = File  # test instrumentation only, in this rank process


def checkpoint_tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                numel = 1
                for d in s.get_shape():
                    numel *= d
                total += numel * torch.empty((), dtype=_dtype(s.get_dtype())).element_size()
    return total


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}[
        name
    ]
