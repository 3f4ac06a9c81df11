"""``accel-zero memory-plot``: draw a memory timeline as a PNG (DESIGN D12).

The timeline is the JSON that :meth:`accel_zero.tracer.MemoryTracer.save_timeline`
writes (see [Note: memory timeline] in tracer.py). One panel per device the tracer
counted, the host first: the tracer's bytes stacked by kind (parameter shards, gathered
parameters, gradients, optimizer state) and, on the host, stacked on the RSS of the first
sample, with the process's RSS as a line over them, so the gap between the stack and the
line is what grew without the tracer knowing. A sample is what was held when its event
happened, so it is drawn over the stretch that ends at it, and each stretch is shaded by
the phase event that ends it (``prepare``, ``forward``, ``backward``, ``step``, ...).
Per-unit events (:data:`UNIT_EVENTS`: gathers, releases, reductions) add samples but no
shading, so a run that marks every unit stays readable.

    accel-zero memory-plot timeline.json -o timeline.png
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from accel_zero.tracer import TimelineSample

# accel_zero.tracer (hence torch) is imported where it is used, so that building the
# ``accel-zero`` parser, which imports this module for its options, stays fast.

__all__ = ["UNIT_EVENTS", "add_arguments", "main", "plot_timeline", "plot_timeline_file"]

UNIT_EVENTS = frozenset(
    {"gather", "gathered", "prefetch", "release", "reduce", "reduced", "unit", "fetch"}
)
"""Events marked per unit: sampled and drawn, but they do not start a shaded phase."""

_MiB = 2**20
_KIND_STYLE = {  # kind -> (legend label, colour)
    "params": ("parameter shards", "#4c72b0"),
    "optimizer_state": ("optimizer state", "#dd8452"),
    "grads": ("gradient shards", "#55a868"),
    "gathered_params": ("gathered parameters", "#c44e52"),
}
_BASE_COLOUR = "#bdbdbd"
_PHASE_COLOURS = (  # light, distinct backgrounds (phase order of first appearance)
    "#fde9c9",
    "#d6eaf8",
    "#e8daef",
    "#d5f5e3",
    "#fadbd8",
    "#fcf3cf",
    "#d0ece7",
    "#f5e1f0",
    "#e5e8c9",
    "#dfe4f7",
    "#f9d9c6",
    "#cfe8dc",
)


def _devices(samples: Sequence[TimelineSample]) -> list[str]:
    from accel_zero.tracer import HOST_DEVICE

    found = {dev for s in samples for dev in s.bytes}
    rest = sorted(found - {HOST_DEVICE})
    return [HOST_DEVICE, *rest]


def _phases(samples: Sequence[TimelineSample]) -> list[tuple[float, float, str]]:
    """(start, end, event) for every phase sample: the stretch since the previous one."""
    spans = []
    start = samples[0].t if samples else 0.0
    for s in samples:
        if s.event in UNIT_EVENTS:
            continue
        if s.t > start:
            spans.append((start, s.t, s.event))
        start = s.t
    return spans


def plot_timeline(
    samples: Sequence[TimelineSample],
    out: str | os.PathLike[str],
    *,
    title: str = "",
    x: Literal["time", "sample"] = "sample",
    dpi: int = 110,
) -> Path:
    """Draw ``samples`` to the PNG ``out``; returns its path.

    ``x="sample"`` (default) spaces samples evenly, which spreads out the per-unit
    events of a fast phase; ``x="time"`` places them at their time.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "accel-zero memory-plot needs matplotlib: pip install matplotlib==3.11.2 "
            "(scripts/setup.sh installs it)"
        ) from exc
    if not samples:
        raise ValueError(
            "the memory timeline has no samples: record with ACCEL_ZERO_MEMORY_TIMELINE=1 "
            "(or tracer.record_timeline()) before the run"
        )
    from accel_zero.tracer import HOST_DEVICE, KINDS, TimelineSample

    out = Path(out)
    devices = _devices(samples)
    # Pure-Figure API (no pyplot): no global state, safe in a training process.
    fig = Figure(figsize=(13, 4.4 * len(devices) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(devices), 1, sharex=True, squeeze=False)[:, 0]
    if x == "sample":
        xs = [float(i) for i in range(len(samples))]
        by_x = [TimelineSample(**{**vars(s), "t": xs[i]}) for i, s in enumerate(samples)]
    else:
        xs = [s.t for s in samples]
        by_x = list(samples)
    phases = _phases(by_x)
    phase_names = list(dict.fromkeys(name for _, _, name in phases))
    phase_colour = {
        name: _PHASE_COLOURS[i % len(_PHASE_COLOURS)] for i, name in enumerate(phase_names)
    }
    host_rss = [s.rss_bytes / _MiB for s in samples]
    has_rss = any(host_rss)
    # The host panel stacks the tracer's bytes on the RSS of the first sample (interpreter,
    # libraries, whatever the process held before), so the gap between the stack and the
    # RSS line is exactly what grew without the tracer knowing.
    base_rss = host_rss[0] if has_rss else 0.0
    for ax, dev in zip(axes, devices, strict=True):
        for start, end, name in phases:
            ax.axvspan(start, end, color=phase_colour[name], linewidth=0, zorder=0)
        kinds = [k for k in KINDS if any(s.bytes.get(dev, {}).get(k, 0) for s in samples)]
        layers = [[s.bytes.get(dev, {}).get(k, 0) / _MiB for s in samples] for k in kinds]
        labels = [f"tracer: {_KIND_STYLE[k][0]}" for k in kinds]
        colours = [_KIND_STYLE[k][1] for k in kinds]
        host = dev == HOST_DEVICE and has_rss
        if host:
            layers.insert(0, [base_rss] * len(samples))
            labels.insert(0, "RSS at the first sample")
            colours.insert(0, _BASE_COLOUR)
        handles: list[Any] = []
        if layers:
            handles.extend(
                ax.stackplot(
                    xs, layers, colors=colours, labels=labels, step="pre", alpha=0.9, zorder=2
                )
            )
        tracked = [sum(s.bytes.get(dev, {}).values()) / _MiB for s in samples]
        if host:
            (line,) = ax.plot(
                xs,
                host_rss,
                drawstyle="steps-pre",
                color="black",
                linewidth=1.6,
                label="process RSS",
                zorder=3,
            )
            handles.append(line)
            peak_i = max(range(len(host_rss)), key=host_rss.__getitem__)
            ax.annotate(
                f"peak {host_rss[peak_i]:.0f} MiB ({samples[peak_i].event})",
                (xs[peak_i], host_rss[peak_i]),
                xytext=(0, 5),
                textcoords="offset points",
                ha="center",
                fontsize=9,
            )
            grown = host_rss[-1] - base_rss
            ax.annotate(
                f"at the end: RSS {host_rss[-1]:.0f} MiB = {base_rss:.0f} at start "
                f"+ {tracked[-1]:.0f} tracer + {grown - tracked[-1]:.0f} untracked",
                xy=(0.0, 1.0),
                xycoords="axes fraction",
                xytext=(6, -6),
                textcoords="offset points",
                ha="left",
                va="top",
                fontsize=9,
                zorder=5,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9},
            )
            ax.set_ylim(0, max(host_rss) * 1.15)
        ax.set_ylabel(f"{dev}: MiB")
        ax.grid(axis="y", alpha=0.3, zorder=1)
        phase_handles = [
            Patch(facecolor=phase_colour[name], label=f"phase: {name}") for name in phase_names
        ]
        ax.legend(
            handles=handles[::-1] + phase_handles,
            loc="upper left",
            bbox_to_anchor=(1.005, 1.0),
            fontsize=8,
            frameon=False,
        )
    if x == "sample":
        from matplotlib.ticker import MaxNLocator

        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel(
        "samples (evenly spaced)" if x == "sample" else "seconds since the tracer started"
    )
    axes[0].set_title(title or "accel_zero memory timeline", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def plot_timeline_file(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    title: str = "",
    x: Literal["time", "sample"] = "sample",
) -> Path:
    """Draw the timeline JSON at ``path`` (default output: the same name, ``.png``)."""
    from accel_zero.tracer import load_timeline

    meta, samples = load_timeline(path)
    if not title:
        parts = [str(meta["run"])] if meta.get("run") else []
        if "rank" in meta:
            parts.append(
                f"rank {meta['rank']}"
                + (f" of {meta['world_size']}" if "world_size" in meta else "")
            )
        title = ", ".join(parts)
    return plot_timeline(
        samples, Path(out) if out else Path(path).with_suffix(".png"), title=title, x=x
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``accel-zero memory-plot`` options."""
    parser.add_argument("timeline", help="Timeline JSON (MemoryTracer.save_timeline).")
    parser.add_argument(
        "-o", "--output", help="PNG to write (default: the timeline's name with .png)."
    )
    parser.add_argument("--title", default="", help="Title (default: from the timeline's meta).")
    parser.add_argument(
        "--x",
        choices=("time", "sample"),
        default="sample",
        help="x axis: samples evenly spaced (default: spreads out per-unit events) or seconds.",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``accel-zero memory-plot``; prints the PNG's path and returns 0."""
    try:
        png = plot_timeline_file(args.timeline, args.output, title=args.title, x=args.x)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"accel-zero memory-plot: {exc}") from exc
    print(png)
    return 0
