"""A real ``accel-zero launch`` of the classifier recipe: 2 CPU ranks, ZeRO-3, ``--tiny``.

``recipes/train_classifier.py`` is ``accel_zero.Trainer`` on the real all-MiniLM-L6-v2
checkpoint: the launch YAML's ``zero_config`` block reaching the Trainer on both ranks,
evaluation (accuracy) before and after training, 4 optimizer steps, and the consolidated
export, which plain ``from_pretrained`` must load with its 13-topic head and tokenizer.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from accel_zero.launch import find_free_port

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "train_classifier.py"
CONFIG = REPO / "recipes" / "configs" / "classifier_zero3_cpu.yaml"
STEPS = 4  # the recipe's --tiny
EVAL_PAIRS = 64
LAUNCH_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _accel_zero_cmd() -> list[str]:
    script = Path(sys.executable).parent / "accel-zero"
    if script.is_file():
        return [str(script)]
    found = shutil.which("accel-zero")
    if found is None:
        pytest.fail("the accel-zero console script is not installed; run bash scripts/setup.sh")
    return [found]


def _minilm_dir() -> Path:
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        from common import minilm_dir
    finally:
        sys.path.remove(str(REPO / "recipes"))
    return minilm_dir()


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the recipe once under ``accel-zero launch``; the tests below read its outcome."""
    work = tmp_path_factory.mktemp("classifier")
    config = yaml.safe_load(CONFIG.read_text())
    config["main_process_port"] = find_free_port()  # never collide with a running job
    config["zero_config"]["timeout"] = 120  # a hang fails the test instead of stalling it
    config_path = work / "classifier_tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out_dir = work / "export"
    cmd = [
        *_accel_zero_cmd(),
        "launch",
        "--config_file",
        str(config_path),
        str(RECIPE),
        "--tiny",
        "--output_dir",
        str(out_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCEL_ZERO_LAUNCH_CONFIG", None)
    env.pop("ACCEL_ZERO_CONFIG", None)
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        check=False,
    )
    output = (proc.stdout + "\n" + proc.stderr).replace("\r", "\n")
    return {"returncode": proc.returncode, "output": output, "out_dir": out_dir}


def _tail(output: str, n: int = 60) -> str:
    return "\n".join(output.splitlines()[-n:])


def test_launch_trains_and_reports_accuracy(launch: dict) -> None:
    output = launch["output"]
    assert launch["returncode"] == 0, f"accel-zero launch failed:\n{_tail(output)}"
    # The YAML's zero_config reached the Trainer; both ranks took part.
    assert "ZeRO stage 3 on 2 ranks; 13 topics" in output, _tail(output)
    assert f"/ {EVAL_PAIRS} held-out pairs" in output, _tail(output)
    assert "16 per micro-batch x 1 accumulation x 2 ranks = 32 pairs per step" in output
    found = {}
    for when in ("before training", "after training "):
        match = re.search(rf"{when} \| eval accuracy ([0-9.]+) eval loss ([0-9.]+)", output)
        assert match is not None, f"no '{when}' line:\n{_tail(output)}"
        found[when] = (float(match.group(1)), float(match.group(2)))
    for accuracy, loss in found.values():
        # Accuracy over 64 pairs is a multiple of 1/64; the loss a real cross-entropy of a
        # 13-way head (ln 13 = 2.56 for a uniform guess), not 2x it (see the recipe).
        assert 0.0 <= accuracy <= 1.0
        assert abs(accuracy * EVAL_PAIRS - round(accuracy * EVAL_PAIRS)) < 1e-2, found
        assert 1.0 < loss < 4.0, found
    assert f"trained {STEPS} steps" in output, _tail(output)
    # One log line per step (--tiny logs every step): loss, grad norm, learning rate.
    logged = re.findall(r"\{'loss': '([0-9.]+)', 'grad_norm': '([0-9.]+)', 'learning_rate'", output)
    assert len(logged) == STEPS, _tail(output)


def test_export_reloads_with_from_pretrained(launch: dict) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert launch["returncode"] == 0, _tail(launch["output"])
    out_dir: Path = launch["out_dir"]
    assert (out_dir / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(out_dir)
    assert model.config.num_labels == 13
    assert model.config.id2label[0] == "ai" and "trivia" in model.config.label2id
    tokenizer = AutoTokenizer.from_pretrained(out_dir)

    # Trained: the encoder moved away from the shipped checkpoint (4 AdamW steps), every
    # weight finite, and the export holds exactly the model's own keys.
    base = _minilm_dir() / "model.safetensors"
    with safe_open(str(base), "pt") as f:
        start = f.get_tensor("encoder.layer.0.attention.self.query.weight")
    trained = model.state_dict()
    assert all(torch.isfinite(t).all() for t in trained.values())
    assert not torch.equal(trained["bert.encoder.layer.0.attention.self.query.weight"], start)
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert {"classifier.weight", "classifier.bias"} <= saved

    model.eval()
    batch = tokenizer(["What is AI?"], ["A branch of computer science."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 13) and torch.isfinite(logits).all()
