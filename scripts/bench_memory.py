"""Resident memory (RSS) and step time per rank: DDP vs FSDP2 vs accel_zero stages 1-3, on CPU.

What the operating system sees (VmRSS / VmHWM from /proc/self/status), next to what the
engines say they hold, on the two workloads of issue 8 at N ranks (default 2, gloo):

- ``gpt2``: a GPT-2 of 29.4 M parameters (8 layers x 512, 8 heads, vocab 8192, 64
  positions; model states dominate: DDP's ideal fp32 AdamW states are 16 B x 29.4 M =
  449 MiB per rank), built eagerly, prepared, then 3 fp32 AdamW steps on a 1x16-token batch.
- ``smollm2``: SmolLM2-135M-Instruct (the asset ``scripts/setup.sh`` prepares) loaded from
  its fp32 safetensors (accel_zero: under ``lazy_init``), bf16 mixed precision (DDP:
  autocast; FSDP2: ``MixedPrecisionPolicy(bf16, fp32 reduce)``; accel_zero:
  ``mixed_precision="bf16"``), AdamW, micro-batch 4 x 96 tokens per rank.

Every run is a fresh set of N processes (so VmHWM is its own), started with the run's
allocator settings in their environment (glibc reads ``MALLOC_*_`` and ``LD_PRELOAD`` at
exec). Runs are interleaved over ``--repeats`` (a shared, noisy machine hits all configs
alike); tables quote medians (RSS) and minima (step time) over repeats.

    python scripts/bench_memory.py                                  # both workloads, 2 repeats
    python scripts/bench_memory.py --workloads gpt2 --repeats 3
    python scripts/bench_memory.py --workloads gpt2 --configs ddp,z3 --allocators lean,jemalloc
    python scripts/bench_memory.py --list                           # configs and allocators

Columns (per rank, the max over ranks of each run; MiB = 2^20 bytes):
``grow`` = VmRSS after the last step minus VmRSS before the model was built (after imports
and process-group set-up); ``peak`` = VmHWM (absolute) and ``peak+`` = VmHWM minus that
same baseline; ``steady`` = VmRSS after the last step (absolute); ``state`` = model-state
bytes the engine holds after ``optimizer.step()`` (accel_zero: ``memory_report()
['model_state_bytes']``; DDP/FSDP2: the unique storages of local params, grads and
optimizer state); ``s/step`` = the slowest rank's step time, minimum over timed steps and
repeats (provisional on a shared machine); ``xDDP`` = ratio to DDP under plain glibc (what
a DDP user runs); ``xDDP=`` = ratio to DDP under the same allocator settings.

Allocators (``--allocators``, see ALLOCATORS below; each applies to every config of the
run, so its cost shows on DDP too): ``glibc`` = the C library as found
(``ACCEL_ZERO_HOST_ALLOCATOR=0``), DDP under it is the reference of every ``xDDP`` and
always runs; ``default`` = ``accel_zero.host_memory.tune_host_allocator()`` first thing in
every rank with the variable unset (what accel_zero ships); ``lean`` = the same with
``ACCEL_ZERO_HOST_ALLOCATOR=lean``; the others are the alternatives measured to choose the
profiles (kept so the choice can be re-checked; see [Note: host allocator profiles] in
accel_zero/host_memory.py). jemalloc / tcmalloc are looked up in ``--lib-dir`` (default:
the system's library folders).

``--timeline PATH.png`` (default ``bench_memory_timeline.png``) draws rank 0's memory
timeline of the first accel_zero stage-3 run (``accel-zero memory-plot``), with the JSON
beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

MiB = 2**20


# --------------------------------------------------------------------- setup
@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    name: str
    steps: int
    """Optimizer steps in all (the first ``warmup`` are not timed)."""
    warmup: int
    micro_batch: int
    seq: int
    mixed_precision: str
    """``no`` (fp32) or ``bf16``."""
    timeout: float
    """Seconds before a run is killed."""


WORKLOADS = {
    "gpt2": Workload(
        name="gpt2", steps=3, warmup=1, micro_batch=1, seq=16, mixed_precision="no", timeout=300
    ),
    "smollm2": Workload(
        name="smollm2",
        steps=10,
        warmup=2,
        micro_batch=4,
        seq=96,
        mixed_precision="bf16",
        timeout=900,
    ),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str
    label: str
    engine: str
    """``ddp``, ``fsdp2`` or ``accel_zero``."""
    zero_config: dict[str, Any] | None = None


CONFIGS = [
    RunConfig(name="ddp", label="DDP", engine="ddp"),
    RunConfig(name="fsdp2", label="FSDP2", engine="fsdp2"),
    RunConfig(name="z1", label="accel_zero stage 1", engine="accel_zero", zero_config={"stage": 1}),
    RunConfig(name="z2", label="accel_zero stage 2", engine="accel_zero", zero_config={"stage": 2}),
    RunConfig(name="z3", label="accel_zero stage 3", engine="accel_zero", zero_config={"stage": 3}),
]
# Offload settings: not in the default set. Until the offload work lands they fail with
# NotImplementedError and their row says so; then they run like any other config.
OFFLOAD_CONFIGS = [
    RunConfig(
        name="z3-opt-cpu",
        label="stage 3, optimizer on CPU",
        engine="accel_zero",
        zero_config={"stage": 3, "offload_optimizer": {"device": "cpu"}},
    ),
    RunConfig(
        name="z3-opt-nvme",
        label="stage 3, optimizer on NVMe",
        engine="accel_zero",
        zero_config={"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "{tmp}"}},
    ),
    RunConfig(
        name="z3-param-cpu",
        label="stage 3, params+optim on CPU",
        engine="accel_zero",
        zero_config={
            "stage": 3,
            "offload_param": {"device": "cpu"},
            "offload_optimizer": {"device": "cpu"},
        },
    ),
]
ALL_CONFIGS = {c.name: c for c in CONFIGS + OFFLOAD_CONFIGS}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Allocator:
    name: str
    what: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Set in the ranks' environment before exec (glibc reads MALLOC_*_ at start-up)."""
    tuning: dict[str, int] | None = None
    """``AllocatorTuning`` fields applied with mallopt first thing in each rank; {} = the
    default tuning of accel_zero.host_memory; None = none."""
    preload: str | None = None
    """``jemalloc`` or ``tcmalloc``: LD_PRELOADed."""
    trim_after: tuple[str, ...] = ()
    """Call malloc_trim(0) after these events: ``prepare``, ``step``."""


_OFF = {"ACCEL_ZERO_HOST_ALLOCATOR": "0"}
ALLOCATORS = {
    a.name: a
    for a in [
        Allocator(
            name="glibc",
            what="glibc as found, ACCEL_ZERO_HOST_ALLOCATOR=0 (DDP's reference)",
            env=_OFF,
        ),
        Allocator(
            name="default",
            what="what accel_zero ships: host_memory.tune_host_allocator(), variable unset",
            tuning={},
        ),
        Allocator(
            name="lean",
            what="ACCEL_ZERO_HOST_ALLOCATOR=lean (mmap 4 MiB, trim 8 MiB)",
            env={"ACCEL_ZERO_HOST_ALLOCATOR": "lean"},
            tuning={},
        ),
        Allocator(
            name="env-64k-trim0",
            what="MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 (issue 8)",
            env={**_OFF, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
        ),
        Allocator(
            name="env-1m",
            what="MALLOC_MMAP_THRESHOLD_=1048576",
            env={**_OFF, "MALLOC_MMAP_THRESHOLD_": "1048576"},
        ),
        Allocator(
            name="mmap1m-trim0",
            what="mallopt mmap 1 MiB, trim 0",
            env=_OFF,
            tuning={"mmap_threshold": 2**20, "trim_threshold": 0},
        ),
        Allocator(
            name="mmap4m",
            what="mallopt mmap 4 MiB, trim 8 MiB",
            env=_OFF,
            tuning={"mmap_threshold": 4 * 2**20, "trim_threshold": 8 * 2**20},
        ),
        Allocator(
            name="mmap8m",
            what="mallopt mmap 8 MiB, trim 16 MiB",
            env=_OFF,
            tuning={"mmap_threshold": 8 * 2**20, "trim_threshold": 16 * 2**20},
        ),
        Allocator(
            name="mmap32m",
            what="mallopt mmap 32 MiB (glibc's max, fixed), trim 64 MiB",
            env=_OFF,
            tuning={"mmap_threshold": 32 * 2**20, "trim_threshold": 64 * 2**20},
        ),
        Allocator(
            name="mmap4m-thp",
            what="mallopt mmap 4 MiB, trim 8 MiB; torch THP_MEM_ALLOC_ENABLE=1",
            env={**_OFF, "THP_MEM_ALLOC_ENABLE": "1"},
            tuning={"mmap_threshold": 4 * 2**20, "trim_threshold": 8 * 2**20},
        ),
        Allocator(
            name="mmap2m-trim0",
            what="mallopt mmap 2 MiB, trim 0",
            env=_OFF,
            tuning={"mmap_threshold": 2 * 2**20, "trim_threshold": 0},
        ),
        Allocator(name="arena2", what="mallopt arena_max 2", env=_OFF, tuning={"arena_max": 2}),
        Allocator(
            name="mmap4m-arena2",
            what="mallopt mmap 4 MiB, trim 8 MiB, arena_max 2",
            env=_OFF,
            tuning={"mmap_threshold": 4 * 2**20, "trim_threshold": 8 * 2**20, "arena_max": 2},
        ),
        Allocator(
            name="trim-step",
            what="glibc defaults + malloc_trim(0) after prepare and every step",
            env=_OFF,
            trim_after=("prepare", "step"),
        ),
        Allocator(
            name="trim-prepare",
            what="glibc defaults + malloc_trim(0) after prepare",
            env=_OFF,
            trim_after=("prepare",),
        ),
        Allocator(name="jemalloc", what="jemalloc 5.3 (LD_PRELOAD)", env=_OFF, preload="jemalloc"),
        Allocator(
            name="jemalloc-d0",
            what="jemalloc, dirty_decay_ms:0 muzzy_decay_ms:0",
            env={**_OFF, "MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0"},
            preload="jemalloc",
        ),
        Allocator(
            name="jemalloc-os",
            what="jemalloc, oversize_threshold:0 (large blocks reused, not purged at once)",
            env={**_OFF, "MALLOC_CONF": "oversize_threshold:0"},
            preload="jemalloc",
        ),
        Allocator(
            name="jemalloc-bg",
            what="jemalloc, background_thread, dirty_decay_ms:1000",
            env={**_OFF, "MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000"},
            preload="jemalloc",
        ),
        Allocator(
            name="tcmalloc", what="tcmalloc-minimal 2.10 (LD_PRELOAD)", env=_OFF, preload="tcmalloc"
        ),
    ]
}
_PRELOAD_FILES = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")


def find_preload(name: str, lib_dirs: list[str]) -> str | None:
    for folder in [*lib_dirs, *_LIB_DIRS]:
        path = Path(folder) / _PRELOAD_FILES[name]
        if path.exists():
            return str(path)
    return None


# ---------------------------------------------------------------- rank side
def _gpt2(seed: int) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=8192,
        n_positions=64,
        n_embd=512,
        n_layer=8,
        n_head=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=8191,
        eos_token_id=8191,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).train()


def _batch(vocab: int, w: Workload, step: int, rank: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (w.micro_batch, w.seq), generator=gen)


def _unit_modules(model: Any) -> list[Any]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def rank_main(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of one run; returns its figures (written as JSON by the caller)."""
    from accel_zero.host_memory import (
        AllocatorTuning,
        apply_allocator_tuning,
        current_rss_bytes,
        malloc_stats,
        malloc_trim,
        process_memory,
        smaps_rollup,
        tune_host_allocator,
    )

    alloc = ALLOCATORS[spec["allocator"]]
    applied: dict[str, int] = {}
    if alloc.tuning == {}:  # first, before the large allocations
        applied = tune_host_allocator()  # the profile $ACCEL_ZERO_HOST_ALLOCATOR selects
    elif alloc.tuning is not None:
        # Explicit settings; $ACCEL_ZERO_HOST_ALLOCATOR=0 keeps the Accelerator from
        # applying its default over them.
        applied = apply_allocator_tuning(AllocatorTuning(**alloc.tuning))

    # Everything imported before the baseline; torch._dynamo before the process group
    # (see accel_zero.comm.import_dynamo_before_process_group).
    import torch
    import torch._dynamo
    import torch.distributed as dist
    from bench_train import held_bytes
    from transformers import AutoModelForCausalLM

    from accel_zero.tracer import MemoryTracer

    w = WORKLOADS[spec["workload"]]
    cfg = ALL_CONFIGS[spec["config"]]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(spec["threads"])
    trim = set(alloc.trim_after)

    accelerator: Any = None
    if cfg.engine == "accel_zero":
        from accel_zero import Accelerator, lazy_init

        zc = json.loads(json.dumps(cfg.zero_config).replace("{tmp}", spec["tmp"]))
        accelerator = Accelerator(zero_config=zc, mixed_precision=w.mixed_precision)
        # The engine's own tracer: its bytes on the timeline, next to RSS.
        tracer = getattr(accelerator, "memory_tracer", None) or accelerator._zero_tracer
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        tracer = MemoryTracer()
    if spec.get("timeline"):
        tracer.record_timeline()
    gc.collect()
    dist.barrier()
    rss0 = current_rss_bytes()
    tracer.mark("start")

    # ---- build / load
    if w.name == "gpt2":
        model = _gpt2(seed=0)
        vocab = 8192
    else:
        from recipes.common import asset_path

        path = asset_path("smollm2-135m-instruct")
        if accelerator is not None:
            with lazy_init(accelerator):
                model = AutoModelForCausalLM.from_pretrained(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.train()
        vocab = model.config.vocab_size
    tracer.mark("built")
    rss_built = current_rss_bytes()

    # ---- prepare
    autocast: Any = contextlib.nullcontext
    if accelerator is not None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        if cfg.engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, gradient_as_bucket_view=True)
            if w.mixed_precision == "bf16":

                def autocast() -> Any:
                    return torch.autocast("cpu", dtype=torch.bfloat16)

        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh("cpu", (world,))
            mp = MixedPrecisionPolicy()
            if w.mixed_precision == "bf16":
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in _unit_modules(model):
                fully_shard(block, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if "prepare" in trim:
        malloc_trim(0)
    gc.collect()
    tracer.mark("prepared")
    rss_prepared = current_rss_bytes()

    # ---- train
    import resource

    times: list[float] = []
    cpu: list[tuple[float, float, int]] = []  # (user s, system s, minor faults) per step
    rss_steps: list[int] = []
    state_bytes = 0
    report: dict[str, Any] | None = None
    dist.barrier()
    for step in range(w.steps):
        x = _batch(vocab, w, step, rank)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        # accel_zero's engine marks its own forward/backward (and its units); DDP/FSDP2
        # runs get the loop's marks instead.
        if accelerator is None:
            tracer.mark("forward", str(step))
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if accelerator is None:
            tracer.mark("backward", str(step))
        optimizer.step()
        tracer.mark("step", str(step))
        t_acc = time.perf_counter()
        if step == w.steps - 1:  # grads still held: the step's model-state high point
            if accelerator is not None:
                report = accelerator.memory_report()
                state_bytes = int(report["model_state_bytes"])
            else:
                state_bytes = held_bytes(model, optimizer)
        accounting = time.perf_counter() - t_acc
        optimizer.zero_grad(set_to_none=True)
        del loss
        if "step" in trim:
            malloc_trim(0)
        times.append(time.perf_counter() - t0 - accounting)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(
            (
                ru1.ru_utime - ru0.ru_utime,
                ru1.ru_stime - ru0.ru_stime,
                ru1.ru_minflt - ru0.ru_minflt,
            )
        )
        tracer.mark("zero_grad", str(step))
        rss_steps.append(current_rss_bytes())

    timed = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(timed, op=dist.ReduceOp.MAX)  # a step takes as long as its slowest rank
    proc = process_memory()
    assert proc is not None, "bench_memory needs Linux /proc"
    heap = malloc_stats()
    result = {
        "rank": rank,
        "applied_tuning": applied,
        "rss0": rss0,
        "rss_built": rss_built,
        "rss_prepared": rss_prepared,
        "rss_steps": rss_steps,
        "hwm": proc.peak_rss_bytes,
        "rss_end": proc.rss_bytes,
        "anon_end": proc.anon_bytes,
        "file_end": proc.file_bytes,
        "malloc_free_end": heap.free_bytes if heap else None,
        "malloc_heap_end": heap.heap_bytes if heap else None,
        "smaps_anon_end": smaps_rollup().get("Anonymous"),
        "state_bytes": state_bytes,
        "step_times": timed.tolist()[w.warmup :],
        # CPU seconds (all threads of this rank) and page faults per timed step: what the
        # allocator costs, much less disturbed by other load on the machine than wall time.
        "step_cpu": cpu[w.warmup :],
        "report": report if rank == 0 else None,
    }
    if spec.get("timeline"):
        tracer.save_timeline(
            spec["timeline"],
            meta={
                "rank": rank,
                "world_size": world,
                "run": f"{cfg.label}, {w.name}, allocator {alloc.name}",
            },
        )
    # Free the model (a DDP reducer holds the group) while the group is registered and
    # let gloo's threads drop their last tensors first (see bench_train.rank_body).
    del model, optimizer, accelerator
    dist.barrier()
    time.sleep(0.05)
    dist.destroy_process_group()
    return result


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"]) / f"rank{os.environ['RANK']}.json"
    try:
        payload: dict[str, Any] = {"ok": rank_main(spec)}
    except BaseException as exc:
        import traceback

        payload = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    out.write_text(json.dumps(payload))
    return 0


# ------------------------------------------------------------------ driver
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Run:
    workload: str
    config: str
    allocator: str
    ranks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    error: str = ""
    wall: float = 0.0

    def worst(self, key: str) -> int:
        return max(int(r[key]) for r in self.ranks)

    def worst_growth(self) -> int:
        return max(int(r["rss_end"]) - int(r["rss0"]) for r in self.ranks)

    def worst_peak_growth(self) -> int:
        return max(int(r["hwm"]) - int(r["rss0"]) for r in self.ranks)

    def cpu_per_step(self) -> tuple[float, float, float]:
        """(user+system s, system s, minor faults) per step: median over steps, max over ranks."""

        def worst(value: Any) -> float:
            return max(statistics.median(value(c) for c in r["step_cpu"]) for r in self.ranks)

        return (
            worst(lambda c: c[0] + c[1]),
            worst(lambda c: c[1]),
            worst(lambda c: c[2]),
        )

    def min_step(self) -> float:
        return min(self.ranks[0]["step_times"])

    def median_step(self) -> float:
        return statistics.median(self.ranks[0]["step_times"])


def launch(
    workload: str,
    config: str,
    allocator: str,
    *,
    world: int,
    threads: int,
    lib_dirs: list[str],
    timeline: Path | None,
) -> Run:
    run = Run(workload=workload, config=config, allocator=allocator)
    alloc = ALLOCATORS[allocator]
    env_extra = dict(alloc.env)
    if alloc.preload:
        lib = find_preload(alloc.preload, lib_dirs)
        if lib is None:
            run.error = f"{_PRELOAD_FILES[alloc.preload]} not found (apt-get install, or --lib-dir)"
            return run
        env_extra["LD_PRELOAD"] = lib
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        spec = {
            "workload": workload,
            "config": config,
            "allocator": allocator,
            "threads": threads,
            "out": tmp,
            "tmp": tmp,
            "timeline": None,
        }
        port = free_port()
        procs = []
        for rank in range(world):
            rank_spec = dict(spec)
            if timeline is not None and rank == 0:
                rank_spec["timeline"] = str(timeline)
            spec_path = Path(tmp) / f"spec{rank}.json"
            spec_path.write_text(json.dumps(rank_spec))
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")},
                **env_extra,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world),
                "OMP_NUM_THREADS": str(threads),
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(spec_path)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + WORKLOADS[workload].timeout
        outputs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                out, _ = p.communicate()
                run.error = f"timeout after {WORKLOADS[workload].timeout:.0f} s"
            outputs.append(out)
        for rank in range(world):
            path = Path(tmp) / f"rank{rank}.json"
            if not path.exists():
                run.error = run.error or f"rank {rank}: no result: {outputs[rank][-600:]}"
                continue
            payload = json.loads(path.read_text())
            if "error" in payload:
                run.error = f"rank {rank}: {payload['error']}"[:300]
                if "NotImplementedError" not in payload["error"]:
                    print(payload["traceback"], file=sys.stderr)
                continue
            run.ranks.append(payload["ok"])
    run.wall = time.monotonic() - start
    if run.error:
        run.ranks.clear()
    return run


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(runs: list[Run], workload: str, configs: list[str], allocators: list[str]) -> str:
    w = WORKLOADS[workload]
    done = [r for r in runs if r.workload == workload]

    def of(config: str, allocator: str) -> list[Run]:
        return [r for r in done if r.config == config and r.allocator == allocator and r.ranks]

    def errors(config: str, allocator: str) -> str:
        errs = [r.error for r in done if r.config == config and r.allocator == allocator]
        return errs[0] if errs else "not run"

    ddp_ref = of("ddp", "glibc")
    ref = {
        "grow": _med([r.worst_growth() for r in ddp_ref]),
        "peak": _med([r.worst("hwm") for r in ddp_ref]),
        "steady": _med([r.worst("rss_end") for r in ddp_ref]),
        "step": min((r.min_step() for r in ddp_ref), default=float("nan")),
    }
    head = (
        f"{'config':22} {'allocator':14} {'n':>2} {'grow':>6} {'xDDP':>5} {'xDDP=':>5} "
        f"{'peak+':>6} {'peak':>6} {'xDDP':>5} {'steady':>6} {'xDDP':>5} {'state':>6} "
        f"{'untrk':>6} {'s/step':>7} {'xDDP':>5} {'xDDP=':>5} {'cpu s':>6} {'sys s':>6} "
        f"{'kflt':>6}"
    )
    lines = [
        f"{w.name}: {w.micro_batch}x{w.seq} tokens/rank, {w.steps} steps "
        f"({w.steps - w.warmup} timed), mixed precision {w.mixed_precision}; MiB per rank, "
        "medians over repeats (s/step: minimum)",
        head,
        "-" * len(head),
    ]
    for alloc in allocators:
        same = of("ddp", alloc)
        same_grow = _med([r.worst_growth() for r in same])
        same_step = min((r.min_step() for r in same), default=float("nan"))
        for config in configs:
            rs = of(config, alloc)
            label = ALL_CONFIGS[config].label
            if not rs and not any(r.config == config and r.allocator == alloc for r in done):
                continue  # not asked for (configs other than DDP under the reference)
            if not rs:
                lines.append(f"{label:22} {alloc:14}  n/a: {errors(config, alloc)[:150]}")
                continue
            grow = _med([r.worst_growth() for r in rs])
            peak = _med([r.worst("hwm") for r in rs])
            peak_grow = _med([r.worst_peak_growth() for r in rs])
            steady = _med([r.worst("rss_end") for r in rs])
            state = _med([r.worst("state_bytes") for r in rs])
            untracked = _med(
                [r.worst("rss_end") - r.worst("rss0") - r.worst("state_bytes") for r in rs]
            )
            step = min(r.min_step() for r in rs)
            cpu_s, sys_s, faults = (min(r.cpu_per_step()[i] for r in rs) for i in range(3))
            lines.append(
                f"{label:22} {alloc:14} {len(rs):2d} {grow / MiB:6.0f} {grow / ref['grow']:5.2f} "
                f"{grow / same_grow:5.2f} {peak_grow / MiB:6.0f} {peak / MiB:6.0f} "
                f"{peak / ref['peak']:5.2f} {steady / MiB:6.0f} {steady / ref['steady']:5.2f} "
                f"{state / MiB:6.0f} {untracked / MiB:6.0f} {step:7.3f} "
                f"{step / ref['step']:5.2f} {step / same_step:5.2f} {cpu_s:6.2f} {sys_s:6.2f} "
                f"{faults / 1000:6.1f}"
            )
    lines.append(
        "untrk = grow - state: what the process grew by beyond the model states it holds "
        "(activations, gathered params, buffers, allocator retention); cpu s / sys s / kflt: "
        "CPU seconds (user+system, system) and thousands of minor page faults per step of "
        "one rank, all its threads (median over steps, max over ranks, min over repeats)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workloads", default="gpt2,smollm2")
    parser.add_argument("--configs", default=",".join(c.name for c in CONFIGS))
    parser.add_argument(
        "--allocators",
        default="default,lean",
        help="comma list (see --list); DDP also runs under 'glibc', the reference of xDDP",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="per rank (0: cores / ranks)")
    parser.add_argument(
        "--lib-dir", action="append", default=[], help="where jemalloc/tcmalloc are"
    )
    parser.add_argument("--timeline", type=Path, default=Path("bench_memory_timeline.png"))
    parser.add_argument("--no-timeline", action="store_true")
    parser.add_argument("--json", type=Path, help="write every run's raw figures here")
    parser.add_argument("--list", action="store_true", help="list configs and allocators")
    ns = parser.parse_args(argv)
    if ns.worker:
        return worker(ns.worker)
    if ns.list:
        for c in ALL_CONFIGS.values():
            print(f"config {c.name:14} {c.label} {c.zero_config or ''}")
        for a in ALLOCATORS.values():
            print(f"allocator {a.name:14} {a.what}")
        return 0
    workloads = [x for x in ns.workloads.split(",") if x]
    configs = [x for x in ns.configs.split(",") if x]
    allocators = [x for x in ns.allocators.split(",") if x]
    for name, known in (
        (workloads, WORKLOADS),
        (configs, ALL_CONFIGS),
        (allocators, ALLOCATORS),
    ):
        bad = [x for x in name if x not in known]
        if bad:
            parser.error(f"unknown {bad}; choose from {sorted(known)}")
    if "ddp" not in configs:
        configs.insert(0, "ddp")  # every ratio is to DDP ...
    reference_only = "glibc" not in allocators
    if reference_only:
        allocators.insert(0, "glibc")  # ... as DDP users run it: glibc as found
    threads = ns.threads or max(1, (os.cpu_count() or 1) // ns.world_size)
    timeline_json = None if ns.no_timeline else ns.timeline.with_suffix(".json")
    runs: list[Run] = []
    print(
        f"{ns.world_size} ranks x {threads} threads (gloo); workloads {workloads}; "
        f"configs {configs}; allocators {allocators}; {ns.repeats} repeat(s), interleaved",
        flush=True,
    )
    for rep in range(ns.repeats):
        for workload in workloads:
            for alloc in allocators:
                for config in configs:
                    if reference_only and alloc == "glibc" and config != "ddp":
                        continue
                    if any(
                        r.error and (r.workload, r.config, r.allocator) == (workload, config, alloc)
                        for r in runs
                    ):
                        continue  # failed once: it will fail again, keep the run short
                    want_timeline = (
                        timeline_json is not None
                        and config == "z3"
                        and not any(r.config == "z3" and r.ranks for r in runs)
                    )
                    run = launch(
                        workload,
                        config,
                        alloc,
                        world=ns.world_size,
                        threads=threads,
                        lib_dirs=ns.lib_dir,
                        timeline=timeline_json if want_timeline else None,
                    )
                    runs.append(run)
                    if run.error:
                        print(f"  [{rep + 1}] {workload} {config} {alloc}: {run.error}", flush=True)
                    else:
                        print(
                            f"  [{rep + 1}] {workload:7} {config:5} {alloc:14} "
                            f"grow {run.worst_growth() / MiB:5.0f} MiB, peak "
                            f"{run.worst('hwm') / MiB:5.0f} MiB, step min "
                            f"{run.min_step():.3f} s, cpu {run.cpu_per_step()[0]:.2f} s "
                            f"(sys {run.cpu_per_step()[1]:.2f}), wall {run.wall:.0f} s",
                            flush=True,
                        )
                    if want_timeline and run.ranks:
                        from accel_zero.memory_plot import plot_timeline_file

                        png = plot_timeline_file(timeline_json, ns.timeline)
                        print(f"  timeline: {timeline_json} -> {png}", flush=True)
    print()
    for workload in workloads:
        print(table(runs, workload, configs, allocators))
        print()
    if ns.json:
        ns.json.write_text(json.dumps([dataclasses.asdict(r) for r in runs], indent=1))
    return 0 if all(r.ranks or "NotImplementedError" in r.error for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
