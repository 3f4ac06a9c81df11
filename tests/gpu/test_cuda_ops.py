"""The multi-tensor CUDA ops (kernels/cuda) against torch; skipped without CUDA."""

from __future__ import annotations

import time

import pytest
import torch

from accel_zero import ops
from accel_zero.ops import adam as ops_adam

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def cuda_ext():
    status = ops.op_status("cuda")
    if status.source == "fallback":
        pytest.fail(f"CUDA is available but the cuda op falls back: {status.reason}")
    module = ops.load_op("cuda")
    assert module is not None
    return module


SHAPES = [(1,), (1000,), (65537,), (300, 301)]


def _state(seed: int, device: str = "cuda"):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device) for s in SHAPES]
    return params


@pytest.mark.parametrize("adamw_mode", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_adam_matches_torch(cuda_ext, adamw_mode, weight_decay):
    ours = _state(0)
    ref = [p.clone().requires_grad_() for p in ours]
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    opt_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    opt = opt_cls(ref, lr=1e-2, weight_decay=weight_decay, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 51):
        grads = [torch.randn(p.shape, generator=gen).cuda() for p in ours]
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ops.fused_adam_step(
            ours, grads, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=weight_decay, steps=[step] * len(ours), adamw_mode=adamw_mode,
        )  # fmt: skip
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_adam_copy_out_and_low_precision_grads(cuda_ext, copy_dtype, grad_dtype):
    params = _state(2)
    ref = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    rm = [torch.zeros_like(p) for p in params]
    rv = [torch.zeros_like(p) for p in params]
    copies = [torch.empty(p.shape, dtype=copy_dtype, device="cuda") for p in params]
    gen = torch.Generator().manual_seed(3)
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    for step in range(1, 11):
        grads = [(torch.randn(p.shape, generator=gen) * 256).to(grad_dtype).cuda() for p in params]
        ops.fused_adam_step(
            params, grads, m, v, steps=[step] * 4, inv_scale=1 / 256, copies=copies, **kw
        )
        ops_adam._adam_torch(
            ref, grads, rm, rv, [None] * 4, steps=[step] * 4, adamw_mode=True,
            bias_correction=True, inv_scale=1 / 256, **kw,
        )  # fmt: skip
        for p, c in zip(params, copies, strict=True):
            assert torch.equal(c, p.to(copy_dtype))
    for a, b in zip(params, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_found_inf_skips_step_without_sync(cuda_ext):
    params = _state(4)
    before = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    grads = [torch.ones_like(p) for p in params]
    flag = torch.ones(1, device="cuda")
    ops.fused_adam_step(
        params, grads, m, v, lr=1.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
        steps=[1] * 4, found_inf=flag,
    )  # fmt: skip
    for a, b in zip(params, before, strict=True):
        assert torch.equal(a, b)
    flag.zero_()
    ops.fused_adam_step(
        params, grads, m, v, lr=1.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
        steps=[1] * 4, found_inf=flag,
    )  # fmt: skip
    for a, b in zip(params, before, strict=True):
        torch.testing.assert_close(a, b - 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_l2norm(cuda_ext, dtype):
    ts = [t.to(dtype) for t in _state(5)]
    ts.append(torch.empty(0, device="cuda", dtype=dtype))
    got = ops.multi_tensor_l2norm(ts)
    want = torch.cat([t.double().flatten() for t in ts]).norm()
    assert got.device.type == "cuda"
    assert got.dtype == torch.float32
    assert got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    # mixed dtypes in one call
    mixed = [ts[0].float(), ts[1].bfloat16(), ts[2].half()]
    want = torch.cat([t.double().flatten() for t in mixed]).norm()
    torch.testing.assert_close(ops.multi_tensor_l2norm(mixed).double(), want, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unscale_and_check_inf(cuda_ext, dtype):
    ts = [(t * 8).to(dtype) for t in _state(6)]
    want = [(t.float() * 0.125).to(dtype) for t in ts]
    assert ops.unscale_and_check_inf(ts, 0.125) is False
    for a, b in zip(ts, want, strict=True):
        assert torch.equal(a, b)
    ts[2].view(-1)[12345] = float("inf")
    assert ops.unscale_and_check_inf(ts, 1.0) is True
    ts[2].view(-1)[12345] = float("nan")
    assert ops.unscale_and_check_inf(ts[2:], 1.0) is True


def test_speed_against_torch_fused_adamw(cuda_ext, capsys):
    """Prints (does not assert) our fused step against torch.optim.AdamW(fused=True)."""
    n_params = 50_000_000
    sizes = [n_params // 100] * 100
    params = [torch.randn(s, device="cuda") for s in sizes]
    grads = [torch.randn(s, device="cuda") for s in sizes]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    for p, g in zip(ref, grads, strict=True):
        p.grad = g
    opt = torch.optim.AdamW(ref, lr=1e-3, fused=True)

    def ours(step: int) -> None:
        ops.fused_adam_step(
            params, grads, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=0.01, steps=[step] * len(params),
        )  # fmt: skip

    times: dict[str, list[float]] = {"accel_zero": [], "torch fused": []}
    for rep in range(20):
        for name, samples in times.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if name == "accel_zero":
                ours(rep + 1)
            else:
                opt.step()
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
    with capsys.disabled():
        for name, raw in times.items():
            ts = sorted(raw[2:])
            print(f"\n{name:12s} median {ts[len(ts) // 2] * 1e3:.3f} ms  min {ts[0] * 1e3:.3f} ms")
