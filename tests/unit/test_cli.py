"""`accel-zero launch` argument rewriting, and one real 2-process CPU launch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser

from accel_zero import cli
from accel_zero.config import LAUNCH_CONFIG_ENV, ZeroConfig
from accel_zero.launch import find_free_port, prepare_launch, split_launch_config

LAUNCH_YAML = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
gpu_ids: '0'
main_training_function: main
zero_config:
  stage: 2
  prefetch_bucket_size: 10M
  offload_optimizer:
    device: cpu
"""


def _parse(*argv: str):
    return launch_command_parser().parse_args(list(argv))


def test_split_strips_block_and_validates() -> None:
    data = yaml.safe_load(LAUNCH_YAML)
    split = split_launch_config(data)
    assert "zero_config" not in split.accelerate
    assert split.accelerate["distributed_type"] == "MULTI_CPU"
    assert split.zero_config == ZeroConfig(
        stage=2, prefetch_bucket_size=10_000_000, offload_optimizer={"device": "cpu"}
    )
    assert split_launch_config({"num_processes": 2}).zero_config is None


def test_split_rejects_competing_backend() -> None:
    with pytest.raises(ValueError, match="distributed_type=DEEPSPEED conflicts"):
        split_launch_config({"distributed_type": "DEEPSPEED", "zero_config": {"stage": 3}})


def test_prepare_launch_rewrites_config_and_env(tmp_path: Path) -> None:
    config = tmp_path / "launch.yaml"
    config.write_text(LAUNCH_YAML)
    args = _parse("--config_file", str(config), "train.py", "--lr", "1e-3")
    env = prepare_launch(args, tmp_path)

    stripped = Path(args.config_file)
    assert stripped.parent == tmp_path and stripped != config
    written = yaml.safe_load(stripped.read_text())
    assert "zero_config" not in written
    assert "gpu_ids" not in written  # GPU ids are dropped for CPU ranks
    # Accelerate's own loader accepts the stripped file (it rejects unknown keys).
    assert load_config_from_file(str(stripped)).num_processes == 2

    block = json.loads(env[LAUNCH_CONFIG_ENV])
    assert ZeroConfig.from_dict(block) == ZeroConfig(
        stage=2, prefetch_bucket_size=10_000_000, offload_optimizer={"device": "cpu"}
    )
    assert block["prefetch_bucket_size"] == 10_000_000  # spelled out, not "10M"
    # MULTI_CPU on one machine runs as torchrun-style local ranks on CPU.
    assert args.multi_gpu is True and args.cpu is False
    assert env["ACCELERATE_USE_CPU"] == "true"
    assert args.training_script == "train.py"
    assert args.training_script_args == ["--lr", "1e-3"]


def test_prepare_launch_without_block_clears_stale_env(tmp_path: Path) -> None:
    config = tmp_path / "plain.yaml"
    config.write_text("distributed_type: 'NO'\nnum_processes: 1\nmixed_precision: 'no'\n")
    args = _parse("--config_file", str(config), "train.py")
    env = prepare_launch(args, tmp_path)
    assert env[LAUNCH_CONFIG_ENV] == ""
    assert not args.multi_gpu  # one process: Accelerate's simple launcher


def test_prepare_launch_cpu_flag_runs_local_ranks(tmp_path: Path) -> None:
    args = _parse("--cpu", "--num_processes", "2", "train.py")
    # An explicit file, so the test never reads this machine's Accelerate default config.
    args.config_file = str(tmp_path / "plain.yaml")
    (tmp_path / "plain.yaml").write_text("num_processes: 2\n")
    env = prepare_launch(args, tmp_path)
    assert args.multi_gpu is True and args.cpu is False and args.use_cpu is True
    assert env["ACCELERATE_USE_CPU"] == "true"
    assert int(env.get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))) >= 1


def test_prepare_launch_bad_block_names_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(LAUNCH_YAML.replace("device: cpu", "device: disk"))
    with pytest.raises(ValueError, match=r"zero_config\.offload_optimizer\.device='disk'"):
        prepare_launch(_parse("--config_file", str(config), "train.py"), tmp_path)


def test_cli_launch_fails_fast_on_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(LAUNCH_YAML.replace("stage: 2", "stag: 2"))
    script = tmp_path / "never.py"
    marker = tmp_path / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert cli.main(["launch", "--config_file", str(config), str(script)]) == 2
    err = capsys.readouterr().err
    assert "zero_config.stag" in err and "did you mean 'stage'" in err
    assert not marker.exists()


def test_cli_env_command(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import accel_zero.env_report  # noqa: F401
    except ImportError:
        assert cli.main(["env"]) == 1
        assert "environment report is not available" in capsys.readouterr().err
    else:
        assert cli.main(["env"]) == 0
        assert "torch" in capsys.readouterr().out  # the report itself, owned by env_report


RANK_SCRIPT = """\
import json
import os

import torch.distributed as dist

from accel_zero.config import ZeroConfig

dist.init_process_group("gloo")
config = ZeroConfig.resolve(None)
print("RANK_REPORT " + json.dumps({
    "rank": dist.get_rank(),
    "world_size": dist.get_world_size(),
    "stage": config.stage,
    "prefetch_bucket_size": config.prefetch_bucket_size,
    "use_cpu": os.environ.get("ACCELERATE_USE_CPU"),
}), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.timeout(240)
def test_real_two_process_cpu_launch(tmp_path: Path) -> None:
    config = tmp_path / "launch.yaml"
    config.write_text(LAUNCH_YAML)
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in (LAUNCH_CONFIG_ENV, "ACCEL_ZERO_CONFIG")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accel_zero.cli",
            "launch",
            "--config_file",
            str(config),
            "--main_process_port",
            str(find_free_port()),
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=220,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The ranks share one stdout, so two reports can land on one line: find each flat
    # JSON object after its marker rather than splitting by line.
    reports = [json.loads(m) for m in re.findall(r"RANK_REPORT (\{[^{}]*\})", result.stdout)]
    assert sorted(r["rank"] for r in reports) == [0, 1], result.stdout + result.stderr
    for report in reports:
        assert report["world_size"] == 2
        assert report["stage"] == 2  # the zero_config block reached this rank
        assert report["prefetch_bucket_size"] == 10_000_000
        assert report["use_cpu"] == "true"
