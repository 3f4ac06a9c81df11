"""A real ``accel-zero launch`` of the main recipe: 2 CPU ranks, ZeRO-3, the tiny model.

This is the main job's command with the tiny asset (a 2-layer Llama with SmolLM2's
tokenizer and chat template) and 3 steps, so it checks the whole path a user takes: the
launch YAML's ``zero_config`` block reaching both ranks, ``lazy_init`` + ``from_pretrained``,
``prepare``, the training loop, generation on a sharded model, the memory report and the
consolidated export that ``from_pretrained`` loads back.
"""

from __future__ import annotations

import math
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
RECIPE = REPO / "recipes" / "finetune_clm.py"
MAIN_CONFIG = REPO / "recipes" / "configs" / "zero3_cpu.yaml"
STEPS = 3
LAUNCH_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _accel_zero_cmd() -> list[str]:
    """The ``accel-zero`` console script of this interpreter (what users run)."""
    script = Path(sys.executable).parent / "accel-zero"
    if script.is_file():
        return [str(script)]
    found = shutil.which("accel-zero")
    if found is None:
        pytest.fail("the accel-zero console script is not installed; run bash scripts/setup.sh")
    return [found]


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    """The tiny asset, prepared if needed (idempotent: well under a second when present)."""
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_assets.py")],
        check=True,
        cwd=REPO,
        timeout=600,
    )
    root = os.environ.get("ACCEL_ZERO_ASSETS")
    base = Path(root) if root else Path.home() / ".cache" / "accel_zero" / "assets"
    return base / "tiny-llama"


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    """Run the recipe once under ``accel-zero launch``; the tests below read its outcome."""
    work = tmp_path_factory.mktemp("launch")
    # The main job's YAML with a free port, so the test never collides with a running job.
    config = yaml.safe_load(MAIN_CONFIG.read_text())
    config["main_process_port"] = find_free_port()
    config["zero_config"]["timeout"] = 120  # a hang fails the test instead of stalling it
    config_path = work / "zero3_tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out_dir = work / "export"
    cmd = [
        *_accel_zero_cmd(),
        "launch",
        "--config_file",
        str(config_path),
        str(RECIPE),
        "--tiny",
        "--max_steps",
        str(STEPS),
        "--max_new_tokens",
        "4",
        # 2 pairs x 2 accumulated micro-batches x 2 ranks = 8 pairs per step: exercises
        # accumulate/no_sync through a real launch.
        "--per_device_batch_size",
        "2",
        "--grad_accum",
        "2",
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
    # tqdm redraws with carriage returns; split on them too so log lines stand alone.
    output = (proc.stdout + "\n" + proc.stderr).replace("\r", "\n")
    return {"returncode": proc.returncode, "output": output, "out_dir": out_dir}


def _tail(output: str, n: int = 60) -> str:
    return "\n".join(output.splitlines()[-n:])


def test_launch_exits_zero(launch: dict) -> None:
    assert launch["returncode"] == 0, f"accel-zero launch failed:\n{_tail(launch['output'])}"


def test_every_step_logs_finite_losses_from_both_ranks(launch: dict) -> None:
    pattern = re.compile(r"step (\d+)/(\d+) loss (\S+) \(ranks: ([^)]*)\)")
    matches = pattern.findall(launch["output"])
    assert [int(m[0]) for m in matches] == list(range(1, STEPS + 1)), _tail(launch["output"])
    for step, total, mean, per_rank in matches:
        assert int(total) == STEPS
        rank_losses = [float(x) for x in per_rank.split()]
        assert len(rank_losses) == 2, f"step {step}: expected 2 ranks, got {per_rank!r}"
        assert all(math.isfinite(x) and x > 0 for x in rank_losses), per_rank
        assert math.isfinite(float(mean))
        assert float(mean) == pytest.approx(sum(rank_losses) / 2, abs=1e-3)
    # The ranks see different data (the loader is sharded), so their losses differ.
    assert any(len(set(m[3].split())) == 2 for m in matches), matches


def test_config_reaches_the_ranks_and_generation_runs(launch: dict) -> None:
    output = launch["output"]
    assert "2 per micro-batch x 2 accumulation x 2 ranks = 8 pairs per step" in output, _tail(
        output
    )
    assert f"trained {STEPS} steps ({2 * STEPS} micro-batches per rank)" in output
    assert "before training | 'What is AI?' ->" in output
    assert "after training  | 'What is AI?' ->" in output


def test_memory_report_from_each_rank(launch: dict, tiny_model: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    # What one DDP rank would hold in fp32 with AdamW: params + grads + 2 moments.
    ddp_bytes = 16 * n_params
    output = launch["output"]
    for rank in (0, 1):
        block = output.split(f"memory report (rank {rank}):", 1)
        assert len(block) == 2, f"no memory report from rank {rank}:\n{_tail(output)}"
        match = re.search(r"model_state_bytes: ([0-9.]+) MiB", block[1])
        assert match is not None, block[1][:800]
        state = float(match.group(1)) * 2**20
        # ZeRO-3 on 2 ranks keeps half of the fp32 masters and AdamW moments (+ bf16 compute
        # shards): ~0.44 of DDP's bytes; well above zero, well below DDP.
        assert 0.25 * ddp_bytes < state < 0.6 * ddp_bytes, (match.group(0), ddp_bytes)
        assert re.search(rf"rank: {rank}\b", block[1]), block[1][:800]
        assert "stage: 3" in block[1]
        assert re.search(r"peak RSS of this process: \d+ MiB", block[1])


def test_export_loads_with_from_pretrained(launch: dict, tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert launch["returncode"] == 0, _tail(launch["output"])
    out_dir: Path = launch["out_dir"]
    assert (out_dir / "config.json").is_file()
    trained = AutoModelForCausalLM.from_pretrained(out_dir)
    start = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template

    trained_sd, start_sd = trained.state_dict(), start.state_dict()
    assert trained_sd.keys() == start_sd.keys()
    changed = []
    for name, tensor in trained_sd.items():
        assert tensor.shape == start_sd[name].shape, name
        assert torch.isfinite(tensor).all(), name
        if not torch.equal(tensor, start_sd[name]):
            changed.append(name)
    # 3 AdamW steps move every trained weight; the tie survives the round trip.
    assert "model.layers.0.self_attn.q_proj.weight" in changed, changed
    assert "model.embed_tokens.weight" in changed, changed
    assert trained.lm_head.weight.data_ptr() == trained.model.embed_tokens.weight.data_ptr()
    batch = tokenizer("Hello there", return_tensors="pt")
    with torch.no_grad():
        logits = trained(**batch).logits
    assert torch.isfinite(logits).all()
