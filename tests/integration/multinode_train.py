"""A few ZeRO-3 steps of the tiny model under any launcher; each rank writes what it saw.

Run by tests/integration/test_multinode_launch.py under ``accel-zero launch`` (one
machine or several), as a user script would be: only the public API
(``accel_zero.Accelerator``, ``prepare``, ``backward``, ``optimizer.step``,
``zero_grad``, ``gather``)::

    accel-zero launch --config_file launch.yaml tests/integration/multinode_train.py OUT_DIR

Rank ``r`` writes ``OUT_DIR/rank{r}.json``: the job's world size, this rank's local
rank and machine (torchrun's ``GROUP_RANK``), every rank's (pid, machine) gathered over
the job (the same list on every rank only if the ranks form one job), and the per-step
losses of every rank, gathered. The data depend on the world size and the rank only,
so 2 machines x 1 process and 1 machine x 2 processes must log the same losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

# The tiny model and data live in the test tree; the launcher runs this file directly.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accel_zero import Accelerator
from tests.distributed.models import build_model, make_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    accelerator = Accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    machine = int(os.environ.get("GROUP_RANK", "0"))
    model = build_model("plain", seed=0)  # same weights in every process
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Rank r's rows of each global batch: a function of (seed, world size, rank) only.
    batches = make_batches(seed=1, n_steps=args.steps, world_size=world, micro_batch=2, seq_len=16)
    losses = []
    for batch in batches.for_rank(rank):
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.gather(loss.detach().reshape(1)).tolist())
    members = accelerator.gather(torch.tensor([[os.getpid(), machine]])).tolist()
    record = {
        "rank": rank,
        "world_size": world,
        "local_rank": accelerator.local_process_index,
        "machine": machine,
        "distributed_type": str(accelerator.distributed_type),
        "members": members,
        "losses": losses,
    }
    accelerator.end_training()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    print(f"rank {rank}/{world} (machine {machine}) losses per step: {losses}", flush=True)


if __name__ == "__main__":
    main()
