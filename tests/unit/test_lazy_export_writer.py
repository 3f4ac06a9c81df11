"""The streamed consolidated export writer, fed unit by unit without a process group.

The engine's ``iter_full_state_dict`` is stood in for by ``state_dict_by_unit``: the model's
own state dict split per ``_no_split_modules`` block (plus the rest), full tensors, as the
engine yields them on the main rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MixtralConfig,
)

from accel_zero import hf
from accel_zero.checkpoint import ConsolidatedWriter, parse_size, write_consolidated


def state_dict_by_unit(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Stand-in for ``Engine.iter_full_state_dict``: one dict per unit, tied names included."""
    classes = hf.no_split_module_classes(model)
    units: list[str] = [
        name for name, m in model.named_modules() if name and isinstance(m, classes)
    ]
    state = model.state_dict(keep_vars=False)
    done: set[str] = set()
    for prefix in units:
        unit = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
        done.update(unit)
        yield unit
    yield {k: v for k, v in state.items() if k not in done}


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=96,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return AutoModelForCausalLM.from_config(cfg)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_parse_size() -> None:
    assert parse_size("10GB") == 10 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500kb") == 500_000
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("ten gigs")
    with pytest.raises(ValueError, match="positive"):
        parse_size(0)


def test_single_file_export_reloads_exactly(tmp_path: Path) -> None:
    model = tiny_gpt2()
    out = tmp_path / "out"
    write_consolidated(state_dict_by_unit(model), model, out, is_main=True)
    files = sorted(os.listdir(out))
    assert "model.safetensors" in files and "config.json" in files
    assert "generation_config.json" in files
    assert not any(f.endswith(".index.json") for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert_same_weights(model, reloaded)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight


def test_sharded_export_writes_index_and_reloads(tmp_path: Path) -> None:
    model = tiny_gpt2()
    out = tmp_path / "out"
    write_consolidated(state_dict_by_unit(model), model, out, is_main=True, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 3
    assert all(f.endswith(f"-of-{len(shard_files):05d}.safetensors") for f in shard_files)
    assert all((out / f).exists() for f in shard_files)
    # tied alias dropped, as save_pretrained does
    assert "lm_head.weight" not in index["weight_map"]
    assert "transformer.wte.weight" in index["weight_map"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert_same_weights(model, reloaded)


def test_writer_never_holds_more_than_one_shard(tmp_path: Path) -> None:
    writer = ConsolidatedWriter(directory=tmp_path, max_shard_bytes=1000)
    peak = 0
    for i in range(10):
        writer.add(f"t{i}", torch.zeros(100))  # 400 bytes each
        peak = max(peak, writer._pending_bytes)
    assert peak <= 1000
    names = writer.finish()
    assert names[-1] == "model.safetensors.index.json"
    assert len(names) == 1 + 5  # 2 tensors per shard


def test_converted_weights_are_reverted_on_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    source = tmp_path / "src"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)  # fused experts, with conversions
    out = tmp_path / "out"
    write_consolidated(state_dict_by_unit(model), model, out, is_main=True, max_shard_size=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(source / "model.safetensors", "pt") as f:
        original_keys = set(f.keys())
    keys = set(index["weight_map"])
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys
    assert keys == original_keys
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(out))


def test_export_into_existing_folder_replaces_weights_keeps_other_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = tiny_gpt2()
    write_consolidated(state_dict_by_unit(old), old, out, is_main=True, max_shard_size=20_000)
    (out / "tokenizer.json").write_text("{}")
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    new = AutoModelForCausalLM.from_config(cfg)
    write_consolidated(state_dict_by_unit(new), new, out, is_main=True)
    files = set(os.listdir(out))
    assert "tokenizer.json" in files
    assert "model.safetensors" in files
    assert "model.safetensors.index.json" not in files
    assert not [f for f in files if "-of-" in f], files
    assert_same_weights(new, AutoModelForCausalLM.from_pretrained(out))


def _failing_units(model: nn.Module) -> Iterator[dict[str, object]]:
    for i, unit in enumerate(state_dict_by_unit(model)):
        yield {**unit, "broken": object()} if i == 2 else unit


def test_failed_export_leaves_previous_checkpoint_intact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    model = tiny_gpt2()
    write_consolidated(state_dict_by_unit(model), model, out, is_main=True)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    drained = []

    def units() -> Iterator[dict[str, object]]:
        for unit in _failing_units(model):
            drained.append(1)
            yield unit

    with pytest.raises(AttributeError):
        write_consolidated(units(), model, out, is_main=True, max_shard_size=20_000)  # type: ignore[arg-type]
    assert len(drained) == 4  # 3 blocks + rest: iterated to the end despite the failure
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_failed_first_export_leaves_nothing_loadable(tmp_path: Path) -> None:
    model = tiny_gpt2()
    out = tmp_path / "out"

    def units() -> Iterator[dict[str, Tensor]]:
        yield from list(state_dict_by_unit(model))[:2]
        raise RuntimeError("collective failed")

    with pytest.raises(RuntimeError, match="collective failed"):
        write_consolidated(units(), model, out, is_main=True, max_shard_size=20_000)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_is_a_clear_error(tmp_path: Path) -> None:
    model = tiny_gpt2()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        write_consolidated(state_dict_by_unit(model), model, a_file, is_main=True)
    with pytest.raises(ValueError, match=r"cannot write to .*file\.txt/out"):
        write_consolidated(state_dict_by_unit(model), model, a_file / "out", is_main=True)


def test_non_main_rank_writes_nothing(tmp_path: Path) -> None:
    model = tiny_gpt2()
    empty_units = ({} for _ in range(4))
    write_consolidated(empty_units, model, tmp_path / "out", is_main=False)
    assert list(tmp_path.iterdir()) == []


def test_hf_helpers() -> None:
    model = tiny_gpt2()
    assert hf.is_transformers_model(model)
    assert not hf.is_transformers_model(nn.Linear(2, 2))
    assert [c.__name__ for c in hf.no_split_module_classes(model)] == ["GPT2Block"]
    assert hf.no_split_module_classes(nn.Linear(2, 2)) == ()
    assert hf.tied_parameter_groups(model) == [["transformer.wte.weight", "lm_head.weight"]]
    keep = hf.export_state_filter(model)
    assert keep("transformer.wte.weight") and not keep("lm_head.weight")
