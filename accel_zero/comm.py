"""The one place that calls ``torch.distributed`` collectives (DESIGN D11).

Every collective the engine issues goes through a :class:`Comm` object, which
counts calls and bytes per operation (tests read ``comm.stats``; a regression
shows up as a count), wraps each call in a profiler range, and turns a failing
or timed-out collective into an error that names the rank, the operation and
what was being communicated.

[Note: hybrid sharding]
``zero_config.shard_group_size`` (FSDP2's HSDP; the idea behind DeepSpeed
ZeRO++'s hpZ) shards parameters, gradients and optimizer state within groups
of S consecutive ranks and replicates them across the W / S groups. The ranks
form a 2-D ``DeviceMesh`` of shape (replicate, shard) = (W / S, S): rank g is
shard rank ``g % S`` of shard group ``g // S``. A :class:`Comm` then speaks for
three groups:

- ``shard``: its ``rank`` and ``world_size`` are this group's, so the engine's
  dim-0 layout (ParamSlot, Unit) is the layout of a plain world of S ranks;
  ``all_gather`` and ``reduce_scatter`` run here, and so do sums over sharded
  rows (clip norm, per-parameter norms: replicas hold the same rows, so a sum
  over the world would count each row W / S times);
- ``replicate``: the ranks holding the same rows in the other groups. A
  gradient shard is reduce-scattered in the shard group, then all-reduced
  here (``reduce_scatter(..., sum_over="world")``), so every replica steps on
  the world's gradient;
- ``world``: whole-gradient all-reduces (ZeRO-1, persistent parameters), the
  fp16 overflow flag and the execution-order check (``all_reduce`` and
  ``check_same`` default to it).

Without hybrid sharding (``shard_group_size`` null or W) the three are one
group, the world, and nothing differs from a plain run.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

__all__ = [
    "GROUPS",
    "Comm",
    "CommStats",
    "GroupName",
    "PendingWork",
    "forget_group_objects",
    "import_dynamo_before_process_group",
    "let_gloo_workers_finish",
    "resolve_shard_group_size",
]

GroupName = Literal["shard", "replicate", "world"]
"""Which ranks a collective spans; see [Note: hybrid sharding]."""
GROUPS: tuple[GroupName, ...] = ("shard", "replicate", "world")
_SHARD_KEY = "zero_config.shard_group_size"

# torch >= 2.13 names the flat collectives *_single; older releases *_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    """Counters for every collective issued through one :class:`Comm`.

    Keys are the operation (``all_gather``, ``reduce_scatter``, ``all_reduce``,
    ``check``, ``broadcast``, ``barrier``, ``all_gather_object``), suffixed with
    the group when hybrid sharding makes it differ from the shard group:
    ``all_reduce[replicate]``, ``all_reduce[world]``, ``check[world]``. A plain
    world (one group) has no suffixes. See :meth:`Comm.key` and :meth:`Comm.traffic`.
    """

    calls: Counter[str] = field(default_factory=Counter)
    """Number of calls per key (``all_gather``, ``all_reduce[replicate]``, ...)."""
    bytes: Counter[str] = field(default_factory=Counter)
    """Bytes passed into each key's collectives on this rank: the input tensor's size
    (``all_gather``: this rank's shard; ``reduce_scatter``: the full input, group size x
    shard; ``all_reduce``/``broadcast``: the tensor; ``check``: 8; object and barrier: 0)."""
    wait_seconds: float = 0.0
    """Seconds this rank spent blocked waiting for collectives to finish."""

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.wait_seconds = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "bytes": dict(self.bytes),
            "wait_seconds": self.wait_seconds,
        }


def import_dynamo_before_process_group() -> None:
    """Import ``torch._dynamo`` while no process group exists yet.

    Measured with torch 2.13 + gloo: when ``torch._dynamo`` is first imported
    *after* ``init_process_group`` (building any ``torch.optim`` optimizer or
    calling ``from_pretrained`` does it), ``destroy_process_group()`` no longer
    frees the group: its gloo threads (``pt_gloo_runloop``, ``gloo_tcp_loop``)
    outlive ``end_training()`` and are torn down during interpreter
    finalisation, where the process sometimes aborts with "terminate called
    without an active exception". Imported first, the group is freed at
    ``destroy_process_group()``. Every training script imports it anyway (the
    optimizer), so this moves the cost, it does not add it. Called by
    ``accel_zero.Accelerator`` and the test harness; tests/integration/
    test_torchrun.py and tests/distributed/test_lazy.py check the threads are gone.
    """
    if dist.is_available() and not dist.is_initialized():
        importlib.import_module("torch._dynamo")


def let_gloo_workers_finish() -> None:
    """Release the GIL briefly before a gloo group can be freed.

    [Note: gloo teardown deadlock] ``~ProcessGroupGloo`` joins its worker
    threads while the caller holds the GIL; a worker still freeing a finished
    ``AsyncAllreduceWork`` whose tensors have Python objects needs the GIL to
    decref them. Seen (gdb) when a DDP reducer dropped the last reference to
    the group right after the last all-reduce: both threads wait forever. Call
    this before the last reference to a group can drop (``destroy_process_group``,
    freeing a DDP model).
    """
    time.sleep(0.05)


def resolve_shard_group_size(value: int | str | None, world_size: int) -> int:
    """Ranks per shard group for ``zero_config.shard_group_size`` in a world of ``world_size``.

    ``None`` is the whole world; ``"node"`` the ranks of one machine (``LOCAL_WORLD_SIZE``,
    set by torchrun, ``accelerate launch`` and ``accel-zero launch``). The result must
    divide the world size: groups are consecutive ranks, all of one size.
    """
    if value is None:
        return world_size
    if world_size == 1 and (value == "node" or isinstance(value, int)):
        logger.warning("%s=%r is ignored: a single process has nothing to shard", _SHARD_KEY, value)
        return 1
    if value == "node":
        local = os.environ.get("LOCAL_WORLD_SIZE", "")
        if not local.isdigit() or int(local) < 1:
            raise ValueError(
                f"{_SHARD_KEY}='node' shards within the ranks of one machine, but "
                f"LOCAL_WORLD_SIZE is {local!r} (torchrun, accelerate launch and accel-zero "
                "launch set it): launch with one of them, or give the group size as an integer"
            )
        size, what = int(local), f"'node' (LOCAL_WORLD_SIZE={local})"
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        size, what = value, str(value)
    else:
        raise ValueError(f"{_SHARD_KEY}={value!r} must be a positive integer, 'node' or null")
    if size > world_size or world_size % size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"{_SHARD_KEY}={what} does not divide the world size {world_size}: shard groups "
            f"are {size} consecutive ranks each, all of one size. Use a divisor of "
            f"{world_size} ({', '.join(map(str, divisors))}), 'node' on machines with equal "
            "numbers of ranks, or null to shard over all ranks"
        )
    return size


def forget_group_objects(mesh: DeviceMesh) -> None:
    """Let ``mesh`` (and its root mesh) hold its process groups by name only.

    [Note: a mesh keeps its group alive]
    A ``DeviceMesh`` stores the group object itself in ``_pg_registry`` (torch 2.13), and
    DTensor keeps meshes in process-wide caches once it has communicated on them (sharding
    propagation, redistribute planning). So after one ``full_tensor()`` or redistribution on
    a lazily built parameter, ``destroy_process_group()`` no longer frees the gloo group: its
    worker threads live on until interpreter exit, which is where gloo can abort the process
    ("terminate called without an active exception"). Measured: ``lazy_init`` + ``prepare``
    + one step + ``end_training()`` left 3 gloo threads per rank; none with this. The same
    holds for the hybrid-sharding mesh a :class:`Comm` keeps for its whole life. Eager code
    reaches the groups through their names (``DeviceMesh.get_group`` resolves them), which
    stay valid while the groups live; only ``torch.compile`` tracing reads the registry, and
    nothing compiles through these meshes.
    """
    for m in (mesh, getattr(mesh, "_root_mesh", None)):
        registry = getattr(m, "_pg_registry", None)
        if isinstance(registry, dict):
            registry.clear()


class PendingWork:
    """An asynchronous collective in flight; ``wait()`` is idempotent."""

    def __init__(self, comm: Comm, work: Any, what: str) -> None:
        self._comm = comm
        self._work = work
        self.what = what

    @property
    def done(self) -> bool:
        return self._work is None

    def wait(self) -> None:
        if self._work is None:
            return
        work, self._work = self._work, None
        start = time.perf_counter()
        try:
            work.wait()
        except Exception as exc:
            raise self._comm.error(self.what, exc) from exc
        finally:
            self._comm.stats.wait_seconds += time.perf_counter() - start


class _ChunkAfter(PendingWork):
    """An in-place all-reduce standing in for a reduce-scatter: ``wait()`` copies this
    rank's chunk of the summed input into the output. See [Note: gloo reduce-scatter]."""

    def __init__(
        self, comm: Comm, work: PendingWork, input: torch.Tensor, output: torch.Tensor, rank: int
    ) -> None:
        super().__init__(comm, None, work.what)
        self._inner: PendingWork | None = work
        self._chunk = input.view(-1, output.numel())[rank]
        self._output = output

    @property
    def done(self) -> bool:
        return self._inner is None

    def wait(self) -> None:
        if self._inner is None:
            return
        inner, self._inner = self._inner, None
        inner.wait()
        self._output.copy_(self._chunk)


class _ReplicaSum(PendingWork):
    """A reduce-scatter in the shard group whose result is then all-reduced across replicas.

    [Note: replica all-reduce order]
    The all-reduce can start only once the reduce-scatter is done. It is issued at a
    point fixed by program order, never by timing: when the next one of these is issued
    (so it overlaps the rest of backward, one bucket behind), or at ``wait()``; and always
    in the order the reduce-scatters were issued (``Comm._replica_queue``). Every rank thus
    issues the same collectives in the same order on every group, which NCCL requires of
    several communicators and which keeps gloo's replicate group free of cross-talk.
    """

    def __init__(self, comm: Comm, scatter: PendingWork, output: torch.Tensor, what: str) -> None:
        super().__init__(comm, None, what)
        self._scatter = scatter
        self._output = output
        self._all_reduce: PendingWork | None = None

    @property
    def done(self) -> bool:
        return self._all_reduce is not None and self._all_reduce.done

    def start_all_reduce(self) -> None:
        """Wait for the reduce-scatter, then issue the replica all-reduce (idempotent)."""
        if self._all_reduce is not None:
            return
        self._scatter.wait()
        self._all_reduce = self._comm.all_reduce(
            self._output,
            what=f"all_reduce across replicas after the {self.what}",
            async_op=True,
            group="replicate",
        )

    def wait(self) -> None:
        self._comm._start_replica_sums(upto=self)
        assert self._all_reduce is not None
        self._all_reduce.wait()


class Comm:
    """Process groups, rank facts and every collective of one engine.

    ``group=None`` means the default (world) group. A group of size 1 short-cuts
    every collective to a local copy, so the engine needs no special cases.

    ``shard_group_size`` (``zero_config.shard_group_size``: an int, ``"node"`` or None)
    turns on hybrid sharding: ``rank`` and ``world_size`` are then the shard group's, and
    collectives take a ``group`` (see [Note: hybrid sharding]). The groups are built here,
    collectively: every rank must construct its Comm at the same point.
    """

    def __init__(
        self,
        group: Any = None,
        timeout: float | None = None,
        device: torch.device | str = "cpu",
        *,
        shard_group_size: int | str | None = None,
    ) -> None:
        self.timeout = timeout
        self.device = torch.device(device)
        """Where small control tensors live (NCCL needs them on the GPU)."""
        self.stats = CommStats()
        # Collectives issued in a profiler range named accel_zero::<op>.
        self.mesh: DeviceMesh | None = None
        """The (replicate, shard) mesh under hybrid sharding, else None. It holds its groups by
        name only (see ``forget_group_objects``)."""
        self.shard_mesh: DeviceMesh | None = None
        """The 1-D mesh of this rank's shard group under hybrid sharding (what lazy_init
        places parameters on), else None (the world)."""
        self._world_group = group
        self._replica_queue: deque[_ReplicaSum] = deque()
        """Replica sums whose all-reduce is not issued yet, oldest first."""
        # This rank and the number of ranks in the world (the data-parallel degree).
        self.global_rank, self.global_world_size = 0, 1
        if dist.is_available() and dist.is_initialized():
            self.global_rank = dist.get_rank(group)
            self.global_world_size = dist.get_world_size(group)
        shard = resolve_shard_group_size(shard_group_size, self.global_world_size)
        self.rank = self.global_rank % shard
        """This rank in its shard group: the rows it owns."""
        self.world_size = shard
        """Ranks in the shard group: how many ways each parameter is cut."""
        self.replicate_rank = self.global_rank // shard
        """Which shard group this rank is in."""
        self.replicate_size = self.global_world_size // shard
        """Shard groups, i.e. copies of every shard."""
        if self.hybrid:
            if group is not None:
                raise ValueError(f"{_SHARD_KEY} needs the default process group, not a subgroup")
            self.mesh = self._build_mesh(shard)
            self.shard_mesh = self.mesh["shard"]

    # ------------------------------------------------------------------ groups
    @property
    def hybrid(self) -> bool:
        """Sharded within groups smaller than the world, replicated across them."""
        return self.replicate_size > 1

    @property
    def group(self) -> Any:
        """The shard group (None for the default group), resolved by name on each use: see
        ``forget_group_objects``."""
        return self.group_of("shard")

    @property
    def distributed(self) -> bool:
        """The shard group has more than one rank (parameters are cut)."""
        return self.world_size > 1

    def group_size(self, group: GroupName) -> int:
        return {
            "shard": self.world_size,
            "replicate": self.replicate_size,
            "world": self.global_world_size,
        }[group]

    def group_of(self, group: GroupName) -> Any:
        """The process group behind ``group`` (None = the default group)."""
        if self.mesh is None or group == "world":
            return self._world_group
        return self.mesh.get_group(group)

    def key(self, op: str, group: GroupName) -> str:
        """The ``stats`` key of ``op`` run on ``group``: see :class:`CommStats`."""
        return op if group == "shard" or not self.hybrid else f"{op}[{group}]"

    def group_of_key(self, key: str) -> GroupName:
        """Inverse of ``key`` for the group: a plain world's only group is the world."""
        if "[" in key:
            name = key[key.index("[") + 1 : -1]
            assert name in GROUPS, key
            return name  # type: ignore[return-value]
        return "shard" if self.hybrid else "world"

    def _build_mesh(self, shard: int) -> DeviceMesh:
        """The (replicate, shard) mesh; every rank creates every group, in the same order.

        The groups are made with ``new_group`` (then wrapped by ``DeviceMesh.from_group``)
        rather than by ``init_device_mesh``, so that they take ``timeout``: its subgroups
        would wait torch's default 30 minutes, not ``zero_config.timeout``.
        """
        from torch.distributed.device_mesh import DeviceMesh

        world, replicas = self.global_world_size, self.replicate_size
        layout = torch.arange(world, dtype=torch.int).view(replicas, shard)
        timeout = datetime.timedelta(seconds=self.timeout) if self.timeout else None
        mine: dict[str, Any] = {}
        for name, rows in (("replicate", layout.t()), ("shard", layout)):
            for ranks in rows.tolist():
                pg = dist.new_group(ranks, timeout=timeout, group_desc=f"accel_zero_{name}")
                if self.global_rank in ranks:
                    mine[name] = pg
        device_type = self.device.type if self.device.type in ("cpu", "cuda") else "cpu"
        mesh = DeviceMesh.from_group(
            [mine["replicate"], mine["shard"]],
            device_type,
            mesh=layout,
            mesh_dim_names=("replicate", "shard"),
        )
        forget_group_objects(mesh)
        logger.info(
            "accel_zero: hybrid sharding, rank %d is shard rank %d of %d in group %d of %d",
            self.global_rank,
            self.rank,
            shard,
            self.replicate_rank,
            replicas,
        )
        return mesh

    # ------------------------------------------------------------------ errors
    def error(self, what: str, exc: BaseException) -> RuntimeError:
        hint = (
            "a collective timed out or failed: most often another rank died, or ranks ran "
            "different modules (the execution order must be the same on every rank)"
        )
        timeout = f" (timeout {self.timeout:.0f} s)" if self.timeout else ""
        where = f"{self.global_rank}/{self.global_world_size}"
        if self.hybrid:
            where += f" (shard rank {self.rank}/{self.world_size})"
        return RuntimeError(
            f"accel_zero rank {where}: {what} failed{timeout}: {hint}. Underlying error: {exc}"
        )

    def _run(
        self,
        op: str,
        what: str,
        nbytes: int,
        fn: Any,
        async_op: bool,
        group: GroupName = "shard",
    ) -> PendingWork:
        key = self.key(op, group)
        self.stats.calls[key] += 1
        self.stats.bytes[key] += nbytes
        with torch.profiler.record_function(f"accel_zero::{key}"):
            try:
                work = fn(self.group_of(group), async_op)
            except Exception as exc:
                raise self.error(what, exc) from exc
        pending = PendingWork(self, work if async_op else None, what)
        return pending

    # ------------------------------------------------------------- collectives
    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, *, what: str, async_op: bool = False
    ) -> PendingWork:
        """``output`` (world_size × numel) receives every shard rank's ``input`` in rank order."""
        if not self.distributed:
            output.copy_(input)
            return PendingWork(self, None, what)
        return self._run(
            "all_gather",
            what,
            input.numel() * input.element_size(),
            lambda g, a: _all_gather(output, input, group=g, async_op=a),
            async_op,
        )

    def reduce_scatter(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        *,
        what: str,
        async_op: bool = False,
        sum_over: Literal["shard", "world"] = "shard",
        input_is_scratch: bool = False,
    ) -> PendingWork:
        """Sum of every shard rank's ``input``; shard rank r receives slice r into ``output``.

        ``sum_over="world"`` (gradients) sums every rank's ``input`` in the world: the
        reduce-scatter is followed by an all-reduce of ``output`` across the replicate group
        (hybrid sharding only; see [Note: replica all-reduce order]). ``input_is_scratch``:
        the caller will not read ``input`` again, so gloo may sum it in place
        ([Note: gloo reduce-scatter]).

        [Note: gloo reduce-scatter]
        torch's gloo backend has no reduce-scatter of its own: it clones the whole input,
        all-reduces the clone and copies one chunk out, one input-sized allocation and copy
        per call (measured: most of ZeRO-3's extra allocation per step on CPU). Given a
        scratch input, the same all-reduce runs in place on it and ``wait()`` copies this
        rank's chunk out; the traffic is what gloo would send anyway, and the call is still
        counted as a reduce-scatter.
        """
        if not self.distributed:
            output.copy_(input)
            scatter = PendingWork(self, None, what)
        elif input_is_scratch and self._is_gloo("shard"):
            summed = self._run(
                "reduce_scatter",
                what,
                input.numel() * input.element_size(),
                lambda g, a: dist.all_reduce(input, op=dist.ReduceOp.SUM, group=g, async_op=a),
                True,
            )
            scatter = _ChunkAfter(self, summed, input, output, self.rank)
            if not (async_op or sum_over == "world"):
                scatter.wait()
        else:
            scatter = self._run(
                "reduce_scatter",
                what,
                input.numel() * input.element_size(),
                lambda g, a: _reduce_scatter(
                    output, input, op=dist.ReduceOp.SUM, group=g, async_op=a
                ),
                async_op or sum_over == "world",
            )
        if sum_over == "shard" or self.replicate_size == 1:
            if not async_op:
                scatter.wait()
            return scatter
        pending = _ReplicaSum(self, scatter, output, what)
        self._replica_queue.append(pending)
        # One behind: the previous bucket's all-reduce starts now, overlapping this one.
        self._start_replica_sums(
            upto=self._replica_queue[-2] if len(self._replica_queue) > 1 else None
        )
        if not async_op:
            pending.wait()
        return pending

    def _is_gloo(self, group: GroupName) -> bool:
        """Whether ``group`` runs on gloo (cached: the backend never changes)."""
        cache = self.__dict__.setdefault("_gloo", {})
        if group not in cache:
            cache[group] = dist.get_backend(self.group_of(group)) == "gloo"
        return bool(cache[group])

    def _start_replica_sums(self, upto: _ReplicaSum | None) -> None:
        """Issue the queued replica all-reduces, oldest first, through ``upto`` (if queued)."""
        if upto is None or upto not in self._replica_queue:
            return
        while self._replica_queue:
            pending = self._replica_queue.popleft()
            pending.start_all_reduce()
            if pending is upto:
                return

    def all_reduce(
        self,
        tensor: torch.Tensor,
        *,
        op: str = "sum",
        what: str,
        async_op: bool = False,
        group: GroupName = "world",
    ) -> PendingWork:
        """In-place all-reduce with ``op`` in {"sum", "max", "min"} over ``group``.

        The default is the world; sums of *sharded* rows (norms) must pass ``group="shard"``,
        since replicas hold the same rows (see [Note: hybrid sharding]).
        """
        if self.group_size(group) == 1:
            return PendingWork(self, None, what)
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[
            op
        ]
        return self._run(
            "all_reduce",
            what,
            tensor.numel() * tensor.element_size(),
            lambda g, a: dist.all_reduce(tensor, op=reduce_op, group=g, async_op=a),
            async_op,
            group,
        )

    def all_gather_object(self, obj: Any, *, what: str) -> list[Any]:
        """Every rank's ``obj`` in the world (small Python objects only: checks, traces)."""
        if self.global_world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.global_world_size
        self._run(
            "all_gather_object",
            what,
            0,
            lambda g, a: dist.all_gather_object(out, obj, group=g),
            False,
            "world",
        )
        return out

    def check_same(self, value: int, *, what: str) -> list[int]:
        """Every rank's 64-bit ``value`` in the world, in global rank order (one tiny
        all-gather, counted as ``check``)."""
        if self.global_world_size == 1:
            return [value]
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        out = torch.empty(self.global_world_size, dtype=torch.int64, device=self.device)
        self._run(
            "check",
            what,
            8,
            lambda g, a: _all_gather(out, mine, group=g, async_op=a),
            False,
            "world",
        )
        return out.tolist()

    def broadcast(self, tensor: torch.Tensor, *, src: int = 0, what: str) -> None:
        """``tensor`` from global rank ``src`` to every rank in the world."""
        if self.global_world_size == 1:
            return
        self._run(
            "broadcast",
            what,
            tensor.numel() * tensor.element_size(),
            lambda g, a: dist.broadcast(tensor, src=src, group=g, async_op=a),
            False,
            "world",
        )

    def barrier(self, *, what: str) -> None:
        if self.global_world_size == 1:
            return
        self._run(
            "barrier", what, 0, lambda g, a: dist.barrier(group=g, async_op=a), False, "world"
        )

    # -------------------------------------------------------------- accounting
    def traffic(self) -> dict[str, Any]:
        """Bytes this rank moved since the last ``stats.reset()``, for ``zero_stats()``.

        - ``bytes_gathered``: bytes all-gathered *into* this rank's outputs (input bytes x
          group size, own shard included), summed over groups;
        - ``bytes_reduced``: bytes this rank passed *into* reduce-scatters and all-reduces
          (gradients, and the small norm and overflow all-reduces), summed over groups;
        - ``bytes_gathered_by_group`` / ``bytes_reduced_by_group``: the same per group
          (``shard``, ``replicate``, ``world``; a plain world has only ``world``);
        - ``collective_bytes``: ``stats.bytes`` (input bytes per key, see :class:`CommStats`);
        - ``groups``: the size of each group.
        """
        gathered: Counter[str] = Counter()
        reduced: Counter[str] = Counter()
        for key, nbytes in self.stats.bytes.items():
            op, group = key.split("[")[0], self.group_of_key(key)
            if op == "all_gather":
                gathered[group] += nbytes * self.group_size(group)
            elif op in ("reduce_scatter", "all_reduce"):
                reduced[group] += nbytes
        return {
            "bytes_gathered": sum(gathered.values()),
            "bytes_reduced": sum(reduced.values()),
            "bytes_gathered_by_group": dict(gathered),
            "bytes_reduced_by_group": dict(reduced),
            "collective_bytes": dict(self.stats.bytes),
            "groups": {g: self.group_size(g) for g in GROUPS},
        }
