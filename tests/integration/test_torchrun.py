"""``torchrun`` on a machine without a GPU: accel_zero runs distributed on gloo, no extra flag.

Plain ``accelerate.Accelerator()`` would run each rank as an independent single
process there (``DistributedType.NO``, no gradient averaging). The config comes
from ``ACCEL_ZERO_CONFIG`` (a YAML path), the route for launchers other than
``accel-zero launch``. The model is built under ``lazy_init`` with a 0-d parameter, whose
replicated DTensor ``prepare`` gathers on the lazy mesh: after that, ``end_training()`` must
still free the gloo group (see [Note: a mesh keeps its group alive]).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.distributed.harness import find_free_port

SCRIPT = textwrap.dedent(
    """
    import glob, json, os, sys
    import torch
    from accel_zero import Accelerator, lazy_init


    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
            )
            self.scale = torch.nn.Parameter(torch.tensor(1.0))  # 0-d: replicated DTensor

        def forward(self, x):
            return self.body(x) * self.scale


    accelerator = Accelerator()
    torch.manual_seed(0)
    with lazy_init(accelerator):  # built sharded; prepare gathers the 0-d DTensor
        model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(1 + accelerator.process_index)  # different data on each rank
    for _ in range(2):
        x = torch.randn(4, 8)
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    state = accelerator.get_state_dict(model)
    out = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "stage": accelerator.zero_config.stage,
        "checksum": float(sum(v.double().sum() for v in state.values())) if state else None,
        "rank": accelerator.process_index,
    }
    # Tear the process group down before exit, as an Accelerate script should; its gloo
    # threads must be gone afterwards (left to interpreter exit, they can abort it).
    accelerator.end_training()
    out["threads_after_end_training"] = sorted(
        open(p).read().strip() for p in glob.glob("/proc/self/task/*/comm")
    )
    with open(os.path.join(sys.argv[1], f"rank{out['rank']}.json"), "w") as f:
        json.dump(out, f)
    """
)


def test_torchrun_without_gpu_runs_distributed_on_gloo(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    cfg = tmp_path / "zero.yaml"
    cfg.write_text("zero_config:\n  stage: 2\n  param_persistence_threshold: 0\n")
    env = {**os.environ, "ACCEL_ZERO_CONFIG": str(cfg), "OMP_NUM_THREADS": "1"}
    env.pop("ACCEL_ZERO_LAUNCH_CONFIG", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={find_free_port()}", str(script), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["distributed_type"] == "DistributedType.MULTI_CPU"
        assert r["num_processes"] == 2
        assert r["stage"] == 2  # from ACCEL_ZERO_CONFIG
    assert ranks[0]["checksum"] is not None  # main rank holds the full state dict
    for r in ranks:  # end_training() really freed the gloo group (no worker threads left)
        assert not [t for t in r["threads_after_end_training"] if "gloo" in t], r
