"""Non-tensor state (scheduler, RNG, sampler, custom objects) as JSON + safetensors, no pickle.

[Note: state without pickle]
Accelerate saves these with ``torch.save`` and loads custom objects with
``weights_only=False``: loading a checkpoint can run arbitrary code. Here a state (any nest of
dicts, lists, tuples, numbers, strings, None, tensors and numpy arrays, which is what
``state_dict()`` methods return) is encoded as JSON, with tensors moved to a companion
safetensors file and referenced by name. Tags are one-key objects whose key starts with
``__`` (``{"__tuple__": [...]}``, ``{"__tensor__": "t0"}``, ...); a dict whose keys are not
all plain strings (int keys, or a string starting with ``__``) is stored as
``{"__dict__": [[key, value], ...]}``, so every key type and the order survive.

A leaf of any other type is pickled with ``torch.save`` only if ``torch.load(...,
weights_only=True)`` reads it back (checked at save time, so an unloadable checkpoint is never
written), and it is always loaded that way.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from accel_zero.checkpoint import layout

__all__ = ["decode_state", "encode_state", "read_state_file", "write_state_file"]

STATE_FORMAT = "accel_zero.state"


def encode_state(value: Any, *, what: str) -> tuple[Any, dict[str, Tensor]]:
    """``(json_value, tensors)`` for ``value``; see [Note: state without pickle]."""
    tensors: dict[str, Tensor] = {}

    def enc(v: Any, path: str) -> Any:
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"__float__": repr(v)}
        if isinstance(v, (list, tuple)):  # a namedtuple comes back as a plain tuple
            items = [enc(x, f"{path}[{i}]") for i, x in enumerate(v)]
            return items if isinstance(v, list) else {"__tuple__": items}
        if isinstance(v, dict):  # OrderedDict / defaultdict come back as dict
            if all(isinstance(k, str) and not k.startswith("__") for k in v):
                return {k: enc(x, f"{path}[{k!r}]") for k, x in v.items()}
            pairs = [[enc(k, f"{path} key {k!r}"), enc(x, f"{path}[{k!r}]")] for k, x in v.items()]
            return {"__dict__": pairs}
        return _encode_leaf(v, path, tensors)

    return enc(value, what), tensors


def _encode_leaf(value: Any, path: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """A one-key tagged object for a tensor, numpy value, dtype, or (checked) pickle."""
    if isinstance(value, Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        tagged: dict[str, Any] = {"__tensor__": name}
    elif isinstance(value, np.ndarray):
        body = {"dtype": value.dtype.str, "shape": list(value.shape), "data": value.tolist()}
        tagged = {"__ndarray__": body}
    elif isinstance(value, np.generic):
        tagged = {"__npscalar__": {"dtype": value.dtype.str, "value": value.item()}}
    elif isinstance(value, torch.dtype):
        tagged = {"__dtype__": str(value).removeprefix("torch.")}
    else:
        tagged = {"__pickle__": _pickle_leaf(value, path, tensors)}
    return tagged


def _pickle_leaf(value: Any, path: str, tensors: dict[str, Tensor]) -> str:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise TypeError(
            f"{path}: a {type(value).__module__}.{type(value).__qualname__} cannot be "
            "checkpointed safely: only dicts, lists, tuples, numbers, strings, tensors, numpy "
            "arrays and what torch.load(weights_only=True) accepts can be stored. Make the "
            f"object's state_dict() return plain values. ({exc})"
        ) from exc
    name = f"p{len(tensors)}"
    tensors[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return name


def _decode_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r} in a checkpoint state")
    return dtype


def decode_state(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of ``encode_state`` (never unpickles without ``weights_only=True``)."""
    tags: dict[str, Any] = {
        "__tuple__": lambda body: tuple(dec(x) for x in body),
        "__dict__": lambda body: {_hashable(dec(k)): dec(x) for k, x in body},
        "__tensor__": lambda body: tensors[body],
        "__float__": float,
        "__ndarray__": lambda body: np.array(body["data"], dtype=np.dtype(body["dtype"])).reshape(
            body["shape"]
        ),
        "__npscalar__": lambda body: np.dtype(body["dtype"]).type(body["value"]),
        "__dtype__": _decode_dtype,
        "__pickle__": lambda body: torch.load(
            io.BytesIO(tensors[body].numpy().tobytes()), weights_only=True
        ),
    }

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            ((tag, body),) = v.items()
            if tag in tags:
                return tags[tag](body)
        return {k: dec(x) for k, x in v.items()}

    return dec(value)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def write_state_file(directory: Path, stem: str, value: Any, *, what: str) -> dict[str, int]:
    """Write ``stem.json`` (+ ``stem.safetensors`` if it holds tensors); ``{name: size}``."""
    from safetensors.torch import save_file

    encoded, tensors = encode_state(value, what=what)
    json_path = directory / f"{stem}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    tensor_file = None
    if tensors:
        tensor_path = directory / f"{stem}.safetensors"
        save_file(tensors, str(tensor_path))
        layout.fsync_path(tensor_path)
        tensor_file = tensor_path.name
        written[str(tensor_path.relative_to(directory))] = tensor_path.stat().st_size
    size = layout.write_json(
        json_path, {"format": STATE_FORMAT, "value": encoded, "tensors": tensor_file}
    )
    written[str(json_path.relative_to(directory))] = size
    return written


def read_state_file(json_path: Path) -> Any:
    """Read a state written by ``write_state_file``."""
    from safetensors.torch import load_file

    document = layout.read_json(json_path)
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise ValueError(f"{json_path} is not an accel_zero state file")
    tensors: dict[str, Tensor] = {}
    if document.get("tensors"):
        tensor_path = json_path.parent / document["tensors"]
        if tensor_path.parent != json_path.parent or "/" in document["tensors"]:
            raise ValueError(f"{json_path}: tensor file must sit beside it")
        tensors = load_file(str(tensor_path))
    return decode_state(document["value"], tensors)
