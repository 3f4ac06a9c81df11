"""``accel_zero.Trainer`` against ``transformers.Trainer`` under DDP, 2 gloo ranks.

The reference is the plain Trainer with ``TrainingArguments(use_cpu=True)`` under the
harness's torchrun-style environment: that makes Accelerate's ``PartialState`` start a gloo
group (MULTI_CPU), and the plain Trainer then wraps the model in DDP. Both Trainers run the
same tiny GPT-2 (tied embeddings), seed, data and arguments, with gradient accumulation and
clipping that really clips; the logged losses, gradient norms and learning rates of every
logging step and the final weights must agree within fp32 tolerance
(``reference.tolerance``), at ZeRO stages 1, 2 and 3.
"""

from __future__ import annotations

import json
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

        def resume() -> None:
            _trainer(3, tmp).train(resume_from_checkpoint=True)

        def lone_cpu_ranks() -> None:  # last: it leaves Accelerate's state single-process
            _trainer(3, tmp, args=_args(tmp, use_cpu=False))

        record("fsdp", fsdp, ValueError)
        record("deepspeed", deepspeed, ValueError)
        record("clipping", clipping, ValueError)
        record("resume", resume, NotImplementedError)

        ckpt_dir = shared_dir  # every rank writes its rows into one checkpoint folder
        _trainer(3, ckpt_dir, args=_args(ckpt_dir, save_strategy="steps", save_steps=2)).train()
        folder = Path(ckpt_dir) / "checkpoint-2"
        seen["checkpoints"] = json.dumps(sorted(p.name for p in Path(ckpt_dir).iterdir()))
        seen["checkpoint_files"] = json.dumps(sorted(p.name for p in folder.iterdir()))
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
        assert "resume_from_checkpoint" in seen["resume"], seen["resume"]
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
