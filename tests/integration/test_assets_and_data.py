"""The prepared assets and the recipe's data pipeline, on the real files.

The converted SmolLM2 checkpoint must be a plain safetensors model that answers like the
GGUF it came from; the chatterbot pairs must be rendered with the chat template and
labelled on the answer only.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "recipes"))
sys.path.insert(0, str(REPO / "scripts"))

import prepare_assets  # noqa: E402
from common import (  # noqa: E402
    IGNORE_INDEX,
    PadCollator,
    build_sft_dataset,
    chatterbot_files,
    iter_chatterbot_pairs,
    tokenize_pair,
)


@pytest.fixture(scope="module")
def assets() -> Path:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_assets.py")],
        check=True,
        cwd=REPO,
        timeout=600,
    )
    return prepare_assets.default_assets_root()


@pytest.fixture(scope="module")
def tokenizer(assets: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets / prepare_assets.SMOLLM2_DIR)


def test_smollm2_asset_is_plain_safetensors_with_template(assets: Path) -> None:
    import json

    from safetensors import safe_open

    folder = assets / prepare_assets.SMOLLM2_DIR
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config  # no GGUF left: save/load as plain weights
    assert (folder / "chat_template.jinja").read_text().count("<|im_start|>") >= 2
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert "model.embed_tokens.weight" in names
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.29.mlp.down_proj.weight").get_dtype() == "F32"
    assert prepare_assets.is_valid(
        folder, prepare_assets._smollm2_expected(prepare_assets.find_gguf(), "float32")
    )


def test_converted_model_answers_like_smollm2(assets: Path, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets / prepare_assets.SMOLLM2_DIR)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_stamp_rejects_a_damaged_folder(assets: Path, tmp_path: Path) -> None:
    source = assets / prepare_assets.TINY_DIR
    copy = tmp_path / "tiny"
    shutil.copytree(source, copy)
    expected = prepare_assets._tiny_expected(assets / prepare_assets.SMOLLM2_DIR)
    assert prepare_assets.is_valid(copy, expected)
    with (copy / "model.safetensors").open("r+b") as f:
        f.truncate(1024)  # an interrupted copy
    assert not prepare_assets.is_valid(copy, expected)
    (copy / "model.safetensors").unlink()
    assert not prepare_assets.is_valid(copy, expected)
    assert not prepare_assets.is_valid(tmp_path / "absent", expected)


def test_chatterbot_pairs() -> None:
    spec = importlib.util.find_spec("chatterbot_corpus")
    assert spec is not None
    pairs = list(iter_chatterbot_pairs(chatterbot_files()))
    # 2,393 consecutive pairs, minus the 87 of the one conversation split into characters.
    assert len(pairs) == 2306
    assert all(p["prompt"] and p["response"] for p in pairs)
    assert {"prompt": "What is AI?", "category": "ai"}.items() <= pairs[0].items()
    assert not any(len(p["prompt"]) == 1 and len(p["response"]) == 1 for p in pairs)


def test_labels_cover_the_answer_only(tokenizer) -> None:
    row = tokenize_pair({"prompt": "Are you sentient?", "response": "Sort of."}, tokenizer)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in labels[:first])
    assert labels[first:] == ids[first:]
    prompt = tokenizer.decode(ids[:first])
    assert prompt.endswith("<|im_start|>assistant\n"), prompt
    assert "Are you sentient?" in prompt and "Sort of." not in prompt
    assert tokenizer.decode(ids[first:]).startswith("Sort of.<|im_end|>")


def test_dataset_and_collator(tokenizer) -> None:
    import torch

    dataset = build_sft_dataset(tokenizer, seq_len=128)
    assert 2200 < len(dataset) < 2306  # a few long pairs dropped, never truncated
    assert max(len(r) for r in dataset["input_ids"]) <= 128
    rows = [dataset[i] for i in range(3)]
    batch = PadCollator(tokenizer.pad_token_id)(rows)
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (3, width)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["attention_mask"][i].sum() == n
        assert torch.equal(batch["labels"][i, :n], torch.tensor(r["labels"]))
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
