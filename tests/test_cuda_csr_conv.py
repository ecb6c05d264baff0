"""CUDA implicit-GEMM CSR conv2d (csr_conv2d_cuda: the CSR tile kernel over padded planes, the
batch in one launch) through pyhwp.conv2d, against float64 references: 3x3 / 5x5, dilation,
asymmetric padding, batch 1 and 3, 1x1, many channels, wide images, bias, NaN/Inf in x."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyhwp
import pyhwp.ops.conv2d as conv_mod

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}

CASES = {
    "3x3": dict(shape=(16, 8, 3, 3), x=(1, 8, 9, 9), padding=1),
    "3x3_batch3": dict(shape=(16, 8, 3, 3), x=(3, 8, 9, 11), padding=1),
    "5x5": dict(shape=(12, 5, 5, 5), x=(2, 5, 12, 10), padding=2),
    "dilated": dict(shape=(8, 6, 3, 3), x=(3, 6, 13, 12), padding=2, dilation=2),
    "dilated_hw": dict(shape=(8, 6, 3, 3), x=(1, 6, 13, 12), padding=(1, 2), dilation=(1, 2)),
    "asymmetric_same": dict(shape=(10, 4, 2, 4), x=(2, 4, 9, 10), padding="same"),
    "no_padding": dict(shape=(9, 7, 3, 3), x=(2, 7, 8, 9), padding=0),
    "1x1": dict(shape=(32, 16, 1, 1), x=(3, 16, 7, 7), padding=0),
    "1x1_strided": dict(shape=(24, 16, 1, 1), x=(2, 16, 9, 9), padding=0, stride=2),
    "many_channels": dict(shape=(40, 300, 3, 3), x=(2, 300, 6, 6), padding=1),
    "wide_image": dict(shape=(33, 16, 3, 3), x=(1, 16, 40, 37), padding=1),
    "tiny_output": dict(shape=(5, 3, 3, 3), x=(2, 3, 3, 4), padding=0),
}


def _gen(*key):
    return torch.Generator().manual_seed(hash(key) % 2**31)


def _weight(shape, g, dtype, sparsity=0.7):
    w = torch.randn(shape, generator=g).to(dtype)
    w = torch.where(torch.rand(shape, generator=g) < sparsity, torch.zeros((), dtype=dtype), w)
    w[0] = 0  # an empty row
    return w


@pytest.fixture
def implicit_calls(monkeypatch):
    """Counts calls of the CUDA implicit-GEMM conv, so that a test fails if it silently took
    another path."""
    calls = []
    real = conv_mod.csr_conv2d_cuda_impl

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(conv_mod, "csr_conv2d_cuda_impl", spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_csr_conv2d_cuda_matches_reference(dtype, case, with_bias, implicit_calls):
    g = _gen("csr-conv", dtype, case, with_bias)
    kw = dict(CASES[case])
    w = _weight(kw.pop("shape"), g, dtype)
    x = torch.randn(kw.pop("x"), generator=g).to(dtype)
    bias = torch.randn(w.shape[0], generator=g).to(dtype) if with_bias else None
    sw = pyhwp.to_sparse(w.cuda(), "csr")
    with torch.inference_mode():
        y = pyhwp.conv2d(x.cuda(), sw, None if bias is None else bias.cuda(), **kw)
    assert implicit_calls, "the CUDA implicit-GEMM conv did not run"
    b64 = None if bias is None else bias.double()
    ref = F.conv2d(x.double(), w.double(), b64, **kw)
    mag = F.conv2d(x.double().abs(), w.double().abs(), None if bias is None else b64.abs(), **kw)
    terms = int((w != 0).flatten(1).sum(1).max()) + 1
    tol = 4 * (terms + 2) * 2**-24 * mag + 2 * EPS[dtype] * ref.abs() + 1e-30
    assert y.shape == ref.shape and y.dtype == dtype and y.is_contiguous()
    assert ((y.double().cpu() - ref).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["3x3_batch3", "dilated", "1x1", "many_channels"])
def test_csr_conv2d_cuda_nonfinite_like_dense(dtype, case, implicit_calls):
    """NaN/Inf in x: Inf * 0 at taps the weight does not store must give NaN as in the dense conv
    (the device check kernel), stored taps give +-Inf / NaN from the tile kernel itself."""
    g = _gen("csr-conv-nonfinite", dtype, case)
    kw = dict(CASES[case])
    w = _weight(kw.pop("shape"), g, dtype, sparsity=0.5)
    x = torch.randn(kw.pop("x"), generator=g).to(dtype)
    n, c, h, wd = x.shape
    x[0, 0, h // 2, wd // 2] = float("inf")
    x[-1, c - 1, 0, wd - 1] = float("nan")
    x[-1, c // 2, h - 1, 1] = float("-inf")
    w[1] = w[1].abs() + 0.5  # a dense row: +-Inf where only Inf and finite values meet
    sw = pyhwp.to_sparse(w.cuda(), "csr")
    with torch.inference_mode():
        y = pyhwp.conv2d(x.cuda(), sw, **kw).double().cpu()
    assert implicit_calls
    ref = F.conv2d(x.double(), w.double(), **kw)
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])
    finite = torch.randn(x.shape, generator=g).to(dtype)  # the flag is per call
    with torch.inference_mode():
        assert not torch.isnan(pyhwp.conv2d(finite.cuda(), sw, **kw)).any()


def test_csr_conv2d_cuda_keeps_autograd_off_the_kernel(implicit_calls):
    """Inference only: a weight or x that needs grad takes the differentiable path."""
    g = _gen("csr-conv-grad")
    w = _weight((8, 4, 3, 3), g, torch.float32)
    x = torch.randn(2, 4, 7, 7, generator=g).cuda().requires_grad_()
    sw = pyhwp.to_sparse(w.cuda(), "csr")
    y = pyhwp.conv2d(x, sw, padding=1)
    y.sum().backward()
    assert not implicit_calls
    ref = torch.autograd.grad(F.conv2d(x, w.cuda(), padding=1).sum(), x)[0]
    torch.testing.assert_close(x.grad, ref, rtol=1e-5, atol=1e-5)


def test_csr_conv2d_cuda_plan_is_cached_per_geometry(implicit_calls):
    g = _gen("csr-conv-cache")
    w = _weight((8, 4, 3, 3), g, torch.float16)
    sw = pyhwp.to_sparse(w.cuda(), "csr")
    with torch.inference_mode():
        for size in (7, 7, 9):
            x = torch.randn(2, 4, size, size, generator=g).to(torch.float16)
            y = pyhwp.conv2d(x.cuda(), sw, padding=1)
            ref = F.conv2d(x.double(), w.double(), padding=1)
            assert (y.double().cpu() - ref).abs().max() <= 0.05 * ref.abs().max()
    assert len(implicit_calls) == 3
