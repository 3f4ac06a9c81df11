"""Several machines: ``accel-zero launch`` with ``num_machines`` > 1, and the rank-side check.

The real part runs two ``accel-zero launch`` processes on loopback, ``--machine_rank 0``
and ``1`` of one launch YAML (MULTI_CPU, gloo), each starting its share of the ranks, and
checks that they form ONE job (every rank 0..N-1 once, the same members seen from every
rank, ranks numbered machine by machine) whose per-step losses equal those of the same
job on one machine. The script is ``multinode_train.py`` (the tiny model, a few steps).

The rest needs no process: the layout ``accel-zero launch`` derives from the YAML and
flags (and the errors for a layout torchrun cannot start), and
``check_launch_environment``, which refuses a process whose job is smaller than what its
launcher (accel-zero launch, torchrun, mpirun, Accelerate's simple launcher) asked for.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from accelerate.commands.launch import launch_command_parser

from accel_zero import cli
from accel_zero.config import CONFIG_PATH_ENV, LAUNCH_CONFIG_ENV
from accel_zero.launch import (
    LAUNCH_LAYOUT_ENV,
    LaunchLayout,
    LaunchMismatchError,
    check_launch_environment,
    configure_launch_parser,
    find_free_port,
    prepare_launch,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "multinode_train.py"
STEPS = 3
JOB_TIMEOUT_S = 240  # ~10-20 s on an idle 2-core machine; generous for a busy one
FAILURE_GRACE_S = 30  # after one side fails, how long the other may take to notice


def _layout_yaml(*, machines: int, per_machine: int, port: int, zero: bool = True) -> dict:
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_CPU",
        "num_machines": machines,
        "num_processes": machines * per_machine,  # Accelerate's meaning: all machines
        "machine_rank": 0,
        "main_process_ip": "127.0.0.1",
        "main_process_port": port,
        "mixed_precision": "no",
        "use_cpu": True,
    }
    if zero:
        # A hung collective fails within a minute instead of stalling the test.
        config["zero_config"] = {"stage": 3, "timeout": 60}
    return config


def _clean_env() -> dict[str, str]:
    """This process's environment without any launcher's or accel_zero's leftovers."""
    drop = {LAUNCH_CONFIG_ENV, LAUNCH_LAYOUT_ENV, CONFIG_PATH_ENV, "WORLD_SIZE", "RANK"}
    drop |= {"LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = "1"  # 2 to 4 ranks share 2 cores
    return env


# ---------------------------------------------------------------- running machines
@dataclass
class _Machine:
    rank: int
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        # Own session: on a hang the whole launch (agent + its ranks) is killed by group.
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill(machine: _Machine) -> None:
    if machine.proc.poll() is None:
        os.killpg(machine.proc.pid, signal.SIGKILL)
    machine.proc.wait()


def _wait(machines: list[_Machine], what: str) -> None:
    """Wait for every machine's launch; fail naming the stuck or failed side, with logs."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    failed_at: float | None = None
    problem = ""
    while True:
        codes = {m.rank: m.proc.poll() for m in machines}
        now = time.monotonic()
        if all(code is not None for code in codes.values()):
            if any(codes.values()):
                problem = f"launches exited with {codes} (machine_rank: exit code)"
            break
        if failed_at is None and any(code for code in codes.values()):
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > FAILURE_GRACE_S):
            stuck = [rank for rank, code in codes.items() if code is None]
            waited = JOB_TIMEOUT_S if failed_at is None else FAILURE_GRACE_S
            problem = (
                f"machine_rank {stuck} still running {waited} s after "
                + ("the start" if failed_at is None else "another machine failed")
                + f" (killed); exit codes so far: {codes}"
            )
            break
        time.sleep(0.2)
    for machine in machines:
        _kill(machine)
    if problem:
        logs = "\n".join(f"--- machine_rank {m.rank} log ({m.log}):\n{m.tail()}" for m in machines)
        pytest.fail(f"{what}: {problem}\n{logs}", pytrace=False)


def _run_job(tmp: Path, *, machines: int, per_machine: int) -> list[dict]:
    """One job of ``machines`` x ``per_machine`` ranks on loopback; each rank's record."""
    name = f"{machines}x{per_machine}"
    work = tmp / name
    work.mkdir()
    config = work / "launch.yaml"
    port = find_free_port()
    config.write_text(
        yaml.safe_dump(_layout_yaml(machines=machines, per_machine=per_machine, port=port))
    )
    out = work / "out"
    env = _clean_env()
    launched = []
    for rank in range(machines):  # the same command on every machine but --machine_rank
        cmd = [
            sys.executable, "-m", "accel_zero.cli", "launch", "--config_file", str(config),
            "--machine_rank", str(rank), str(SCRIPT), str(out), "--steps", str(STEPS),
        ]  # fmt: skip
        log = work / f"machine{rank}.log"
        launched.append(_Machine(rank=rank, proc=_start(cmd, log, env), log=log))
    _wait(launched, f"{name} job on port {port}")
    files = sorted(out.glob("rank*.json"))
    records = [json.loads(f.read_text()) for f in files]
    logs = "\n".join(m.tail(10) for m in launched)
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(machines * per_machine)], (
        f"{name}: rank files {[f.name for f in files]}\n{logs}"
    )
    return records


def _check_one_job(records: list[dict], *, machines: int, per_machine: int) -> None:
    world = machines * per_machine
    assert sorted(r["rank"] for r in records) == list(range(world))
    for r in records:
        assert r["world_size"] == world, r
        assert r["distributed_type"] == "DistributedType.MULTI_CPU", r
        # torchrun's static rendezvous numbers the ranks machine by machine.
        assert r["machine"] == r["rank"] // per_machine, r
        assert r["local_rank"] == r["rank"] % per_machine, r
    members = records[0]["members"]
    assert all(r["members"] == members for r in records), [r["members"] for r in records]
    assert len({pid for pid, _ in members}) == world, members  # N processes, each once
    assert [machine for _, machine in members] == [r // per_machine for r in range(world)]
    losses = records[0]["losses"]
    assert all(r["losses"] == losses for r in records)  # gathered: the same on every rank
    assert len(losses) == STEPS and all(len(step) == world for step in losses)
    assert all(math.isfinite(x) for step in losses for x in step)


def _compare(tmp: Path, *, machines: int, per_machine: int) -> None:
    world = machines * per_machine
    multi = _run_job(tmp, machines=machines, per_machine=per_machine)
    _check_one_job(multi, machines=machines, per_machine=per_machine)
    single = _run_job(tmp, machines=1, per_machine=world)
    _check_one_job(single, machines=1, per_machine=world)
    got, want = multi[0]["losses"], single[0]["losses"]
    print(f"{machines} machines x {per_machine} processes, per-step losses by rank: {got}")
    print(f"1 machine x {world} processes, per-step losses by rank: {want}")
    # Same seed, data, rank order and collectives: the same numbers (gloo on loopback).
    flat_got, flat_want = [x for s in got for x in s], [x for s in want for x in s]
    assert flat_got == pytest.approx(flat_want, rel=1e-6, abs=1e-7), (got, want)
    assert len({tuple(step) for step in got}) == STEPS  # the model moves between steps


def test_two_machines_one_process_each_is_one_job(tmp_path: Path) -> None:
    _compare(tmp_path, machines=2, per_machine=1)


@pytest.mark.slow
def test_two_machines_two_processes_each_is_one_job(tmp_path: Path) -> None:
    _compare(tmp_path, machines=2, per_machine=2)


def test_accelerate_simple_launcher_on_two_machines_fails_loudly(tmp_path: Path) -> None:
    """The issue's symptom with plain ``accelerate launch``: one process, no group.

    Accelerate's simple launcher runs MULTI_CPU as one process waiting for mpirun to
    start the others; ``accel_zero.Accelerator()`` must refuse it rather than train alone.
    """
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        yaml.safe_dump(_layout_yaml(machines=2, per_machine=1, port=find_free_port(), zero=False))
    )
    zero = tmp_path / "zero.yaml"
    zero.write_text("zero_config:\n  stage: 3\n  timeout: 60\n")
    env = {**_clean_env(), CONFIG_PATH_ENV: str(zero)}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        str(SCRIPT), str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "LaunchMismatchError" in output, output[-3000:]
    assert "accelerate launch (simple launcher) asked for several ranks" in output, output[-3000:]
    assert "MASTER_ADDR=127.0.0.1" in output and "accel-zero launch" in output
    assert not (tmp_path / "out").exists()  # it never trained


# ---------------------------------------------------------------- the layout
def _prepare(tmp: Path, config: dict, *argv: str) -> tuple[Any, dict[str, str]]:
    path = tmp / "launch.yaml"
    path.write_text(yaml.safe_dump(config))
    parser = launch_command_parser()
    configure_launch_parser(parser)
    args = parser.parse_args(["--config_file", str(path), *argv, "train.py"])
    return args, prepare_launch(args, tmp)


def test_multi_machine_cpu_goes_through_torchrun(tmp_path: Path) -> None:
    config = _layout_yaml(machines=2, per_machine=2, port=29611)
    args, env = _prepare(tmp_path, config, "--machine_rank", "1", "--main_process_ip", "10.0.0.5")
    # Accelerate's torchrun route (it turns these into --nnodes/--node_rank/--nproc_per_node).
    assert args.multi_gpu is True and args.cpu is False and args.use_cpu is True
    assert env["ACCELERATE_USE_CPU"] == "true"
    assert args.rdzv_backend == "static" and args.same_network is False
    layout = LaunchLayout.from_env(env[LAUNCH_LAYOUT_ENV])
    assert (layout.num_processes, layout.num_machines, layout.machine_rank) == (4, 2, 1)
    assert layout.processes_per_machine == 2
    assert layout.main_process_ip == "10.0.0.5"  # the flag wins over the key
    assert layout.sources["main_process_ip"] == "--main_process_ip"
    assert layout.sources["num_machines"] == f"{tmp_path / 'launch.yaml'}: num_machines"
    assert layout.main_process_port == 29611


def test_rendezvous_keys_count_unless_the_flag_is_given(tmp_path: Path) -> None:
    config = {**_layout_yaml(machines=2, per_machine=1, port=29612), "rdzv_backend": "c10d"}
    config["same_network"] = True
    args, _ = _prepare(tmp_path, config)
    assert args.rdzv_backend == "c10d" and args.same_network is True  # Accelerate drops these
    args, env = _prepare(tmp_path, config, "--rdzv_backend", "static")
    assert args.rdzv_backend == "static"
    assert LaunchLayout.from_env(env[LAUNCH_LAYOUT_ENV]).sources["rdzv_backend"] == (
        "--rdzv_backend"
    )


def test_one_machine_layout_is_handed_to_the_ranks(tmp_path: Path) -> None:
    args, env = _prepare(tmp_path, _layout_yaml(machines=1, per_machine=2, port=29613))
    assert args.multi_gpu is True  # local torchrun ranks, as before
    assert LaunchLayout.from_env(env[LAUNCH_LAYOUT_ENV]).num_processes == 2
    # No num_processes anywhere: Accelerate counts devices, nothing to hold the ranks to.
    args, env = _prepare(tmp_path, {"distributed_type": "NO", "mixed_precision": "no"})
    assert env[LAUNCH_LAYOUT_ENV] == "" and not args.multi_gpu


@pytest.mark.parametrize(
    ("changes", "argv", "message"),
    [
        ({}, ["--machine_rank", "2"], r"machine_rank=2 \(--machine_rank\) must be in 0\.\.1"),
        (
            {"num_processes": 3},
            [],
            r"num_processes=3 \(.*launch.yaml: num_processes\) is the total over all "
            r"num_machines=2 .* set num_processes 2",
        ),
        ({"main_process_ip": None}, [], r"num_machines=2 \(.*\) needs main_process_ip"),
        ({"num_processes": None}, [], r"num_machines=2 \(.*\) needs num_processes"),
        ({"main_process_port": 0}, [], r"main_process_port=0 .* works on one machine only"),
        ({"num_machines": 0}, [], r"num_machines=0 .* must be at least 1"),
        ({"num_machines": "two"}, [], r"num_machines='two' \(.*\) must be an integer"),
    ],
)
def test_bad_layout_names_the_key_and_its_source(
    tmp_path: Path, changes: dict, argv: list[str], message: str
) -> None:
    config = {**_layout_yaml(machines=2, per_machine=1, port=29614), **changes}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        _prepare(tmp_path, config, *argv)


def test_cli_rejects_a_bad_layout_before_any_rank_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(_layout_yaml(machines=2, per_machine=1, port=29615)))
    script = tmp_path / "never.py"
    marker = tmp_path / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    argv = ["launch", "--config_file", str(config), "--machine_rank", "5", str(script)]
    assert cli.main(argv) == 2
    assert "machine_rank=5 (--machine_rank) must be in 0..1" in capsys.readouterr().err
    assert not marker.exists()


# ---------------------------------------------------------------- the rank-side check
def _layout_env(num_processes: int, num_machines: int) -> dict[str, str]:
    layout = LaunchLayout(
        num_processes=num_processes,
        num_machines=num_machines,
        machine_rank=num_machines - 1,
        main_process_ip="127.0.0.1",
        main_process_port=29500,
        sources={"num_machines": "two.yaml: num_machines", "num_processes": "--num_processes"},
    )
    return {LAUNCH_LAYOUT_ENV: layout.to_env()}


TORCHRUN_4 = {
    "WORLD_SIZE": "4",
    "RANK": "3",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}
SIMPLE_LAUNCHER = {
    "ACCELERATE_DYNAMO_BACKEND": "NO",
    "ACCELERATE_USE_CPU": "True",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


@pytest.mark.parametrize(
    ("environ", "world_size"),
    [
        ({}, 1),  # plain `python train.py`
        (TORCHRUN_4, 4),
        ({**_layout_env(4, 2), **TORCHRUN_4}, 4),
        ({"PMI_SIZE": "2", "PMI_RANK": "1"}, 2),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, 1),
        ({k: v for k, v in SIMPLE_LAUNCHER.items() if not k.startswith("MASTER")}, 1),
        ({**SIMPLE_LAUNCHER, **_layout_env(1, 1)}, 1),  # accel-zero launch said: one process
        ({"MASTER_ADDR": "127.0.0.1"}, 1),  # no launcher marker: an exported shell variable
    ],
)
def test_matching_launch_passes(environ: dict[str, str], world_size: int) -> None:
    check_launch_environment(world_size=world_size, rank=0, environ=environ)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {**_layout_env(4, 2), **TORCHRUN_4},
            [
                "accel-zero launch asked for 4 ranks: num_processes=4 (--num_processes); "
                "num_machines=2 (two.yaml: num_machines); machine_rank=1, "
                "main_process_ip=127.0.0.1, main_process_port=29500, rdzv_backend=static "
                "(default)",
                f"(${LAUNCH_LAYOUT_ENV})",
                "torchrun / env:// asked for 4 ranks: WORLD_SIZE=4, RANK=3, LOCAL_WORLD_SIZE=2",
                "do not pass cpu=False",
            ],
        ),
        (_layout_env(2, 2), ["accel-zero launch asked for 2 ranks", "each with its own"]),
        ({"PMI_SIZE": "4", "PMI_RANK": "0"}, ["mpirun asked for 4 ranks: PMI_SIZE=4, PMI_RANK=0"]),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, ["mpirun asked for 2 ranks: OMPI_COMM_WORLD_SIZE=2"]),
        (
            SIMPLE_LAUNCHER,
            [
                "accelerate launch (simple launcher) asked for several ranks: "
                "MASTER_ADDR=127.0.0.1, MASTER_PORT=29500",
                "use `accel-zero launch`",
            ],
        ),
    ],
)
def test_alone_in_a_multi_rank_launch_fails(environ: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(LaunchMismatchError) as info:
        check_launch_environment(world_size=1, rank=0, environ=environ)
    message = str(info.value)
    assert "rank 0 is in no process group (one process alone)" in message
    assert "but its launch asked for more" in message
    for text in expected:
        assert text in message, message


def test_a_group_of_another_size_fails() -> None:
    with pytest.raises(LaunchMismatchError, match="not what its launch asked for") as info:
        check_launch_environment(world_size=4, rank=2, environ={"WORLD_SIZE": "2"})
    assert "rank 2 is in a process group of 4 ranks" in str(info.value)


def test_unreadable_launch_variables_are_named() -> None:
    with pytest.raises(LaunchMismatchError, match=r"\$WORLD_SIZE='four' is not an integer"):
        check_launch_environment(world_size=1, environ={"WORLD_SIZE": "four"})
    with pytest.raises(ValueError, match=rf"\${LAUNCH_LAYOUT_ENV}='\{{' is not a launch layout"):
        check_launch_environment(world_size=1, environ={LAUNCH_LAYOUT_ENV: "{"})
