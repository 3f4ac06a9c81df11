"""The N-rank runner itself: results, every failing rank's traceback, no hang."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import RankFailure, init_pg, run_ranks


def _sum_ranks(rank: int, world_size: int, scale: float) -> dict:
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    with init_pg(rank, world_size):
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        backend = dist.get_backend()
    return {
        "rank": rank,
        "sum": t.item() * scale,
        "env": env,
        "threads": torch.get_num_threads(),
        "backend": backend,
        "initialized_after": dist.is_initialized(),
    }


def _fail_on_odd_ranks(rank: int, world_size: int) -> int:
    if rank % 2 == 1:
        raise ValueError(f"deliberate failure on rank {rank}")
    return rank


def _rank1_fails_while_rank0_waits(rank: int, world_size: int) -> None:
    with init_pg(rank, world_size, timeout=300.0):
        if rank == 1:
            raise RuntimeError("rank 1 broke before the collective")
        dist.all_reduce(torch.ones(1))  # rank 0 would wait here for 300 s


def _sleep_forever_on_rank0(rank: int, world_size: int) -> int:
    if rank == 0:
        while True:
            time.sleep(0.1)
    return rank


def _hard_exit(rank: int, world_size: int) -> None:
    os._exit(3)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_come_back_in_rank_order_with_torchrun_env(world_size: int) -> None:
    out = run_ranks(_sum_ranks, world_size, 2.0, timeout=90)
    expected_sum = 2.0 * world_size * (world_size + 1) / 2
    assert [o["rank"] for o in out] == list(range(world_size))
    for rank, o in enumerate(out):
        assert o["sum"] == expected_sum
        assert o["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
        }
        assert o["threads"] == 1
        assert o["backend"] == "gloo"
        assert o["initialized_after"] is False


def test_every_failing_rank_traceback_is_in_the_error() -> None:
    with pytest.raises(AssertionError) as info:
        run_ranks(_fail_on_odd_ranks, 4, timeout=60)
    msg = str(info.value)
    assert "deliberate failure on rank 1" in msg
    assert "deliberate failure on rank 3" in msg
    assert "_fail_on_odd_ranks" in msg  # a real traceback, not just the message
    assert isinstance(info.value, RankFailure)
    assert sorted(info.value.failures) == [1, 3]


def test_peer_blocked_in_a_collective_does_not_hang() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank1_fails_while_rank0_waits, 2, timeout=100, failure_grace=5)
    assert "rank 1 broke before the collective" in str(info.value)
    assert 1 in info.value.failures
    # Far below the collective's own 300 s timeout and the harness's 100 s.
    assert time.monotonic() - start < 90


def test_hanging_rank_is_killed_at_timeout_with_its_stack() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_sleep_forever_on_rank0, 2, timeout=12)
    assert time.monotonic() - start < 60
    assert list(info.value.failures) == [0]
    text = info.value.failures[0]
    assert "timed out after 12 s" in text
    assert "_sleep_forever_on_rank0" in text  # faulthandler's stack names the hanging frame


def test_rank_that_exits_without_result_is_reported() -> None:
    with pytest.raises(RankFailure, match="exited with code 3"):
        run_ranks(_hard_exit, 1, timeout=60)


def _pid_env_and_group(rank: int, world_size: int, tag: str) -> dict:
    leaked = os.environ.get("HARNESS_LEAK")
    os.environ["HARNESS_LEAK"] = tag  # must not be seen by the next task
    with init_pg(rank, world_size):
        t = torch.ones(1)
        dist.all_reduce(t)
    return {"pid": os.getpid(), "leaked": leaked, "sum": t.item(), "tag": os.environ["TAG"]}


def _accelerate_state(rank: int, world_size: int) -> tuple:
    from accelerate import PartialState

    state = PartialState(cpu=True)
    t = torch.ones(1)
    dist.all_reduce(t)
    return state.num_processes, state.process_index, state.distributed_type.value, t.item()


def test_pool_reuses_ranks_with_fresh_env_and_process_group_each_task() -> None:
    from tests.distributed.harness import RankPool

    with RankPool(2) as pool:
        first = pool.run(_pid_env_and_group, "a", env={"TAG": "one"})
        second = run_ranks(_pid_env_and_group, 2, "b", env={"TAG": "two"}, pool=pool)
    assert [o["pid"] for o in first] == [o["pid"] for o in second]  # same processes
    assert [o["leaked"] for o in first + second] == [None] * 4
    assert [o["tag"] for o in first + second] == ["one", "one", "two", "two"]
    assert all(o["sum"] == 2.0 for o in first + second)
    with pytest.raises(ValueError, match="pool has world size 2, asked for 4"):
        run_ranks(_pid_env_and_group, 4, "c", pool=pool)


def test_pool_restarts_after_a_failure_and_resets_accelerate_state() -> None:
    from tests.distributed.harness import RankPool

    with RankPool(2) as pool:
        before = pool.run(_pid_env_and_group, "a", env={"TAG": "x"})
        with pytest.raises(RankFailure, match="deliberate failure on rank 1"):
            pool.run(_fail_on_odd_ranks)
        after = pool.run(_pid_env_and_group, "a", env={"TAG": "x"})
        assert {o["pid"] for o in before}.isdisjoint(o["pid"] for o in after)
        # Accelerate's process-wide state is rebuilt for every task.
        first = pool.run(_accelerate_state)
        second = pool.run(_accelerate_state)
    assert first == second == [(2, 0, "MULTI_CPU", 2.0), (2, 1, "MULTI_CPU", 2.0)]


def test_free_port_is_bindable_and_outside_the_ephemeral_range() -> None:
    import socket

    from accel_zero.launch import _ephemeral_range, find_free_port

    low, _ = _ephemeral_range()
    for _ in range(20):
        port = find_free_port()
        assert 1024 <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
