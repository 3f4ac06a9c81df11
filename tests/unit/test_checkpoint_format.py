"""The sharded checkpoint format on its own: ranks simulated by threads (one process).

Each simulated rank writes its own RowShards with its rank id, and the threads meet at a
``threading.Barrier`` where real ranks meet at a gloo barrier (tests/integration/
test_checkpoint_crash.py runs real processes, and kills them mid-save).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

from accel_zero.checkpoint import (
    CheckpointError,
    SaveOptions,
    begin_save,
    checkpoint_dir_for_load,
    checkpoint_dir_for_save,
    consolidate,
    export_checkpoint,
    is_complete,
    load_accelerator_objects,
    open_checkpoint,
    prune_checkpoints,
    save_accelerator_objects,
)
from accel_zero.checkpoint.save import CheckpointSave
from accel_zero.checkpoint.state import decode_state, encode_state
from accel_zero.shards import RowShard, ShardReader, local_row_range

REPO = Path(__file__).resolve().parents[2]
FAST = SaveOptions(fsync=False)


# ----------------------------------------------------------------- helpers
def cut(
    state: dict[str, Tensor], rank: int, world_size: int, *, replicated: Iterable[str] = ()
) -> Iterator[RowShard]:
    """This rank's rows of every tensor (torch.chunk rows), as the engine yields them."""
    whole = set(replicated)
    for key, tensor in state.items():
        if tensor.dim() == 0 or key in whole:
            yield RowShard(
                key=key,
                global_shape=tuple(tensor.shape),
                row_start=0,
                tensor=tensor,
                replicated=True,
            )
            continue
        start, end = local_row_range(tensor.shape[0], rank, world_size)
        yield RowShard(
            key=key, global_shape=tuple(tensor.shape), row_start=start, tensor=tensor[start:end]
        )


def save_ranks(
    directory: Path,
    world_size: int,
    body: Callable[[CheckpointSave], None],
    *,
    options: SaveOptions = FAST,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Run one save with ``world_size`` simulated ranks (threads); ``body(save)`` writes."""
    barrier = threading.Barrier(world_size, timeout=60)

    def wait() -> None:
        barrier.wait()

    errors: list[tuple[int, BaseException]] = []
    published: list[Path] = []

    def rank_main(rank: int) -> None:
        try:
            with begin_save(
                directory, rank=rank, world_size=world_size, barrier=wait, options=options
            ) as save:
                body(save)
                published.append(save.commit(metadata))
        except BaseException as exc:
            errors.append((rank, exc))
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:  # the lowest rank's own error, not what it caused on the others
        raise min(errors, key=lambda e: (isinstance(e[1], threading.BrokenBarrierError), e[0]))[1]
    assert len(set(published)) == 1
    return published[0]


def sample_state(seed: int = 0) -> dict[str, Tensor]:
    """Odd row counts (uneven chunks, ranks with no rows), several dtypes, 0-d and 1-row."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "model/embed.weight": torch.randn(13, 6, generator=gen),
        "model/norm.weight": torch.randn(6, generator=gen),
        "model/one_row": torch.randn(1, 3, generator=gen),
        "model/cube": torch.randn(5, 2, 3, generator=gen).to(torch.bfloat16),
        "model/scale": torch.tensor(0.5),
        "model/ids": torch.arange(9, dtype=torch.int64),
        "optim/embed.weight/exp_avg": torch.randn(13, 6, generator=gen),
        "optim/embed.weight/step": torch.tensor(7.0),
    }


def write_sample(directory: Path, world_size: int, seed: int = 0, **kwargs: Any) -> Path:
    state = sample_state(seed)
    return save_ranks(
        directory,
        world_size,
        lambda save: save.write_shards(cut(state, save.rank, world_size)),
        **kwargs,
    )


# --------------------------------------------------------------- the format
@pytest.mark.parametrize("readers", [1, 2, 3, 4])
def test_written_by_2_reads_on_any_world_size(tmp_path: Path, readers: int) -> None:
    state = sample_state()
    write_sample(tmp_path / "ckpt", 2, options=SaveOptions(fsync=False, max_file_size=200))
    with open_checkpoint(tmp_path / "ckpt") as reader:
        engine_view: ShardReader = reader  # mypy: the engine's loading interface
        assert engine_view.shape("model/norm.weight") == (6,)
        assert reader.world_size == 2
        assert set(reader.keys()) == set(state)
        for key, full in state.items():
            assert reader.shape(key) == tuple(full.shape)
            assert reader.dtype(key) == full.dtype
            if full.dim() == 0:
                assert torch.equal(reader.read_rows(key, 0, 0), full)
                continue
            for rank in range(readers):
                start, end = local_row_range(full.shape[0], rank, readers)
                assert torch.equal(reader.read_rows(key, start, end), full[start:end]), key
        # any range, including one spanning both writers' files, and an empty one
        assert torch.equal(
            reader.read_rows("model/embed.weight", 3, 11), state["model/embed.weight"][3:11]
        )
        assert reader.read_rows("model/embed.weight", 4, 4).shape == (0, 6)
        assert reader.shape("model/absent") is None
        with pytest.raises(ValueError, match=r"rows must lie in 0\.\.13"):
            reader.read_rows("model/embed.weight", 10, 14)


def test_files_rotate_are_plain_safetensors_and_index_records_rows(tmp_path: Path) -> None:
    state = sample_state()
    version = write_sample(
        tmp_path / "ckpt", 2, options=SaveOptions(fsync=False, max_file_size=200)
    )
    files = sorted(p.name for p in (version / "shards").glob("r00000-*.safetensors"))
    assert len(files) > 2, files  # rotated at 200 bytes
    index = json.loads((version / "shards" / "r00001.index.json").read_text())
    entry = index["tensors"]["model/embed.weight"]
    assert entry["global_shape"] == [13, 6] and entry["rows"] == [7, 13]
    assert entry["dtype"] == "float32"
    # replicated tensors are written once, by rank 0
    assert "optim/embed.weight/step" not in index["tensors"]
    assert index["tensors"]["model/one_row"]["file"] is None  # rank 1 owns none of 1 row
    with safe_open(str(version / entry["file"]), "pt") as f:  # readable by safetensors itself
        assert torch.equal(f.get_tensor("model/embed.weight"), state["model/embed.weight"][7:])
    manifest = json.loads((version / "MANIFEST.json").read_text())
    assert manifest["files"][entry["file"]] == (version / entry["file"]).stat().st_size


@pytest.mark.parametrize("direct_io", [True, False])
def test_large_reads_at_unaligned_offsets(tmp_path: Path, direct_io: bool) -> None:
    """Reads of 1 MiB and more go through O_DIRECT windows: unaligned starts, several
    windows, and the file's last partial block must all come back exact."""
    gen = torch.Generator().manual_seed(5)
    state = {
        "model/small": torch.randn(3, 7, generator=gen),  # puts the next tensor off-alignment
        "model/big": torch.randn(5003, 1031, generator=gen),  # ~20 MiB, 3 windows of 8 MiB
    }
    options = SaveOptions(fsync=False, direct_io=direct_io)
    save_ranks(
        tmp_path / "ckpt", 2, lambda s: s.write_shards(cut(state, s.rank, 2)), options=options
    )
    big = state["model/big"]
    ranges = [(0, 5003), (1, 5002), (333, 2502), (2501, 2503), (2502, 5003), (4000, 5003)]
    with open_checkpoint(tmp_path / "ckpt", direct_io=direct_io) as reader:
        for start, end in ranges:
            assert torch.equal(reader.read_rows("model/big", start, end), big[start:end]), (
                start,
                end,
            )
        assert torch.equal(reader.read("model/small"), state["model/small"])


def test_writer_consumes_each_shard_before_the_next(tmp_path: Path) -> None:
    """The engine may hand out views of one reused buffer."""
    values = [torch.full((4, 3), float(i)) for i in range(5)]

    def reused(rank: int) -> Iterator[RowShard]:
        buffer = torch.empty(4, 3)
        for i, value in enumerate(values):
            buffer.copy_(value)
            yield RowShard(key=f"model/t{i}", global_shape=(4, 3), row_start=0, tensor=buffer)
            buffer.fill_(-1.0)  # the next shard overwrites the buffer

    save_ranks(tmp_path / "ckpt", 1, lambda save: save.write_shards(reused(save.rank)))
    with open_checkpoint(tmp_path / "ckpt") as reader:
        for i, value in enumerate(values):
            assert torch.equal(reader.read(f"model/t{i}"), value)


def test_full_header_rotates_the_file(tmp_path: Path) -> None:
    state = {
        f"model/layer.{i}.a_rather_long_parameter_name.weight": torch.full((2,), float(i))
        for i in range(150)
    }  # ~110 header bytes each: 4 KiB of header (the O_DIRECT-aligned minimum) holds ~37
    options = SaveOptions(fsync=False, header_reserve=2048)
    version = save_ranks(
        tmp_path / "ckpt", 1, lambda s: s.write_shards(cut(state, 0, 1)), options=options
    )
    assert len(list((version / "shards").glob("*.safetensors"))) > 3
    with open_checkpoint(tmp_path / "ckpt") as reader:
        for key, value in state.items():
            assert torch.equal(reader.read(key), value)


def test_save_into_an_existing_checkpoint_replaces_it(tmp_path: Path) -> None:
    first = write_sample(tmp_path / "ckpt", 2, seed=1)
    second = write_sample(tmp_path / "ckpt", 2, seed=2)
    assert first != second and not first.exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["LATEST", second.name]
    with open_checkpoint(tmp_path / "ckpt") as reader:
        assert torch.equal(reader.read("model/embed.weight"), sample_state(2)["model/embed.weight"])


def test_publish_refuses_rows_that_overlap_or_are_missing(tmp_path: Path) -> None:
    write_sample(tmp_path / "ckpt", 2, seed=1)

    def overlapping(save: CheckpointSave) -> None:  # both ranks claim rows 0..3
        save.write_shards(
            [RowShard(key="model/w", global_shape=(6, 2), row_start=0, tensor=torch.ones(3, 2))]
        )

    with pytest.raises(RuntimeError, match=r"refusing to publish.*model/w.*overlap"):
        save_ranks(tmp_path / "ckpt", 2, overlapping)
    with open_checkpoint(tmp_path / "ckpt") as reader:  # the old checkpoint is untouched
        assert torch.equal(reader.read("model/embed.weight"), sample_state(1)["model/embed.weight"])
    with pytest.raises(ValueError, match="yielded twice"):
        save_ranks(
            tmp_path / "other",
            1,
            lambda s: s.write_shards([*cut({"model/w": torch.ones(2)}, 0, 1)] * 2),
        )


# ---------------------------------------------------- damaged checkpoints
def _complete_then_damaged(tmp_path: Path) -> tuple[Path, Path]:
    good = tmp_path / "checkpoints" / "checkpoint_1"
    bad = tmp_path / "checkpoints" / "checkpoint_2"
    write_sample(good, 2, seed=1)
    write_sample(bad, 2, seed=2)
    return good, bad


def test_missing_shard_file_is_named_with_the_last_complete_checkpoint(tmp_path: Path) -> None:
    good, bad = _complete_then_damaged(tmp_path)
    victim = next((bad / "v000001" / "shards").glob("r00001-*.safetensors"))
    victim.unlink()
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(bad)
    message = str(info.value)
    assert f"{victim} is missing" in message
    assert f"The last complete checkpoint in {good.parent} is {good}." in message
    assert info.value.path == victim and info.value.last_complete == good
    assert not is_complete(bad) and is_complete(good)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    _, bad = _complete_then_damaged(tmp_path)
    victim = next((bad / "v000001" / "shards").glob("r00000-*.safetensors"))
    size = victim.stat().st_size
    os.truncate(victim, size - 10)
    with pytest.raises(
        CheckpointError,
        match=rf"{victim} has {size - 10} bytes, the manifest recorded {size} \(truncated",
    ):
        open_checkpoint(bad)


def test_interrupted_save_is_incomplete(tmp_path: Path) -> None:
    _complete_then_damaged(tmp_path)
    fresh = tmp_path / "checkpoints" / "checkpoint_3"
    save = begin_save(fresh, rank=0, world_size=1, barrier=lambda: None, options=FAST)
    save.write_shards(cut(sample_state(), 0, 1))  # killed here: never committed
    save.abort()
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint_3 is incomplete: a save into it was interrupted.*"
        r"last complete checkpoint .* is .*checkpoint_2",
    ):
        open_checkpoint(fresh)


def test_not_a_checkpoint_and_dangling_pointer(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "optimizer.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="plain Accelerate checkpoint"):
        open_checkpoint(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        open_checkpoint(tmp_path / "nothing")
    version = write_sample(tmp_path / "ckpt", 1)
    os.rename(version, tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"LATEST names v000001, which does not exist"):
        open_checkpoint(tmp_path / "ckpt")


def test_another_models_checkpoint_is_refused(tmp_path: Path) -> None:
    write_sample(tmp_path / "ckpt", 2)
    reader = open_checkpoint(tmp_path / "ckpt")
    expected = {k: tuple(v.shape) for k, v in sample_state().items()}
    reader.check_compatible(expected)  # the same model
    other = {**expected, "model/embed.weight": (14, 6), "model/extra": (3,)}
    del other["model/norm.weight"]
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path / "ckpt", expected=other)
    message = str(info.value)
    assert "saved from another model" in message
    assert "1 keys missing (e.g. model/extra)" in message
    assert "model/embed.weight: checkpoint (13, 6), model (14, 6)" in message
    assert "1 unexpected (e.g. model/norm.weight)" in message
    assert info.value.path.name == "MANIFEST.json"
    reader.close()


def test_tampered_shard_header_is_refused(tmp_path: Path) -> None:
    version = write_sample(tmp_path / "ckpt", 1)
    victim = next((version / "shards").glob("*.safetensors"))
    data = bytearray(victim.read_bytes())
    at = data.index(b'"model/embed.weight"')
    data[at + 1 : at + 6] = b"xodel"  # same size: passes the manifest, fails the header check
    victim.write_bytes(bytes(data))
    with (
        open_checkpoint(tmp_path / "ckpt") as reader,
        pytest.raises(CheckpointError, match=r"does not hold 'model/embed\.weight'"),
    ):
        reader.read("model/embed.weight")


# ------------------------------------------------------ state without pickle
class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def test_state_round_trips_every_plain_type() -> None:
    np.random.seed(3)
    value = {
        "lr": [0.1, float("inf"), float("nan")],
        3: (1, 2, None),
        "__private": True,
        "nested": OrderedDict(b=torch.arange(3), a=np.arange(4, dtype=np.uint32)),
        "np": np.float32(1.5),
        "dtype": torch.bfloat16,
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }
    encoded, tensors = encode_state(value, what="test")
    json.dumps(encoded)  # JSON-able
    back = decode_state(json.loads(json.dumps(encoded)), tensors)
    assert back["lr"][:2] == [0.1, float("inf")] and np.isnan(back["lr"][2])
    assert back[3] == (1, 2, None) and back["__private"] is True
    assert torch.equal(back["nested"]["b"], torch.arange(3))
    assert back["nested"]["a"].dtype == np.uint32 and back["nested"]["a"].tolist() == [0, 1, 2, 3]
    assert back["np"] == np.float32(1.5) and back["dtype"] is torch.bfloat16
    random.setstate(back["python_rng"])
    np.random.set_state(back["numpy_rng"])


def test_unsafe_objects_are_refused_at_save_and_never_unpickled_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=r"test\['hook'\]: a .*_Evil cannot be checkpointed safely"):
        encode_state({"hook": _Evil()}, what="test")
    # a checkpoint crafted to carry a pickle payload: loaded with weights_only=True only
    encoded, tensors = encode_state({"ok": {1, 2}}, what="test")  # a set: pickled, allowed
    assert decode_state(encoded, tensors) == {"ok": {1, 2}}
    import io

    buffer = io.BytesIO()
    torch.save({"x": _Evil()}, buffer)
    tensors["p0"] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    with pytest.raises(Exception, match="Weights only load failed"):
        decode_state(encoded, tensors)
    assert not (tmp_path / "pwned").exists()


def test_no_unsafe_load_in_the_checkpoint_package() -> None:
    """Every torch.load call passes weights_only=True; nothing imports pickle."""
    import ast

    calls = 0
    for path in (REPO / "accel_zero" / "checkpoint").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill") for n in names), path
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert flags.get("weights_only") == "True", f"{path}:{node.lineno}"
    assert calls >= 2  # the check saw the loads it guards


# --------------------------------------------------- Accelerate's own objects
class Counter:
    """An object registered with register_for_checkpointing."""

    def __init__(self) -> None:
        self.count = 0
        self.history: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.history = state["count"], list(state["history"])


def _plain_accelerator(project_dir: Path | None = None, **project: Any) -> tuple[Any, ...]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    config = ProjectConfiguration(project_dir=str(project_dir) if project_dir else None, **project)
    accelerator = Accelerator(
        cpu=True,
        project_config=config,
        # the epoch-seeded sampler: its position is the epoch, restored exactly
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    data = torch.utils.data.TensorDataset(torch.arange(20.0).reshape(10, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, optimizer, scheduler, loader, counter


def _save_accelerator(accelerator: Any, directory: Path) -> Path:
    return save_ranks(directory, 1, lambda save: save_accelerator_objects(save, accelerator))


def test_accelerator_objects_round_trip_without_pickle(tmp_path: Path) -> None:
    accelerator, optimizer, scheduler, loader, counter = _plain_accelerator()
    for _epoch in range(2):  # two epochs: the loader's epoch counter is 2
        for _ in loader:
            optimizer.step()
            scheduler.step()
    counter.count, counter.history = 5, [0.5, 0.25]
    accelerator.step = 3
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    version = _save_accelerator(accelerator, tmp_path / "ckpt")
    expect = (torch.rand(3), random.random(), np.random.rand())
    saved_lr, saved_epoch = scheduler.get_last_lr(), loader.iteration
    order = [batch[0].tolist() for batch in loader]  # epoch 2's shuffle

    assert not list(version.rglob("*.pkl")) and not list(version.rglob("*.bin"))
    for _ in range(3):
        scheduler.step()
    counter.count, accelerator.step = 0, 0
    loader.set_epoch(7)
    with open_checkpoint(tmp_path / "ckpt") as reader:
        load_accelerator_objects(reader, accelerator)
    assert scheduler.get_last_lr() == saved_lr
    assert (counter.count, counter.history, accelerator.step) == (5, [0.5, 0.25], 3)
    assert loader.iteration == saved_epoch == 2
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (
        expect[0].tolist(),
        *expect[1:],
    )
    assert [batch[0].tolist() for batch in loader] == order  # the resumed epoch shuffles alike

    accelerator.register_for_checkpointing(Counter())
    with (
        open_checkpoint(tmp_path / "ckpt") as reader,
        pytest.raises(ValueError, match="holds 1 objects registered"),
    ):
        load_accelerator_objects(reader, accelerator)


def test_automatic_naming_total_limit_and_crash_leftovers(tmp_path: Path) -> None:
    accelerator, *_ = _plain_accelerator(tmp_path, automatic_checkpoint_naming=True, total_limit=2)
    parent = tmp_path / "checkpoints"
    for _ in range(3):
        target = checkpoint_dir_for_save(accelerator, None)
        _save_accelerator(accelerator, target)
        prune_checkpoints(accelerator, target)
        accelerator.project_configuration.iteration += 1
    assert sorted(p.name for p in parent.iterdir()) == ["checkpoint_1", "checkpoint_2"]
    accelerator.project_configuration.iteration = 2
    with pytest.raises(ValueError, match=r"checkpoint_2 \(2\) already exists"):
        checkpoint_dir_for_save(accelerator, None)
    # a crash while writing checkpoint_3: load_state() without a folder takes checkpoint_2
    begin_save(
        parent / "checkpoint_3", rank=0, world_size=1, barrier=lambda: None, options=FAST
    ).abort()
    assert checkpoint_dir_for_load(accelerator, None) == parent / "checkpoint_2"
    # the next save reuses the interrupted folder; pruning keeps total_limit complete ones
    accelerator.project_configuration.iteration = 3
    target = checkpoint_dir_for_save(accelerator, None)
    _save_accelerator(accelerator, target)
    assert prune_checkpoints(accelerator, target) == [parent / "checkpoint_1"]
    assert checkpoint_dir_for_load(accelerator, None) == parent / "checkpoint_3"
    with pytest.raises(ValueError, match="folder does not exist"):
        checkpoint_dir_for_load(accelerator, tmp_path / "nope")


# ------------------------------------------------------------------ export
def _engine_shards(model: nn.Module, rank: int, world_size: int) -> Iterator[RowShard]:
    """What the engine yields for a model: first names of parameters (tied ones once), all
    buffers replicated (non-persistent ones too: the export must drop them)."""
    state = {f"model/{n}": p.detach() for n, p in model.named_parameters()}
    buffers = {f"model/{n}": b for n, b in model.named_buffers()}
    yield from cut({**state, **buffers}, rank, world_size, replicated=buffers)


def _export_round_trip(model: nn.Module, tmp_path: Path, **export: Any) -> Path:
    def body(save: CheckpointSave) -> None:
        save.write_model_files(model)
        save.write_shards(_engine_shards(model, save.rank, 2))

    save_ranks(tmp_path / "ckpt", 2, body)
    return export_checkpoint(tmp_path / "ckpt", tmp_path / "out", **export)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_export_loads_with_from_pretrained(tmp_path: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM

    from tests.distributed.models import build_model

    model: Any = build_model(name, seed=3)
    model.generation_config.max_new_tokens = 17  # a saved generation config survives
    out = _export_round_trip(model, tmp_path, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()  # several shards
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 17
    reloaded: Any = AutoModelForCausalLM.from_pretrained(out)
    expected, got = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    if name == "gpt2":
        assert reloaded.lm_head.weight is reloaded.transformer.wte.weight


def test_export_reverts_transformers_conversions(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src")  # fused experts
    out = _export_round_trip(model, tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as f:
        original = set(f.keys())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == original
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16).float(), reloaded.state_dict()[key]), key


def test_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    consolidate.add_arguments(parser)
    write_sample(tmp_path / "ckpt", 2)
    assert consolidate.main(parser.parse_args([str(tmp_path / "ckpt"), str(tmp_path / "out")])) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:  # a plain module
        assert torch.equal(f.get_tensor("embed.weight"), sample_state()["model/embed.weight"])
        assert "embed.weight/exp_avg" not in f.keys()
    assert (
        consolidate.main(parser.parse_args([str(tmp_path / "nowhere"), str(tmp_path / "o")])) == 1
    )
    assert "no checkpoint folder" in capsys.readouterr().err


_PEAK_SCRIPT = """
import sys
from accel_zero.checkpoint import export_checkpoint
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
before = hwm()
export_checkpoint(sys.argv[1], sys.argv[2], max_shard_size="40MB")
print(before, hwm())
"""


def test_export_peak_memory_is_about_one_tensor(tmp_path: Path) -> None:
    mib = 1 << 20
    tensor_bytes, count = 16 * mib, 8  # a 128 MiB model of 16 MiB tensors

    def body(save: CheckpointSave) -> None:
        for i in range(count):  # made here: the test process never holds the model either
            layer = {f"model/layer{i}.weight": torch.full((1024, 4096), float(i))}
            save.write_shards(cut(layer, save.rank, 2))

    save_ranks(tmp_path / "ckpt", 2, body)
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "out")],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    before, after = (int(x) for x in result.stdout.split()[-2:])
    growth = after - before
    print(
        f"export VmHWM growth {growth / mib:.1f} MiB (model {count * tensor_bytes / mib:.0f} MiB)"
    )
    # the read buffer (one tensor) + the two 8 MiB O_DIRECT buffers (+ slack)
    assert growth < 2 * tensor_bytes + 16 * mib, growth
    assert growth < count * tensor_bytes / 2, growth
    with safe_open(str(tmp_path / "out" / "model-00004-of-00004.safetensors"), "pt") as f:
        assert f.get_slice("layer7.weight")[0:1, 0:2].tolist() == [[7.0, 7.0]]
