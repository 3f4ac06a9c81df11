"""CPUAdam (AVX-512 / AVX2 / scalar kernel paths and the torch fallback) against torch.optim."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from accel_zero import ops
from accel_zero.cpu_adam import CPUAdam


def _paths() -> list[str]:
    paths = ["fallback"]
    module = None
    if ops.op_status("cpu_adam").source != "fallback":
        module = ops.load_op("cpu_adam")
    if module is not None:
        best = module.best_isa()
        paths += {"avx512": ["avx512", "avx2", "scalar"], "avx2": ["avx2", "scalar"]}.get(
            best, ["scalar"]
        )
    return paths


PATHS = _paths()


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Runs the test on one code path: a kernel ISA, or the forced torch fallback."""
    if request.param == "fallback":
        monkeypatch.setenv(ops.FORCE_FALLBACK_ENV, "cpu_adam")
        monkeypatch.delenv(ops.CPU_ADAM_ISA_ENV, raising=False)
    else:
        monkeypatch.delenv(ops.FORCE_FALLBACK_ENV, raising=False)
        monkeypatch.setenv(ops.CPU_ADAM_ISA_ENV, request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield request.param


# Odd sizes exercise the scalar tails after the 16- and 8-wide vector bodies, and
# the kernel's 32K-element chunks are crossed in the large-input test below.
SHAPES = [(1,), (15,), (17, 3), (33,), (67, 129)]


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _run_pair(ours_cls_kwargs, ref_cls, ref_kwargs, steps=100, groups=None, grad_dtype=None):
    base = _params(0)
    ours_p = [p.clone().requires_grad_() for p in base]
    ref_p = [p.clone().requires_grad_() for p in base]
    if groups is None:
        ours = CPUAdam(ours_p, **ours_cls_kwargs)
        ref = ref_cls(ref_p, **ref_kwargs)
    else:
        ours = CPUAdam(
            [{"params": ours_p[i::2], **g} for i, g in enumerate(groups)], **ours_cls_kwargs
        )
        ref = ref_cls([{"params": ref_p[i::2], **g} for i, g in enumerate(groups)], **ref_kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(ours_p, ref_p, strict=True):
            grad = torch.randn(a.shape, generator=gen)
            if grad_dtype is not None:
                grad = grad.to(grad_dtype).float()
            a.grad = grad.clone()
            b.grad = grad.clone()
        ours.step()
        ref.step()
    return ours_p, ref_p, ours, ref


def _assert_close(ours, ref):
    for a, b in zip(ours, ref, strict=True):
        # fp32 within 1e-6 relative (torch's vectorised sqrt is not correctly rounded,
        # so a last-bit difference per step can accumulate; atol covers values near 0).
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
    num = (
        sum(float((a.detach() - b.detach()).norm() ** 2) for a, b in zip(ours, ref, strict=True))
        ** 0.5
    )
    den = sum(float(b.detach().norm() ** 2) for b in ref) ** 0.5
    assert num / den < 1e-6


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(path, weight_decay):
    ours, ref, _, _ = _run_pair(
        {"lr": 1e-2, "weight_decay": weight_decay},
        torch.optim.AdamW,
        {"lr": 1e-2, "weight_decay": weight_decay},
    )
    _assert_close(ours, ref)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_l2_matches_torch(path, weight_decay):
    ours, ref, _, _ = _run_pair(
        {"lr": 1e-2, "weight_decay": weight_decay, "adamw_mode": False},
        torch.optim.Adam,
        {"lr": 1e-2, "weight_decay": weight_decay},
    )
    _assert_close(ours, ref)


def test_param_groups_and_betas(path):
    groups = [{"lr": 3e-3, "weight_decay": 0.0}, {"lr": 2e-2, "weight_decay": 0.05}]
    ours, ref, opt, _ = _run_pair(
        {"betas": (0.8, 0.99), "eps": 1e-6},
        torch.optim.AdamW,
        {"betas": (0.8, 0.99), "eps": 1e-6},
        groups=groups,
    )
    _assert_close(ours, ref)
    assert [g["lr"] for g in opt.param_groups] == [3e-3, 2e-2]


def test_no_bias_correction_differs(path):
    """bias_correction=False must change the first steps (the flag is not ignored)."""
    p1 = torch.ones(40, requires_grad=True)
    p2 = torch.ones(40, requires_grad=True)
    o1 = CPUAdam([p1], lr=0.1)
    o2 = CPUAdam([p2], lr=0.1, bias_correction=False)
    p1.grad = torch.full((40,), 0.5)
    p2.grad = torch.full((40,), 0.5)
    o1.step()
    o2.step()
    # step 1 with correction moves by lr; without, by lr * 0.1 / sqrt(0.001)
    torch.testing.assert_close(p1.detach(), torch.full((40,), 0.9))
    expected = 1 - 0.1 * (0.1 * 0.5) / ((0.001 * 0.25) ** 0.5 + 1e-8)
    torch.testing.assert_close(p2.detach(), torch.full((40,), expected))


@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
def test_copy_out_equals_cast(path, copy_dtype):
    params = [p.clone() for p in _params(3)]
    for p in params:
        p.mul_(100)  # exercise fp16 rounding and range
    opt = CPUAdam(params, lr=1e-1)
    copies = [torch.empty(p.shape, dtype=copy_dtype) for p in params]
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        opt.step(grads=grads, copy_to=copies)
        for p, c in zip(params, copies, strict=True):
            assert torch.equal(c.view(torch.int16), p.to(copy_dtype).view(torch.int16))
    # a mapping keyed by parameter works too, and parameters without an entry are skipped
    only = {params[1]: copies[1]}
    before = copies[0].clone()
    opt.step(grads=grads, copy_to=only)
    assert torch.equal(copies[0], before)
    assert torch.equal(copies[1].view(torch.int16), params[1].to(copy_dtype).view(torch.int16))


def test_bf16_copy_of_special_values(path):
    vals = torch.tensor(
        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, float("inf"), float("nan"), 1e-40] * 3
    )
    p = vals.clone()
    opt = CPUAdam([p], lr=0.0)  # lr 0 leaves p unchanged; only the copy is checked
    c = torch.empty(p.shape, dtype=torch.bfloat16)
    opt.step(grads=[torch.zeros_like(p)], copy_to=[c])
    assert torch.equal(c.view(torch.int16), p.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads_and_inv_scale(path, grad_dtype):
    """bf16/fp16 gradients scaled by 1024 with inv_scale=1/1024 == torch on the fp32 values."""
    base = _params(5)
    ours = [p.clone() for p in base]
    ref = [p.clone().requires_grad_() for p in base]
    o = CPUAdam(ours, lr=1e-2, weight_decay=0.01)
    r = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(6)
    for _ in range(20):
        low = [torch.randn(p.shape, generator=gen).to(grad_dtype) for p in base]
        scaled = [(g.float() * 1024).to(grad_dtype) for g in low]  # exact: power of two
        for p, g in zip(ref, low, strict=True):
            p.grad = g.float()
        o.step(grads=scaled, inv_scale=1 / 1024)
        r.step()
    _assert_close(ours, ref)


def test_state_dict_round_trip_and_torch_interop(path):
    base = _params(7)
    a = [p.clone().requires_grad_() for p in base]
    b = [p.clone().requires_grad_() for p in base]
    oa = CPUAdam(a, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(8)
    grads = [[torch.randn(p.shape, generator=gen) for p in base] for _ in range(20)]
    for step in range(10):
        for p, g in zip(a, grads[step], strict=True):
            p.grad = g
        oa.step()
    # deepcopy: a state_dict holds references and load_state_dict does not copy them
    sd = copy.deepcopy(oa.state_dict())
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    # resume in a fresh optimizer from a copy of the weights
    with torch.no_grad():
        for x, y in zip(b, a, strict=True):
            x.copy_(y)
    ob = CPUAdam(b, lr=1.0)
    ob.load_state_dict(copy.deepcopy(sd))
    assert ob.param_groups[0]["lr"] == 1e-2
    # and torch AdamW can load it too
    c = [p.detach().clone().requires_grad_() for p in a]
    oc = torch.optim.AdamW(c, lr=1e-2, weight_decay=0.1)
    oc.load_state_dict(copy.deepcopy(sd))
    for step in range(10, 20):
        for ps in (a, b, c):
            for p, g in zip(ps, grads[step], strict=True):
                p.grad = g.clone()
        oa.step()
        ob.step()
        oc.step()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    _assert_close(a, c)


def test_closure_and_skip_params_without_grad(path):
    w = torch.randn(8, requires_grad=True)
    frozen = torch.randn(8, requires_grad=True)
    opt = CPUAdam([w, frozen], lr=0.1)
    before = frozen.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) > 0
    assert torch.equal(frozen.detach(), before)
    assert frozen not in opt.state


def test_kernel_matches_fallback_on_large_random_input(monkeypatch):
    """The kernel (default ISA, 2 threads) against the torch fallback, one step, 1M params."""
    if ops.op_status("cpu_adam").source == "fallback":
        pytest.skip("cpu_adam kernel unavailable")
    monkeypatch.delenv(ops.CPU_ADAM_ISA_ENV, raising=False)
    gen = torch.Generator().manual_seed(9)
    n = (1 << 20) + 5
    tensors = [torch.randn(n, generator=gen) for _ in range(3)]
    tensors[2] = tensors[2].abs()
    grad = torch.randn(n, generator=gen).to(torch.bfloat16)
    results = []
    for forced in ("", "cpu_adam"):
        monkeypatch.setenv(ops.FORCE_FALLBACK_ENV, forced)
        p, m, v = (t.clone() for t in tensors)
        copy = torch.empty(n, dtype=torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ops.fused_adam_step(
                [p], [grad], [m], [v], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.01, steps=[7], inv_scale=0.5, copies=[copy], threads=2,
            )  # fmt: skip
        results.append((p, m, v, copy))
    (p1, m1, v1, c1), (p2, m2, v2, c2) = results
    assert torch.equal(m1, m2)  # same FMA roundings as torch
    assert torch.equal(v1, v2)
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)
    assert (c1.float() - c2.float()).abs().max() <= (p2.abs().max() * 2**-7)


def test_rejects_non_fp32_params():
    p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="fp32 CPU master"):
        CPUAdam([p]).step()
    with pytest.raises(ValueError, match="lr"):
        CPUAdam([torch.zeros(1)], lr=-1.0)
    q = torch.zeros(4)
    with pytest.raises(ValueError, match="one per parameter"):
        CPUAdam([q]).step(grads=[torch.zeros(4), torch.zeros(4)])
