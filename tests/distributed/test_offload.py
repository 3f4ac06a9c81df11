"""Optimizer and parameter offload (issue 9, DESIGN D6) on 2 gloo ranks and real files.

- Parity: offload_optimizer cpu and nvme (and nvme with offload_param nvme at stage 3)
  train like no offload at stages 1-3, fp32 and bf16, with accumulation and clipping.
- Checkpoints stream the swapped state: a run with the optimizer on NVMe resumes bit for
  bit, and a checkpoint taken without offload resumes with it (one format).
- Accounting: ``accel-zero estimate`` equals ``memory_report()`` per kind and per place
  (host memory and nvme) with every offload setting.
- Files and faults at the engine's level: the swap folder and files are private and go at
  ``end_training``; a bad ``nvme_path`` and a disk too small fail before the first step;
  a record altered or left from another step is refused by the next step, naming the file.
  (The swap layer's own faults, ENOSPC mid-write included, are in tests/unit/test_swap.py.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.harness import RankFailure, run_ranks
from tests.distributed.reference import TrainResult, TrainSpec, assert_parity

WORLD = 2


def _offloads(stage: int, folder: str) -> dict[str, dict[str, Any]]:
    nvme = {"device": "nvme", "nvme_path": folder}
    out: dict[str, dict[str, Any]] = {
        "cpu": {"offload_optimizer": {"device": "cpu"}},
        "nvme": {"offload_optimizer": nvme},
    }
    if stage == 3:
        out["nvme+params"] = {"offload_optimizer": nvme, "offload_param": nvme}
    return out


def _parity_body(
    rank: int, world: int, spec: TrainSpec, stage: int, folder: str
) -> dict[str, TrainResult]:
    from tests.distributed.reference import train_accel_zero_rank

    # A small sub_group_size: many records, parameters split across them (the hard case).
    base = {"stage": stage, "param_persistence_threshold": 100, "sub_group_size": 3000}
    results = {"none": train_accel_zero_rank(rank, world, spec, base)}
    for name, offload in _offloads(stage, folder).items():
        results[name] = train_accel_zero_rank(rank, world, spec, {**base, **offload})
    return results if rank == 0 else {}


@pytest.mark.parametrize("mixed", ["no", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_trains_like_no_offload(
    rank_pool: Any, tmp_path: Path, stage: int, mixed: str
) -> None:
    spec = TrainSpec(model="gpt2", mixed_precision=mixed, grad_accum=2, max_grad_norm=0.5)  # type: ignore[arg-type]
    results = run_ranks(
        _parity_body, WORLD, spec, stage, str(tmp_path), timeout=600, pool=rank_pool(WORLD)
    )[0]
    for name, result in results.items():
        # The CPU Adam kernel computes AdamW's arithmetic in another order (fp32: ~1e-7).
        assert_parity(results["none"], result, spec, label=f"stage {stage} {mixed} {name}")


def _read_ahead_body(rank: int, world: int, spec: TrainSpec, folder: str) -> dict[str, Any]:
    from tests.distributed.reference import train_accel_zero_rank

    # More units than parameter swap buffers, and a backward that gathers each unit again
    # (the recomputed forward of gradient checkpointing), as scripts/bench_scale.py runs a
    # Llama. (The read-ahead starving a gather is pinned down in tests/unit/test_swap.py.)
    nvme = {"device": "nvme", "nvme_path": folder, "buffer_count": 2}
    base = {"stage": 3, "param_persistence_threshold": 0, "max_reuse_distance": 0}
    offload = {"offload_optimizer": {**nvme, "buffer_count": 4}, "offload_param": nvme}
    results = {"none": train_accel_zero_rank(rank, world, spec, base)}
    results["nvme+params"] = train_accel_zero_rank(rank, world, spec, {**base, **offload})
    return results if rank == 0 else {}


def test_gradient_checkpointing_with_parameters_on_nvme_trains_like_no_offload(
    rank_pool: Any, tmp_path: Path
) -> None:
    spec = TrainSpec(
        model="llama",
        model_kwargs={"n_layer": 6},
        mixed_precision="bf16",
        gradient_checkpointing=True,
    )
    results = run_ranks(
        _read_ahead_body, WORLD, spec, str(tmp_path), timeout=600, pool=rank_pool(WORLD)
    )[0]
    assert_parity(results["none"], results["nvme+params"], spec, label="checkpointing, nvme+params")


def _resume_body(rank: int, world: int, folder: str, offload_first: bool) -> dict[str, Any]:
    from tests.distributed.test_checkpoint_resume import _run, _spec

    spec = _spec("bf16", world)
    (Path(folder) / "swap").mkdir(exist_ok=True)
    nvme = {"device": "nvme", "nvme_path": str(Path(folder) / "swap")}
    plain = {"stage": 3, "param_persistence_threshold": 100, "sub_group_size": 3000}
    swapped = {**plain, "offload_optimizer": nvme, "offload_param": nvme}
    ckpt = str(Path(folder) / "ckpt")
    first, second = (swapped, swapped) if offload_first else (plain, swapped)
    whole = _run(rank, world, spec, first, range(8))
    _run(rank, world, spec, first, range(4), save=ckpt)
    resumed = _run(rank, world, spec, second, range(4, 8), resume=ckpt)
    return {"whole": whole, "resumed": resumed}


def test_resume_with_the_optimizer_on_nvme_is_bit_exact(rank_pool: Any, tmp_path: Path) -> None:
    out = run_ranks(_resume_body, WORLD, str(tmp_path), True, timeout=600, pool=rank_pool(WORLD))
    for res in out:
        assert res["resumed"]["losses"] == res["whole"]["losses"][4:]
        assert res["resumed"]["draws"] == res["whole"]["draws"][4:]
        for key, value in res["whole"]["state"].items():
            assert torch.equal(res["resumed"]["state"][key], value), key


def test_a_checkpoint_without_offload_resumes_with_nvme_offload(
    rank_pool: Any, tmp_path: Path
) -> None:
    out = run_ranks(_resume_body, WORLD, str(tmp_path), False, timeout=600, pool=rank_pool(WORLD))
    spec_tol = TrainSpec(mixed_precision="bf16")
    for res in out:
        # torch's AdamW before the checkpoint, the CPU Adam kernel after: equal within bf16
        # (the kernel's fp32 arithmetic differs from torch's at ~1e-7).
        expected = TrainResult(losses=res["whole"]["losses"][4:], grad_norms=[], state_dict={})
        actual = TrainResult(losses=res["resumed"]["losses"], grad_norms=[], state_dict={})
        assert_parity(expected, actual, spec_tol, label="none -> nvme")


def _estimate_body(rank: int, world: int, stage: int, offload: dict[str, Any]) -> dict[str, Any]:
    from accel_zero import Accelerator
    from accel_zero.estimator import estimate, shapes_from_module
    from tests.distributed.models import build_model, make_batches

    zero = {"stage": stage, "param_persistence_threshold": 100, **offload}
    accelerator = Accelerator(zero_config=zero, mixed_precision="bf16")
    model = build_model("gpt2", seed=0)
    shapes = shapes_from_module(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = make_batches(1, 1, world, 2, 16, 96).for_rank(rank)[0]
    accelerator.backward(model(input_ids=x, labels=x).loss)
    optimizer.step()
    report = accelerator.memory_report()["per_device"]
    traced = {
        (kind, place): report.get(place, {}).get(kind, 0)
        for kind in ("params", "grads", "optimizer_state")
        for place in ("cpu", "nvme")
    }
    off_opt = offload.get("offload_optimizer", {}).get("device", "none")
    off_param = offload.get("offload_param", {}).get("device", "none")
    (row,) = [
        r
        for r in estimate(
            shapes,
            world_size=world,
            mixed_precision="bf16",
            param_persistence_threshold=100,
            host_is_device=True,  # no GPU: the device is the host
        )
        if (r.stage, r.offload_optimizer, r.offload_param) == (stage, off_opt, off_param)
    ]
    estimated = {
        (kind, "nvme" if place == "nvme" else "cpu"): 0
        for kind in ("params", "grads", "optimizer_state")
        for place in ("cpu", "nvme")
    }
    for (kind, place), n in row.by_place.items():
        key = (kind, "nvme" if place == "nvme" else "cpu")
        estimated[key] += n
    return {"traced": traced, "estimated": estimated}


@pytest.mark.parametrize(
    ("stage", "which"),
    [(1, "cpu"), (1, "nvme"), (2, "nvme"), (3, "cpu"), (3, "nvme"), (3, "nvme+params")],
)
def test_estimate_equals_memory_report_with_offload(
    rank_pool: Any, tmp_path: Path, stage: int, which: str
) -> None:
    offload = _offloads(stage, str(tmp_path))[which]
    for out in run_ranks(_estimate_body, WORLD, stage, offload, timeout=300, pool=rank_pool(WORLD)):
        assert out["traced"] == out["estimated"], out


def _files_body(rank: int, world: int, folder: str) -> dict[str, Any]:
    from accel_zero import Accelerator
    from tests.distributed.models import build_model, make_batches

    nvme = {"device": "nvme", "nvme_path": folder}
    accelerator = Accelerator(  # threshold 0: every tensor is sharded, so swapped
        zero_config={
            "stage": 3,
            "param_persistence_threshold": 0,
            "offload_optimizer": nvme,
            "offload_param": nvme,
        }
    )
    model = build_model("gpt2", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = make_batches(1, 1, world, 2, 16, 96).for_rank(rank)[0]
    accelerator.backward(model(input_ids=x, labels=x).loss)
    optimizer.step()
    rank_dir = next(Path(folder).glob(f"*/rank{rank}"))
    modes = {
        "run": stat.S_IMODE(rank_dir.parent.stat().st_mode),
        "rank": stat.S_IMODE(rank_dir.stat().st_mode),
        "files": {stat.S_IMODE(f.stat().st_mode) for f in rank_dir.iterdir()},
        "count": len(list(rank_dir.iterdir())),
    }
    stats = accelerator.zero_stats()
    accelerator.end_training()
    modes["left"] = [str(p) for p in Path(folder).rglob("*")] if rank == 0 else []
    modes["written"] = stats["swap_bytes_written"]
    modes["read"] = stats["swap_bytes_read"]
    return modes


def test_swap_files_are_private_and_removed_at_end_training(tmp_path: Path) -> None:
    out = run_ranks(_files_body, WORLD, str(tmp_path), timeout=300)  # fresh ranks: it ends them
    for modes in out:
        assert modes["run"] == 0o700 and modes["rank"] == 0o700, modes
        assert modes["files"] == {0o600} and modes["count"] > 0, modes
        assert modes["written"] > 0 and modes["read"] > 0, modes
    assert out[0]["left"] == [], out[0]["left"]


def _bad_path_body(rank: int, world: int, path: str) -> str:
    from accel_zero import Accelerator
    from tests.distributed.models import build_model

    accelerator = Accelerator(
        zero_config={
            "stage": 3,
            "param_persistence_threshold": 0,
            "offload_optimizer": {"device": "nvme", "nvme_path": path},
        }
    )
    model = build_model("gpt2", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    try:
        accelerator.prepare(model, optimizer)
    except (ValueError, OSError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_a_bad_nvme_path_fails_at_prepare_naming_it(rank_pool: Any, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for path in (missing, a_file):
        for msg in run_ranks(_bad_path_body, WORLD, str(path), timeout=120, pool=rank_pool(WORLD)):
            assert "zero_config.offload_optimizer.nvme_path" in msg and str(path) in msg, msg


@contextlib.contextmanager
def _tiny_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_disk_too_small_fails_at_prepare_naming_path_and_bytes(
    rank_pool: Any, tmp_path: Path
) -> None:
    with _tiny_tmpfs(tmp_path, "64k") as mnt:
        msgs = run_ranks(_bad_path_body, WORLD, str(mnt), timeout=120, pool=rank_pool(WORLD))
    for msg in msgs:
        assert str(mnt) in msg and "bytes" in msg, msg


def _tamper_body(rank: int, world: int, folder: str, how: str) -> str:
    from accel_zero import Accelerator
    from tests.distributed.models import build_model, make_batches

    nvme = {"device": "nvme", "nvme_path": folder}
    accelerator = Accelerator(
        zero_config={"stage": 3, "param_persistence_threshold": 0, "offload_optimizer": nvme}
    )
    model = build_model("gpt2", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = make_batches(1, 2, world, 2, 16, 96).for_rank(rank)
    record = next(Path(folder).glob(f"*/rank{rank}/opt*0.swp"))
    saved = record.read_bytes()
    for i, x in enumerate(batches):
        accelerator.backward(model(input_ids=x, labels=x).loss)
        if i == 1:
            data = bytearray(record.read_bytes())
            if how == "altered":
                data[8192] ^= 0xFF  # a byte of the first field
                record.write_bytes(bytes(data))
            else:  # stale: the file as it was before the first step
                record.write_bytes(saved)
        try:
            optimizer.step()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        optimizer.zero_grad()
    return "no error"


@pytest.mark.parametrize("how", ["altered", "stale"])
def test_a_damaged_swap_record_is_refused_naming_the_file(tmp_path: Path, how: str) -> None:
    # Fresh ranks: both fail in the same step, in their own record (no collective hangs).
    try:
        msgs = run_ranks(_tamper_body, WORLD, str(tmp_path), how, timeout=300)
    except RankFailure as exc:  # pragma: no cover - the message says why
        raise AssertionError(str(exc)) from exc
    for msg in msgs:
        assert "opt" in msg and ".swp" in msg, msg
        assert (
            ("checksum" in msg or "corrupt" in msg.lower())
            if how == "altered"
            else ("generation" in msg)
        ), msg
