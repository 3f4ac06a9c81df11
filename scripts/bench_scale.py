"""A model bigger than this machine's memory, fine-tuned on it (issue 9: ZeRO-Infinity).

    python scripts/bench_scale.py                      # ~3.2B Llama, 2 CPU ranks, 4 steps
    python scripts/bench_scale.py --size 1B --steps 4  # the ~1B size DeepSpeed still fits
    python scripts/bench_scale.py --size 1B --deepspeed-python /work/venv-ds/bin/python

Builds a Llama-architecture model with ``from_config`` under ``accel_zero.lazy_init``
(every rank initialises one module at a time and keeps only its rows), bf16 compute,
gradient checkpointing, and fine-tunes it for a few steps on the chatterbot dialogues
(tokenised with the real SmolLM2 tokenizer, packed into 1 x 256-token sequences per rank)
on 2 gloo ranks, with the optimizer state (fp32 masters, Adam moments) and the bf16
parameter shards on NVMe (``offload_optimizer`` / ``offload_param: nvme``). It prints the
parameter count, what DDP and FSDP2 would need (16 bytes per parameter), the peak RSS of
each rank, the bytes on disk, the seconds of each step split into compute, communication
waits and disk stalls, and the loss of every step.

With ``--deepspeed-python`` it runs the same model, data and settings through DeepSpeed
ZeRO-3 (optimizer and parameters on NVMe, DeepSpeedCPUAdam) in that interpreter's
environment, for the issue's comparison at ~1B. Not part of the test suite (minutes per
step at 3B on 2 cores); its figures go in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    # hidden, layers, heads, kv heads, intermediate (Llama-3.2-3B-like shapes, SmolLM2 vocab)
    "3B": (3072, 30, 24, 8, 8192),
    "1B": (2048, 20, 32, 8, 5632),
    "tiny": (256, 4, 4, 2, 688),
}
SEQ = 256


def _config(size: str):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    hidden, layers, heads, kv, inter = SIZES[size]
    return LlamaConfig(
        vocab_size=49152,  # the SmolLM2 tokenizer's
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def _blocks(rank: int, world: int, steps: int) -> list:  # type: ignore[type-arg]
    """Packed 256-token rows of the chatterbot dialogues (chat template), one per rank and
    step, the same split on every run."""
    import torch

    sys.path.insert(0, str(REPO / "recipes"))
    from common import SMOLLM2_DIR, asset_path, load_chatterbot_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(asset_path(SMOLLM2_DIR))
    stream: list[int] = []
    for row in load_chatterbot_dataset("english"):
        chat = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]},
        ]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(stream) >= SEQ * world * steps:
            break
    rows = torch.tensor(stream[: SEQ * world * steps]).view(steps, world, SEQ)
    return [rows[s, rank : rank + 1] for s in range(steps)]


def _rss() -> tuple[int, int]:
    now = peak = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return now, peak


def worker(args: argparse.Namespace) -> None:
    """One rank (started by torchrun): build, prepare, train, report as JSON on stdout."""
    import torch
    from transformers import AutoModelForCausalLM

    from accel_zero import Accelerator, lazy_init

    torch.manual_seed(0)
    nvme = {"device": "nvme", "nvme_path": args.nvme_path, "buffer_count": 4}
    zero = {
        "stage": 3,
        "param_persistence_threshold": "100K",
        "prefetch_bucket_size": args.prefetch,
        "max_live_parameters": args.max_live,
        "max_reuse_distance": 0,
        "reduce_bucket_size": "50M",
        "reduce_dtype": "bf16",
        "offload_optimizer": nvme,
        "offload_param": nvme if args.offload_param else {"device": "none"},
        "sub_group_size": "10M",
        "timeout": 3600,
    }
    if not args.offload_param:
        zero["offload_param"] = {"device": "none"}
    accelerator = Accelerator(mixed_precision="bf16", zero_config=zero)
    rank, world = accelerator.process_index, accelerator.num_processes
    t0 = time.perf_counter()
    with lazy_init(accelerator):
        model = AutoModelForCausalLM.from_config(_config(args.size), dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    build_s = time.perf_counter() - t0
    _, build_peak = _rss()
    blocks = _blocks(rank, world, args.steps)
    engine = accelerator.zero_engine(model)
    steps = []
    model.train()
    for step, x in enumerate(blocks, start=1):
        before = accelerator.zero_stats()
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        seconds = time.perf_counter() - start
        after = accelerator.zero_stats()
        comm = float(after["comm_wait_seconds"]) - float(before["comm_wait_seconds"])
        disk = float(after.get("swap_stall_seconds", 0.0)) - float(
            before.get("swap_stall_seconds", 0.0)
        )
        moved = sum(
            float(after.get(k, 0)) - float(before.get(k, 0))
            for k in ("swap_bytes_read", "swap_bytes_written")
        )
        steps.append(
            {
                "step": step,
                "loss": float(loss.detach()),
                "grad_norm": float(norm) if norm is not None else None,
                "seconds": seconds,
                "comm_wait": comm,
                "disk_stall": disk,
                "compute_other": seconds - comm - disk,
                "swap_gb": moved / 1e9,
            }
        )
        if rank == 0:
            print(f"# step {step}: loss {steps[-1]['loss']:.4f}, {seconds:.1f} s", flush=True)
    report = accelerator.memory_report()
    nvme_bytes = report["per_device"].get("nvme", {}).get("total", 0)
    now, peak = _rss()
    result = {
        "rank": rank,
        "params": n_params,
        "build_seconds": build_s,
        "build_peak_rss": build_peak,
        "peak_rss": peak,
        "steady_rss": now,
        "nvme_bytes": nvme_bytes,
        "ram_model_state": report["model_state_bytes"] - nvme_bytes,
        "steps": steps,
        "swap": {k: v for k, v in accelerator.zero_stats().items() if k.startswith("swap_")},
        "units": len(engine.units),
    }
    print("RESULT " + json.dumps(result), flush=True)
    accelerator.end_training()


def _print(results: list[dict], size: str) -> None:  # type: ignore[type-arg]
    r0 = results[0]
    n = r0["params"]
    gb = 1e9
    print(
        f"\nLlama-architecture model ({size}): {n / 1e9:.2f} B parameters, 2 ranks x 1 x 256 tokens"
    )
    print(
        f"DDP / FSDP2 would need 16 bytes per parameter of model state: {16 * n / gb:.1f} GB "
        f"per rank (DDP) / {16 * n / gb / 2:.1f} GB per rank (FSDP2), on a {_ram_gb():.0f} GB "
        "machine holding both ranks"
    )
    for r in results:
        print(
            f"rank {r['rank']}: build {r['build_seconds']:.0f} s "
            f"(peak RSS {r['build_peak_rss'] / gb:.2f} GB), "
            f"peak RSS {r['peak_rss'] / gb:.2f} GB, steady {r['steady_rss'] / gb:.2f} GB, "
            f"model state in RAM {r['ram_model_state'] / gb:.2f} GB, "
            f"on disk {r['nvme_bytes'] / gb:.1f} GB"
        )
    total_disk = sum(r["nvme_bytes"] for r in results)
    total_peak = sum(r["peak_rss"] for r in results)
    print(
        f"both ranks: peak RSS {total_peak / gb:.1f} GB ({total_peak / n:.1f} bytes of RAM per "
        f"parameter), {total_disk / gb:.1f} GB on disk"
    )
    print("\nstep   loss    grad_norm   seconds  compute+other  comm wait  disk stall  swap GB")
    for i, s in enumerate(r0["steps"]):
        worst = max(results, key=lambda r: r["steps"][i]["seconds"])["steps"][i]
        gn = worst["grad_norm"]
        print(
            f"{s['step']:>4}  {s['loss']:7.4f}  {gn if gn is None else f'{gn:9.3f}'}  "
            f"{worst['seconds']:8.1f}  {worst['compute_other']:13.1f}  {worst['comm_wait']:9.1f}  "
            f"{worst['disk_stall']:10.1f}  {worst['swap_gb']:7.1f}"
        )
    print(f"swap (rank 0): {json.dumps({k: round(v, 3) for k, v in r0['swap'].items()})}")


def _ram_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="3B")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--prefetch", default="120M", help="zero_config.prefetch_bucket_size")
    p.add_argument("--max-live", default="400M", help="zero_config.max_live_parameters")
    p.add_argument("--no-offload-param", dest="offload_param", action="store_false")
    p.add_argument("--nvme-path", default=None, help="swap folder (default: a temp folder)")
    p.add_argument("--deepspeed-python", default=None, help="run DeepSpeed in this interpreter")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    made = args.nvme_path is None
    nvme_path = args.nvme_path or tempfile.mkdtemp(prefix="accel_zero_scale_", dir="/work")
    Path(nvme_path).mkdir(parents=True, exist_ok=True)
    from accel_zero.launch import find_free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    python = args.deepspeed_python or sys.executable
    cmd = [
        python, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(find_free_port()), __file__, "--worker",
        "--size", args.size, "--steps", str(args.steps), "--lr", str(args.lr),
        "--prefetch", args.prefetch, "--max-live", args.max_live, "--nvme-path", nvme_path,
    ]  # fmt: skip
    if not args.offload_param:
        cmd.append("--no-offload-param")
    if args.deepspeed_python:
        raise SystemExit("DeepSpeed runs are driven by scripts/bench_offload.py's helper")
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("# "):
            print(line)
    results = sorted(
        (json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
        key=lambda r: r["rank"],
    )
    if made:
        shutil.rmtree(nvme_path, ignore_errors=True)
    if proc.returncode != 0 or len(results) != 2:
        rank0 = [line for line in proc.stderr.splitlines() if line.startswith("[rank0]")]
        print(proc.stdout[-3000:], "\n".join(rank0[-60:]) or proc.stderr[-6000:], sep="\n")
        raise SystemExit(f"bench_scale: the ranks failed (exit {proc.returncode})")
    _print(results, args.size)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
