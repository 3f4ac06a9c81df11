"""The op loader (prebuilt / JIT / fallback), builders, env report and multi-tensor helpers."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from accel_zero.kernels.builder import BUILDERS, get_extensions

from accel_zero import env_report, ops
from accel_zero.ops import loader

REPO = Path(__file__).resolve().parents[2]


def test_every_builder_names_its_sources_and_compatibility():
    assert set(BUILDERS) == set(ops.OP_NAMES)
    for name, builder in BUILDERS.items():
        assert builder.prebuilt_module == f"accel_zero._ops_{name}"
        for src in builder.sources():
            assert Path(src).is_file(), src
        ok, why = builder.is_compatible()
        assert ok or why, f"{name}: incompatible without a reason"


def test_cuda_skipped_cleanly_without_cuda(monkeypatch):
    monkeypatch.delenv("ACCEL_ZERO_OPS", raising=False)
    names = [e.name for e in get_extensions()]
    cuda_ok, why = BUILDERS["cuda"].is_compatible()
    assert ("accel_zero._ops_cuda" in names) == cuda_ok
    if not torch.cuda.is_available() and torch.version.cuda is None:
        assert not cuda_ok
        assert "without CUDA" in why
    monkeypatch.setenv("ACCEL_ZERO_OPS", "aio,bogus")
    with pytest.raises(ValueError, match="bogus"):
        get_extensions()


def test_force_fallback_env(monkeypatch):
    monkeypatch.setenv(ops.FORCE_FALLBACK_ENV, "all")
    for name in ops.OP_NAMES:
        status = ops.op_status(name)
        assert status.source == "fallback"
        assert ops.FORCE_FALLBACK_ENV in status.reason
    loader._warn_fallback.cache_clear()  # the cache load_op warns through
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops.load_op("cpu_adam") is None
        assert ops.load_op("cpu_adam") is None
    assert len(caught) == 1
    assert "cpu_adam" in str(caught[0].message)
    with pytest.raises(ValueError, match="unknown op"):
        ops.load_op("nope")


def test_compiled_ops_load_and_are_reported(monkeypatch):
    monkeypatch.delenv(ops.FORCE_FALLBACK_ENV, raising=False)
    for name in ("aio", "cpu_adam"):
        ok, why = BUILDERS[name].is_compatible()
        if not ok:
            pytest.skip(f"{name} cannot build here: {why}")
        module = ops.load_op(name)
        assert module is not None
        assert ops.op_status(name).source in ("prebuilt", "jit")


def test_env_report_builds_nothing(monkeypatch, tmp_path):
    # An empty JIT cache: the report must say "JIT-buildable", not build.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(ops.FORCE_FALLBACK_ENV, raising=False)
    out = io.StringIO()
    with redirect_stdout(out):
        assert env_report.main([]) == 0
    text = out.getvalue()
    for label in ("torch", "C++ compiler", "ninja", "libaio.h", "CPU features"):
        assert label in text
    for name in ops.OP_NAMES:
        assert f"op {name}" in text
    if ops.op_status("aio").source == "jit-buildable":
        assert "JIT-buildable" in text
    assert not (tmp_path / "cache").exists()


# -- multi-tensor helpers on CPU (CONTRACT.md) -------------------------------------------------


def test_multi_tensor_l2norm_cpu():
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(100, generator=gen), torch.randn(3, 7, generator=gen).to(torch.bfloat16)]
    ts.append(torch.randn(5, generator=gen).half())
    ts.append(torch.empty(0))
    got = ops.multi_tensor_l2norm(ts)
    want = torch.cat([t.float().flatten() for t in ts]).double().norm()
    assert got.dim() == 0
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert float(ops.multi_tensor_l2norm([])) == 0.0


def test_unscale_and_check_inf_cpu():
    a = torch.full((10,), 4.0)
    b = torch.full((3,), 2.0, dtype=torch.bfloat16)
    assert ops.unscale_and_check_inf([a, b], 0.25) is False
    assert torch.equal(a, torch.ones(10))
    assert torch.equal(b, torch.full((3,), 0.5, dtype=torch.bfloat16))
    c = torch.tensor([1.0, float("inf")])
    assert ops.unscale_and_check_inf([a, c], 0.5) is True
    d = torch.tensor([float("nan")], dtype=torch.bfloat16)
    assert ops.unscale_and_check_inf([d], 1.0) is True
    assert ops.unscale_and_check_inf([], 1.0) is False


def test_fused_adam_step_validates():
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="differ in length"):
        ops.fused_adam_step(
            [p], [], [p], [p], lr=1.0, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0, steps=[1]
        )
    with pytest.raises(ValueError, match="sizes differ"):
        ops.fused_adam_step(
            [p], [torch.zeros(5)], [torch.zeros(4)], [torch.zeros(4)],
            lr=1.0, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0, steps=[1],
        )  # fmt: skip
    with pytest.raises(TypeError, match="float32"):
        ops.fused_adam_step(
            [p.double()], [p], [p], [p], lr=1.0, beta1=0.9, beta2=0.9, eps=1e-8,
            weight_decay=0, steps=[1],
        )  # fmt: skip


@pytest.mark.slow
def test_prebuilt_and_jit_from_installed_wheel(tmp_path):
    """``ACCEL_ZERO_BUILD_OPS=1`` wheel: aio comes prebuilt; cpu_adam JIT-builds from the
    sources shipped inside the (non-editable) install."""
    if not BUILDERS["aio"].is_compatible()[0] or not BUILDERS["cpu_adam"].is_compatible()[0]:
        pytest.skip("needs a compiler and libaio")
    # Build from a copy: an in-tree build would leave build/ and egg-info in the checkout.
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "build", "*.egg-info", "__pycache__", "*.so", ".*_cache", "tests", "recipes"
        ),
    )
    env = {**os.environ, "ACCEL_ZERO_BUILD_OPS": "1", "ACCEL_ZERO_OPS": "aio"}
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(wheel_dir), str(src)],
        check=True, env=env, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    wheel = next(wheel_dir.glob("accel_zero-*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    probe = (
        "import accel_zero, torch, os\n"
        "from accel_zero import ops\n"
        "assert accel_zero.__file__.startswith(os.environ['TARGET']), accel_zero.__file__\n"
        "print('aio', ops.op_status('aio').source)\n"
        "print('cpu_adam', ops.op_status('cpu_adam').source)\n"
        "m = ops.load_op('cpu_adam')\n"
        "print('cpu_adam_file', m.__file__)\n"
        "print('cpu_adam', ops.op_status('cpu_adam').source)\n"
        "a = ops.AsyncIO()\n"
        "print('backend', a.backend)\n"
        # Every subpackage of the checkout made it into the wheel.
        "import pkgutil\n"
        "found = pkgutil.walk_packages(accel_zero.__path__, 'accel_zero.')\n"
        "print('subpackages', sorted(m.name for m in found if m.ispkg))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", ops.FORCE_FALLBACK_ENV)}
    env.update(
        PYTHONPATH=str(target), TARGET=str(target), TORCH_EXTENSIONS_DIR=str(tmp_path / "jit")
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert "aio prebuilt" in lines
    in_checkout = sorted(
        "accel_zero." + ".".join(init.parent.relative_to(REPO / "accel_zero").parts)
        for init in (REPO / "accel_zero").rglob("__init__.py")
        if init.parent != REPO / "accel_zero"
    )
    wheel_packages = next(line for line in lines if line.startswith("subpackages"))
    for name in in_checkout:
        assert repr(name) in wheel_packages, f"{name} missing from the wheel: {wheel_packages}"
    assert "cpu_adam jit-buildable" in lines
    assert "cpu_adam jit" in lines
    assert "backend libaio" in lines
    assert any(str(tmp_path / "jit") in line for line in lines if line.startswith("cpu_adam_file"))
