"""``accel-zero launch``: Accelerate's launcher plus a ``zero_config:`` block.

``accelerate launch`` rejects YAML keys it does not know, so this command takes the
exact ``accelerate launch`` CLI, reads ``--config_file``, removes the ``zero_config:``
block, validates it (a bad config fails here, naming the key, before any rank starts),
writes the rest to a temporary YAML for Accelerate, puts the block in
``$ACCEL_ZERO_LAUNCH_CONFIG`` (JSON) for every rank, and runs Accelerate's own
launcher in-process.

Multi-process CPU. Accelerate treats ``distributed_type: MULTI_CPU`` as "mpirun will
start the ranks" (its simple launcher runs one process and expects MPI/IPEX env
variables). Without an ``mpirun_hostfile``, ``accel-zero launch`` instead routes
MULTI_CPU (or ``--cpu``/``use_cpu``) with several processes or several machines through
Accelerate's ``multi_gpu_launcher``, which is ``torch.distributed.run`` (torchrun): it
spawns ``num_processes / num_machines`` local ranks with RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_* set, and ``ACCELERATE_USE_CPU=true`` makes Accelerate pick MULTI_CPU with gloo
in each rank. ``OMP_NUM_THREADS`` defaults to physical cores / local ranks (at least 1).

Several machines. The same command runs on every machine with its own ``machine_rank``
(key or ``--machine_rank``); ``num_processes`` is the total over all machines, as in
Accelerate. Accelerate's torchrun route (``prepare_multi_gpu_env``) turns the keys into
``--nnodes``/``--node_rank``/``--nproc_per_node`` and a rendezvous at
``main_process_ip:main_process_port``; MULTI_GPU already takes it, MULTI_CPU now does
too. The layout is checked here (machine_rank in range, num_processes a multiple of
num_machines, machine 0's address given) and handed to every rank in
``$ACCEL_ZERO_LAUNCH_LAYOUT``, so that :func:`check_launch_environment` can refuse a
process that ends up in a smaller job than the launch asked for.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accel_zero.config import LAUNCH_CONFIG_ENV, ROOT, ZeroConfig

logger = logging.getLogger(__name__)

LAUNCH_LAYOUT_ENV = "ACCEL_ZERO_LAUNCH_LAYOUT"
"""JSON of the :class:`LaunchLayout` an ``accel-zero launch`` started, seen by every rank."""

_CPU_TYPES = ("MULTI_CPU",)
_REPLACED_TYPES = ("DEEPSPEED", "FSDP", "MEGATRON_LM")
_RDZV_DEFAULT = "static"  # Accelerate's default --rdzv_backend

# What launchers leave in each process's environment (see check_launch_environment).
_TORCHRUN_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "GROUP_WORLD_SIZE")
_MPI_SIZE_KEYS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_KEYS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_ACCELERATE_LAUNCH_MARKER = "ACCELERATE_DYNAMO_BACKEND"  # set by every `accelerate launch` route


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


# ---------------------------------------------------------------- the layout
@dataclass(frozen=True, kw_only=True)
class LaunchLayout:
    """How many processes on how many machines a launch asked for, and who said so."""

    num_processes: int | None = None
    """Processes over all machines together (Accelerate's meaning); None: not given."""
    num_machines: int = 1
    """Machines, each running the same ``accel-zero launch`` command."""
    machine_rank: int = 0
    """This machine's index, 0 .. num_machines - 1; machine 0 hosts the rendezvous."""
    main_process_ip: str | None = None
    """Address of machine 0, reachable from every machine (needed for num_machines > 1)."""
    main_process_port: int | None = None
    """Rendezvous port on machine 0 (None: Accelerate's 29500)."""
    rdzv_backend: str = _RDZV_DEFAULT
    """torchrun's rendezvous: ``static`` (ranks by machine_rank) or ``c10d``."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where each value came from: ``--flag``, ``FILE: key`` or ``default``."""

    def __post_init__(self) -> None:
        n = self.num_machines
        if n < 1:
            raise ValueError(f"{self._say('num_machines')} must be at least 1")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"{self._say('num_processes')} must be at least 1")
        if not 0 <= self.machine_rank < n:
            raise ValueError(
                f"{self._say('machine_rank')} must be in 0..{n - 1} for "
                f"{self._say('num_machines')}: number the machines 0, 1, ..., with machine 0 "
                "at main_process_ip"
            )
        if n == 1:
            return
        if not self.main_process_ip:
            raise ValueError(
                f"{self._say('num_machines')} needs main_process_ip, the address of machine 0 "
                "that every machine can reach: set main_process_ip in the config file or pass "
                "--main_process_ip"
            )
        if self.num_processes is None:
            raise ValueError(
                f"{self._say('num_machines')} needs num_processes, the number of processes on "
                f"all machines together (e.g. {n} machines x 8 GPUs: num_processes {8 * n})"
            )
        if self.num_processes % n:
            per = max(1, self.num_processes // n)
            raise ValueError(
                f"{self._say('num_processes')} is the total over all "
                f"{self._say('num_machines')} (Accelerate's meaning) and must be a multiple of "
                f"it: for {per} process(es) per machine set num_processes {per * n}"
            )
        if self.main_process_port == 0:
            raise ValueError(
                f"{self._say('main_process_port')} (pick a free port) works on one machine "
                "only: every machine must be given the same port of machine 0; set a fixed "
                "main_process_port"
            )

    def _say(self, key: str) -> str:
        """``key=value (source)``, for messages."""
        return f"{key}={getattr(self, key)} ({self.sources.get(key, 'default')})"

    @property
    def processes_per_machine(self) -> int | None:
        """Local ranks each machine starts (None when num_processes was not given)."""
        if self.num_processes is None:
            return None
        return max(1, self.num_processes // self.num_machines)

    def describe(self) -> str:
        """The settings that fix the job's size, grouped by source, for error messages."""
        keys = ["num_processes", "num_machines"]
        if self.num_machines > 1:
            keys += ["machine_rank", "main_process_ip", "main_process_port", "rdzv_backend"]
        by_source: dict[str, list[str]] = {}
        for key in keys:
            source = self.sources.get(key, "default")
            by_source.setdefault(source, []).append(f"{key}={getattr(self, key)}")
        return "; ".join(f"{', '.join(items)} ({source})" for source, items in by_source.items())

    def to_env(self) -> str:
        """The ``$ACCEL_ZERO_LAUNCH_LAYOUT`` value."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls, value: str) -> LaunchLayout:
        """Parse ``$ACCEL_ZERO_LAUNCH_LAYOUT`` (written by :meth:`to_env`)."""
        try:
            data = json.loads(value)
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"${LAUNCH_LAYOUT_ENV}={value!r} is not a launch layout ({exc}); it is set by "
                f"accel-zero launch: unset it if it leaked from another job"
            ) from exc


def _as_int(key: str, value: Any, source: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} ({source}) must be an integer") from None


def resolve_layout(
    args: argparse.Namespace, accelerate: Mapping[str, Any], *, config_source: str
) -> LaunchLayout:
    """The layout from the CLI flags, else the config keys, else Accelerate's defaults.

    The flag wins over the key, as in ``accelerate launch``. ``rdzv_backend`` and
    ``same_network`` are the exception there (their parser defaults are not None, so
    Accelerate never reads the keys); here the key counts unless the flag was given
    (see :func:`configure_launch_parser`).
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in ("num_processes", "num_machines", "machine_rank", "main_process_port"):
        cli = getattr(args, key, None)
        if cli is not None:
            values[key], sources[key] = _as_int(key, cli, f"--{key}"), f"--{key}"
        elif accelerate.get(key) is not None:
            source = f"{config_source}: {key}"
            values[key], sources[key] = _as_int(key, accelerate[key], source), source
    if args.main_process_ip is not None:
        values["main_process_ip"] = str(args.main_process_ip)
        sources["main_process_ip"] = "--main_process_ip"
    elif accelerate.get("main_process_ip") is not None:
        values["main_process_ip"] = str(accelerate["main_process_ip"])
        sources["main_process_ip"] = f"{config_source}: main_process_ip"
    if getattr(args, "rdzv_backend", None) is not None:
        values["rdzv_backend"], sources["rdzv_backend"] = args.rdzv_backend, "--rdzv_backend"
    elif accelerate.get("rdzv_backend") is not None:
        values["rdzv_backend"] = str(accelerate["rdzv_backend"])
        sources["rdzv_backend"] = f"{config_source}: rdzv_backend"
    return LaunchLayout(**values, sources=sources)


def configure_launch_parser(parser: argparse.ArgumentParser) -> None:
    """Let the config file's ``rdzv_backend``/``same_network`` count unless the flag is given.

    Accelerate's parser defaults them to ``"static"``/``False``, so ``accelerate launch``
    can never tell the flag from its absence and ignores the keys; with None defaults
    :func:`prepare_launch` applies flag > key > Accelerate's default.
    """
    parser.set_defaults(rdzv_backend=None, same_network=None)


def _wants_cpu_torchrun(
    args: argparse.Namespace, accelerate: Mapping[str, Any], layout: LaunchLayout
) -> bool:
    """MULTI_CPU (or --cpu) with several processes or machines and no mpirun hostfile."""
    distributed_type = str(accelerate.get("distributed_type", "")).upper()
    cpu = (
        distributed_type in _CPU_TYPES
        or bool(args.cpu)
        or bool(getattr(args, "use_cpu", False))
        or bool(accelerate.get("use_cpu", False))
    )
    hostfile = args.mpirun_hostfile or accelerate.get("mpirun_hostfile")
    multi_flags = args.multi_gpu or args.use_deepspeed or args.use_fsdp or args.tpu
    several = (layout.num_processes or 1) > 1 or layout.num_machines > 1
    return cpu and several and not hostfile and not multi_flags


def prepare_launch(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """Rewrite ``args`` for Accelerate in place; return the environment every rank must see.

    Reads ``args.config_file`` (else Accelerate's default config file, if any), strips
    and validates the ``zero_config`` block, writes the remainder to
    ``workdir/accelerate_config.yaml`` and points ``args.config_file`` at it. Checks the
    machines x processes layout and puts it in ``$ACCEL_ZERO_LAUNCH_LAYOUT``.
    Raises ValueError/TypeError naming the key on a bad block or layout.
    """
    import yaml
    from accelerate.commands.config import default_config_file

    env: dict[str, str] = {}
    accelerate: dict[str, Any] = {}
    config_source = "config file"
    if args.config_file is None and not args.cpu and os.path.isfile(default_config_file):
        args.config_file = default_config_file  # what `accelerate launch` would read
    if args.config_file is not None:
        path = Path(args.config_file)
        if not path.is_file():
            raise ValueError(f"--config_file {path} does not exist")
        config_source = str(path)
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise TypeError(f"--config_file {path} must hold a mapping, got {type(data).__name__}")
        split = split_launch_config(data, source=str(path))
        accelerate = split.accelerate
        if split.zero_config is not None:
            env[LAUNCH_CONFIG_ENV] = launch_env_value(split.zero_config)

    # Cloud launchers (SageMaker) start the machines themselves, from keys of their own.
    local = str(accelerate.get("compute_environment", "LOCAL_MACHINE")) == "LOCAL_MACHINE"
    layout = (
        resolve_layout(args, accelerate, config_source=config_source) if local else LaunchLayout()
    )
    cpu_torchrun = _wants_cpu_torchrun(args, accelerate, layout)
    if args.config_file is not None:
        if cpu_torchrun:
            accelerate.pop("gpu_ids", None)  # GPU ids mean nothing to CPU ranks
        stripped = workdir / "accelerate_config.yaml"
        stripped.write_text(yaml.safe_dump(accelerate, sort_keys=False), encoding="utf-8")
        args.config_file = str(stripped)
    if LAUNCH_CONFIG_ENV not in env:
        env[LAUNCH_CONFIG_ENV] = ""  # a stale value from an outer launch must not leak in
    # Without num_processes Accelerate counts devices itself: nothing to hold the ranks to.
    held = local and layout.num_processes is not None
    env[LAUNCH_LAYOUT_ENV] = layout.to_env() if held else ""
    # Accelerate reads these two keys never (see configure_launch_parser); apply them.
    args.rdzv_backend = layout.rdzv_backend if local else args.rdzv_backend or _RDZV_DEFAULT
    if getattr(args, "same_network", None) is None:
        args.same_network = bool(accelerate.get("same_network", False))

    if cpu_torchrun:
        # See the module docstring: torchrun ranks on every machine instead of mpirun.
        args.multi_gpu = True
        args.cpu = False
        args.use_cpu = True
        env["ACCELERATE_USE_CPU"] = "true"
        if "OMP_NUM_THREADS" not in os.environ:
            import psutil

            local_ranks = layout.processes_per_machine or 1
            cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
            env["OMP_NUM_THREADS"] = str(max(1, cores // local_ranks))
    # The host allocator's profile from each rank's start, so it also covers what a script
    # allocates before Accelerator() (a no-op by default; see accel_zero/host_memory.py).
    from accel_zero.host_memory import allocator_env

    env.update(allocator_env())
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
        except ConnectionError as exc:
            # Accelerate's port check on machine 0: its message names the port and the fix.
            print(f"accel-zero launch: {exc}", file=sys.stderr)
            return 1
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
    configure_launch_parser(parser)
    return run_launch(parser.parse_args(argv))


# ------------------------------------------------------- the rank-side check
class LaunchMismatchError(ValueError):
    """This process joined a job of another size than its launch asked for."""


@dataclass(frozen=True, kw_only=True)
class LaunchRequest:
    """One launcher's word, read from the environment, on how many ranks the job has."""

    launcher: str
    """Who said so, e.g. ``accel-zero launch``, ``torchrun``, ``mpirun``."""
    world_size: int | None
    """Ranks asked for; None: more than one, count unknown."""
    settings: str
    """The variables / keys that said so, with their values."""
    fix: str
    """What to change when this process is not in a job of that size."""


def _env_int(environ: Mapping[str, str], key: str) -> int | None:
    value = environ.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchMismatchError(
            f"${key}={value!r} is not an integer: it is set by the launcher (torchrun, "
            "mpirun, accelerate launch); unset it or fix the launch"
        ) from None


def _shown(environ: Mapping[str, str], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{key}={environ[key]}" for key in keys if environ.get(key))


def launch_requests(environ: Mapping[str, str] | None = None) -> list[LaunchRequest]:
    """What the launchers that started this process asked for, read from its environment.

    - ``accel-zero launch``: ``$ACCEL_ZERO_LAUNCH_LAYOUT`` (num_processes over num_machines).
    - torchrun (also Accelerate's multi-GPU/CPU route, and any ``env://`` set-up):
      ``WORLD_SIZE`` (with RANK, LOCAL_WORLD_SIZE, GROUP_WORLD_SIZE = machines).
    - mpirun: ``PMI_SIZE`` (MPICH, Intel MPI), ``OMPI_COMM_WORLD_SIZE`` (Open MPI),
      ``MV2_COMM_WORLD_SIZE`` (MVAPICH).
    - ``accelerate launch``'s simple launcher (one process, expecting mpirun to start the
      rest for MULTI_CPU): it sets ``MASTER_ADDR``/``MASTER_PORT`` only for a config of
      several processes or machines, so those with ``ACCELERATE_DYNAMO_BACKEND`` (set by
      every Accelerate launch) and no rank variable at all mean "more than one, not
      started". Skipped under ``accel-zero launch``, whose layout says exactly.
    """
    env = os.environ if environ is None else environ
    requests: list[LaunchRequest] = []
    layout_value = env.get(LAUNCH_LAYOUT_ENV)
    layout = LaunchLayout.from_env(layout_value) if layout_value else None
    if layout is not None and layout.num_processes is not None:
        requests.append(
            LaunchRequest(
                launcher="accel-zero launch",
                world_size=layout.num_processes,
                settings=f"{layout.describe()} (${LAUNCH_LAYOUT_ENV})",
                fix=(
                    "run the same `accel-zero launch` command on each of the "
                    f"{layout.num_machines} machine(s), each with its own --machine_rank "
                    "(0 on the machine at main_process_ip); num_processes counts the "
                    "processes of all machines together"
                ),
            )
        )
    world = _env_int(env, "WORLD_SIZE")
    if world is not None:
        requests.append(
            LaunchRequest(
                launcher="torchrun / env://",
                world_size=world,
                settings=_shown(env, _TORCHRUN_KEYS),
                fix=(
                    "let accel_zero.Accelerator() create the process group from these "
                    "variables (do not pass cpu=False on a machine without a GPU), or create "
                    "it yourself with torch.distributed.init_process_group() (env://) before "
                    "Accelerator()"
                ),
            )
        )
    for key in _MPI_SIZE_KEYS:
        size = _env_int(env, key)
        if size is not None:
            requests.append(
                LaunchRequest(
                    launcher="mpirun",
                    world_size=size,
                    settings=_shown(env, (key, *_MPI_RANK_KEYS)),
                    fix=(
                        "Accelerate joins MPI ranks only on CPU (MULTI_CPU): set use_cpu: "
                        "true / --cpu, or start the ranks with `accel-zero launch` instead"
                    ),
                )
            )
            break  # one MPI library's word is enough
    rank_keys = (*_TORCHRUN_KEYS, *_MPI_SIZE_KEYS, *_MPI_RANK_KEYS)
    if (
        layout is None
        and env.get(_ACCELERATE_LAUNCH_MARKER) is not None
        and env.get("MASTER_ADDR")
        and not any(env.get(key) for key in rank_keys)
    ):
        requests.append(
            LaunchRequest(
                launcher="accelerate launch (simple launcher)",
                world_size=None,
                settings=(
                    f"{_shown(env, ('MASTER_ADDR', 'MASTER_PORT'))} with "
                    f"{_ACCELERATE_LAUNCH_MARKER} set and no RANK/WORLD_SIZE/"
                    f"{'/'.join(_MPI_SIZE_KEYS)}"
                ),
                fix=(
                    "Accelerate's simple launcher starts one process and, for MULTI_CPU with "
                    "several processes or machines, expects mpirun to start the rest: use "
                    "`accel-zero launch` (it starts the ranks with torchrun on every machine), "
                    "or mpirun (mpirun_hostfile), or torchrun. If one process is meant and "
                    "MASTER_ADDR comes from your shell, unset MASTER_ADDR"
                ),
            )
        )
    return requests


def check_launch_environment(
    *, world_size: int, rank: int = 0, environ: Mapping[str, str] | None = None
) -> None:
    """Refuse to run in a job of another size than the launch asked for.

    ``world_size``/``rank``: the job this process actually joined (the process group's
    size, 1 when there is none). Raises :class:`LaunchMismatchError` naming every
    launcher setting that disagrees and the fix, so a launch that asked for several
    ranks never trains as independent single processes.
    """
    wrong = [
        request
        for request in launch_requests(environ)
        if (request.world_size is None and world_size == 1)
        or (request.world_size is not None and request.world_size != world_size)
    ]
    if not wrong:
        return
    joined = (
        "no process group (one process alone)"
        if world_size == 1
        else f"a process group of {world_size} ranks"
    )
    lines = [
        f"accel_zero: rank {rank} is in {joined}, but its launch asked for more"
        if all(r.world_size is None or r.world_size > world_size for r in wrong)
        else f"accel_zero: rank {rank} is in {joined}, which is not what its launch asked for"
    ]
    for request in wrong:
        size = "several" if request.world_size is None else str(request.world_size)
        lines.append(
            f"  - {request.launcher} asked for {size} ranks: {request.settings}. "
            f"Fix: {request.fix}."
        )
    raise LaunchMismatchError("\n".join(lines))


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
