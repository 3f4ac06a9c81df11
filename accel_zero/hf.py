"""Everything accel_zero knows about transformers lives here (STYLE 13).

The engine never imports transformers; it asks this module, which answers sensibly for a
plain ``nn.Module`` too:

- ``is_transformers_model(model)``
- ``no_split_module_classes(model)``: the model's ``_no_split_modules`` resolved to classes
- ``tied_parameter_groups(model)``: names that share one ``nn.Parameter``
- ``export_state_filter(model)``: which state-dict keys a consolidated export keeps
- ``revert_weight_renames(model, state)``: undo transformers' load-time conversions
- ``save_model_files(model, directory)``: config.json / generation_config.json
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = [
    "explain_load_errors",
    "export_state_filter",
    "is_transformers_model",
    "no_split_module_classes",
    "revert_weight_renames",
    "save_model_files",
    "tied_parameter_groups",
]

logger = logging.getLogger(__name__)


def _pretrained_model_class() -> type | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional for the engine
        return None
    return PreTrainedModel


def is_transformers_model(model: nn.Module) -> bool:
    """True if ``model`` is a transformers ``PreTrainedModel`` (config, save_pretrained...)."""
    cls = _pretrained_model_class()
    return cls is not None and isinstance(model, cls)


def no_split_module_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The model's ``_no_split_modules`` (class names) resolved to the classes present in it.

    transformers gathers the names of all sub-models in ``post_init``; a plain module may set
    the attribute too. Names that match no submodule are ignored (composite models list the
    blocks of every sub-model); order follows first appearance in ``model.modules()``.
    """
    names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if declared:
            names.update(declared)
    found: dict[str, type[nn.Module]] = {}
    for module in model.modules():
        name = type(module).__name__
        if name in names and name not in found:
            found[name] = type(module)
    return tuple(found.values())


def tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names bound to the same ``nn.Parameter`` object (size > 1).

    In each group the first name is the one a consolidated checkpoint keeps (the one
    transformers' ``save_pretrained`` keeps: not a key of ``all_tied_weights_keys``).
    """
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    tied_keys = set(getattr(model, "all_tied_weights_keys", None) or {})
    groups = []
    for names in by_id.values():
        if len(names) > 1:
            groups.append(sorted(names, key=lambda n: (n in tied_keys, names.index(n))))
    return groups


def export_state_filter(model: nn.Module) -> Callable[[str], bool]:
    """A predicate: does a consolidated export keep this state-dict key?

    Drops the aliases of tied parameters (safetensors cannot store aliases; transformers
    re-ties on load) and ``_keys_to_ignore_on_save``.
    """
    dropped: set[str] = set()
    for group in tied_parameter_groups(model):
        dropped.update(group[1:])
    dropped.update(getattr(model, "_keys_to_ignore_on_save", None) or ())
    return lambda key: key not in dropped


def revert_weight_renames(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Undo transformers' load-time key renames and weight conversions for ``state``.

    ``state`` must hold every tensor a conversion needs together (a fused MoE expert tensor
    and its siblings): the engine yields whole units, which do. Plain modules pass through.
    """
    if not is_transformers_model(model) or not state:
        return state
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, state))  # type: ignore[arg-type]


def save_model_files(model: nn.Module, directory: Path, *, dtype: Any = None) -> None:
    """Write what ``save_pretrained`` writes besides the weights: config and generation config.

    As ``save_pretrained`` does, the config records the architecture and the weights' dtype.
    A plain ``nn.Module`` writes nothing.
    """
    if not is_transformers_model(model):
        return
    hf_model: Any = model
    config = hf_model.config
    weights_dtype = dtype if dtype is not None else hf_model.dtype
    config.dtype = str(weights_dtype).split(".")[-1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if hf_model.can_generate() and getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(directory)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.extend(record.getMessage().splitlines())
        except Exception:  # a broken log record must not break loading
            pass


@contextmanager
def explain_load_errors() -> Iterator[None]:
    """Turn transformers' "see the report above" load failures into errors naming the keys.

    transformers logs a LOAD REPORT (key | status | details) and then raises a RuntimeError
    that only points at it; under lazy_init the report's model shapes are this rank's rows.
    """
    handler = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        yield
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        rows = [line.strip() for line in handler.lines if "MISMATCH" in line and "|" in line]
        raise ValueError(
            "from_pretrained under lazy_init: checkpoint tensor shapes do not match the model "
            "built from its config:\n  "
            + "\n  ".join(rows or ["(see the LOAD REPORT logged above)"])
            + "\n('model:' shapes are this rank's rows under lazy_init.) Fix config.json to "
            "match the checkpoint, or pass ignore_mismatched_sizes=True to re-initialise them."
        ) from exc
    finally:
        hf_logger.removeHandler(handler)
