"""Lazy model construction: every parameter built inside ``lazy_init`` holds only this rank's rows.

``with lazy_init(accelerator): model = AutoModelForCausalLM.from_pretrained(path)`` gives a
model whose parameters are ``nn.Parameter``s wrapping a ``DTensor`` on a 1-D mesh over the
ranks the engine shards over, placed ``Shard(0)`` (``Replicate`` for 0-d parameters): the
whole world, or under hybrid sharding (``zero_config.shard_group_size``) this rank's shard
group, so each group reads every row once. The local tensor is this rank's dim-0 rows with
``torch.chunk`` semantics, which is the layout the engine consumes (CONTRACT "Sharding
layout"). Buffers stay plain full tensors.

[Note: lazy construction]
Three public torch mechanisms, installed only for the duration of the context:

1. ``register_module_parameter_registration_hook``: a parameter created on the meta device
   (``from_pretrained`` builds the model under ``torch.device("meta")``) is replaced at
   registration by a meta ``DTensor`` ``Shard(0)`` placeholder. transformers' loader reads
   DTensor parameters shard-on-read (``safetensors.get_slice`` of this rank's rows), ties
   weights, rebuilds non-persistent buffers and initialises missing keys itself.
2. ``register_module_module_registration_hook``: a parameter created on a real device
   (``from_config``, or any ``nn.Module`` built eagerly inside the context) is left whole
   while its module's ``__init__`` runs its own init, and is cut to this rank's rows when the
   module is attached to its parent. So at most one module's own parameters are full at any
   time, and the random generator advances exactly as in eager construction.
3. A ``TorchFunctionMode`` that catches initialisation ops on sharded parameters (every
   ``torch.nn.init`` function and the in-place random ``Tensor`` methods): the op runs on a
   temporary full-size tensor drawn from the ordinary generator and this rank keeps its
   rows. Random draws therefore match eager/plain loading bit for bit (same seed, same
   values), at the price of one full parameter, transiently, per init call. On a meta
   placeholder the op is a no-op, as on any meta tensor.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from accel_zero import hf
from accel_zero.comm import forget_group_objects

__all__ = ["is_lazy_param", "lazy_init", "local_row_range", "shard_tensor_rows"]

logger = logging.getLogger(__name__)


def local_row_range(dim0: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a ``dim0``-row tensor owned by ``rank`` (``torch.chunk`` rule).

    ``chunk = ceil(dim0 / world_size)``; rank ``r`` owns ``[r*chunk, min((r+1)*chunk, dim0))``,
    possibly empty. This is ``Shard(0)`` of a DTensor on a 1-D mesh.
    """
    chunk = -(-dim0 // world_size) if dim0 else 0
    start = min(rank * chunk, dim0)
    return start, min(start + chunk, dim0)


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def shard_tensor_rows(full: Tensor, mesh: DeviceMesh) -> DTensor:
    """Keep this rank's dim-0 rows of ``full`` (no communication) as a ``Shard(0)`` DTensor.

    0-d tensors are replicated. Works on meta tensors (a meta placeholder comes back).
    """
    placements: tuple[Placement, ...]
    if full.dim() == 0:
        local = full.detach().clone()
        placements = (Replicate(),)
    else:
        start, end = local_row_range(full.shape[0], mesh.get_local_rank(), mesh.size())
        local = full.detach()[start:end].clone()
        placements = (Shard(0),)
    return DTensor.from_local(
        local,
        mesh,
        placements,
        run_check=False,
        shape=full.shape,
        stride=_contiguous_stride(full.shape),
    )


def is_lazy_param(tensor: object, mesh: DeviceMesh | None = None) -> bool:
    """True for a DTensor placed on a 1-D mesh (``mesh`` if given) as lazy_init makes them."""
    if not isinstance(tensor, DTensor):
        return False
    if mesh is not None and tensor.device_mesh != mesh:
        return False
    return tensor.device_mesh.ndim == 1


@dataclass(kw_only=True)
class _LazyContext:
    """Everything one ``lazy_init`` block installs; nothing is global."""

    mesh: DeviceMesh
    """1-D mesh over the shard group (the world without hybrid sharding); every placeholder
    and shard lives on it."""
    handles: list[RemovableHandle] = field(default_factory=list)
    """Global module hooks, removed on exit."""
    parents: weakref.WeakSet[nn.Module] = field(default_factory=weakref.WeakSet)
    """Modules that received a child inside the block: candidates for the final sweep."""
    children: weakref.WeakSet[nn.Module] = field(default_factory=weakref.WeakSet)
    """Modules attached to a parent inside the block (their own params are sharded then)."""

    def placeholder(self, param: nn.Parameter, where: str) -> nn.Parameter:
        """A parameter holding this rank's rows of ``param`` (meta stays meta)."""
        _check_shardable(param, f"{where} (rank {self.mesh.get_local_rank()})")
        dt = shard_tensor_rows(param.detach(), self.mesh)
        new = nn.Parameter(dt, requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)
        return new

    def shard_module_params(self, module: nn.Module) -> None:
        """Replace the module's own full (non-meta) parameters by their local rows."""
        for name, param in list(module._parameters.items()):
            if param is None or isinstance(param, DTensor):
                continue
            module._parameters[name] = self.placeholder(param, f"{type(module).__name__}.{name}")


def _check_shardable(param: Tensor, where: str) -> None:
    if param.layout != torch.strided:
        raise TypeError(
            f"lazy_init: parameter {where} has layout {param.layout} and cannot be sharded along "
            "dim 0 (only dense, strided parameters can). Build this model outside lazy_init."
        )
    data = param.detach()  # a plain Tensor for nn.Parameter; the subclass itself otherwise
    if type(data) is not Tensor:
        raise TypeError(
            f"lazy_init: parameter {where} is a {type(data).__name__}, a tensor subclass that "
            "cannot be sharded along dim 0 (quantized or already distributed?). Build this "
            "model outside lazy_init."
        )


# In-place random methods of Tensor; their result depends on the generator and the full shape.
_RANDOM_METHODS = frozenset(
    {
        Tensor.uniform_,
        Tensor.normal_,
        Tensor.random_,
        Tensor.bernoulli_,
        Tensor.exponential_,
        Tensor.geometric_,
        Tensor.cauchy_,
        Tensor.log_normal_,
    }
)
# ``torch.nn.init`` functions, matched by name: their ``handle_torch_function`` call looks the
# function up in the module namespace at call time, so a library that wraps them (transformers'
# ``guard_torch_init_functions`` does) hands the mode its wrapper, not torch's function.
_INIT_FUNCTION_NAMES = frozenset(
    name
    for name in dir(torch.nn.init)
    if name.endswith("_") and not name.startswith("_") and callable(getattr(torch.nn.init, name))
)


def _is_init_function(func: Callable[..., Any]) -> bool:
    return inspect.isfunction(func) and func.__name__ in _INIT_FUNCTION_NAMES


class _InitOnShardsMode(TorchFunctionMode):
    """See [Note: lazy construction], point 3."""

    def __init__(self, mesh: DeviceMesh) -> None:
        super().__init__()
        self.mesh = mesh

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _RANDOM_METHODS or _is_init_function(func):
            in_kwargs = not args and "tensor" in kwargs
            target = kwargs["tensor"] if in_kwargs else (args[0] if args else None)
            if isinstance(target, DTensor) and is_lazy_param(target, self.mesh):
                return self._init_on_full(func, target, args, kwargs, in_kwargs)
        elif func is Tensor.copy_ and args and is_lazy_param(args[0], self.mesh):
            src = args[1] if len(args) > 1 else kwargs["src"]
            if not isinstance(src, DTensor):
                return self._copy_rows(args[0], src)
        elif func is Tensor.__getitem__ and args and is_lazy_param(args[0], self.mesh):
            return self._row_view(args[0], args[1])
        elif func is Tensor.__setitem__ and args and is_lazy_param(args[0], self.mesh):
            return self._set_rows(args[0], args[1], args[2])
        return func(*args, **kwargs)

    def _init_on_full(
        self,
        func: Callable[..., Any],
        target: DTensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        in_kwargs: bool,
    ) -> DTensor:
        local = target.to_local()
        if local.device.type == "meta":
            return target  # a placeholder: nothing to initialise, no random draw, like meta
        full = torch.empty(target.shape, dtype=target.dtype, device=local.device)
        if in_kwargs:
            func(**{**kwargs, "tensor": full})
        else:
            func(full, *args[1:], **kwargs)
        self._copy_rows(target, full)
        return target

    def _copy_rows(self, target: DTensor, full: Tensor) -> DTensor:
        local = target.to_local()
        if local.device.type == "meta":
            return target
        full = full.expand(target.shape) if full.shape != target.shape else full
        if target.dim() == 0:
            rows = full
        else:
            start, end = local_row_range(
                target.shape[0], self.mesh.get_local_rank(), self.mesh.size()
            )
            rows = full[start:end]
        with torch.no_grad():
            local.copy_(rows)
        return target

    def _row_view(self, target: DTensor, index: Any) -> Tensor:
        """``param[i]`` (e.g. zeroing a padding row): a view of the local row, or a scratch.

        Writes through the view land in this rank's rows; a row owned by another rank is a
        zero scratch (that rank makes the same write). On a meta placeholder any index gives a
        meta scratch of the right shape.
        """
        local = target.to_local()
        if local.device.type == "meta":
            return torch.empty(target.shape, dtype=target.dtype, device="meta")[index]
        row = index[0] if isinstance(index, tuple) and index else index
        if isinstance(row, bool) or not isinstance(row, int) or target.dim() == 0:
            raise TypeError(
                f"lazy_init: indexing a sharded parameter of shape {tuple(target.shape)} with "
                f"{index!r} while building the model is not supported (only an integer row, as "
                "in padding_idx zeroing). Index the parameter after accelerator.prepare."
            )
        rest = index[1:] if isinstance(index, tuple) else ()
        dim0 = target.shape[0]
        row = row + dim0 if row < 0 else row
        start, end = local_row_range(dim0, self.mesh.get_local_rank(), self.mesh.size())
        if start <= row < end:
            return local[(row - start, *rest)]
        return torch.zeros(target.shape[1:], dtype=target.dtype, device=local.device)[rest]

    def _set_rows(self, target: DTensor, index: Any, value: Any) -> None:
        """``param[i] = v`` while building (e.g. a padding row): applied to the owned row."""
        self._row_view(target, index).copy_(torch.as_tensor(value))


def _mesh_for(accelerator: Any) -> DeviceMesh:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "lazy_init needs the process group: torch.distributed is not initialised. Create "
            "the Accelerator first (accel_zero.Accelerator() or accelerate.Accelerator() under "
            "`accel-zero launch` / `accelerate launch` / torchrun), or call "
            "torch.distributed.init_process_group(), then enter lazy_init(accelerator)."
        )
    comm = getattr(accelerator, "zero_comm", None)  # an accel_zero.Accelerator
    shard_mesh = getattr(comm, "shard_mesh", None)
    if shard_mesh is not None:
        return shard_mesh  # hybrid sharding: the shard group's rows (groups held by name)
    device = getattr(accelerator, "device", None)
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type not in ("cpu", "cuda"):
        device_type = "cpu"
    mesh = DeviceMesh.from_group(dist.group.WORLD, device_type)  # type: ignore[arg-type]
    forget_group_objects(mesh)  # See [Note: a mesh keeps its group alive] in accel_zero/comm.py
    return mesh


@contextmanager
def lazy_init(accelerator: Any = None) -> Iterator[DeviceMesh]:
    """Build models whose parameters hold only this rank's dim-0 rows.

    ``accelerator`` is an ``accel_zero.Accelerator`` or an ``accelerate.Accelerator``; only
    its process group (torch.distributed must be initialised) and device type are used.
    Yields the 1-D mesh the parameters are placed on. See [Note: lazy construction].
    """
    mesh = _mesh_for(accelerator)
    ctx = _LazyContext(mesh=mesh)

    def on_param(module: nn.Module, name: str, param: nn.Parameter | None) -> Any:
        if param is None or isinstance(param, DTensor) or not param.is_meta:
            return None  # real tensors are cut when their module is attached (point 2)
        return ctx.placeholder(param, f"{type(module).__name__}.{name}")

    def on_module(parent: nn.Module, name: str, child: nn.Module | None) -> Any:
        if child is not None:
            ctx.parents.add(parent)
            ctx.children.add(child)
            ctx.shard_module_params(child)
        return None

    with ExitStack() as stack:
        stack.enter_context(hf.explain_load_errors())
        ctx.handles.append(nn.modules.module.register_module_parameter_registration_hook(on_param))
        ctx.handles.append(nn.modules.module.register_module_module_registration_hook(on_module))
        for handle in ctx.handles:
            stack.callback(handle.remove)
        stack.enter_context(_InitOnShardsMode(mesh))
        yield mesh
        # Roots (modules never attached to a parent) still own their direct parameters whole.
        for module in list(ctx.parents):
            if module not in ctx.children:
                ctx.shard_module_params(module)
    tracer = getattr(accelerator, "memory_tracer", None)  # an accel_zero.Accelerator
    if tracer is not None:
        tracer.mark("load")
