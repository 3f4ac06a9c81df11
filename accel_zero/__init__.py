"""accel_zero: ZeRO-3 / ZeRO-Infinity class training backend for Hugging Face Accelerate.

Re-exports only. Names resolve on first use so that ``import accel_zero`` stays
light (no transformers / accelerate import until asked for).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Accelerator": "accel_zero.accelerator",
    "lazy_init": "accel_zero.lazy",
    "ZeroConfig": "accel_zero.config",
    "OffloadConfig": "accel_zero.config",
    "AioConfig": "accel_zero.config",
    "LossScaleConfig": "accel_zero.config",
    "CPUAdam": "accel_zero.cpu_adam",
    "Trainer": "accel_zero.trainer",
}

__all__ = [
    "Accelerator",
    "AioConfig",
    "CPUAdam",
    "LossScaleConfig",
    "OffloadConfig",
    "Trainer",
    "ZeroConfig",
    "__version__",
    "lazy_init",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'accel_zero' has no attribute {name!r}")
    return getattr(import_module(module), name)
