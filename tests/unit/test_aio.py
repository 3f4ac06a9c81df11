"""AsyncIO (libaio kernel and its thread-pool fallback): round trips, alignment, errors."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from accel_zero import ops
from accel_zero.ops import loader

BACKENDS = ["libaio", "python"]


@pytest.fixture(params=BACKENDS)
def make_aio(request, monkeypatch):
    """A factory of AsyncIO handles on the requested backend (the fallback forced by env)."""
    if request.param == "python":
        monkeypatch.setenv(ops.FORCE_FALLBACK_ENV, "aio")
    else:
        monkeypatch.delenv(ops.FORCE_FALLBACK_ENV, raising=False)
        ok, why = ops.op_status("aio").source != "fallback", ops.op_status("aio").reason
        if not ok:
            pytest.skip(f"aio kernel unavailable: {why}")

    def make(**kwargs) -> ops.AsyncIO:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            aio = ops.AsyncIO(**kwargs)
        assert aio.backend == request.param
        return aio

    return make


def _random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + n)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, (1 << 20) + 3])
def test_round_trip(make_aio, tmp_path, size):
    aio = make_aio(block_size=64 << 10, queue_depth=4, threads=2)
    src = _random_bytes(size)
    path = tmp_path / "t.bin"
    aio.write(src, path)
    assert aio.wait() == 1
    # Writes are padded with zeros to whole 4096-byte blocks.
    padded = -(-size // 4096) * 4096
    assert path.stat().st_size == padded
    assert path.read_bytes() == src.numpy().tobytes() + bytes(padded - size)
    dst = torch.empty(size, dtype=torch.uint8)
    assert aio.sync_read(dst, path) == 1
    assert torch.equal(src, dst)


def test_round_trip_300mib(make_aio, tmp_path):
    aio = make_aio(block_size=1 << 20, queue_depth=16, threads=2)
    n = (300 << 20) // 4
    src = ops.aligned_empty(n, torch.float32)
    src.copy_(torch.randn(n, generator=torch.Generator().manual_seed(1)))
    dst = ops.aligned_empty(n, torch.float32)
    aio.sync_write(src, tmp_path / "big.bin")
    aio.sync_read(dst, tmp_path / "big.bin")
    assert torch.equal(src, dst)
    (tmp_path / "big.bin").unlink()  # pytest keeps old tmp dirs around


def test_unaligned_buffer_and_dtypes(make_aio, tmp_path):
    """User memory that is not 4096-aligned goes through bounce buffers (same bytes)."""
    aio = make_aio(block_size=8192, queue_depth=2)
    backing = _random_bytes(3 * 8192 + 100)
    src = backing[7 : 7 + 2 * 8192 + 33]  # odd address, odd length
    assert src.data_ptr() % 4096 != 0
    aio.sync_write(src, tmp_path / "u.bin")
    out = torch.zeros(3 * 8192 + 100, dtype=torch.uint8)[5 : 5 + src.numel()]
    aio.sync_read(out, tmp_path / "u.bin")
    assert torch.equal(out, src)
    b = torch.randn(1000, dtype=torch.float32).to(torch.bfloat16)
    aio.sync_write(b, tmp_path / "bf16.bin")
    c = torch.empty_like(b)
    aio.sync_read(c, tmp_path / "bf16.bin")
    assert torch.equal(b.view(torch.int16), c.view(torch.int16))


def test_offsets_in_one_file(make_aio, tmp_path):
    aio = make_aio(block_size=16 << 10, queue_depth=8, threads=3)
    path = tmp_path / "packed.bin"
    pieces = [_random_bytes(n, seed=i) for i, n in enumerate([5000, 4096, 1, 70000, 12288])]
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += -(-p.numel() // 4096) * 4096
    for p, off in zip(pieces, offsets, strict=True):
        aio.write(p, path, offset=off)
    assert aio.wait() == len(pieces)
    outs = [torch.empty_like(p) for p in pieces]
    for o, off in zip(outs, offsets, strict=True):
        aio.read(o, path, offset=off)
    assert aio.wait() == len(pieces)
    for p, o in zip(pieces, outs, strict=True):
        assert torch.equal(p, o)
    with pytest.raises(ValueError, match="multiple of 4096"):
        aio.write(pieces[0], path, offset=100)


def test_many_concurrent_ops_and_handles(make_aio, tmp_path):
    handles = [
        make_aio(block_size=32 << 10, queue_depth=4, threads=1),
        make_aio(block_size=8192, queue_depth=16, threads=2),
    ]
    data = {}
    for i in range(48):
        h = handles[i % 2]
        t = _random_bytes(1000 + 7919 * i, seed=i)
        data[i] = t
        h.write(t, tmp_path / f"f{i}.bin")
    assert handles[0].pending() + handles[1].pending() <= 48
    assert handles[0].wait() == 24
    assert handles[1].wait() == 24
    assert handles[0].wait() == 0  # nothing left
    outs = {i: torch.empty_like(t) for i, t in data.items()}
    for i, o in outs.items():
        handles[(i + 1) % 2].read(o, tmp_path / f"f{i}.bin")
    assert sum(h.wait() for h in handles) == 48
    for i, t in data.items():
        assert torch.equal(t, outs[i]), i


def test_kernel_and_fallback_write_identical_bytes(tmp_path, monkeypatch):
    if ops.op_status("aio").source == "fallback":
        pytest.skip("aio kernel unavailable")
    src = _random_bytes((1 << 20) + 4097)[1:]  # unaligned start too
    monkeypatch.delenv(ops.FORCE_FALLBACK_ENV, raising=False)
    kernel = ops.AsyncIO(block_size=64 << 10, queue_depth=8, threads=2)
    assert kernel.backend == "libaio"
    kernel.sync_write(src, tmp_path / "k.bin")
    monkeypatch.setenv(ops.FORCE_FALLBACK_ENV, "aio")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fallback = ops.AsyncIO(block_size=64 << 10, queue_depth=8, threads=2)
    assert fallback.backend == "python"
    fallback.sync_write(src, tmp_path / "p.bin")
    assert (tmp_path / "k.bin").read_bytes() == (tmp_path / "p.bin").read_bytes()
    # and each reads what the other wrote
    a, b = torch.empty_like(src), torch.empty_like(src)
    kernel.sync_read(a, tmp_path / "p.bin")
    fallback.sync_read(b, tmp_path / "k.bin")
    assert torch.equal(a, src)
    assert torch.equal(b, src)


def test_forced_fallback_warns_once(monkeypatch):
    monkeypatch.setenv(ops.FORCE_FALLBACK_ENV, "aio")
    loader._warn_fallback.cache_clear()  # the cache load_op warns through
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.AsyncIO()
        ops.AsyncIO()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1
    assert "aio" in msgs[0]
    assert ops.FORCE_FALLBACK_ENV in msgs[0]
    monkeypatch.setenv(ops.FORCE_FALLBACK_ENV, "nonsense")
    with pytest.raises(ValueError, match="unknown ops"):
        ops.AsyncIO()


def test_aligned_empty():
    for dtype in (torch.float32, torch.bfloat16, torch.uint8, torch.float64):
        for numel in (0, 1, 1000, 4097):
            t = ops.aligned_empty(numel, dtype)
            assert t.numel() == numel
            assert t.dtype == dtype
            assert t.data_ptr() % 4096 == 0
            assert t.is_contiguous()


# -- errors ----------------------------------------------------------------------------------


def test_missing_file_and_directory(make_aio, tmp_path):
    aio = make_aio()
    with pytest.raises(ops.AioError) as e:
        aio.read(torch.empty(10, dtype=torch.uint8), tmp_path / "nope.bin")
    assert e.value.errno == errno.ENOENT
    assert e.value.filename == str(tmp_path / "nope.bin")
    with pytest.raises(ops.AioError) as e:
        aio.write(torch.empty(10, dtype=torch.uint8), tmp_path / "no" / "dir.bin")
    assert e.value.errno == errno.ENOENT


def test_file_smaller_than_requested(make_aio, tmp_path):
    aio = make_aio()
    aio.sync_write(_random_bytes(5000), tmp_path / "s.bin")  # padded to 8192
    with pytest.raises(ops.ShortReadError) as e:
        aio.read(torch.empty(9000, dtype=torch.uint8), tmp_path / "s.bin")
    assert e.value.errno == errno.EIO
    assert e.value.filename == str(tmp_path / "s.bin")
    assert "smaller than" in str(e.value)
    with pytest.raises(ops.ShortReadError):
        aio.read(torch.empty(4096, dtype=torch.uint8), tmp_path / "s.bin", offset=8192)
    assert aio.pending() == 0


@contextlib.contextmanager
def _as_nobody() -> Iterator[None]:
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


def test_permission_denied(make_aio, tmp_path):
    aio = make_aio()
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "r.bin").write_bytes(bytes(4096))
    os.chmod(locked / "r.bin", 0o000)
    os.chmod(locked, 0o555)
    os.chmod(tmp_path, 0o755)
    try:
        with _as_nobody():
            with pytest.raises(ops.AioError) as e:
                aio.write(torch.zeros(10, dtype=torch.uint8), locked / "w.bin")
            assert e.value.errno == errno.EACCES
            assert e.value.filename == str(locked / "w.bin")
            with pytest.raises(ops.AioError) as e:
                aio.read(torch.zeros(10, dtype=torch.uint8), locked / "r.bin")
            assert e.value.errno == errno.EACCES
    finally:
        os.chmod(locked, 0o755)


def _need_root(tool: str) -> None:
    if os.geteuid() != 0 or shutil.which(tool) is None:
        pytest.skip(f"needs root and {tool}")


@pytest.fixture
def tiny_tmpfs(tmp_path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a full disk after 64 blocks."""
    _need_root("mount")
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full(make_aio, tiny_tmpfs):
    aio = make_aio(block_size=64 << 10, queue_depth=4)
    target = tiny_tmpfs / "big.bin"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aio.write(_random_bytes(1 << 20), target)
    # tmpfs takes O_DIRECT since Linux 6.6; where it does not, the handle says so.
    for w in caught:
        assert "O_DIRECT is not supported" in str(w.message)
    with pytest.raises(ops.AioError) as e:
        aio.wait()
    assert e.value.errno == errno.ENOSPC
    assert e.value.filename == str(target)
    assert "full" in str(e.value)


@pytest.fixture
def failing_block_device(tmp_path) -> Iterator[str]:
    """A loop device whose backing file was truncated: every read fails with EIO."""
    _need_root("losetup")
    image = tmp_path / "loop.img"
    image.write_bytes(bytes(1 << 20))
    r = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        os.truncate(image, 0)
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_device_io_error(make_aio, failing_block_device):
    aio = make_aio(block_size=8192)
    buf = ops.aligned_empty(16384, torch.uint8)
    aio.read(buf, failing_block_device)
    with pytest.raises(ops.AioError) as e:
        aio.wait()
    assert e.value.errno == errno.EIO
    assert e.value.filename == failing_block_device
    assert not isinstance(e.value, ops.ShortReadError)


def test_bad_arguments(make_aio, tmp_path):
    with pytest.raises(ValueError, match="block_size"):
        ops.AsyncIO(block_size=1000)
    with pytest.raises(ValueError, match="queue_depth"):
        ops.AsyncIO(queue_depth=0)
    aio = make_aio()
    with pytest.raises(ValueError, match="contiguous"):
        aio.write(torch.zeros(4, 4).t(), tmp_path / "x.bin")


def test_file_system_without_o_direct_falls_back_and_says_so(make_aio, tmp_path):
    """ramfs refuses O_DIRECT (EINVAL at open): buffered IO, one warning naming the path."""
    _need_root("mount")
    mnt = tmp_path / "ram"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "ramfs", "ramfs", str(mnt)], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount ramfs: {r.stderr.strip()}")
    try:
        aio = make_aio(block_size=8192)
        src = _random_bytes(20000)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            aio.sync_write(src, mnt / "f.bin")
            aio.sync_write(src, mnt / "f.bin")
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1, msgs
        assert "O_DIRECT is not supported" in msgs[0]
        assert str(mnt / "f.bin") in msgs[0]
        dst = torch.empty_like(src)
        aio.sync_read(dst, mnt / "f.bin")
        assert torch.equal(src, dst)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
