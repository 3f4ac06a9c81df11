"""Process-memory readers and glibc allocator tuning (accel_zero.host_memory).

The readers are checked against /proc/self/status read independently, and against a
real allocation. mallopt changes the calling process for good, so every tuning test runs
in a fresh interpreter (``_in_fresh_python``) and never in the pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from accel_zero.host_memory import (
    DEFAULT_TUNING,
    PROFILES,
    AllocatorTuning,
    allocator_env,
    current_rss_bytes,
    malloc_stats,
    process_memory,
    profile_from_env,
    smaps_rollup,
)

MiB = 2**20
LINUX = sys.platform.startswith("linux") and Path("/proc/self/status").exists()
pytestmark = pytest.mark.skipif(not LINUX, reason="reads /proc (Linux)")


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} not in /proc/self/status")


def _glibc() -> bool:
    return malloc_stats() is not None


def test_process_memory_matches_proc_status() -> None:
    before_rss, before_hwm = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    mem = process_memory()
    after_rss, after_hwm = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    assert mem is not None
    slack = 2 * MiB  # the interpreter may touch a few pages between the reads
    assert min(before_rss, after_rss) - slack <= mem.rss_bytes <= max(before_rss, after_rss) + slack
    assert before_hwm <= mem.peak_rss_bytes <= after_hwm
    assert mem.peak_rss_bytes >= mem.rss_bytes
    # RssAnon + RssFile + RssShmem is VmRSS by definition (same snapshot).
    parts = mem.anon_bytes + mem.file_bytes + mem.shmem_bytes
    assert abs(parts - mem.rss_bytes) <= slack


def test_current_rss_agrees_with_status_and_smaps() -> None:
    status = _status_bytes("VmRSS")
    fast = current_rss_bytes()
    rollup = smaps_rollup()
    assert abs(fast - status) <= 2 * MiB
    if rollup:  # Linux >= 4.14
        assert abs(rollup["Rss"] - status) <= 4 * MiB
        assert rollup["Anonymous"] > 0


def test_rss_readers_see_a_real_allocation() -> None:
    # 96 MiB is above glibc's largest mmap threshold (32 MiB), so these are fresh pages,
    # resident once written, whatever the heap held before.
    before = current_rss_bytes()
    t = torch.ones(96 * MiB // 4)
    grown = current_rss_bytes() - before
    mem = process_memory()
    assert mem is not None
    assert grown >= 90 * MiB, grown
    assert mem.peak_rss_bytes >= mem.rss_bytes >= before + 90 * MiB
    del t
    assert current_rss_bytes() < before + 40 * MiB  # an mmapped block goes back when freed


@pytest.mark.skipif(not LINUX or malloc_stats() is None, reason="glibc mallinfo2")
def test_malloc_stats_count_heap_allocations() -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = malloc_stats()
    # 64 KiB blocks: under glibc's smallest mmap threshold, so they come from a heap.
    blocks = [libc.malloc(64 * 1024) for _ in range(64)]
    during = malloc_stats()
    for b in blocks:
        libc.free(b)
    after = malloc_stats()
    assert before is not None and during is not None and after is not None
    # Within 5%: the interpreter allocates and frees a little between the readings.
    assert during.in_use_bytes - before.in_use_bytes >= 0.95 * 64 * 64 * 1024
    assert during.in_use_bytes - after.in_use_bytes >= 0.95 * 64 * 64 * 1024


def test_allocator_tuning_validates() -> None:
    assert AllocatorTuning(mmap_threshold=1 << 20, arena_max=2).settings() == {
        "mmap_threshold": 1 << 20,
        "arena_max": 2,
    }
    with pytest.raises(ValueError, match="mmap_threshold"):
        AllocatorTuning(mmap_threshold=64 * MiB)
    with pytest.raises(ValueError, match="arena_max=0"):
        AllocatorTuning(arena_max=0)
    with pytest.raises(ValueError, match="trim_threshold"):
        AllocatorTuning(trim_threshold=-1)


# --------------------------------------------------------- tuning (fresh processes)
_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    from accel_zero.host_memory import (
        AllocatorTuning, apply_allocator_tuning, current_rss_bytes, malloc_stats, malloc_trim,
        tune_host_allocator,
    )
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    arg = json.loads(sys.argv[1])
    if arg["how"] == "default":
        applied = tune_host_allocator()
    else:
        applied = apply_allocator_tuning(AllocatorTuning(**arg["tuning"]))
    out = {"applied": applied}
    if malloc_stats() is None:  # another allocator preloaded
        print(json.dumps(out))
        sys.exit(0)
    # Where does a block of arg["size"] bytes come from: its own mmap or a heap?
    before = malloc_stats()
    p = libc.malloc(arg["size"])
    libc.memset(p, 1, arg["size"])
    during = malloc_stats()
    out["mmapped"] = during.mmap_bytes - before.mmap_bytes >= arg["size"]
    # Free it under a live block allocated after it (so it is not the heap's top) and
    # see whether the pages stay resident until malloc_trim.
    pin = libc.malloc(4096)
    rss_held = current_rss_bytes()
    libc.free(p)
    out["freed_returned"] = rss_held - current_rss_bytes()
    out["trimmed"] = malloc_trim(0)
    out["trim_returned"] = rss_held - current_rss_bytes()
    libc.free(pin)
    print(json.dumps(out))
    """
)


def _in_fresh_python(arg: dict, env: dict[str, str] | None = None) -> dict:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full_env.pop("ACCEL_ZERO_HOST_ALLOCATOR", None)
    full_env.pop("LD_PRELOAD", None)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(arg)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc(), reason="glibc malloc")
def test_mmap_threshold_takes_effect_and_heap_blocks_need_trim() -> None:
    size = 8 * MiB
    # Threshold above the block: it comes from the heap; freed, its pages stay resident
    # (the trim threshold is far above) until malloc_trim gives them back.
    heap = _in_fresh_python(
        {
            "how": "explicit",
            "size": size,
            "tuning": {"mmap_threshold": 32 * MiB, "trim_threshold": 2**30},
        }
    )
    assert heap["applied"] == {"mmap_threshold": 32 * MiB, "trim_threshold": 2**30}
    assert not heap["mmapped"]
    assert heap["freed_returned"] < size // 2, heap
    assert heap["trimmed"] and heap["trim_returned"] >= size - MiB, heap
    # Threshold below the block: its own mmap, returned to the OS at free.
    mapped = _in_fresh_python(
        {"how": "explicit", "size": size, "tuning": {"mmap_threshold": 1 * MiB}}
    )
    assert mapped["mmapped"]
    assert mapped["freed_returned"] >= size - MiB, mapped


@pytest.mark.skipif(not _glibc(), reason="glibc malloc")
def test_opt_out_and_user_settings_are_respected() -> None:
    tuning = {"mmap_threshold": 1 * MiB, "trim_threshold": 0}
    # The opt-out switches the default-on entry point off entirely.
    off = _in_fresh_python(
        {"how": "default", "size": MiB, "tuning": {}}, env={"ACCEL_ZERO_HOST_ALLOCATOR": "0"}
    )
    assert off["applied"] == {}
    # A parameter set through glibc's own variable is the user's choice: left alone.
    user = _in_fresh_python(
        {"how": "explicit", "size": 2 * MiB, "tuning": tuning},
        env={"MALLOC_MMAP_THRESHOLD_": str(16 * MiB)},
    )
    assert user["applied"] == {"trim_threshold": 0}
    assert not user["mmapped"]  # 2 MiB < the user's 16 MiB threshold
    # The entry point the Accelerator calls applies the profile the variable names.
    default = _in_fresh_python({"how": "default", "size": MiB, "tuning": {}})
    assert default["applied"] == DEFAULT_TUNING.settings()
    lean = _in_fresh_python(
        {"how": "default", "size": 8 * MiB, "tuning": {}},
        env={"ACCEL_ZERO_HOST_ALLOCATOR": "lean"},
    )
    assert lean["applied"] == PROFILES["lean"].settings()
    assert lean["mmapped"] and lean["freed_returned"] >= 7 * MiB, lean


def _jemalloc() -> str | None:
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64"):
        path = Path(folder) / "libjemalloc.so.2"
        if path.exists():
            return str(path)
    return None


@pytest.mark.skipif(not _glibc() or _jemalloc() is None, reason="needs libjemalloc2")
def test_nothing_set_under_a_preloaded_allocator() -> None:
    # glibc's knobs would do nothing under jemalloc: none are set, none reported.
    preloaded = _in_fresh_python(
        {"how": "explicit", "size": MiB, "tuning": {"mmap_threshold": MiB}},
        env={"LD_PRELOAD": str(_jemalloc())},
    )
    assert preloaded["applied"] == {}


def test_allocator_env_for_launchers() -> None:
    lean = PROFILES["lean"]
    lean_env = {k: str(v) for k, v in lean.settings().items()}
    expected = {
        "MALLOC_MMAP_THRESHOLD_": lean_env["mmap_threshold"],
        "MALLOC_TRIM_THRESHOLD_": lean_env["trim_threshold"],
    }
    assert allocator_env({}, lean) == expected
    assert allocator_env({"ACCEL_ZERO_HOST_ALLOCATOR": "lean"}) == expected
    assert allocator_env({}) == {
        f"MALLOC_{k.upper()}_": v for k, v in DEFAULT_TUNING.settings().items()
    }
    assert allocator_env({"ACCEL_ZERO_HOST_ALLOCATOR": "off"}) == {}
    # The user's own variable wins; a preloaded allocator turns it off.
    mine = {"ACCEL_ZERO_HOST_ALLOCATOR": "lean", "MALLOC_TRIM_THRESHOLD_": "0"}
    assert allocator_env(mine) == {"MALLOC_MMAP_THRESHOLD_": expected["MALLOC_MMAP_THRESHOLD_"]}
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}
    assert allocator_env(tunables, lean) == {
        "MALLOC_TRIM_THRESHOLD_": expected["MALLOC_TRIM_THRESHOLD_"]
    }
    assert allocator_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, lean) == {}


def test_profile_from_env() -> None:
    assert profile_from_env({}) == DEFAULT_TUNING
    assert profile_from_env({"ACCEL_ZERO_HOST_ALLOCATOR": "Lean"}) == PROFILES["lean"]
    assert profile_from_env({"ACCEL_ZERO_HOST_ALLOCATOR": "0"}) is None
    with pytest.raises(ValueError, match=r"ACCEL_ZERO_HOST_ALLOCATOR='fast'.*'glibc', 'lean'"):
        profile_from_env({"ACCEL_ZERO_HOST_ALLOCATOR": "fast"})


@pytest.mark.skipif(not _glibc(), reason="glibc malloc")
def test_allocator_env_takes_effect_at_exec() -> None:
    # What a launcher sets reaches glibc before the first allocation: same effect as mallopt.
    env = allocator_env({}, AllocatorTuning(mmap_threshold=MiB))
    out = _in_fresh_python(
        {"how": "explicit", "size": 2 * MiB, "tuning": {"trim_threshold": 2**30}}, env=env
    )
    assert out["mmapped"], out


def _resident_kib(address: int, nbytes: int) -> int:
    """KiB of the mapping around ``address`` resident now (Rss in /proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("no mapping holds the address")


def test_drop_file_pages_frees_a_mapped_checkpoints_rows_and_spares_anonymous_memory(
    tmp_path: Path,
) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from accel_zero.host_memory import drop_file_pages

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4 << 20, dtype=torch.float32)}, str(path))  # 16 MiB
    with safe_open(str(path), framework="pt") as f:
        rows = f.get_slice("w")[:]  # as transformers reads a rank's rows
        copy = rows.clone()
        touched = _resident_kib(rows.data_ptr(), rows.nbytes)
        dropped = drop_file_pages(rows)
        after = _resident_kib(rows.data_ptr(), rows.nbytes)
        assert dropped >= rows.nbytes - 2 * 4096, (dropped, rows.nbytes)  # all whole pages
        assert touched - after >= dropped // 1024 - 8, (touched, after, dropped)
        assert torch.equal(rows, copy)  # read back from the file when touched again
    anonymous = torch.arange(1 << 20, dtype=torch.float32)
    assert drop_file_pages(anonymous) == 0  # would zero it: never
    assert torch.equal(anonymous, torch.arange(1 << 20, dtype=torch.float32))
