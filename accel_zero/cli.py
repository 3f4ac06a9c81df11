"""The ``accel-zero`` command: ``launch`` | ``env`` | ``estimate`` | ``export``.

``accel-zero launch`` takes exactly the ``accelerate launch`` arguments (see
``accel_zero.launch``); ``accel-zero env`` reports which compiled kernels and devices
are usable; ``accel-zero estimate`` prints per-rank model-state memory for every
ZeRO stage and offload setting (see ``accel_zero.estimator``); ``accel-zero export``
turns a sharded ``save_state`` checkpoint into consolidated safetensors that
``from_pretrained`` loads (see ``accel_zero.checkpoint.consolidate``); ``accel-zero
memory-plot`` draws a memory timeline as a PNG (see ``accel_zero.memory_plot``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _env(args: argparse.Namespace) -> int:
    try:
        from accel_zero import env_report
    except ImportError as exc:
        print(
            f"accel-zero env: the environment report is not available in this install ({exc})",
            file=sys.stderr,
        )
        return 1
    result = env_report.main(["--build"] if args.build else [])
    return int(result) if isinstance(result, int) else 0


def _estimate(args: argparse.Namespace) -> int:
    from accel_zero import estimator

    return estimator.main(args)


def _export(args: argparse.Namespace) -> int:
    from accel_zero.checkpoint import consolidate

    return consolidate.main(args)


def _memory_plot(args: argparse.Namespace) -> int:
    from accel_zero import memory_plot

    return memory_plot.main(args)


def _launch(args: argparse.Namespace) -> int:
    from accel_zero.launch import run_launch

    return run_launch(args)


def build_parser() -> argparse.ArgumentParser:
    """The full ``accel-zero`` parser (``launch`` is Accelerate's own launch parser)."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.commands.utils import CustomArgumentParser

    from accel_zero.checkpoint.consolidate import add_arguments as add_export_arguments
    from accel_zero.estimator import add_arguments as add_estimate_arguments
    from accel_zero.launch import configure_launch_parser

    parser = CustomArgumentParser(
        "accel-zero",
        description="ZeRO-3 / ZeRO-Infinity training backend for Hugging Face Accelerate.",
        allow_abbrev=False,
    )
    subparsers = parser.add_subparsers(
        title="commands", metavar="{launch,env,estimate,export,memory-plot}"
    )
    launch = launch_command_parser(subparsers)
    configure_launch_parser(launch)
    launch.description = (
        "Run a script like `accelerate launch`, with a `zero_config:` block allowed in "
        "--config_file. " + (launch.description or "")
    )
    launch.set_defaults(func=_launch)

    env = subparsers.add_parser("env", help="Report usable kernels, devices and versions.")
    env.add_argument(
        "--build", action="store_true", help="Build every buildable kernel first (JIT)."
    )
    env.set_defaults(func=_env)

    estimate = subparsers.add_parser(
        "estimate",
        help="Per-rank model-state memory for ZeRO stages 1/2/3 and each offload setting.",
        description="Per-rank model-state bytes (params, grads, optimizer state) following "
        "the ZeRO paper's accounting, for a model given as a Hugging Face config (built on "
        "the meta device, no weights) or as a parameter count.",
    )
    add_estimate_arguments(estimate)
    estimate.set_defaults(func=_estimate)

    export = subparsers.add_parser(
        "export",
        help="Turn a sharded save_state checkpoint into a from_pretrained folder.",
        description="Reassemble the model weights of a checkpoint written by save_state (on any "
        "number of ranks) into consolidated safetensors with the model's config, one tensor at "
        "a time, in one process.",
    )
    add_export_arguments(export)
    export.set_defaults(func=_export)

    from accel_zero.memory_plot import add_arguments as add_plot_arguments

    plot = subparsers.add_parser(
        "memory-plot",
        help="Draw a memory timeline (JSON) as a PNG.",
        description="Stack the tracer's bytes per kind (parameters, gathered parameters, "
        "gradients, optimizer state) under the process's RSS, with the phases shaded, from a "
        "timeline written by accelerator.save_memory_timeline(path).",
    )
    add_plot_arguments(plot)
    plot.set_defaults(func=_memory_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
