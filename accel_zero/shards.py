"""Row shards: how sharded state leaves and re-enters the engine (checkpoints, export).

Every sharded tensor accel_zero keeps (fp32 master weights, optimizer moments) is cut
along dim 0 with ``torch.chunk`` semantics over the ranks of its sharding group: with
``chunk = ceil(rows / N)``, rank ``r`` owns rows ``[r * chunk, min((r + 1) * chunk, rows))``
(possibly none). A :class:`RowShard` is one rank's real rows of one tensor (never the
padding), named by a stable key, with the global shape, so that a reader on another world
size can find the rows it needs (:func:`local_row_range` on its own rank and size).

Keys: ``model/<fqn>`` for a parameter's fp32 master weights (the first name of a tied
parameter), ``optim/<fqn>/<state name>`` for a per-parameter optimizer tensor
(``exp_avg``, ``exp_avg_sq``, ...). Tensors that every rank holds whole (0-d parameters,
Adam's ``step``) are ``replicated``: written once, read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["RowShard", "ShardReader", "local_row_range"]


def local_row_range(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a ``rows``-row tensor that ``rank`` of ``world_size`` owns."""
    chunk = -(-rows // world_size) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


@dataclass(frozen=True, kw_only=True)
class RowShard:
    """One rank's rows of one sharded tensor (or a whole replicated tensor)."""

    key: str
    """Stable name: ``model/<fqn>`` or ``optim/<fqn>/<state>`` (see the module docstring)."""
    global_shape: tuple[int, ...]
    """Shape of the whole tensor across all ranks."""
    row_start: int
    """First global row held here (0 for replicated tensors)."""
    tensor: torch.Tensor
    """The rows, shape ``(rows_here, *global_shape[1:])``, on CPU or the device; for a
    replicated tensor the whole tensor. May be a view: consume it before asking for the next
    shard (it can live in a reused swap buffer)."""
    replicated: bool = False
    """Every rank holds the same whole tensor: a writer keeps one copy."""

    def __post_init__(self) -> None:
        if self.replicated:
            if tuple(self.tensor.shape) != tuple(self.global_shape) or self.row_start != 0:
                raise ValueError(f"{self.key}: a replicated shard must hold the whole tensor")
            return
        if not self.global_shape:
            raise ValueError(f"{self.key}: a 0-d tensor cannot be row-sharded; mark it replicated")
        if tuple(self.tensor.shape[1:]) != tuple(self.global_shape[1:]):
            raise ValueError(
                f"{self.key}: rows of shape {tuple(self.tensor.shape)} do not fit global shape "
                f"{tuple(self.global_shape)}"
            )
        end = self.row_start + self.tensor.shape[0]
        if self.row_start < 0 or end > self.global_shape[0]:
            raise ValueError(
                f"{self.key}: rows [{self.row_start}, {end}) outside 0..{self.global_shape[0]}"
            )


class ShardReader(Protocol):
    """What a sharded checkpoint offers the engine and optimizer when they load from it."""

    def shape(self, key: str) -> tuple[int, ...] | None:
        """Global shape of ``key``, or None if the checkpoint does not hold it."""
        ...

    def read_rows(self, key: str, start: int, end: int) -> torch.Tensor:
        """Rows ``[start, end)`` of ``key`` (whatever ranks wrote them), as a CPU tensor in
        the dtype it was saved in; for a replicated (or 0-d) tensor, the whole tensor."""
        ...
