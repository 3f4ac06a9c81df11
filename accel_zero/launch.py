"""``accel-zero launch``: Accelerate's launcher plus a ``zero_config:`` block.

``accelerate launch`` rejects YAML keys it does not know, so this command takes the
exact ``accelerate launch`` CLI, reads ``--config_file``, removes the ``zero_config:``
block, validates it (a bad config fails here, naming the key, before any rank starts),
writes the rest to a temporary YAML for Accelerate, puts the block in
``$ACCEL_ZERO_LAUNCH_CONFIG`` (JSON) for every rank, and runs Accelerate's own
launcher in-process.

Multi-process CPU. Accelerate treats ``distributed_type: MULTI_CPU`` as "mpirun will
start the ranks" (its simple launcher runs one process and expects MPI/IPEX env
variables). Without an ``mpirun_hostfile`` on one machine, ``accel-zero launch``
instead routes MULTI_CPU (or ``--cpu``/``use_cpu`` with ``num_processes`` > 1) through
Accelerate's ``multi_gpu_launcher``, which is ``torch.distributed.run`` (torchrun):
it spawns ``num_processes`` local ranks with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*
set, and ``ACCELERATE_USE_CPU=true`` makes Accelerate pick MULTI_CPU with gloo in
each rank. ``OMP_NUM_THREADS`` defaults to physical cores / ranks (at least 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accel_zero.config import LAUNCH_CONFIG_ENV, ROOT, ZeroConfig

logger = logging.getLogger(__name__)

_CPU_TYPES = ("MULTI_CPU",)
_REPLACED_TYPES = ("DEEPSPEED", "FSDP", "MEGATRON_LM")


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """A launch YAML split into what Accelerate reads and what accel_zero reads."""

    accelerate: dict[str, Any]
    """The YAML without the ``zero_config`` block (what ``accelerate launch`` accepts)."""
    zero_config: ZeroConfig | None
    """The validated block, or None when the YAML has none."""


def split_launch_config(data: Mapping[str, Any], *, source: str = "<config>") -> SplitConfig:
    """Strip and validate the ``zero_config`` block; reject Accelerate settings it would fight."""
    accelerate = {key: value for key, value in data.items() if key != ROOT}
    if ROOT not in data:
        return SplitConfig(accelerate=accelerate, zero_config=None)
    block = data[ROOT] if data[ROOT] is not None else {}
    zero = ZeroConfig.from_dict(block)
    distributed_type = str(accelerate.get("distributed_type", "")).upper()
    if distributed_type in _REPLACED_TYPES:
        raise ValueError(
            f"{source}: distributed_type={distributed_type} conflicts with the {ROOT} block: "
            "accel_zero replaces DeepSpeed/FSDP/Megatron; set distributed_type to MULTI_GPU "
            "(GPUs) or MULTI_CPU (CPU) or NO (one process)"
        )
    return SplitConfig(accelerate=accelerate, zero_config=zero)


def launch_env_value(zero: ZeroConfig) -> str:
    """The ``$ACCEL_ZERO_LAUNCH_CONFIG`` value: the validated block, fully spelled out, as JSON."""
    return json.dumps(zero.to_dict(), sort_keys=True)


def _wants_local_cpu_ranks(args: argparse.Namespace, accelerate: Mapping[str, Any]) -> bool:
    """MULTI_CPU (or --cpu) with several processes on one machine and no mpirun hostfile."""
    distributed_type = str(accelerate.get("distributed_type", "")).upper()
    cpu = (
        distributed_type in _CPU_TYPES
        or bool(args.cpu)
        or bool(getattr(args, "use_cpu", False))
        or bool(accelerate.get("use_cpu", False))
    )
    num_processes = args.num_processes or accelerate.get("num_processes") or 1
    num_machines = args.num_machines or accelerate.get("num_machines") or 1
    hostfile = args.mpirun_hostfile or accelerate.get("mpirun_hostfile")
    multi_flags = args.multi_gpu or args.use_deepspeed or args.use_fsdp or args.tpu
    return (
        cpu
        and int(num_processes) > 1
        and int(num_machines) <= 1
        and not hostfile
        and not multi_flags
    )


def prepare_launch(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """Rewrite ``args`` for Accelerate in place; return the environment every rank must see.

    Reads ``args.config_file`` (else Accelerate's default config file, if any), strips
    and validates the ``zero_config`` block, writes the remainder to
    ``workdir/accelerate_config.yaml`` and points ``args.config_file`` at it.
    Raises ValueError/TypeError naming the key on a bad block.
    """
    import yaml
    from accelerate.commands.config import default_config_file

    env: dict[str, str] = {}
    accelerate: dict[str, Any] = {}
    if args.config_file is None and not args.cpu and os.path.isfile(default_config_file):
        args.config_file = default_config_file  # what `accelerate launch` would read
    if args.config_file is not None:
        path = Path(args.config_file)
        if not path.is_file():
            raise ValueError(f"--config_file {path} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise TypeError(f"--config_file {path} must hold a mapping, got {type(data).__name__}")
        split = split_launch_config(data, source=str(path))
        accelerate = split.accelerate
        if split.zero_config is not None:
            env[LAUNCH_CONFIG_ENV] = launch_env_value(split.zero_config)
        if _wants_local_cpu_ranks(args, accelerate):
            accelerate.pop("gpu_ids", None)  # GPU ids mean nothing to CPU ranks
        stripped = workdir / "accelerate_config.yaml"
        stripped.write_text(yaml.safe_dump(accelerate, sort_keys=False), encoding="utf-8")
        args.config_file = str(stripped)
    if LAUNCH_CONFIG_ENV not in env:
        env[LAUNCH_CONFIG_ENV] = ""  # a stale value from an outer launch must not leak in

    if _wants_local_cpu_ranks(args, accelerate):
        # See the module docstring: torchrun-style local ranks instead of mpirun.
        args.multi_gpu = True
        args.cpu = False
        args.use_cpu = True
        env["ACCELERATE_USE_CPU"] = "true"
        if "OMP_NUM_THREADS" not in os.environ:
            import psutil

            ranks = int(args.num_processes or accelerate.get("num_processes") or 1)
            cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
            env["OMP_NUM_THREADS"] = str(max(1, cores // ranks))
    return env


def run_launch(args: argparse.Namespace) -> int:
    """Validate, rewrite and run an ``accelerate launch`` namespace; returns the exit code."""
    from accelerate.commands.launch import launch_command

    with tempfile.TemporaryDirectory(prefix="accel_zero_launch_") as workdir:
        try:
            env = prepare_launch(args, Path(workdir))
        except (ValueError, TypeError) as exc:
            print(f"accel-zero launch: invalid configuration: {exc}", file=sys.stderr)
            return 2
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            launch_command(args)
        except subprocess.CalledProcessError as exc:
            return exc.returncode or 1
        except Exception as exc:
            # torchrun's ChildFailedError already printed each failed rank's traceback.
            if type(exc).__name__ == "ChildFailedError":
                return 1
            raise
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``accel-zero launch ARGS`` (ARGS exactly as for ``accelerate launch``)."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    parser.prog = "accel-zero launch"
    return run_launch(parser.parse_args(argv))


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Picked at random *below* the kernel's ephemeral range and checked by
    binding. A port from ``bind(0)`` is an ephemeral one: between our probe and
    rank 0's store binding it, another test's outgoing connection or its own
    ``bind(0)`` probe can take the same number, and ranks of two concurrent
    jobs would rendezvous with each other's store. Below the ephemeral range
    only another caller of this function can collide (1 in ~10,000).
    """
    low, _ = _ephemeral_range()
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12_000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
