"""The main job next to DDP: the README's recipe under accel_zero ZeRO-3 and under DDP.

Both are the real ``accel-zero launch`` of recipes/finetune_clm.py with the main job's YAML
(recipes/configs/zero3_cpu.yaml: 2 CPU ranks, bf16), the same seed, data and loop; the
reference adds ``--reference_ddp`` (the recipe then builds Accelerate's own
``Accelerator``, which wraps the whole model in DDP, and loads it with plain
``from_pretrained``). Runs alternate over ``--repeats`` so a noisy minute on a shared
machine hits both alike; every run is a fresh launch, so peak RSS is its own.

    python scripts/bench_main_job.py                     # 20 steps, 2 repeats (~8 min)
    python scripts/bench_main_job.py --steps 60 --repeats 1

Printed per run and summarised per engine (median over repeats; minima of s/step too):
``s/step`` = the recipe's own figure (training loop wall time / steps, the first step's
trace recording included); ``peak RSS`` = each rank's VmHWM (``ru_maxrss``) printed by the
recipe at the end (loading, prepare, generate and training included); the final logged
loss; for accel_zero the coordinator's prefetch hits and misses and the seconds rank 0
waited on communication (``zero_stats()``), as a share of the training loop's time.
Targets (issue 8): peak RSS at most 0.70x DDP's, step time at most 1.05x.
"""

from __future__ import annotations

import argparse
import ast
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "recipes/configs/zero3_cpu.yaml"
RECIPE = REPO / "recipes/finetune_clm.py"
ENGINES = {"ddp": "DDP (accelerate.Accelerator)", "zero3": "accel_zero ZeRO-3"}


def run_once(engine: str, steps: int, timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "accel_zero.cli", "launch", "--config_file", str(CONFIG),
        str(RECIPE), "--max_steps", str(steps), "--no_save",
    ]  # fmt: skip
    if engine == "ddp":
        cmd.append("--reference_ddp")
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    wall = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-30:])
        raise RuntimeError(f"{engine}: launch exited {proc.returncode}:\n{tail}")
    trained = re.search(r"trained (\d+) steps .* in ([\d.]+) s, ([\d.]+) s/step", out)
    peaks = [float(m) for m in re.findall(r"peak RSS of this process: (\d+) MiB", out)]
    losses = re.findall(r"step \d+/\d+ loss ([\d.]+)", out)
    if trained is None or not peaks or not losses:
        raise RuntimeError(f"{engine}: could not read the recipe's output:\n{out[-3000:]}")
    row: dict[str, Any] = {
        "loop_s": float(trained.group(2)),
        "s_step": float(trained.group(3)),
        "peak_rss": peaks,
        "loss": float(losses[-1]),
        "wall": wall,
    }
    stats = re.search(r"zero stats \(rank 0\): (\{.*\})", out)
    if stats is not None:
        z = ast.literal_eval(stats.group(1))
        row["hits"] = z["prefetch_hits"]
        row["misses"] = z["prefetch_misses"]
        row["wait"] = z["comm_wait_seconds"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    args = p.parse_args(argv)

    rows: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    for repeat in range(args.repeats):
        order = list(ENGINES) if repeat % 2 == 0 else list(reversed(ENGINES))
        for engine in order:
            r = run_once(engine, args.steps, args.timeout)
            rows[engine].append(r)
            extra = (
                f", prefetch {r['hits']} hits / {r['misses']} misses, comm wait "
                f"{r['wait']:.1f} s ({100 * r['wait'] / r['loop_s']:.1f}% of the loop)"
                if "hits" in r
                else ""
            )
            peaks = "/".join(f"{x:.0f}" for x in r["peak_rss"])
            print(
                f"  {engine} repeat {repeat + 1}: {r['s_step']:.2f} s/step, peak RSS {peaks} "
                f"MiB, final loss {r['loss']:.4f}, wall {r['wall']:.0f} s{extra}",
                flush=True,
            )

    def med(engine: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[engine])

    def peak(engine: str) -> float:
        return statistics.median(max(r["peak_rss"]) for r in rows[engine])

    print()
    print(f"main job, {args.steps} steps, {args.repeats} repeats (medians; min s/step)")
    head = f"{'engine':<30} {'s/step':>7} {'min':>6} {'x DDP':>6} {'peak RSS MiB':>13} {'x DDP':>6}"
    print(head + f" {'final loss':>10}")
    print("-" * (len(head) + 11))
    for engine, name in ENGINES.items():
        s = med(engine, "s_step")
        lo = min(r["s_step"] for r in rows[engine])
        print(
            f"{name:<30} {s:>7.2f} {lo:>6.2f} {s / med('ddp', 's_step'):>6.3f} "
            f"{peak(engine):>13.0f} {peak(engine) / peak('ddp'):>6.3f} {med(engine, 'loss'):>10.4f}"
        )
    z = rows["zero3"]
    hits, misses = (
        statistics.median(r["hits"] for r in z),
        statistics.median(r["misses"] for r in z),
    )
    share = statistics.median(r["wait"] / r["loop_s"] for r in z)
    print(
        f"accel_zero prefetch: {hits:.0f} hits, {misses:.0f} misses "
        f"({100 * hits / max(hits + misses, 1):.1f}% hits); rank 0 waited on communication "
        f"{100 * share:.1f}% of the loop"
    )
    step_ratio = med("zero3", "s_step") / med("ddp", "s_step")
    rss_ratio = peak("zero3") / peak("ddp")
    for what, ratio, limit in (("step time", step_ratio, 1.05), ("peak RSS", rss_ratio, 0.70)):
        verdict = "met" if ratio <= limit else "NOT met"
        print(f"target {what} <= {limit:.2f}x DDP: {ratio:.3f}x -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
