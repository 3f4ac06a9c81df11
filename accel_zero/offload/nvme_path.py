"""The swap folder: validation of ``nvme_path`` before the first step, private folders.

:func:`validate_nvme_path` turns a configured path into an :class:`NvmePath`
(the only way to build a :class:`~accel_zero.offload.swap.SwapSpace`), so a
missing, unwritable or O_DIRECT-less folder is reported once, up front, with
the config key and the fix.
"""

from __future__ import annotations

import errno as errno_mod
import mmap
import os
import secrets
import shutil
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from accel_zero import ops
from accel_zero.offload.swap_format import SwapError


@dataclass(frozen=True, kw_only=True)
class NvmePath:
    """A swap folder that passed :func:`validate_nvme_path`."""

    path: Path
    """The folder, absolute."""
    direct: bool
    """Whether its file system takes O_DIRECT (else IO goes through the page cache)."""
    free_bytes: int
    """Free bytes at validation time (for messages and the estimator)."""


def validate_nvme_path(path: str | os.PathLike[str], *, key: str) -> NvmePath:
    """Check that ``path`` can hold swap files, before the first step.

    Raises ``ValueError`` naming ``key`` (the config key, e.g.
    ``zero_config.offload_optimizer.nvme_path``), the path and the fix when it is
    missing, not a folder or not writable. Probes O_DIRECT with a real aligned
    write of one block to a temporary file (then removed); a file system without
    it (tmpfs before Linux 6.6, ramfs, some network file systems) gets buffered IO
    and exactly one ``RuntimeWarning`` per call.
    """
    folder = Path(path).expanduser().absolute()
    fix = f"point {key} at a writable folder on a local NVMe disk"
    try:
        mode = folder.stat().st_mode
    except FileNotFoundError:
        raise ValueError(
            f"{key}={str(folder)!r} does not exist; create it (mkdir -p {folder}) or {fix}"
        ) from None
    except OSError as e:
        raise ValueError(
            f"{key}={str(folder)!r} is not accessible by this process (uid {os.geteuid()}: "
            f"{e.strerror}, on the folder or one above it); fix the permissions or {fix}"
        ) from e
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{key}={str(folder)!r} is not a folder; {fix}")
    probe = folder / f".accel_zero_probe_{os.getpid()}_{secrets.token_hex(4)}"
    direct = _probe_write(probe, key=key, direct=bool(getattr(os, "O_DIRECT", 0)))
    if not direct:
        warnings.warn(
            f"{key}={str(folder)!r}: the file system does not support O_DIRECT; swap files "
            "there use buffered IO (through the page cache: slower, and it takes RAM)",
            RuntimeWarning,
            stacklevel=2,
        )
    return NvmePath(path=folder, direct=direct, free_bytes=shutil.disk_usage(folder).free)


def _probe_write(probe: Path, *, key: str, direct: bool) -> bool:
    """Write one aligned block to ``probe`` (O_DIRECT if asked); True if O_DIRECT worked."""
    block = mmap.mmap(-1, ops.IO_ALIGN)  # anonymous mappings are page aligned
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        try:
            fd = os.open(probe, flags | (os.O_DIRECT if direct else 0), 0o600)
        except OSError as e:
            if direct and e.errno == errno_mod.EINVAL:
                probe.unlink(missing_ok=True)  # ramfs creates the file, then refuses O_DIRECT
                return _probe_write(probe, key=key, direct=False)
            raise
        try:
            os.write(fd, block)
        except OSError as e:
            if direct and e.errno == errno_mod.EINVAL:  # opened, but no direct IO on write
                os.close(fd)
                probe.unlink()
                return _probe_write(probe, key=key, direct=False)
            raise
        os.close(fd)
        probe.unlink()
        return direct
    except OSError as e:
        probe.unlink(missing_ok=True)
        if e.errno in (errno_mod.EACCES, errno_mod.EPERM, errno_mod.EROFS):
            raise ValueError(
                f"{key}={str(probe.parent)!r} is not writable by this process (uid "
                f"{os.geteuid()}: {e.strerror}); fix its permissions (chown/chmod) or point "
                f"{key} at a writable folder"
            ) from e
        if e.errno == errno_mod.ENOSPC:
            raise ValueError(
                f"{key}={str(probe.parent)!r}: the disk is full (a 4096-byte test write "
                f"failed); free space or point {key} at another disk"
            ) from e
        raise ValueError(
            f"{key}={str(probe.parent)!r}: a test write failed ({e.strerror}); {key} needs a "
            "writable local folder"
        ) from e
    finally:
        block.close()


def new_run_id() -> str:
    """A fresh run id (time + random), for rank 0 to choose and broadcast."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def make_private_dir(path: Path) -> None:
    """Create ``path`` (parent must exist) as mode 0700, or make an existing folder 0700."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode passes the umask; an existing folder keeps its own
    except OSError as e:
        raise SwapError(
            f"cannot create the private swap folder {path}: {e.strerror or e}; remove what is "
            "in the way or choose another nvme_path",
            path=path,
        ) from e
