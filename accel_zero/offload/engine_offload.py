"""What one engine keeps off the compute device, and where (DESIGN D6).

Built by the engine at set-up from ``offload_optimizer`` / ``offload_param``:

- ``cpu``: the fp32 masters and optimizer state live in host memory (page-locked on CUDA)
  and the step runs there with the CPU Adam kernel; a compute-dtype working shard stays
  on the device for the gathers. On a CPU-only machine host memory *is* the device
  memory: the layout is the one without offload, only the step changes.
- ``nvme`` (optimizer): the optimizer state goes to swap records, one per sub-group
  (:class:`~accel_zero.offload.swapped.SwappedOptimizer`): ZeRO-3's masters too (they
  are then nowhere in memory) and ZeRO-3's gradient shards as they arrive; ZeRO-1/2
  keep their masters, the rows of the whole parameters. Tensors too small to be worth
  swapping (ZeRO-3's persistent parameters) stay in memory with their state.
- ``nvme`` (parameters, ZeRO-3, with the optimizer on NVMe): the working shards go to
  swap records too (:class:`~accel_zero.offload.params.SwappedParams`).

Swap files live under ``<nvme_path>/<run id>/rank<r>/`` (run id chosen by rank 0), are
checked before the first step (``validate_nvme_path``) and removed by ``close``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from accel_zero.comm import Comm
from accel_zero.config import ZeroConfig
from accel_zero.offload.nvme_path import new_run_id, validate_nvme_path
from accel_zero.offload.params import SwappedParams
from accel_zero.offload.plan import SlotRows, plan_sub_groups
from accel_zero.offload.swap import SwapSpace
from accel_zero.offload.swapped import SwappedOptimizer
from accel_zero.partition import Unit
from accel_zero.tracer import MemoryTracer

logger = logging.getLogger(__name__)

__all__ = ["EngineOffload"]


@dataclass(kw_only=True)
class EngineOffload:
    """One engine's swapped optimizer state and parameters, and their swap spaces."""

    optimizer: SwappedOptimizer | None
    """Optimizer state on NVMe (None: in memory)."""
    params: SwappedParams | None
    """ZeRO-3 working shards on NVMe (None: in memory)."""
    spaces: list[SwapSpace] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        *,
        config: ZeroConfig,
        units: Sequence[Unit],
        comm: Comm,
        tracer: MemoryTracer,
    ) -> EngineOffload | None:
        """Plan and register the swap records (nothing is written yet); None without NVMe."""
        opt_cfg, param_cfg = config.offload_optimizer, config.offload_param
        if opt_cfg.device != "nvme" and param_cfg.device != "nvme":
            return None
        run_id = comm.all_gather_object(
            new_run_id() if comm.rank == 0 else None, what="swap run id"
        )[0]
        spaces: list[SwapSpace] = []

        def space(key: str, cfg: Any) -> SwapSpace:
            nvme = validate_nvme_path(cfg.nvme_path, key=f"zero_config.{key}.nvme_path")
            s = SwapSpace(
                nvme,
                run_id=run_id,
                rank=comm.rank,
                buffer_count=cfg.buffer_count,
                block_size=config.aio.block_size,
                queue_depth=config.aio.queue_depth,
                threads=config.aio.threads,
                pin_memory=cfg.pin_memory,
            )
            spaces.append(s)
            return s

        try:
            optimizer = None
            if opt_cfg.device == "nvme":
                stage3 = config.stage == 3
                swapped = [u for u in units if u.resharded or not stage3]
                slots = [
                    SlotRows(
                        unit=u.index,
                        slot=i,
                        rows=s.local_rows(comm.rank),
                        row_numel=s.row_numel,
                    )
                    for u in swapped
                    for i, s in enumerate(u.slots)
                ]
                for u in swapped:
                    for s in u.slots:
                        if s.row_numel > config.sub_group_size:
                            raise ValueError(
                                f"zero_config.sub_group_size={config.sub_group_size} is smaller "
                                f"than one row of {s.fqn} ({s.row_numel} elements): rows are "
                                "swapped whole; raise sub_group_size"
                            )
                optimizer = SwappedOptimizer(
                    units=units,
                    groups=plan_sub_groups(slots, config.sub_group_size),
                    space=space("offload_optimizer", opt_cfg),
                    grad_space=space("offload_optimizer", opt_cfg) if stage3 else None,
                    masters_on_disk=stage3,
                    tracer=tracer,
                )
            params = None
            if param_cfg.device == "nvme":
                params = SwappedParams(
                    space("offload_param", param_cfg), [u for u in units if u.resharded], tracer
                )
        except BaseException:
            for made in spaces:
                made.close()
            raise
        logger.info(
            "accel_zero: swap space %s/%s/rank%d (optimizer on %s, parameters on %s)",
            opt_cfg.nvme_path or param_cfg.nvme_path,
            run_id,
            comm.rank,
            opt_cfg.device,
            param_cfg.device,
        )
        return cls(optimizer=optimizer, params=params, spaces=spaces)

    def swaps_masters(self, unit: Unit) -> bool:
        """The unit's fp32 masters live on disk (ZeRO-3 with the optimizer on NVMe)."""
        return self.optimizer is not None and self.optimizer.masters_on_disk and unit.resharded

    def swaps_grads(self, unit: Unit) -> bool:
        """The unit's gradient shards go to disk at a synchronising backward."""
        return (
            self.optimizer is not None
            and self.optimizer.grad_space is not None
            and (unit.resharded)
        )

    def read_masters(self, unit: Unit) -> torch.Tensor:
        """The unit's flat padded fp32 masters, read back from disk (a fresh tensor)."""
        assert self.optimizer is not None
        out = torch.empty(unit.numel, dtype=torch.float32)
        self.optimizer.read_unit_masters(unit.index, out)
        return out

    def stats(self) -> dict[str, float]:
        """Swap traffic of all spaces: bytes, seconds, GB/s and time stalled on the disk."""
        totals: dict[str, float] = {
            "swap_bytes_read": 0,
            "swap_bytes_written": 0,
            "swap_read_seconds": 0.0,
            "swap_write_seconds": 0.0,
            "swap_stall_seconds": 0.0,
        }
        for s in self.spaces:
            st = s.stats
            totals["swap_bytes_read"] += st.bytes_read
            totals["swap_bytes_written"] += st.bytes_written
            totals["swap_read_seconds"] += st.read_seconds
            totals["swap_write_seconds"] += st.write_seconds
            totals["swap_stall_seconds"] += st.stall_seconds
        for kind in ("read", "write"):
            moved = totals[f"swap_bytes_{'read' if kind == 'read' else 'written'}"]
            secs = totals[f"swap_{kind}_seconds"]
            totals[f"swap_{kind}_gbps"] = moved / secs / 1e9 if secs else 0.0
        return totals

    def close(self, *, keep: bool = False) -> None:
        """Remove the swap files (``keep``: leave them); idempotent."""
        if self.params is not None:
            self.params.close(keep=keep)
        for space in self.spaces:
            space.close(keep=keep)
