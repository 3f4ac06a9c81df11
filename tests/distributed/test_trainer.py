"""``accel_zero.Trainer`` against ``transformers.Trainer`` under DDP, 2 gloo ranks.

The reference is the plain Trainer with ``TrainingArguments(use_cpu=True)`` under the
harness's torchrun-style environment: that makes Accelerate's ``PartialState`` start a gloo
group (MULTI_CPU), and the plain Trainer then wraps the model in DDP. Both Trainers run the
same tiny GPT-2 (tied embeddings), seed, data and arguments, with gradient accumulation and
clipping that really clips; the logged losses, gradient norms and learning rates of every
logging step and the final weights must agree within fp32 tolerance
(``reference.tolerance``), at ZeRO stages 1, 2 and 3.

Resume (issue 10): a run stopped after its checkpoint and resumed in a new Trainer equals
the uninterrupted run bit for bit (losses, clip norms, learning rates, weights, random
draws), mid-epoch and at an epoch boundary; ``load_best_model_at_end`` restores the best
checkpoint's sharded state; folders without a sharded state are refused, named.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.reference import TrainResult, TrainSpec, assert_parity

WORLD = 2
SPEC = TrainSpec(model="gpt2")  # the tiny model and its fp32 tolerance
MAX_GRAD_NORM = 0.5  # below the tiny model's gradient norms (~1.0-1.5): every step clips
STEPS = 3
GRAD_ACCUM = 2
PER_DEVICE = 2
ROWS = STEPS * GRAD_ACCUM * PER_DEVICE * WORLD  # one epoch is exactly the run


def _rows(n: int, seed: int, seq: int = 16, vocab: int = 96) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (seq,), generator=g)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def _args(out_dir: str, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    settings: dict[str, Any] = {
        "output_dir": out_dir,
        "use_cpu": True,  # gloo DDP for the plain Trainer under the harness's environment
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
        "max_steps": STEPS,
        "per_device_train_batch_size": PER_DEVICE,
        "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": GRAD_ACCUM,
        "max_grad_norm": MAX_GRAD_NORM,
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "logging_steps": 1,
        "save_strategy": "no",
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def _trainer(stage: int | None, out_dir: str, **kwargs: Any) -> Any:
    """The plain Trainer (stage None) or accel_zero's, on the tiny GPT-2."""
    import transformers

    from accel_zero import trainer as accel_zero_trainer
    from tests.distributed.models import build_model

    kwargs.setdefault("args", _args(out_dir))
    kwargs.setdefault("train_dataset", _rows(ROWS, seed=7))
    model = build_model("gpt2", seed=0)
    if stage is None:
        return transformers.Trainer(model=model, **kwargs)
    # Threshold 0: every parameter is sharded, the hardest layout.
    zero = {"stage": stage, "param_persistence_threshold": 0}
    return accel_zero_trainer.Trainer(model=model, zero_config=zero, **kwargs)


def _logged(trainer: Any, key: str) -> list[float]:
    return [float(h[key]) for h in trainer.state.log_history if key in h and "loss" in h]


def _final_weights(trainer: Any, stage: int | None) -> dict[str, torch.Tensor]:
    if stage is None:
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return dict(trainer.accelerator.get_state_dict(trainer.model))  # full on rank 0


def _train_body(rank: int, world_size: int, stage: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, s in (("ddp", None), ("accel_zero", stage)):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = _trainer(s, tmp)
            trainer.train()
            out[name] = {
                "wrapped": type(trainer.model_wrapped).__name__,
                "losses": _logged(trainer, "loss"),
                "grad_norms": _logged(trainer, "grad_norm"),
                "lrs": _logged(trainer, "learning_rate"),
                "weights": _final_weights(trainer, s),
            }
    return out if rank == 0 else {}


def _result(run: dict[str, Any]) -> TrainResult:
    return TrainResult(
        losses=run["losses"], grad_norms=run["grad_norms"], state_dict=run["weights"]
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainer_matches_transformers_trainer_under_ddp(rank_pool: Any, stage: int) -> None:
    res = run_ranks(_train_body, WORLD, stage, timeout=240, pool=rank_pool(WORLD))[0]
    ddp, zero = res["ddp"], res["accel_zero"]
    # The reference really is DDP, and the run really accumulates and clips.
    assert ddp["wrapped"] == "DistributedDataParallel", ddp["wrapped"]
    assert zero["wrapped"] == "GPT2LMHeadModel", zero["wrapped"]  # in place, never wrapped
    assert len(ddp["losses"]) == STEPS, ddp["losses"]
    assert min(ddp["grad_norms"]) > MAX_GRAD_NORM, ddp["grad_norms"]
    assert zero["lrs"] == ddp["lrs"]
    assert_parity(_result(ddp), _result(zero), SPEC, label=f"Trainer stage {stage}")


def _flow_body(rank: int, world_size: int, export_dir: str) -> dict[str, Any]:
    """evaluate -> train -> evaluate -> predict -> save_model on accel_zero ZeRO-3, and the
    same numbers from plain Trainers under DDP."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The reference evaluates "before" on its own Trainer: a plain Trainer that evaluates
        # first never wraps the model in DDP afterwards (Accelerate's prepare_model skips a
        # model already marked prepared), so its ranks would train on unsynced gradients.
        before = _trainer(None, tmp, eval_dataset=_rows(10, seed=3)).evaluate()["eval_loss"]
        trainer = _trainer(None, tmp, eval_dataset=_rows(10, seed=3))
        trainer.train()
        out["ddp"] = {
            "wrapped": type(trainer.model_wrapped).__name__,
            "eval": [before, trainer.evaluate()["eval_loss"]],
            "losses": _logged(trainer, "loss"),
            "predictions": torch.as_tensor(trainer.predict(_rows(6, seed=5)).predictions),
            "weights": _final_weights(trainer, None),
        }
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(3, tmp, eval_dataset=_rows(10, seed=3))
        before = trainer.evaluate()["eval_loss"]  # prepares (shards) the model
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
        pred = trainer.predict(_rows(6, seed=5))
        trainer.save_model(export_dir)
        out["accel_zero"] = {
            "eval": [before, after],
            "losses": _logged(trainer, "loss"),
            "predictions": torch.as_tensor(pred.predictions),
        }
    return out if rank == 0 else {}


def test_evaluate_train_predict_and_save_model_zero3(rank_pool: Any, tmp_path: Path) -> None:
    """Evaluating first (which prepares, and so shards, the model) changes nothing; the
    export loads with plain from_pretrained and holds the trained weights."""
    from transformers import GPT2LMHeadModel

    export = tmp_path / "export"
    res = run_ranks(_flow_body, WORLD, str(export), timeout=240, pool=rank_pool(WORLD))[0]
    ddp, zero = res["ddp"], res["accel_zero"]
    assert ddp["wrapped"] == "DistributedDataParallel", ddp["wrapped"]
    assert zero["eval"] == pytest.approx(ddp["eval"], rel=1e-6)
    assert zero["eval"][1] != ddp["eval"][0]  # training moved the eval loss
    assert zero["losses"] == pytest.approx(ddp["losses"], rel=1e-6)
    assert zero["predictions"].shape == (6, 16, 96)
    torch.testing.assert_close(zero["predictions"], ddp["predictions"], rtol=1e-5, atol=1e-5)

    reloaded = GPT2LMHeadModel.from_pretrained(export)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    state = reloaded.state_dict()
    for key, expected in ddp["weights"].items():
        if key in state:
            torch.testing.assert_close(state[key], expected, rtol=1e-6, atol=1e-5, msg=key)
    assert "transformer.h.0.attn.c_attn.weight" in state


def _errors_body(rank: int, world_size: int, shared_dir: str) -> dict[str, str]:
    """Each misuse raises at once, naming the argument and the fix; a checkpoint holds the
    sharded state, not rank 0's shard of the optimizer."""
    from accel_zero import trainer as accel_zero_trainer
    from tests.distributed.models import build_model

    seen: dict[str, str] = {}

    def record(name: str, fn: Any, exc_type: type[BaseException]) -> None:
        try:
            fn()
        except exc_type as exc:
            seen[name] = str(exc)
        else:
            seen[name] = "<no error>"

    with tempfile.TemporaryDirectory() as tmp:
        # The block of `accel-zero launch` reaches the Trainer as it reaches Accelerator().
        trainer = accel_zero_trainer.Trainer(
            model=build_model("gpt2", seed=0), args=_args(tmp), train_dataset=_rows(ROWS, 7)
        )
        seen["launch_stage"] = str(trainer.accelerator.zero_config.stage)

        def fsdp() -> None:
            _trainer(3, tmp, args=_args(tmp, fsdp_config={"version": 2}))

        def deepspeed() -> None:
            args = _args(tmp)
            args.deepspeed = "ds_config.json"  # what TrainingArguments(deepspeed=...) leaves
            _trainer(3, tmp, args=args)

        def clipping() -> None:
            accel_zero_trainer.Trainer(
                model=build_model("gpt2", seed=0),
                args=_args(tmp),
                zero_config={"stage": 3, "gradient_clipping": 2.0},
            )

        def resume() -> None:  # tmp holds no checkpoint yet
            _trainer(3, tmp).train(resume_from_checkpoint=True)

        def best_without_state() -> None:
            args = _args(
                tmp,
                save_only_model=True,
                load_best_model_at_end=True,
                eval_strategy="steps",
                save_strategy="steps",
                metric_for_best_model="loss",
            )
            _trainer(3, tmp, args=args)

        def resume_from(folder: Path) -> Any:
            return lambda: _trainer(3, tmp).train(resume_from_checkpoint=str(folder))

        def lone_cpu_ranks() -> None:  # last: it leaves Accelerate's state single-process
            _trainer(3, tmp, args=_args(tmp, use_cpu=False))

        record("fsdp", fsdp, ValueError)
        record("deepspeed", deepspeed, ValueError)
        record("clipping", clipping, ValueError)
        record("resume", resume, ValueError)
        record("best_without_state", best_without_state, ValueError)

        ckpt_dir = shared_dir  # every rank writes its rows into one checkpoint folder
        _trainer(3, ckpt_dir, args=_args(ckpt_dir, save_strategy="steps", save_steps=2)).train()
        folder = Path(ckpt_dir) / "checkpoint-2"
        seen["checkpoints"] = json.dumps(sorted(p.name for p in Path(ckpt_dir).iterdir()))
        seen["checkpoint_files"] = json.dumps(sorted(p.name for p in folder.iterdir()))
        # A Trainer checkpoint without the sharded state (what save_only_model=True or
        # transformers.Trainer writes), and one whose sharded save never got published.
        plain, interrupted = Path(tmp) / "plain-checkpoint", Path(tmp) / "interrupted-checkpoint"
        shutil.copytree(folder, plain, ignore=shutil.ignore_patterns("LATEST", "v0*"))
        shutil.copytree(folder, interrupted, ignore=shutil.ignore_patterns("LATEST"))
        record("no_sharded_state", resume_from(plain), ValueError)
        record("interrupted", resume_from(interrupted), ValueError)
        record("lone_cpu_ranks", lone_cpu_ranks, ValueError)
    return seen


def test_conflicts_fail_clearly_and_checkpoints_hold_the_sharded_state(
    rank_pool: Any, tmp_path: Path
) -> None:
    env = {"ACCEL_ZERO_LAUNCH_CONFIG": json.dumps({"stage": 2})}
    results = run_ranks(
        _errors_body, WORLD, str(tmp_path), timeout=240, env=env, pool=rank_pool(WORLD)
    )
    for seen in results:
        assert seen["launch_stage"] == "2"
        assert "fsdp" in seen["fsdp"] and "Remove them" in seen["fsdp"], seen["fsdp"]
        assert "deepspeed=" in seen["deepspeed"], seen["deepspeed"]
        assert "zero_config" in seen["deepspeed"], seen["deepspeed"]
        assert "gradient_clipping=2.0" in seen["clipping"], seen["clipping"]
        assert "max_grad_norm" in seen["clipping"], seen["clipping"]
        assert "resume_from_checkpoint=True" in seen["resume"], seen["resume"]
        assert "no complete checkpoint" in seen["resume"], seen["resume"]
        assert "save_only_model" in seen["best_without_state"], seen["best_without_state"]
        msg = seen["no_sharded_state"]
        assert "plain-checkpoint holds no accel_zero sharded state" in msg, msg
        assert "from_pretrained(folder)" in msg and "save_only_model" in msg, msg
        msg = seen["interrupted"]
        assert "interrupted-checkpoint is incomplete" in msg and "LATEST" in msg, msg
        assert "use_cpu=True" in seen["lone_cpu_ranks"], seen["lone_cpu_ranks"]
        # save_steps=2 of 3 steps: at step 2 and (upstream saves the last step too) 3, each
        # with accelerator.save_state's sharded model + optimizer (LATEST -> v000001), the
        # from_pretrained export, the scheduler and the Trainer's state; never upstream's
        # optimizer.pt (it would hold one rank's shard).
        assert json.loads(seen["checkpoints"]) == ["checkpoint-2", "checkpoint-3"], seen
        files = set(json.loads(seen["checkpoint_files"]))
        expected = {"LATEST", "v000001", "model.safetensors", "config.json", "scheduler.pt"}
        assert expected | {"trainer_state.json"} <= files, files
        assert "optimizer.pt" not in files, files
        # The RNG states live in the sharded state only (see [Note: Trainer resume]).
        assert not any(name.startswith("rng_state") for name in files), files
    # The sharded state and the export beside it hold the same (final) weights.
    from safetensors.torch import load_file

    from accel_zero.checkpoint import export_checkpoint

    folder = tmp_path / "checkpoint-3"
    export_checkpoint(folder, tmp_path / "from-shards")
    exported = load_file(tmp_path / "from-shards" / "model.safetensors")
    beside = load_file(folder / "model.safetensors")
    assert exported.keys() == beside.keys() and len(beside) > 10, sorted(beside)
    for key, tensor in beside.items():
        assert torch.equal(exported[key], tensor), key


# ------------------------------------------------------------------ resume
RESUME_STEPS = 4
SAVE_STEPS = 2
DROPOUT = 0.1
"""Dropout on, so that a resumed run whose random generators are off shows in its losses."""


def _resume_trainer(stage: int, out_dir: Path, rows: int, **kwargs: Any) -> Any:
    """accel_zero's Trainer for the resume runs: 4 steps, a checkpoint every 2, dropout."""
    from torch import nn

    args = _args(str(out_dir), max_steps=RESUME_STEPS, save_strategy="steps", save_steps=SAVE_STEPS)
    trainer = _trainer(stage, str(out_dir), args=args, train_dataset=_rows(rows, seed=7), **kwargs)
    for module in trainer.model.modules():
        if isinstance(module, nn.Dropout):
            module.p = DROPOUT
    return trainer


def _by_step(trainer: Any) -> dict[int, dict[str, float]]:
    return {
        int(h["step"]): {k: float(h[k]) for k in ("loss", "grad_norm", "learning_rate")}
        for h in trainer.state.log_history
        if "loss" in h
    }


def _resume_body(rank: int, world_size: int, stage: int, rows: int, folder: str) -> dict[str, Any]:
    """Uninterrupted 4 steps; 4 steps stopped after the checkpoint at step 2; then a new
    Trainer (new model, new Accelerator) resumes that run's last checkpoint for steps 3-4."""
    from transformers import TrainerCallback

    class StopAfterCheckpoint(TrainerCallback):  # the run "dies" right after checkpoint-2
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == SAVE_STEPS:
                control.should_training_stop = True

    def result(trainer: Any) -> dict[str, Any]:  # taken right after each run
        return {
            "logs": _by_step(trainer),
            "draw": float(torch.rand(())),  # the random generators at the end of the run
            "weights": _final_weights(trainer, stage),
        }

    runs: dict[str, Any] = {}
    whole = _resume_trainer(stage, Path(folder) / "whole", rows)
    whole.train()
    runs["whole"] = result(whole)
    cut = _resume_trainer(stage, Path(folder) / "cut", rows, callbacks=[StopAfterCheckpoint()])
    cut.train()
    runs["cut"] = {"logs": _by_step(cut)}
    resumed = _resume_trainer(stage, Path(folder) / "cut", rows)
    resumed.train(resume_from_checkpoint=True)  # the newest complete checkpoint: checkpoint-2
    runs["resumed"] = result(resumed)
    return runs


@pytest.mark.parametrize(
    ("stage", "rows"),
    [
        (1, 16),  # 2 steps per epoch: the checkpoint falls on the epoch boundary
        (2, 32),  # 1 epoch: the resumed run skips the 4 micro-batches already trained
        (3, 32),
    ],
)
def test_resume_from_checkpoint_continues_the_run_bit_for_bit(
    rank_pool: Any, tmp_path: Path, stage: int, rows: int
) -> None:
    """Stopped after checkpoint-2 and resumed in a new Trainer, a run logs the losses, clip
    norms and learning rates of the uninterrupted run at steps 3-4 and ends with its weights
    and its random generators, bit for bit (same ranks, same arithmetic)."""
    out = run_ranks(
        _resume_body, WORLD, stage, rows, str(tmp_path), timeout=240, pool=rank_pool(WORLD)
    )
    for rank, runs in enumerate(out):
        whole, cut, resumed = runs["whole"]["logs"], runs["cut"]["logs"], runs["resumed"]["logs"]
        assert sorted(whole) == [1, 2, 3, 4] and sorted(cut) == [1, 2], (whole, cut)
        assert sorted(resumed) == [1, 2, 3, 4], resumed  # 1-2 from trainer_state.json
        for step in (3, 4):
            assert resumed[step] == whole[step], (rank, step, resumed[step], whole[step])
        lrs = [whole[s]["learning_rate"] for s in (1, 2, 3, 4)]
        assert lrs == sorted(lrs, reverse=True) and lrs[3] < lrs[2] < lrs[1], lrs  # decays
        assert runs["resumed"]["draw"] == runs["whole"]["draw"], rank
    whole_w, resumed_w = out[0]["whole"]["weights"], out[0]["resumed"]["weights"]
    assert whole_w.keys() == resumed_w.keys() and len(whole_w) > 10, sorted(whole_w)
    for key, value in whole_w.items():
        assert torch.equal(resumed_w[key], value), key
    assert (tmp_path / "cut" / "checkpoint-4").is_dir()  # the resumed run saves on


def _load_best_body(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    """load_best_model_at_end with the *highest* eval loss as best: checkpoint-2 (training
    lowers the loss on its own rows), which is not the last one."""
    args = _args(
        folder,
        max_steps=RESUME_STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        eval_strategy="steps",
        eval_steps=SAVE_STEPS,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer = _trainer(3, folder, args=args, eval_dataset=_rows(8, seed=7))
    trainer.train()
    evals = [float(h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    return {
        "best": trainer.state.best_model_checkpoint,
        "evals": evals,
        "weights": _final_weights(trainer, 3),
    }


def test_load_best_model_at_end_restores_the_best_checkpoints_sharded_state(
    rank_pool: Any, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = run_ranks(_load_best_body, WORLD, str(tmp_path), timeout=240, pool=rank_pool(WORLD))
    res = out[0]
    assert all(r["best"] == str(tmp_path / "checkpoint-2") for r in out), [r["best"] for r in out]
    assert res["evals"][0] > res["evals"][1], res["evals"]
    best = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    last = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert len(best) > 10 and best.keys() <= res["weights"].keys(), sorted(best)
    for key, value in best.items():
        assert torch.equal(res["weights"][key], value), key
    assert any(not torch.equal(last[k], best[k]) for k in best)  # step 4 really differs
