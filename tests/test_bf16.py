"""bfloat16 on the CPU for the 2:4 and masked patterns: float64 references, bit-equality with the
float32 kernels rounded once, layouts, NaN/Inf, bad input (CSR's bfloat16: test_csr_paths.py).
`bf16_isa` adds the AVX512-BF16 and AMX masked and 2:4 kernels to the vector ISAs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyhwp
from helpers import BF16_ISAS, assert_conv_close_bf16, assert_linear_close_bf16, pattern_weight
from pyhwp._ext import _C

# The ISAs whose bfloat16 masked and 2:4 matmuls run dot-product units: AMX's tiles, AVX512-BF16.
DOT_ISAS = [isa for isa in BF16_ISAS if isa in ("avx512_bf16", "amx")]

PATTERNS = ["2:4", "masked"]
# Odd sizes around the 2:4 groups (4) and metadata words (32), masked tiles (16) and panels.
SHAPES = [(1, 1), (5, 3), (17, 33), (16, 32), (37, 77), (33, 130), (70, 1000)]
# Around the 2:4 permute/tile switch (8), the masked narrow/wide switch (29 on AVX-512) and the
# AVX512-BF16 switches (masked 8, 2:4 5).
BATCHES = [1, 2, 4, 5, 6, 8, 9, 17, 33, 64, 130]


def bf16_weight(shape, pattern, g):
    """A random bfloat16 weight `pattern` can store (masked: 16x16 tiles half zero, plus
    unstructured zeros, so stored tiles hold pruned zeros too)."""
    if pattern == "masked":
        w = pattern_weight(shape, "csr", 0.4, g)
        w2 = w.reshape(shape[0], -1)
        n, k = w2.shape
        keep = (torch.rand(-(-n // 16), -(-k // 16), generator=g) >= 0.5)
        keep = keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :k]
        w = (w2 * keep).reshape(shape)
    else:
        w = pattern_weight(shape, pattern, generator=g)
    return w.bfloat16()


def terms(w):
    w2 = w.reshape(w.shape[0], -1)
    return int((w2 != 0).sum(1).max()) + 1 if w2.numel() else 1


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(bf16_isa, pattern, shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = bf16_weight(shape, pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    assert sw.dtype == torch.bfloat16 and sw.values.dtype == torch.bfloat16
    bias = torch.randn(shape[0], generator=g).bfloat16()
    for batch in BATCHES:
        x = torch.randn(batch, shape[1], generator=g).bfloat16()
        for b in (None, bias):
            assert_linear_close_bf16(pyhwp.linear(x, sw, b), x, w, b, terms(w))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("batch", [1, 3, 16, 45, 130])
def test_equals_float32_kernel_rounded_once(isa, pattern, batch):
    """The bfloat16 entry is the float32 kernel on exactly widened operands plus one rounding per
    output: same products, same summation order, so the results agree bit for bit. (Not on AMX,
    whose tile unit sums in its own order: the float64-reference tests bound it.)"""
    g = torch.Generator().manual_seed(batch)
    w = bf16_weight((45, 300), pattern, g)
    sw, sw32 = pyhwp.to_sparse(w, pattern), pyhwp.to_sparse(w.float(), pattern)
    x = torch.randn(batch, 300, generator=g).bfloat16()
    bias = torch.randn(45, generator=g).bfloat16()
    y = pyhwp.linear(x, sw, bias)
    assert torch.equal(y, pyhwp.linear(x.float(), sw32, bias.float()).bfloat16())
    xs = x.t().contiguous().t()  # the same values with k strided
    assert torch.equal(pyhwp.linear(xs, sw), pyhwp.linear(xs.float(), sw32).bfloat16())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_long_k_and_wide_batch(bf16_isa, pattern):
    """K = 4095 (odd; several packing units and K chunks) at 300 columns (several register
    blocks per panel)."""
    g = torch.Generator().manual_seed(13)
    w = bf16_weight((40, 4095), pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    bias = torch.randn(40, generator=g).bfloat16()
    x = torch.randn(300, 4095, generator=g).bfloat16()
    assert_linear_close_bf16(pyhwp.linear(x, sw, bias), x, w, bias, terms(w))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_3d_and_non_contiguous_input(bf16_isa, pattern):
    g = torch.Generator().manual_seed(3)
    w = bf16_weight((40, 66), pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(3, 50, 66, generator=g).bfloat16()
    y = pyhwp.linear(x, sw)
    assert y.shape == (3, 50, 40) and y.dtype == torch.bfloat16
    assert_linear_close_bf16(y, x, w, terms=terms(w))
    for xs in (torch.randn(66, 20, generator=g).bfloat16().t(),          # transposed
               torch.randn(20, 132, generator=g).bfloat16()[:, ::2],       # strided columns
               torch.randn(1, 66, generator=g).bfloat16().expand(9, 66)):  # stride-0 rows
        assert_linear_close_bf16(pyhwp.linear(xs, sw), xs, w, terms=terms(w))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("p", [1, 7, 45, 200])
def test_transpose_out_conv_layout(bf16_isa, pattern, p):
    """(K, P) patch matrices with p contiguous, output (N, P): the conv layout of both kernels."""
    from pyhwp.kernels import find_kernel
    from pyhwp.ops.linear import MATMULS

    g = torch.Generator().manual_seed(p)
    w = bf16_weight((37, 50), pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    bias = torch.randn(37, generator=g).bfloat16()
    xt = torch.randn(50, p, generator=g).bfloat16()
    mm = MATMULS[find_kernel("linear", pattern, xt.device, xt.dtype).name]
    y = mm(xt.t(), sw, bias, True)
    assert y.shape == (37, p) and y.is_contiguous() and y.dtype == torch.bfloat16
    assert_linear_close_bf16(y.t(), xt.t(), w, bias, terms(w))


@pytest.mark.parametrize("hw", [7, 14])  # 14: on AVX-512 the CSR and 2:4 convs take the tap rows' aligned plan
@pytest.mark.parametrize("pattern", PATTERNS)
def test_conv2d(bf16_isa, pattern, hw):
    g = torch.Generator().manual_seed(5)
    w = bf16_weight((8, 4, 3, 3), pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(2, 4, hw, hw, generator=g).bfloat16()
    bias = torch.randn(8, generator=g).bfloat16()
    for _ in range(2):  # the second call through conv2d's fast path
        assert_conv_close_bf16(pyhwp.conv2d(x, sw, bias, padding=1), x, w, bias, padding=1)


@pytest.mark.parametrize("pattern", ["csr", *PATTERNS])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_nonfinite_input_rounds_once(bf16_isa, pattern, stride):
    """A NaN/Inf in x sends the conv to its fallback (CSR stride 1: one GEMM per tap, summed;
    else im2col): the outputs it does not reach are still each rounded once, and the NaNs land
    where dense puts them."""
    g = torch.Generator().manual_seed(6 + stride)
    w = bf16_weight((8, 4, 3, 3), pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(2, 4, 9, 11, generator=g)
    x[0, 1, 4, 5], x[1, 2, 0, 0] = float("nan"), float("inf")
    x = x.bfloat16()
    bias = torch.randn(8, generator=g).bfloat16()
    y = pyhwp.conv2d(x, sw, bias, stride, 1)
    assert bool(torch.isfinite(y).any())
    assert_conv_close_bf16(y, x, w, bias, stride, 1)


# (channels, multiplier, k, stride, padding, dilation, H, W, batch): strided depthwise convs on
# small inputs where torch 2.13's CPU bfloat16 conv2d returned wrong values (the first two) or
# read out of bounds (the third), and a plain one.
DEPTHWISE = [(4, 2, 3, 3, 1, 1, 17, 1, 1), (16, 2, 5, 2, 0, 1, 17, 5, 2), (16, 3, 3, 3, 3, 2, 1, 19, 1),
             (8, 1, 3, 1, 1, 1, 9, 9, 2)]


@pytest.mark.parametrize("pattern", ["csr", "masked"])
@pytest.mark.parametrize("c, m, k, s, p, d, h, w, n", DEPTHWISE)
def test_depthwise_conv2d(pattern, c, m, k, s, p, d, h, w, n):
    """Depthwise convs run torch's direct convolution, in float32 for bfloat16 (pyhwp.ops.conv2d
    ._depthwise): within one rounding of the exact result."""
    g = torch.Generator().manual_seed(c * m + k)
    wt = torch.randn(c * m, 1, k, k, generator=g)
    wt = (wt * (torch.rand(wt.shape, generator=g) < 0.6)).bfloat16()
    sw = pyhwp.to_sparse(wt, pattern)
    x = torch.randn(n, c, h, w, generator=g).bfloat16()
    bias = torch.randn(c * m, generator=g).bfloat16()
    assert_conv_close_bf16(pyhwp.conv2d(x, sw, bias, s, p, d, c), x, wt, bias, s, p, d, c)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("batch", [1, 4, 40])
def test_nonfinite_inputs_propagate_like_dense(bf16_isa, pattern, batch):
    g = torch.Generator().manual_seed(9)
    w = bf16_weight((30, 40), pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(batch, 40, generator=g).bfloat16()
    x[0, 3] = float("nan")
    x[-1, 7] = float("inf")
    x[batch // 2, 20] = float("-inf")
    x[batch // 2, 39] = float("inf")  # the last k-tile (a single step on AMX)
    y = pyhwp.linear(x, sw)
    ref = F.linear(x.double(), w.double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(torch.signbit(y[torch.isinf(y)]), torch.signbit(ref[torch.isinf(ref)]))


@pytest.mark.parametrize("stored", ["all", "even", "odd", "alternate-rows"])
@pytest.mark.parametrize("batch", [8, 64, 100])
def test_masked_tile_pairs_and_singles(bf16_isa, stored, batch):
    """The AMX kernel runs stored k-tiles 2u, 2u + 1 as one product and the others alone: weights
    whose panels store every tile, only even or only odd ones, or a mix, with an odd k-tile count."""
    g = torch.Generator().manual_seed(batch)
    n, k = 48, 16 * 6 + 5  # 7 k-tiles: the last one has no partner
    tiles = torch.ones(3, 7, dtype=torch.bool)
    if stored == "even":
        tiles[:, 1::2] = False
    elif stored == "odd":
        tiles[:, 0::2] = False
    elif stored == "alternate-rows":
        tiles[1, 0::2] = False
        tiles[2, 1::3] = False
    keep = tiles.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :k]
    w = (torch.randn(n, k, generator=g) * keep).bfloat16()
    sw = pyhwp.to_sparse(w, "masked")
    x = torch.randn(batch, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    assert_linear_close_bf16(pyhwp.linear(x, sw, bias), x, w, bias, terms(w))


@pytest.mark.skipif(not DOT_ISAS, reason="needs AVX512-BF16 (Zen 4, Sapphire Rapids or later) and a build with it")
@pytest.mark.parametrize("unit", DOT_ISAS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_dot_products_read_subnormal_inputs_as_zero(unit, pattern):
    """Documented difference of the AMX and AVX512-BF16 paths (as of every AMX or VDPBF16PS product,
    torch's dense one included): subnormal bfloat16 inputs count as zero; the vector kernels
    multiply them."""
    w = torch.full((16, 16), 2.0**100)
    w.view(16, 4, 4)[:, :, 2:] = 0  # 2:4 (positions 0 and 1 of every group)
    sw = pyhwp.to_sparse(w.bfloat16(), pattern)
    x = torch.zeros(16, 16).bfloat16()
    x[:, 0] = 2.0**-130  # subnormal in bfloat16 (and float32)
    previous = _C.active_isa()
    try:
        _C.set_isa_cap(unit)
        assert torch.equal(pyhwp.linear(x, sw), torch.zeros(16, 16).bfloat16())
        _C.set_isa_cap("avx512")
        assert torch.equal(pyhwp.linear(x, sw), torch.full((16, 16), 2.0**-30).bfloat16())
    finally:
        _C.set_isa_cap(previous)


@pytest.mark.skipif(not DOT_ISAS, reason="needs AVX512-BF16 (Zen 4, Sapphire Rapids or later) and a build with it")
@pytest.mark.parametrize("unit", DOT_ISAS)
def test_dot_product_convs_read_subnormal_inputs_as_zero(unit):
    """The same for masked 3x3 convs: AMX's conv, or the masked implicit GEMM's VDPBF16PS kernel."""
    w = torch.zeros(16, 16, 3, 3)
    w[:, :8] = 2.0**100  # 16x16 tiles of the flattened (channel, tap) columns, half of them stored
    sw = pyhwp.to_sparse(w.bfloat16(), "masked")
    x = torch.zeros(1, 16, 8, 8).bfloat16()
    x[0, 0] = 2.0**-130
    previous = _C.active_isa()
    try:
        _C.set_isa_cap(unit)
        assert torch.equal(pyhwp.conv2d(x, sw, padding=1), torch.zeros(1, 16, 8, 8).bfloat16())
        _C.set_isa_cap("avx512")
        assert pyhwp.conv2d(x, sw, padding=1).float().abs().min() > 0
    finally:
        _C.set_isa_cap(previous)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_empty_batch_and_zero_weight(pattern):
    sw = pyhwp.to_sparse(torch.zeros(20, 32).bfloat16(), pattern)
    assert pyhwp.linear(torch.randn(0, 32).bfloat16(), sw).shape == (0, 20)
    bias = torch.randn(20).bfloat16()
    assert torch.equal(pyhwp.linear(torch.randn(3, 32).bfloat16(), sw, bias), bias.expand(3, 20))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_mixed_dtypes_are_refused(pattern):
    w = bf16_weight((6, 8), pattern, torch.Generator().manual_seed(1))
    sw = pyhwp.to_sparse(w, pattern)
    with pytest.raises(TypeError, match="x has dtype torch.float32 but weight has torch.bfloat16"):
        pyhwp.linear(torch.randn(2, 8), sw)
    with pytest.raises(TypeError, match="bias has dtype torch.float32, input has torch.bfloat16"):
        pyhwp.linear(torch.randn(2, 8).bfloat16(), sw, torch.randn(6))
    # The op itself (what autograd and compiled graphs call) checks too.
    op, arrays = ((torch.ops.pyhwp.sparse24_matmul, (sw.values, sw.meta)) if pattern == "2:4" else
                  (torch.ops.pyhwp.masked_matmul, (sw.tile_ptr, sw.tile_idx, sw.values, sw.mask_bits)))
    name = "sparse24_matmul" if pattern == "2:4" else "masked_matmul"
    arrays32 = tuple(a.float() if a is sw.values else a for a in arrays)
    with pytest.raises(TypeError, match=rf"pyhwp::{name}: .* one dtype .* got x torch.bfloat16, values torch.float32"):
        op(torch.randn(2, 8).bfloat16(), *arrays32, None)
    with pytest.raises(TypeError, match=r"values torch.bfloat16, bias torch.float32"):
        op(torch.randn(2, 8).bfloat16(), *arrays, torch.randn(6))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("batch", [1, 40])
def test_grads_match_dense_autograd(pattern, batch):
    """bfloat16 backward (torch ops on the stored arrays) against dense float64 autograd on the same
    bfloat16 values, within bfloat16 rounding of the results."""
    g = torch.Generator().manual_seed(7)
    w = bf16_weight((33, 40), pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(batch, 40, generator=g).bfloat16()
    b = torch.randn(33, generator=g).bfloat16()
    gy = torch.randn(batch, 33, generator=g).bfloat16()
    arrays = {k: v for k, v in sw._tensors().items()}
    vs = sw.values.detach().clone().requires_grad_()
    xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
    pyhwp.linear(xs, type(sw)._unchecked(sw.shape, **(arrays | {"values": vs})), bs).backward(gy)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    F.linear(xd, wd, bd).backward(gy.double())
    assert xs.grad.dtype == vs.grad.dtype == bs.grad.dtype == torch.bfloat16
    tol = dict(rtol=2**-7, atol=2**-7 * 8)
    torch.testing.assert_close(xs.grad.double(), xd.grad, **tol)
    torch.testing.assert_close(bs.grad.double(), bd.grad, **tol)
    kept = type(sw)._unchecked(sw.shape, **(arrays | {"values": vs.grad})).to_dense().double()
    torch.testing.assert_close(kept, wd.grad * (w != 0), **tol)
