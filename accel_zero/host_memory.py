"""Process memory as the operating system sees it, and the C allocator's settings (DESIGN D12).

Readers: :func:`process_memory` (``/proc/self/status``: current and peak resident set),
:func:`current_rss_bytes` (``/proc/self/statm``, cheap enough for a timeline sample),
:func:`smaps_rollup` (anonymous vs file-backed pages) and :func:`malloc_stats` (glibc's
``mallinfo2``: bytes malloc holds free, i.e. freed by torch but not given back).

Allocator: torch allocates CPU tensors with ``posix_memalign``, so on Linux glibc's
malloc decides whether freed tensor memory goes back to the OS. Its *dynamic mmap
threshold* keeps it: a freed mmapped block of up to 32 MiB raises the threshold to its
size (and the trim threshold to twice that), so later blocks of that size come from the
heap, where freed ones stay resident and fragment it. gloo's worker threads allocate in
arenas of their own.

[Note: host allocator profiles]
``$ACCEL_ZERO_HOST_ALLOCATOR`` picks a profile (:data:`PROFILES`); unset means
:data:`DEFAULT_PROFILE`. Measured with ``scripts/bench_memory.py`` (2 gloo ranks, CPU,
per rank; step time on a shared 2-core machine, minima of interleaved runs):

=========================  ===============  ==================  ========================
setting                    GPT-2 29.4M,     SmolLM2-135M,       SmolLM2 cost per step:
                           ZeRO-3 RSS       ZeRO-3 peak /       ZeRO-3 | DDP
                           growth           steady RSS
=========================  ===============  ==================  ========================
glibc as found (glibc)     812-871 MiB      3712 / 3397 MiB     -
mmap 4 MiB, trim 8 (lean)  360 MiB (-57%)   3428 / 2285 MiB     time +37%, CPU +30% | +3%
mmap 1 MiB, trim 0         348 MiB          3418 / 2284 MiB     CPU +25% | +4%
malloc_trim(0) each step   367 MiB          3572 / 1757 MiB     CPU +27% | 0%
jemalloc 5.3 (LD_PRELOAD)  354 MiB          3129 / 1761 MiB     CPU +30% | +25%
tcmalloc 2.10 (LD_PRELOAD) 686 MiB          -                   -
M_ARENA_MAX=2              783 MiB          -                   -
=========================  ===============  ==================  ========================

Everything that gives memory back to the OS costs page faults when the memory is used
again. The table above was measured while the engine's BufferPool never matched on CPU
(fixed in f32cf1e: it keyed by ``torch.device``, ``cpu:0`` against ``cpu``), so every
gather and reduce buffer was a fresh allocation each step. Re-measured after the fix
(``scripts/bench_memory.py --repeats 1``, SmolLM2-135M bf16; peak RSS x DDP's, s/step):

=========================  ===============  ===============  ===============
setting                    ZeRO-3           ZeRO-1           GPT-2 29.4M ZeRO-3
=========================  ===============  ===============  ===============
glibc as found (default)   0.82x, 4.09 s    1.09x, 4.17 s    grow 698 MiB, 0.46 s
lean                       0.71x, 3.98 s    0.89x, 4.73 s    grow 395 MiB, 0.57 s
=========================  ===============  ===============  ===============

``lean`` now costs ZeRO-3 nothing measurable on SmolLM2 and is what a ZeRO-3 run on CPU
should use; it stays opt-in because stages 1 and 2 (bf16 compute copies and whole
gradients allocated per step) and tiny model-state-bound steps (GPT-2, +25%) still pay
more than the 5% budget. Make it the default once those allocations are pooled too;
re-measure with ``scripts/bench_memory.py --allocators default,lean``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOCATOR_ENV",
    "DEFAULT_PROFILE",
    "DEFAULT_TUNING",
    "PROFILES",
    "AllocatorTuning",
    "MallocStats",
    "ProcessMemory",
    "allocator_env",
    "apply_allocator_tuning",
    "current_rss_bytes",
    "drop_file_pages",
    "malloc_stats",
    "malloc_trim",
    "process_memory",
    "profile_from_env",
    "release_free_memory",
    "smaps_rollup",
    "tune_host_allocator",
]

ALLOCATOR_ENV = "ACCEL_ZERO_HOST_ALLOCATOR"
"""A profile name (:data:`PROFILES`), ``default``, or ``off``/``0``: leave the C allocator
as the process found it and never trim. See [Note: host allocator profiles]."""

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# The glibc environment variables that set the same parameters at start-up; a user who
# sets one has chosen, and we leave that parameter alone.
_GLIBC_ENV = {
    "mmap_threshold": "MALLOC_MMAP_THRESHOLD_",
    "trim_threshold": "MALLOC_TRIM_THRESHOLD_",
    "top_pad": "MALLOC_TOP_PAD_",
    "arena_max": "MALLOC_ARENA_MAX",
}
_GLIBC_TUNABLES = {
    "mmap_threshold": "glibc.malloc.mmap_threshold",
    "trim_threshold": "glibc.malloc.trim_threshold",
    "top_pad": "glibc.malloc.top_pad",
    "arena_max": "glibc.malloc.arena_max",
}
_MALLOC_PARAMS = {
    "mmap_threshold": _M_MMAP_THRESHOLD,
    "trim_threshold": _M_TRIM_THRESHOLD,
    "top_pad": _M_TOP_PAD,
    "arena_max": _M_ARENA_MAX,
}


# ------------------------------------------------------------------- readers
@dataclass(frozen=True, kw_only=True)
class ProcessMemory:
    """This process's resident memory, from ``/proc/self/status`` (bytes)."""

    rss_bytes: int
    """Resident now (``VmRSS``): what the OOM killer weighs."""
    peak_rss_bytes: int
    """Highest ``VmRSS`` since the process started (``VmHWM``)."""
    anon_bytes: int
    """Resident anonymous pages (``RssAnon``): the heap, tensors, thread stacks."""
    file_bytes: int
    """Resident file-backed pages (``RssFile``): libraries, memory-mapped checkpoints."""
    shmem_bytes: int
    """Resident shared memory (``RssShmem``)."""


def _read_kib_fields(path: str, keys: set[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                parts = rest.split()
                # "VmRSS:	  123456 kB"
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def process_memory() -> ProcessMemory | None:
    """Current and peak resident memory of this process; None where ``/proc`` is missing."""
    keys = {"VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"}
    try:
        v = _read_kib_fields("/proc/self/status", keys)
    except OSError:
        return None
    return ProcessMemory(
        rss_bytes=v.get("VmRSS", 0),
        peak_rss_bytes=v.get("VmHWM", 0),
        anon_bytes=v.get("RssAnon", 0),
        file_bytes=v.get("RssFile", 0),
        shmem_bytes=v.get("RssShmem", 0),
    )


def current_rss_bytes() -> int:
    """Resident bytes now, from ``/proc/self/statm`` (a few microseconds); 0 without ``/proc``."""
    try:  # os.open/read: a third of the cost of open() with its buffered file object
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        return 0
    try:
        return int(os.read(fd, 256).split()[1]) * _PAGE_SIZE
    finally:
        os.close(fd)


def smaps_rollup() -> dict[str, int]:
    """``/proc/self/smaps_rollup`` in bytes (``Rss``, ``Anonymous``, ``Private_Dirty``, ...).

    Empty where the kernel has no rollup (before Linux 4.14) or ``/proc`` is missing.
    Reading it walks every mapping: milliseconds, not for a hot path.
    """
    out: dict[str, int] = {}
    try:
        text = Path("/proc/self/smaps_rollup").read_text(encoding="ascii")
    except OSError:
        return out
    for line in text.splitlines()[1:]:  # the first line names the address range
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


# ------------------------------------------------------------------- glibc
class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> ctypes.CDLL | None:
    """The C library this process links, if it is glibc (mallopt/malloc_trim/mallinfo2)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None  # musl or another C library: none of glibc's knobs apply
    version.restype = ctypes.c_char_p
    return libc


def _glibc_version() -> tuple[int, int]:
    libc = _libc()
    if libc is None:
        return (0, 0)
    raw = libc.gnu_get_libc_version().decode()
    major, minor = raw.split(".")[:2]
    return int(major), int(minor)


def _preloaded_allocator(environ: Mapping[str, str] | None = None) -> str | None:
    """jemalloc or tcmalloc when LD_PRELOAD replaces malloc (glibc's knobs then do nothing)."""
    preload = (os.environ if environ is None else environ).get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return name
    return None


@dataclass(frozen=True, kw_only=True)
class MallocStats:
    """glibc's view of its heaps (``mallinfo2``), all arenas summed, in bytes."""

    heap_bytes: int
    """Obtained from the OS by brk/heaps (``arena``): in use plus free."""
    mmap_bytes: int
    """Blocks served directly by mmap (``hblkhd``): returned to the OS when freed."""
    in_use_bytes: int
    """Heap bytes in live allocations (``uordblks``)."""
    free_bytes: int
    """Heap bytes free but kept (``fordblks``): freed memory that may still be resident."""
    top_releasable_bytes: int
    """Free bytes at the top of the main heap that trimming would return (``keepcost``)."""


def malloc_stats() -> MallocStats | None:
    """glibc's heap figures (None elsewhere, or when another allocator is preloaded).

    It locks every arena and walks their free lists: call it at phase boundaries,
    not per tensor.
    """
    libc = _libc()
    if libc is None or _preloaded_allocator() or _glibc_version() < (2, 33):
        return None
    fn = libc.mallinfo2
    fn.restype = _MallInfo2
    info = fn()
    return MallocStats(
        heap_bytes=info.arena,
        mmap_bytes=info.hblkhd,
        in_use_bytes=info.uordblks,
        free_bytes=info.fordblks,
        top_releasable_bytes=info.keepcost,
    )


def malloc_trim(pad: int = 0) -> bool:
    """Give free heap pages back to the OS (glibc ``malloc_trim``); True if any went back.

    Every arena is walked and free pages anywhere in a heap are released, not only at
    its top, so this undoes retention that the trim threshold allows. Pages released
    here fault back in (zeroed) when the heap reuses them.
    """
    libc = _libc()
    if libc is None or _preloaded_allocator():
        return False
    fn = libc.malloc_trim
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return bool(fn(pad))


# ------------------------------------------------------------------ tuning
@dataclass(frozen=True, kw_only=True)
class AllocatorTuning:
    """glibc malloc parameters set with ``mallopt`` (None leaves one at glibc's default).

    Setting any of ``mmap_threshold``, ``trim_threshold``, ``top_pad`` turns glibc's
    dynamic mmap threshold off: blocks at or above the threshold are then always mmapped
    and unmapped when freed. So setting only ``trim_threshold`` freezes the mmap threshold
    at 128 KiB, which is rarely what is meant: set both.
    """

    mmap_threshold: int | None = None
    """Bytes from which an allocation gets its own mmap (glibc: 128 KiB, rising to 32 MiB)."""
    trim_threshold: int | None = None
    """Free bytes at a heap's top before it is given back (glibc: 128 KiB, rising)."""
    top_pad: int | None = None
    """Extra bytes requested whenever a heap grows (glibc: 128 KiB)."""
    arena_max: int | None = None
    """Most malloc arenas (glibc: 8 x cores); each thread that allocates may get its own."""

    def __post_init__(self) -> None:
        for name in ("mmap_threshold", "trim_threshold", "top_pad", "arena_max"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(
                    f"AllocatorTuning.{name}={value!r}: expected a non-negative int or None"
                )
        if self.arena_max == 0:
            raise ValueError("AllocatorTuning.arena_max=0: glibc needs at least one arena")
        if self.mmap_threshold is not None and self.mmap_threshold > 32 * 2**20:
            # glibc's HEAP_MAX/DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more.
            raise ValueError(
                f"AllocatorTuning.mmap_threshold={self.mmap_threshold}: glibc accepts at most "
                "32 MiB (33554432) on 64-bit"
            )

    def settings(self) -> dict[str, int]:
        """The parameters this tuning sets, by name."""
        return {
            name: value for name in _MALLOC_PARAMS if (value := getattr(self, name)) is not None
        }


PROFILES: dict[str, AllocatorTuning] = {
    "glibc": AllocatorTuning(),
    "lean": AllocatorTuning(mmap_threshold=4 * 2**20, trim_threshold=8 * 2**20),
}
"""Named settings for ``$ACCEL_ZERO_HOST_ALLOCATOR``. See [Note: host allocator profiles]."""

DEFAULT_PROFILE = "glibc"
"""The profile used when ``$ACCEL_ZERO_HOST_ALLOCATOR`` is unset (measured: see the note)."""

DEFAULT_TUNING = PROFILES[DEFAULT_PROFILE]


def profile_from_env(environ: Mapping[str, str] | None = None) -> AllocatorTuning | None:
    """The tuning ``$ACCEL_ZERO_HOST_ALLOCATOR`` selects; None when it says ``off``/``0``.

    Raises ValueError naming the variable and the profiles for an unknown value.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(ALLOCATOR_ENV, "").strip().lower()
    if raw in {"0", "off", "false", "no"}:
        return None
    if not raw or raw in {"1", "on", "true", "yes", "default"}:
        return DEFAULT_TUNING
    if raw not in PROFILES:
        raise ValueError(
            f"{ALLOCATOR_ENV}={raw!r}: expected one of {sorted(PROFILES)}, 'default' or 'off'"
        )
    return PROFILES[raw]


def _user_chose(name: str, environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    if _GLIBC_ENV[name] in environ:
        return True
    return _GLIBC_TUNABLES[name] in environ.get("GLIBC_TUNABLES", "")


def apply_allocator_tuning(tuning: AllocatorTuning) -> dict[str, int]:
    """Set ``tuning``'s parameters in this process's glibc malloc; returns those set.

    Nothing is set on a C library other than glibc or when LD_PRELOAD replaces malloc; a
    parameter the user already set through glibc's own environment variable
    (``MALLOC_MMAP_THRESHOLD_``, ...) or ``GLIBC_TUNABLES`` is left as they chose. Unlike
    :func:`tune_host_allocator` this ignores ``$ACCEL_ZERO_HOST_ALLOCATOR``.
    """
    libc = _libc()
    if libc is None:
        return {}
    other = _preloaded_allocator()
    if other is not None:
        logger.debug("accel_zero: %s is preloaded; glibc malloc settings skipped", other)
        return {}
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied: dict[str, int] = {}
    for name, value in tuning.settings().items():
        if _user_chose(name):
            continue
        if mallopt(_MALLOC_PARAMS[name], value) != 1:
            logger.warning("accel_zero: mallopt(%s=%d) was refused by glibc", name, value)
            continue
        applied[name] = value
    return applied


def allocator_env(
    environ: Mapping[str, str] | None = None, tuning: AllocatorTuning | None = None
) -> dict[str, str]:
    """glibc environment variables that apply ``tuning`` (default: the profile
    ``$ACCEL_ZERO_HOST_ALLOCATOR`` selects) from a process's start, for a launcher to add
    to every rank's environment.

    Set before exec, they also cover what a script allocates before it creates the
    ``Accelerator`` (a model built first) and the processes it spawns. Empty when the
    profile is ``off``, when LD_PRELOAD replaces malloc, or off Linux; a variable the user
    set already is left out (theirs wins).
    """
    environ = os.environ if environ is None else environ
    if tuning is None:
        tuning = profile_from_env(environ)
    if tuning is None or _preloaded_allocator(environ) or not sys.platform.startswith("linux"):
        return {}
    return {
        _GLIBC_ENV[name]: str(value)
        for name, value in tuning.settings().items()
        if not _user_chose(name, environ)
    }


def tune_host_allocator(tuning: AllocatorTuning | None = None) -> dict[str, int]:
    """Apply ``tuning`` (default: the profile ``$ACCEL_ZERO_HOST_ALLOCATOR`` selects).

    Returns the parameters set; nothing when the profile is ``off``. The engine calls it
    early in ``Accelerator.__init__``; see :func:`apply_allocator_tuning` for what is
    skipped. ``mallopt`` changes how later allocations are served, not where earlier ones
    live, so it must come before the large allocations (the model), and it affects the
    calling process only (each rank calls it).
    """
    if tuning is None:
        tuning = profile_from_env()
    return {} if tuning is None else apply_allocator_tuning(tuning)


def release_free_memory() -> bool:
    """``malloc_trim(0)`` unless ``$ACCEL_ZERO_HOST_ALLOCATOR`` is ``off``; True if pages went
    back. For the end of one-off phases (prepare, an export, evaluation), whose freed
    memory the training step would not reuse; not per step (the step re-faults what it
    gave back: +27% CPU per step measured on SmolLM2 ZeRO-3)."""
    if profile_from_env() is None:
        return False
    return malloc_trim(0)


_MADV_DONTNEED = 4


def _mapping_of(address: int) -> tuple[int, int, str, str] | None:
    """(start, end, permissions, path) of the mapping holding ``address``, from
    ``/proc/self/maps``; None where there is none (or no ``/proc``)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return start, end, fields[1], fields[5] if len(fields) > 5 else ""
    return None


def drop_file_pages(tensor: Any) -> int:
    """Drop the resident pages of a CPU tensor that lies in a mapping of a regular file (rows
    read straight from a memory-mapped checkpoint; safetensors maps it private, ``rw-p``),
    once its data lives elsewhere and the tensor is dead: RSS falls by them, and a later read
    faults them back in from the file. Only whole pages inside the tensor (its neighbours'
    pages are untouched), and only in a file mapping: anonymous memory, which
    ``MADV_DONTNEED`` would zero, is left alone. Returns the bytes dropped."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or not tensor.numel():
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = os.sysconf("SC_PAGE_SIZE")
    low, high = -(-start // page) * page, end // page * page
    mapping = _mapping_of(start)
    if high <= low or mapping is None:
        return 0
    _, map_end, perms, path = mapping
    del perms  # private (copy-on-write) or shared: a file's pages either way
    if not path.startswith("/") or path.startswith("/dev/") or high > map_end:
        return 0
    libc = _libc()
    if libc is None:
        return 0
    if libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), _MADV_DONTNEED) != 0:
        return 0
    return high - low
