"""CPU Adam step on 50M fp32 parameters: accel_zero CPUAdam vs torch AdamW vs DeepSpeed.

    python scripts/bench_adam.py [--numel 50000000] [--reps 9] [--threads 1 2]

One table: per thread count and method, median and minimum step time over
interleaved repetitions (every method once per round, so a noisy neighbour on
this shared machine hits all of them alike), effective bandwidth, and ratios
measured in the same run:

* ``bound``: a plain memory-bound pass over exactly Adam's bytes (4 fp32 arrays
  read, 3 written: 28 B/param; +2 B with the bf16 copy-out), same threads;
* ``vs fused``: time / torch fused AdamW (with the bf16 copy: / fused + a
  separate ``copy_`` to bf16);
* ``% bound``: bound time / method time (100% = at memory bandwidth).

DeepSpeed's CPUAdam is compiled from its sources (``pip install --no-deps
--target ~/.cache/accel_zero/deepspeed deepspeed``, never touching torch) with
its own builder's flags; when that is impossible its rows say n/a and why.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from accel_zero import ops
from accel_zero.cpu_adam import CPUAdam

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def load_deepspeed_cpu_adam(target: Path) -> tuple[object | None, str]:
    """DeepSpeed's cpu_adam op built from its own sources, or (None, why)."""
    if not (target / "deepspeed").is_dir():
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
               "--target", str(target), "deepspeed"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            return None, f"pip install deepspeed failed: {r.stderr.strip().splitlines()[-1:]}"
    csrc = target / "deepspeed" / "ops" / "csrc"
    sources = [csrc / "adam" / "cpu_adam.cpp", csrc / "adam" / "cpu_adam_impl.cpp"]
    if not all(s.is_file() for s in sources):
        return None, f"DeepSpeed sources not found under {csrc}"
    flags = open("/proc/cpuinfo", encoding="utf-8").read()
    simd = "-D__AVX512__" if "avx512" in flags else "-D__AVX256__"
    # The flags of deepspeed/ops/op_builder/cpu/builder.py (CPUOpBuilder.cxx_args).
    cflags = ["-O3", "-g", "-Wno-reorder", "-march=native", "-fopenmp", simd]
    from torch.utils import cpp_extension

    build_dir = target / "build_cpu_adam"
    build_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    try:
        module = cpp_extension.load(
            name="ds_cpu_adam_ref",
            sources=[str(s) for s in sources],
            extra_include_paths=[str(csrc / "includes")],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    except Exception as e:
        return None, f"build failed: {str(e).splitlines()[0]}"
    print(f"# DeepSpeed cpu_adam loaded in {time.perf_counter() - t0:.1f} s (cached after once)")
    return module, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=50_000_000)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--deepspeed-dir", type=Path, default=Path.home() / ".cache/accel_zero/deepspeed"
    )
    parser.add_argument("--no-deepspeed", action="store_true")
    args = parser.parse_args()
    n = args.numel

    kernel = ops.load_op("cpu_adam")
    if kernel is None:
        sys.exit("the cpu_adam kernel is not available here (see `accel-zero env`)")
    ds, ds_why = (
        (None, "--no-deepspeed")
        if args.no_deepspeed
        else load_deepspeed_cpu_adam(args.deepspeed_dir)
    )

    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(n, generator=gen)

    def param() -> torch.Tensor:
        return torch.randn(n, generator=gen).requires_grad_()

    def with_grad(p: torch.Tensor) -> torch.Tensor:
        p.grad = grad
        return p

    # One set of weights and state per method, so every method runs on warm, owned memory.
    ours_p = with_grad(param())
    ours = CPUAdam([ours_p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    ours_c_p = with_grad(param())
    ours_c = CPUAdam([ours_c_p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    copy_ours = torch.empty(n, dtype=torch.bfloat16)
    torch_opts = {}
    for mode in ("for-loop", "foreach", "fused"):
        kw = {"foreach": mode == "foreach", "fused": mode == "fused"}
        if mode == "for-loop":
            kw["foreach"] = False
        p = with_grad(param())
        torch_opts[mode] = torch.optim.AdamW(
            [p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw
        )
    fused_c_p = with_grad(param())
    fused_c = torch.optim.AdamW(
        [fused_c_p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True
    )
    copy_torch = torch.empty(n, dtype=torch.bfloat16)
    probe = [torch.randn(n, generator=gen) for _ in range(3)]
    probe_copy = torch.empty(n, dtype=torch.bfloat16)
    ds_state = None
    if ds is not None:
        ds.create_adam(0, LR, BETAS[0], BETAS[1], EPS, WD, True, False)
        ds_state = [param().detach(), torch.zeros(n), torch.zeros(n), [0]]

    def ds_step() -> None:
        assert ds is not None and ds_state is not None
        ds_state[3][0] += 1
        ds.adam_update(0, ds_state[3][0], LR, BETAS[0], BETAS[1], EPS, WD, True,
                       ds_state[0], grad, ds_state[1], ds_state[2])  # fmt: skip

    def fused_then_copy() -> None:
        fused_c.step()
        copy_torch.copy_(fused_c_p.detach())

    threads_now = [1]

    def bound(copy: bool) -> Callable[[], None]:
        return lambda: kernel.bandwidth_probe(
            probe[0].data_ptr(), grad.data_ptr(), probe[1].data_ptr(), probe[2].data_ptr(),
            probe_copy.data_ptr() if copy else 0, n, threads_now[0], "",
        )  # fmt: skip

    methods: dict[str, tuple[Callable[[], None] | None, int]] = {
        "bound (28 B/param)": (bound(False), 28),
        "accel_zero CPUAdam": (ours.step, 28),
        "torch AdamW for-loop": (torch_opts["for-loop"].step, 28),
        "torch AdamW foreach": (torch_opts["foreach"].step, 28),
        "torch AdamW fused": (torch_opts["fused"].step, 28),
        "DeepSpeed CPUAdam": (ds_step if ds is not None else None, 28),
        "bound + bf16 (30 B)": (bound(True), 30),
        "accel_zero + bf16 copy": (lambda: ours_c.step(copy_to=[copy_ours]), 30),
        "torch fused + bf16 copy": (fused_then_copy, 30),
    }

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, numel {n:,}, reps {args.reps} (interleaved), "
          f"cpu_adam ISA {kernel.best_isa()}")  # fmt: skip
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        threads_now[0] = threads
        ours.threads = ours_c.threads = threads
        times: dict[str, list[float]] = {k: [] for k, (fn, _) in methods.items() if fn}
        for rep in range(args.reps + 1):  # round 0 warms up (first-touch of the state)
            for name, (fn, _) in methods.items():
                if fn is None:
                    continue
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if rep > 0:
                    times[name].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name, (fn, nbytes) in methods.items():
            if fn is None:
                rows.append((threads, name, None, None, None, None, None, ds_why))
                continue
            copy = nbytes == 30
            ref = med["torch fused + bf16 copy" if copy else "torch AdamW fused"]
            bnd = med["bound + bf16 (30 B)" if copy else "bound (28 B/param)"]
            m = med[name]
            rows.append(
                (threads, name, m, min(times[name]), nbytes * n / m / 1e9, m / ref, bnd / m, "")
            )
    header = (f"{'thr':>3}  {'method':<24} {'median ms':>10} {'min ms':>9} {'GB/s':>6} "
              f"{'vs fused':>9} {'% bound':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for threads, name, m, mn, gbs, vs, pb, why in rows:
        if m is None:
            print(f"{threads:>3}  {name:<24} {'n/a':>10}   ({why})")
            continue
        print(f"{threads:>3}  {name:<24} {m * 1e3:>10.1f} {mn * 1e3:>9.1f} {gbs:>6.1f} "
              f"{vs:>8.2f}x {pb * 100:>7.0f}%")  # fmt: skip


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
