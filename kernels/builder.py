"""All op builders, and the extension list ``setup.py`` builds with ACCEL_ZERO_BUILD_OPS=1.

``ACCEL_ZERO_OPS`` (comma list, default all) limits which ops a prebuilt install
compiles; an op this machine cannot build is skipped with the reason logged, so
``pip install`` never fails because CUDA or libaio is missing.
"""

from __future__ import annotations

import logging
import os

from .aio.builder import AioBuilder
from .cpu_adam.builder import CPUAdamBuilder
from .cuda.builder import CudaOpsBuilder
from .op_builder import OpBuilder

logger = logging.getLogger(__name__)

BUILDERS: dict[str, OpBuilder] = {
    b.name: b for b in (AioBuilder(), CPUAdamBuilder(), CudaOpsBuilder())
}
"""Every op by its short name (``aio``, ``cpu_adam``, ``cuda``)."""


def get_extensions() -> list:
    """Setuptools extensions for the ops this machine can build (used by setup.py)."""
    wanted = os.environ.get("ACCEL_ZERO_OPS", "all")
    names = list(BUILDERS) if wanted == "all" else [n.strip() for n in wanted.split(",") if n]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(f"ACCEL_ZERO_OPS names unknown ops {unknown}; known: {sorted(BUILDERS)}")
    extensions = []
    for name in names:
        builder = BUILDERS[name]
        ok, why = builder.is_compatible()
        if not ok:
            logger.warning("accel_zero: not building op %r: %s", name, why)
            print(f"accel_zero: not building op {name!r}: {why}")  # pip shows stdout only
            continue
        extensions.append(builder.extension())
    return extensions
