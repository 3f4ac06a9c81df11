"""Consolidated export on 2 gloo ranks: lazily built model -> streamed safetensors -> reload.

``_gathered_units`` stands in for ``Engine.iter_full_state_dict`` where the point is the
writer (every rank iterates; the gather is a collective; the main rank gets tensors, the
others empty dicts). ``test_accelerator_save_model_round_trip`` drives the real engine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from tests.distributed.harness import init_pg, run_ranks
from tests.distributed.test_lazy_common import make_checkpoint


def _gathered_units(model: nn.Module, rank: int) -> Iterator[dict[str, Tensor]]:
    """Full tensors per unit (a ``_no_split_modules`` block, then the rest), on rank 0 only."""
    from accel_zero import hf

    classes = hf.no_split_module_classes(model)
    prefixes = [name + "." for name, m in model.named_modules() if name and isinstance(m, classes)]
    state = model.state_dict(keep_vars=True)
    groups = [[k for k in state if k.startswith(p)] for p in prefixes]
    grouped = {k for g in groups for k in g}
    groups.append([k for k in state if k not in grouped])
    for keys in groups:
        unit = {}
        for key in keys:
            value = state[key]
            full = value.full_tensor() if isinstance(value, DTensor) else value  # collective
            unit[key] = full.detach().clone()
        yield unit if rank == 0 else {}


def _export_lazy(rank: int, world_size: int, src: str, out: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from accel_zero import lazy_init
    from accel_zero.checkpoint import write_consolidated
    from accel_zero.comm import Comm

    with init_pg(rank, world_size):
        comm = Comm()

        def agree(value: str | None) -> str | None:
            return comm.all_gather_object(value, what="export status")[0]  # type: ignore[no-any-return]

        with lazy_init(None):
            model = AutoModelForCausalLM.from_pretrained(src)
        write_consolidated(
            _gathered_units(model, rank),
            model,
            out,
            is_main=rank == 0,
            max_shard_size=30_000,
            agree=agree,
        )

        # a failure on the main rank mid-stream: every rank still finishes the collectives
        # and raises; the previous checkpoint stays as it was
        def broken() -> Iterator[dict[str, Any]]:
            for i, unit in enumerate(_gathered_units(model, rank)):
                yield {**unit, "oops": object()} if (i == 1 and rank == 0) else unit

        try:
            write_consolidated(broken(), model, out, is_main=rank == 0, agree=agree)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": None}


def test_streamed_export_of_lazy_model_round_trips(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = make_checkpoint("llama", tmp_path / "src")
    out = tmp_path / "out"
    results = run_ranks(_export_lazy, 2, str(src), str(out), timeout=240)
    assert results[0]["error"].startswith("AttributeError"), results
    assert results[1]["error"].startswith("RuntimeError: save_model failed on the main rank")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    plain = AutoModelForCausalLM.from_pretrained(src)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), reloaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def _accelerator_round_trip(rank: int, world_size: int, src: str, out: str) -> bool:
    from transformers import AutoModelForCausalLM

    from accel_zero import Accelerator, lazy_init

    accelerator = Accelerator(cpu=True)
    with lazy_init(accelerator):
        model = AutoModelForCausalLM.from_pretrained(src)
    model = accelerator.prepare(model)
    accelerator.save_model(model, out, max_shard_size="40KB")
    return accelerator.is_main_process


def test_accelerator_save_model_round_trip(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = make_checkpoint("gpt2", tmp_path / "src")
    out = tmp_path / "out"
    run_ranks(_accelerator_round_trip, 2, str(src), str(out), timeout=240)
    files = os.listdir(out)
    assert "config.json" in files and "generation_config.json" in files
    plain = AutoModelForCausalLM.from_pretrained(src)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), reloaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
