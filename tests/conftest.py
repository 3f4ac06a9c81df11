"""Shared pytest set-up: repo root importable, GPU tests skipped without CUDA."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # `from tests.distributed.harness import run_ranks` works from any test file,
    # and spawned ranks inherit sys.path, so they can unpickle test functions too.
    sys.path.insert(0, str(REPO_ROOT))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (tests/gpu or @pytest.mark.gpu)")
    gpu_dir = REPO_ROOT / "tests" / "gpu"
    for item in items:
        if item.get_closest_marker("gpu") or gpu_dir in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rank_pool() -> Iterator[Callable[[int], Any]]:
    """``rank_pool(world_size)`` -> a ``RankPool`` shared by the whole session.

    Pass it as ``run_ranks(fn, ws, *args, pool=rank_pool(ws))`` to skip the
    per-test cost of spawning ranks and importing torch/transformers/accelerate.
    """
    from tests.distributed.harness import RankPool

    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in pools:
            pools[world_size] = RankPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
