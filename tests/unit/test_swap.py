"""SwapSpace (NVMe swap files + buffer pool) on real file systems, with real faults."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from accel_zero import ops
from accel_zero.offload import (
    NvmePath,
    SwapCorruptError,
    SwapForeignError,
    SwapIOError,
    SwapRecordInvalidError,
    SwapSpace,
    SwapStaleError,
    SwapTruncatedError,
    validate_nvme_path,
)
from accel_zero.offload.swap_format import verify_record

pytestmark = pytest.mark.filterwarnings("ignore:accel_zero op 'aio' uses its pure-PyTorch")

KEY = "zero_config.offload_optimizer.nvme_path"
# Three fields of odd sizes and two dtypes: padding, alignment and views all get exercised.
FIELDS = [("master", 3000, torch.float32), ("exp_avg", 2049, torch.float32)]
FIELDS += [("copy", 777, torch.bfloat16)]


@pytest.fixture(params=["libaio", "python"])
def backend(request, monkeypatch) -> str:
    if request.param == "python":
        monkeypatch.setenv(ops.FORCE_FALLBACK_ENV, "aio")
    else:
        monkeypatch.delenv(ops.FORCE_FALLBACK_ENV, raising=False)
        status = ops.op_status("aio")
        if status.source == "fallback":
            pytest.skip(f"aio kernel unavailable: {status.reason}")
    return request.param


def _nvme(path: Path) -> NvmePath:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback engine's one warning
        return validate_nvme_path(path, key=KEY)


def _space(path: Path, run_id: str = "run1", rank: int = 0, **kwargs) -> SwapSpace:
    kwargs.setdefault("block_size", 64 << 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return SwapSpace(_nvme(path), run_id=run_id, rank=rank, **kwargs)


def _values(key: str, generation: int) -> dict[str, torch.Tensor]:
    """Distinct, reproducible contents per (record, generation)."""
    g = torch.Generator().manual_seed(hash((key, generation)) % (1 << 31))
    return {n: torch.randn(numel, generator=g).to(dtype) for n, numel, dtype in FIELDS}


def _fill(space: SwapSpace, key: str, generation: int) -> None:
    buf = space.acquire(key)
    for name, t in buf.fields.items():
        t.copy_(_values(key, generation)[name])
    space.write(buf, generation=generation)


def _check(fields: dict[str, torch.Tensor], key: str, generation: int) -> None:
    want = _values(key, generation)
    assert set(fields) == set(want)
    for name, t in fields.items():
        assert torch.equal(t, want[name]), (key, generation, name)


# -- round trips ---------------------------------------------------------------------------


def test_round_trip_several_records_and_stats(backend, tmp_path):
    space = _space(tmp_path, buffer_count=3, threads=2)
    keys = [f"opt/{i}" for i in range(5)]
    layouts = [space.register(k, FIELDS) for k in keys]
    space.register("grad/0", [("grad", 100_000, torch.float32)])
    for k in keys:
        _fill(space, k, 7)
    space.flush()
    for k in reversed(keys):  # get without prefetch: a synchronous read
        buf = space.get(k, generation=7)
        assert buf.key == k
        _check(buf.fields, k, 7)
        space.release(buf)
    stats = space.stats
    assert stats.writes == stats.reads == len(keys)
    assert stats.bytes_written == stats.bytes_read == sum(lay.nbytes for lay in layouts)
    assert stats.read_seconds > 0 and stats.write_seconds > 0
    assert stats.read_gbps > 0 and stats.write_gbps > 0
    assert stats.checksum_seconds > 0
    # The pool is sized from the largest record and the file is the record's image.
    assert space.buffer_bytes == 3 * space.layout("grad/0").nbytes
    assert space.path("opt/0").stat().st_size == layouts[0].nbytes
    assert space.disk_bytes == sum(lay.nbytes for lay in layouts) + space.layout("grad/0").nbytes
    for lay in layouts:
        assert all(f.offset % 4096 == 0 for f in lay.fields)
        assert lay.nbytes % 4096 == 0
    space.close()


@pytest.mark.parametrize("buffer_count", [2, 3])
def test_pipeline_prefetch_next_write_previous(backend, tmp_path, buffer_count):
    """The optimizer's pattern: while record i steps, i+1 is read and i-1 written."""
    space = _space(tmp_path, buffer_count=buffer_count)
    keys = [f"opt/{i}" for i in range(5)]
    for k in keys:
        space.register(k, FIELDS)
        _fill(space, k, 0)
    # With 3 buffers the write of i-1 is deferred until i is in hand (3 records live);
    # with 2 it is issued before prefetching i+1.
    deferred = buffer_count >= 3
    for step in range(1, 4):
        space.prefetch(keys[0], generation=step - 1)
        previous = None
        for i, k in enumerate(keys):
            buf = space.get(k, generation=step - 1)
            _check(buf.fields, k, step - 1)
            if not deferred:
                if previous is not None:
                    space.write(previous, generation=step)
                    previous = None
            if i + 1 < len(keys):
                space.prefetch(keys[i + 1], generation=step - 1)
            if deferred and previous is not None:
                space.write(previous, generation=step)
            for name, t in buf.fields.items():  # "step" record i
                t.copy_(_values(k, step)[name])
            previous = buf
        assert previous is not None
        space.write(previous, generation=step)
    space.flush()
    for k in keys:
        _check(space.get(k, generation=3).fields, k, 3)
        space.release(space.get(k, generation=3))
    stats = space.stats
    assert stats.writes == 5 * 4
    assert stats.bytes_written == stats.writes * space.layout(keys[0]).nbytes
    assert stats.bytes_read == stats.reads * space.layout(keys[0]).nbytes
    space.close()


def test_prefetch_during_write_reuses_the_buffer(tmp_path):
    space = _space(tmp_path, buffer_count=1)
    space.register("opt/0", FIELDS)
    _fill(space, "opt/0", 1)
    space.prefetch("opt/0", generation=1)  # the write may still be in flight
    buf = space.get("opt/0", generation=1)
    _check(buf.fields, "opt/0", 1)
    assert space.stats.reads == 0  # no disk read: the buffer held the data
    for name, t in buf.fields.items():
        t.copy_(_values("opt/0", 2)[name])
    space.write(buf, generation=2)
    space.flush()
    _check(space.get("opt/0", generation=2).fields, "opt/0", 2)
    space.close()


def test_drop_cancels_prefetches_and_holds(tmp_path):
    space = _space(tmp_path, buffer_count=2)
    for i in range(3):
        space.register(f"opt/{i}", FIELDS)
        _fill(space, f"opt/{i}", 1)
    space.flush()
    space.prefetch("opt/0", generation=1)
    space.prefetch("opt/1", generation=1)
    with pytest.raises(RuntimeError, match="pool exhausted"):
        space.prefetch("opt/2", generation=1)
    space.drop("opt/0")  # a prefetch nobody will use
    held = space.get("opt/2", generation=1)
    space.drop("opt/2")  # a held buffer, given back unwritten
    with pytest.raises(RuntimeError, match="not held"):
        _ = held.fields
    _check(space.get("opt/1", generation=1).fields, "opt/1", 1)
    space.drop("opt/1")
    assert space.free_buffers == 2
    space.drop("opt/1")  # idempotent
    _fill(space, "opt/0", 2)
    space.prefetch("opt/0", generation=2)  # keeps the write's buffer ...
    space.drop("opt/0")  # ... unless dropped: the write still lands
    space.flush()
    assert space.free_buffers == 2
    _check(space.get("opt/0", generation=2).fields, "opt/0", 2)
    space.close()


def test_misuse_is_a_clear_error_not_a_hang(tmp_path):
    space = _space(tmp_path, buffer_count=2)
    for i in range(3):
        space.register(f"opt/{i}", FIELDS)
    with pytest.raises(SwapRecordInvalidError, match="never written"):
        space.get("opt/0", generation=0)
    assert space.free_buffers == 2
    a = space.acquire("opt/0")
    b = space.acquire("opt/1")
    assert space.free_buffers == 0
    with pytest.raises(RuntimeError, match="pool exhausted"):
        space.acquire("opt/2")
    with pytest.raises(RuntimeError, match="already held"):
        space.acquire("opt/0")
    space.write(a, generation=1)
    assert space.free_buffers == 1  # free once the write lands
    with pytest.raises(RuntimeError, match="not held"):
        _ = a.fields  # the views are invalid once written
    with pytest.raises(RuntimeError, match="not held"):
        space.write(a, generation=2)
    space.release(b)
    space.flush()
    with pytest.raises(
        SwapStaleError, match="generation 5 was asked for, the last one written is 1"
    ):
        space.prefetch("opt/0", generation=5)
    with pytest.raises(ValueError, match="not registered"):
        space.get("nope", generation=0)
    with pytest.raises(ValueError, match="register every record before"):
        space.register("big", [("x", 10**6, torch.float32)])
    with pytest.raises(ValueError, match="already registered"):
        space.register("opt/0", FIELDS)
    space.close()
    with pytest.raises(ValueError, match="run_id"):
        SwapSpace(_nvme(tmp_path), run_id="../x", rank=0)


# -- folders, files, cleanup -----------------------------------------------------------------


def test_folder_and_file_modes_and_close(tmp_path):
    old = os.umask(0)  # the modes must not depend on the umask
    try:
        r0 = _space(tmp_path, run_id="runA", rank=0)
        r1 = _space(tmp_path, run_id="runA", rank=1)
    finally:
        os.umask(old)
    for space in (r0, r1):
        space.register("opt/0", FIELDS)
        _fill(space, "opt/0", 0)
        space.flush()
    run = tmp_path / "runA"
    assert r0.folder == run / "rank0"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert stat.S_IMODE(r0.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(r0.path("opt/0").stat().st_mode) == 0o600
    r0.close()
    assert not r0.folder.exists()
    assert run.exists()  # rank 1 still uses it
    r1.close(keep=True)
    assert r1.path("opt/0").stat().st_size == r1.layout("opt/0").nbytes
    r1.close()  # idempotent: the first close decided
    assert r1.path("opt/0").exists()
    r2 = _space(tmp_path, run_id="runB")
    r2.register("opt/0", FIELDS)
    r2.close()
    assert not (tmp_path / "runB").exists()


def test_nvme_path_missing_not_a_folder_unwritable(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as e:
        validate_nvme_path(tmp_path / "nope", key=KEY)
    assert KEY in str(e.value) and str(tmp_path / "nope") in str(e.value)
    assert "mkdir -p" in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder") as e:
        validate_nvme_path(tmp_path / "file", key=KEY)
    assert KEY in str(e.value)
    # Under /tmp (1777), so that user nobody can reach it; pytest's own folders are 0700.
    base = Path(tempfile.mkdtemp(prefix="accel_zero_swap_test_"))
    try:
        os.chmod(base, 0o755)
        locked = base / "locked"
        locked.mkdir()
        os.chmod(locked, 0o555)
        hidden = base / "hidden"
        (hidden / "inner").mkdir(parents=True)
        os.chmod(hidden, 0o000)
        with _as_nobody():
            with pytest.raises(ValueError, match="not writable by this process") as e:
                validate_nvme_path(locked, key=KEY)
            with pytest.raises(ValueError, match="not accessible by this process") as e2:
                validate_nvme_path(hidden / "inner", key=KEY)
        assert KEY in str(e.value) and str(locked) in str(e.value)
        assert "chmod" in str(e.value)
        assert KEY in str(e2.value) and str(hidden / "inner") in str(e2.value)
        assert os.listdir(locked) == []  # the probe left nothing behind
    finally:
        os.chmod(base / "locked", 0o755)
        os.chmod(base / "hidden", 0o755)
        shutil.rmtree(base)
    assert validate_nvme_path(tmp_path, key=KEY).path == tmp_path
    assert os.listdir(tmp_path) == ["file"]


@contextlib.contextmanager
def _as_nobody() -> Iterator[None]:
    """Run as user nobody (root ignores permissions); as a normal user 0555 suffices."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextlib.contextmanager
def _mount(tmp_path: Path, fs: str, *options: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"mounting {fs} needs root and mount")
    mnt = tmp_path / fs
    mnt.mkdir()
    cmd = ["mount", "-t", fs, *(["-o", ",".join(options)] if options else []), fs, str(mnt)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount {fs}: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_file_system_without_o_direct_warns_once_and_works(tmp_path):
    """ramfs refuses O_DIRECT: buffered IO, one warning naming the key and the path."""
    with _mount(tmp_path, "ramfs") as mnt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nvme = validate_nvme_path(mnt, key=KEY)
            space = SwapSpace(nvme, run_id="r", rank=0, buffer_count=2)
            space.register("opt/0", FIELDS)
            _fill(space, "opt/0", 3)
            space.flush()
            _check(space.get("opt/0", generation=3).fields, "opt/0", 3)
            space.close()
        msgs = [str(w.message) for w in caught if "O_DIRECT" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert KEY in msgs[0] and str(mnt) in msgs[0]
        assert not nvme.direct


# -- disk full -------------------------------------------------------------------------------


def test_disk_full_at_register_with_preallocation(tmp_path):
    with _mount(tmp_path, "tmpfs", "size=256k") as mnt:
        space = _space(mnt)
        with pytest.raises(SwapIOError) as e:
            space.register("opt/0", [("master", 1 << 20, torch.float32)])
        assert e.value.errno == errno.ENOSPC
        assert e.value.nbytes == 4096 + (4 << 20)
        assert str(space.folder) in str(e.value) and str(e.value.nbytes) in str(e.value)
        space.close()


def test_disk_full_during_write_invalidates_the_record(tmp_path):
    with _mount(tmp_path, "tmpfs", "size=512k") as mnt:
        space = _space(mnt, buffer_count=2, preallocate=False)
        space.register("small", FIELDS)
        space.register("big", [("master", 200_000, torch.float32)])  # 800 KB: cannot fit
        _fill(space, "small", 1)
        space.flush()
        buf = space.acquire("big")
        buf.fields["master"].fill_(1.0)
        space.write(buf, generation=1)
        with pytest.raises(SwapIOError) as e:
            space.flush()
        nbytes = space.layout("big").nbytes
        assert e.value.errno == errno.ENOSPC
        assert e.value.nbytes == nbytes
        assert e.value.path == str(space.path("big"))
        assert str(space.path("big")) in str(e.value) and f"{nbytes} bytes" in str(e.value)
        space.flush()  # raised once
        with pytest.raises(SwapRecordInvalidError, match="last write failed") as e2:
            space.get("big", generation=1)
        assert "No space left" in str(e2.value)
        # Read back at once (the write may still be in flight): the failure, not data.
        buf = space.acquire("big")
        buf.fields["master"].fill_(2.0)
        space.write(buf, generation=2)
        with pytest.raises(SwapIOError, match="No space left"):
            space.get("big", generation=2)
        space.flush()  # get() reported it
        with pytest.raises(SwapRecordInvalidError, match="last write failed"):
            space.get("big", generation=2)
        space.close()


def _punch_hole(path: Path, offset: int, nbytes: int) -> None:
    """Free the blocks of a byte range (tmpfs gives the pages back), keeping the size."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, 0x01 | 0x02, offset, nbytes) != 0:  # KEEP_SIZE | PUNCH_HOLE
            pytest.skip(f"cannot punch a hole: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def test_failed_overwrite_leaves_no_valid_copy(tmp_path):
    """A write that fails half-way over a valid copy: neither generation reads back, and
    the file itself (new header, part of the new data) fails verification."""
    with _mount(tmp_path, "tmpfs", "size=1m") as mnt:
        space = _space(mnt, buffer_count=1, preallocate=False)
        layout = space.register("opt/0", [("master", 100_000, torch.float32)])
        _fill_ones(space, "opt/0", 1.0, generation=1)
        space.flush()
        field = layout.fields[0]
        _punch_hole(space.path("opt/0"), field.offset + 65536, 131072)
        filler = mnt / "filler"
        filler.write_bytes(bytes(shutil.disk_usage(mnt).free))  # ENOSPC when the hole fills
        _fill_ones(space, "opt/0", 2.0, generation=2)
        with pytest.raises(SwapIOError) as e:
            space.flush()
        assert e.value.errno == errno.ENOSPC
        for generation in (1, 2):
            with pytest.raises(SwapRecordInvalidError, match="last write failed"):
                space.get("opt/0", generation=generation)
        image = ops.aligned_empty(layout.nbytes, torch.uint8)
        image.copy_(
            torch.frombuffer(bytearray(space.path("opt/0").read_bytes()), dtype=torch.uint8)
        )
        for generation, error in ((2, SwapCorruptError), (1, SwapStaleError)):
            with pytest.raises(error):
                verify_record(
                    image, layout, run_id="run1", generation=generation, path=space.path("opt/0")
                )
        filler.unlink()
        _fill_ones(space, "opt/0", 3.0, generation=3)  # rewriting makes it valid again
        space.flush()
        assert torch.equal(
            space.get("opt/0", generation=3).fields["master"], torch.full((100_000,), 3.0)
        )
        space.close()


def _fill_ones(space: SwapSpace, key: str, value: float, *, generation: int) -> None:
    buf = space.acquire(key)
    for t in buf.fields.values():
        t.fill_(value)
    space.write(buf, generation=generation)


# -- integrity -------------------------------------------------------------------------------


def _flip_middle_of(path: Path, offset: int, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset + nbytes // 2)
        b = f.read(4)
        f.seek(offset + nbytes // 2)
        f.write(bytes(x ^ 0xFF for x in b))


@pytest.mark.parametrize(
    "fault", ["truncated", "altered_field", "altered_header", "other_run", "stale", "deleted"]
)
def test_damaged_files_are_detected(tmp_path, fault):
    space = _space(tmp_path, buffer_count=1)
    space.register("opt/0", FIELDS)
    path = space.path("opt/0")
    layout = space.layout("opt/0")
    _fill(space, "opt/0", 1)
    space.flush()
    expected: tuple[type[Exception], str]
    generation = 1
    if fault == "truncated":
        os.truncate(path, layout.nbytes - 4096)
        expected = (SwapTruncatedError, f"truncated: {layout.nbytes - 4096} bytes")
    elif fault == "altered_field":
        field = layout.fields[1]
        _flip_middle_of(path, field.offset, field.nbytes)
        expected = (SwapCorruptError, "field 'exp_avg'.*fails its checksum")
    elif fault == "altered_header":
        _flip_middle_of(path, 16, 64)
        expected = (SwapCorruptError, "header checksum mismatch")
    elif fault == "other_run":
        other = _space(tmp_path, run_id="run2", buffer_count=1)
        other.register("opt/0", FIELDS)
        _fill(other, "opt/0", 1)
        other.close(keep=True)
        shutil.copyfile(other.path("opt/0"), path)
        expected = (SwapForeignError, "written by run 'run2', not this run 'run1'")
    elif fault == "stale":
        shutil.copyfile(path, tmp_path / "old.swp")
        _fill(space, "opt/0", 2)
        space.flush()
        shutil.copyfile(tmp_path / "old.swp", path)
        generation = 2
        expected = (SwapStaleError, "holds generation 1, expected 2")
    else:
        path.unlink()
        expected = (SwapIOError, "No such file")
    with pytest.raises(expected[0], match=expected[1]) as e:
        space.get("opt/0", generation=generation)
    assert str(path) in str(e.value)
    assert e.value.path == str(path)
    # The failed read gave its buffer back: the space still works.
    _fill(space, "opt/0", 9)
    space.flush()
    _check(space.get("opt/0", generation=9).fields, "opt/0", 9)
    space.close()


def test_parameter_read_ahead_never_takes_the_buffer_a_gather_needs(tmp_path):
    """offload_param's read-ahead is a hint: with every buffer prefetching units the trace
    predicted, a gather of another unit (a wrong prediction, or the recomputed forward of
    gradient checkpointing) still gets its shard. Before the fix: 'swap pool exhausted for
    param/5' at the second step of scripts/bench_scale.py --size 1B."""
    from types import SimpleNamespace

    from accel_zero.offload.params import SwappedParams
    from accel_zero.tracer import MemoryTracer

    units = [SimpleNamespace(index=i, numel=1000, dtype=torch.float32) for i in range(8)]
    space = _space(tmp_path, buffer_count=4)
    params = SwappedParams(space, units, MemoryTracer())  # type: ignore[arg-type]
    for u in units:
        params.write_initial(u.index, torch.full((1000,), float(u.index)))
    space.flush()
    params.prefetch([1, 2, 3, 4])  # the trace's guess: leaves one buffer for a demand
    assert space.free_buffers >= 1
    assert torch.equal(params.fetch(5), torch.full((1000,), 5.0))
    params.done(5)
    # Even with every buffer taken by read-aheads, a demand evicts them instead of failing.
    for unit in (1, 2, 3):
        space.prefetch(params.key(unit), generation=0)
    space.prefetch(params.key(6), generation=0)
    assert space.free_buffers == 0
    assert torch.equal(params.fetch(7), torch.full((1000,), 7.0))
    params.done(7)
    # A read-ahead that was right is used as it is.
    assert torch.equal(params.fetch(6), torch.full((1000,), 6.0))
    params.done(6)
    params.close()
