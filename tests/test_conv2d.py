"""pyhwp.conv2d for every storage pattern: float64 references over a grid of conv configurations."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import pyhwp
from pyhwp.formats import SparseWeight, patterns
from pyhwp.ops import conv2d_reference
from helpers import ISAS, assert_conv_close, pattern_weight, random_sparse

PATTERNS = patterns()


def make_weight(shape, pattern, generator, sparsity=0.6):
    """(dense, sparse) weights of `shape` in `pattern`; skips when the pattern cannot store it."""
    w = pattern_weight(shape, pattern, sparsity, generator)
    try:
        sw = pyhwp.to_sparse(w, pattern)
    except ValueError as e:
        pytest.skip(f"{pattern} cannot store a {tuple(shape)} weight: {e}")
    return w, sw


def _case_id(case):
    k, s, d, g, pad = case
    return f"k{k}-s{s}-d{d}-g{g}-p{pad}".replace(" ", "")


def _grid():
    """Every kernel x stride x dilation x groups, with the padding cycling through its forms."""
    paddings = [0, 1, (2, 1), "same", "valid", (0, 3)]
    cases = []
    for i, (k, s, d, g) in enumerate(itertools.product((1, 3, 5, 7), (1, 2), (1, 2), (1, 2, "dw"))):
        pad = paddings[i % len(paddings)]
        if pad == "same" and s != 1:
            pad = k // 2
        cases.append((k, s, d, g, pad))
    return cases


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", _grid(), ids=_case_id)
def test_conv2d_grid(pattern, case):
    k, s, d, g, pad = case
    c_in = 8
    groups, c_out = (8, 8) if g == "dw" else (g, 6)
    g_ = torch.Generator().manual_seed(hash(case) % 2**31)
    w, sw = make_weight((c_out, c_in // groups, k, k), pattern, g_)
    bias = torch.randn(c_out, generator=g_)
    for batch in (1, 3):
        x = torch.randn(batch, c_in, 15, 13, generator=g_)
        for b in (None, bias):
            y = pyhwp.conv2d(x, sw, b, s, pad, d, groups)
            assert y.is_contiguous()
            assert_conv_close(y, x, w, b, s, pad, d, groups)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k, dilation", [(2, 1), (4, 1), (4, 3), (6, 2)])
def test_same_padding_with_even_kernels_is_asymmetric(pattern, k, dilation):
    g_ = torch.Generator().manual_seed(k * 10 + dilation)
    w, sw = make_weight((6, 4, k, k), pattern, g_)
    x = torch.randn(2, 4, 11, 9, generator=g_)
    y = pyhwp.conv2d(x, sw, None, 1, "same", dilation)
    assert y.shape == (2, 6, 11, 9)
    assert_conv_close(y, x, w, None, 1, "same", dilation)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k, stride, padding, groups", [
    (1, 1, 0, 1), (1, 2, 0, 1), (1, 1, 1, 2), (3, 1, 1, 1), (3, 2, 1, 2), (3, 1, "same", 24),
], ids=str)
def test_every_isa(isa, pattern, k, stride, padding, groups):
    # Channels and sizes wide enough for the kernels' 16-row blocks and 64-column tiles, and
    # batch-1 images small enough (P < 8) for their gather paths.
    g_ = torch.Generator().manual_seed(k + 7 * stride + groups)
    c_in, c_out = 24, 40 if groups != 24 else 24
    w, sw = make_weight((c_out, c_in // groups, k, k), pattern, g_, sparsity=0.8)
    bias = torch.randn(c_out, generator=g_)
    for batch, hw in ((1, (2, 3)), (2, (17, 19))):
        x = torch.randn(batch, c_in, *hw, generator=g_)
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            y = pyhwp.conv2d(xin, sw, bias, stride, padding, 1, groups)
            assert_conv_close(y, x, w, bias, stride, padding, 1, groups)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k, stride, groups", [(1, 1, 1), (1, 2, 1), (1, 1, 2), (3, 1, 1), (3, 2, 2), (3, 1, 8)],
                         ids=str)
def test_channels_last_input(pattern, k, stride, groups):
    g_ = torch.Generator().manual_seed(100 + k + stride + groups)
    w, sw = make_weight((8, 8 // groups, k, k), pattern, g_)
    bias = torch.randn(8, generator=g_)
    x = torch.randn(3, 8, 9, 7, generator=g_).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    y = pyhwp.conv2d(x, sw, bias, stride, k // 2, 1, groups)
    assert y.is_contiguous(memory_format=torch.channels_last)  # as torch returns it
    assert_conv_close(y, x, w, bias, stride, k // 2, 1, groups)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_channels_last_depthwise_with_bias(pattern):
    """A depthwise conv (multiplier 4, 1x1, stride 2, padding 1, dilation 2) on a channels_last
    1-pixel-wide input with a bias: torch 2.13's CPU conv2d reads out of bounds there (a segfault
    here); pyhwp hands torch NCHW input and returns channels_last."""
    g_ = torch.Generator().manual_seed(4)
    w, sw = make_weight((16, 1, 1, 1), pattern, g_)
    bias = torch.randn(16, generator=g_)
    x = torch.randn(1, 4, 28, 1, generator=g_).contiguous(memory_format=torch.channels_last)
    y = pyhwp.conv2d(x, sw, bias, 2, 1, 2, 4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_conv_close(y, x, w, bias, 2, 1, 2, 4)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("make", [
    lambda g: torch.randn(2, 8, 18, 13, generator=g)[:, :, ::2],             # strided rows
    lambda g: torch.randn(2, 8, 13, 9, generator=g).transpose(2, 3),         # W before H in memory
    lambda g: torch.randn(2, 12, 9, 13, generator=g)[:, 2:10],               # channel slice
    lambda g: torch.randn(1, 8, 9, 13, generator=g).expand(3, 8, 9, 13),     # stride-0 batch
    lambda g: torch.randn(9, 13, 8, 2, generator=g).permute(3, 2, 0, 1),     # batch innermost
], ids=["strided", "transposed", "channel-slice", "expanded", "batch-innermost"])
@pytest.mark.parametrize("k", [1, 3])
def test_non_contiguous_input(pattern, make, k):
    g_ = torch.Generator().manual_seed(200 + k)
    w, sw = make_weight((6, 8, k, k), pattern, g_)
    x = make(g_)
    assert not x.is_contiguous()
    for stride in (1, 2):
        assert_conv_close(pyhwp.conv2d(x, sw, None, stride, k // 2), x, w, None, stride, k // 2)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_unbatched_input_and_empty_batch(pattern):
    g_ = torch.Generator().manual_seed(300)
    w, sw = make_weight((6, 8, 3, 3), pattern, g_)
    bias = torch.randn(6, generator=g_)
    x = torch.randn(8, 7, 9, generator=g_)
    y = pyhwp.conv2d(x, sw, bias, padding=1)
    assert y.shape == (6, 7, 9)
    assert_conv_close(y.unsqueeze(0), x.unsqueeze(0), w, bias, padding=1)
    assert pyhwp.conv2d(torch.randn(0, 8, 7, 9), sw, bias, padding=1).shape == (0, 6, 7, 9)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k, groups", [(1, 1), (3, 1), (3, 2)])
def test_nonfinite_inputs_propagate_like_dense(pattern, k, groups):
    g_ = torch.Generator().manual_seed(400 + k)
    w, sw = make_weight((6, 8 // groups, k, k), pattern, g_, sparsity=0.8)
    x = torch.randn(2, 8, 7, 6, generator=g_)
    x[0, 1, 3, 2] = float("nan")
    x[1, 6, 0, 5] = float("inf")
    x[1, 2, 6, 0] = float("-inf")
    y = pyhwp.conv2d(x, sw, None, 1, k // 2, 1, groups)
    ref = F.conv2d(x, w, None, 1, k // 2, 1, groups)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("col", [0, 15, 16, 36])
def test_nonfinite_input_found_in_any_column(isa, pattern, col):
    # The padded copies of x are checked for NaN/Inf as they are written (common/row_copy*.cpp,
    # one per ISA): rows of 37 inputs take whole vectors and masked ends, and the copy shifted by
    # the left pad starts its vectors one column early.
    g_ = torch.Generator().manual_seed(500 + col)
    w, sw = make_weight((16, 8, 3, 3), pattern, g_, sparsity=0.5)
    x = torch.randn(1, 8, 5, 37, generator=g_)
    x[0, 3, 2, col] = float("nan")
    x[0, 5, 4, 36 - col] = float("inf")
    y = pyhwp.conv2d(x, sw, None, 1, 1)
    ref = F.conv2d(x, w, None, 1, 1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, threads", [(2, 1), (2, 2), (1, 2), (1, 16)])
@pytest.mark.parametrize("kernel, padding", [((1, 1), 0), ((1, 1), (2, 0)), ((3, 1), (1, 0)), ((2, 1), (0, 0)),
                                             ((3, 3), (1, 0))])
def test_convs_without_column_padding_copy_whole_planes(isa, kernel, padding, batch, threads):
    # With no column padding (no left/right pad: the padded rows are x's rows) the CSR implicit
    # GEMM copies each channel's rows as one run (common/implicit_conv.cpp), the zero rows above
    # and below, the spare row and the alignment padding included. One image over several threads:
    # each copies a range of rows from mid-plane, with 16 threads some ranges only padding rows.
    g_ = torch.Generator().manual_seed(kernel[0] * 10 + kernel[1] + threads)
    w, sw = make_weight((32, 16, *kernel), "csr", g_, sparsity=0.5)
    x = torch.randn(batch, 16, 11, 16 if kernel[1] == 3 else 13, generator=g_)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = pyhwp.conv2d(x, sw, None, 1, padding)
        torch.testing.assert_close(y, F.conv2d(x, w, None, 1, padding), rtol=1e-5, atol=1e-5)
        x[-1, 15, 10, 12] = float("nan")
        x[0, 0, 0, 0] = float("inf")
        y = pyhwp.conv2d(x, sw, None, 1, padding)
    finally:
        torch.set_num_threads(previous)
    ref = F.conv2d(x, w, None, 1, padding)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-5, atol=1e-5)


def _record_csr_plans(monkeypatch):
    """A list that gets, for every CSR implicit-GEMM call, whether its plan was aligned."""
    conv2d_module = __import__("sys").modules["pyhwp.ops.conv2d"]
    aligned, run = [], conv2d_module.csr_conv2d_impl

    def spy(x, row_offsets, values, plan, geometry, bias):
        aligned.append(plan.aligned)
        return run(x, row_offsets, values, plan, geometry, bias)

    monkeypatch.setattr(conv2d_module, "csr_conv2d_impl", spy)
    return aligned


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernel, hw, padding, dilation", [
    (3, (14, 14), 1, 1),      # rows of 16 floats already: no pixel added
    (3, (9, 30), 1, 1),       # 30 + 2 = 32
    (3, (16, 12), 2, 2),      # dilation 2: 12 + 4
    (5, (7, 12), 2, 1),       # kw = 5: the plain plan everywhere
    (3, (20, 6), 5, 5),       # (kw - 1) * dw = 10 > 8 lanes of halo: the plain plan too
    (2, (6, 15), "same", 1),  # an even kernel
], ids=str)
def test_aligned_csr_plan_matches_dense(isa, monkeypatch, kernel, hw, padding, dilation, threads):
    # Stride-1 CSR convs with kw = 2 or 3 on AVX-512 whose padded rows round up to whole lines
    # cheaply take the aligned plan (csr_conv2d_aligned): one entry per row of taps, grouped by
    # the mask of its stored columns, each line loaded once for all of them and each column's sums
    # shifted into place. Elsewhere the plain plan. NaN/Inf in x still send the call to the
    # per-tap path.
    aligned = _record_csr_plans(monkeypatch)
    g_ = torch.Generator().manual_seed(kernel * 100 + hw[1])
    w, sw = make_weight((40, 24, kernel, kernel), "csr", g_, sparsity=0.7)
    bias = torch.randn(40, generator=g_)
    x = torch.randn(2, 24, *hw, generator=g_)
    x_bad = x.clone()
    x_bad[1, 23, hw[0] - 1, hw[1] - 1] = float("nan")
    x_bad[0, 5, 0, 3] = float("inf")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = pyhwp.conv2d(x, sw, bias, 1, padding, dilation)
        y_again = pyhwp.conv2d(x, sw, None, 1, padding, dilation)
        y_bad = pyhwp.conv2d(x_bad, sw, bias, 1, padding, dilation)
    finally:
        torch.set_num_threads(previous)
    assert len(aligned) >= 3 and set(aligned) == {isa == "avx512" and kernel <= 3 and (kernel - 1) * dilation <= 8}
    assert_conv_close(y, x, w, bias, 1, padding, dilation)
    assert_conv_close(y_again, x, w, None, 1, padding, dilation)
    ref = F.conv2d(x_bad, w, bias, 1, padding, dilation)
    assert torch.equal(torch.isnan(y_bad), torch.isnan(ref)) and torch.equal(torch.isinf(y_bad), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y_bad[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_aligned_csr_plan_only_where_its_offsets_fit_int32():
    # 2130 channels of 1000 x 1000, 3x3, padding 1: the plain layout's planes (rows of 1002 floats)
    # fit the plans' int32 offsets, the aligned one's (rows of 1008) would not, so no aligned plan.
    if "avx512" not in ISAS:
        pytest.skip("needs AVX-512")
    from pyhwp._ext import _C

    big = (1, 2130, 1000, 1000, 1, 1, 3, 3, 1, 1, 1000, 1000)
    small = (1, 16, 14, 14, 1, 1, 3, 3, 1, 1, 14, 14)
    previous = _C.active_isa()
    try:
        _C.set_isa_cap("avx512")
        assert _C.csr_conv2d_aligned(small) and not _C.csr_conv2d_aligned(big)
        with pytest.raises(ValueError, match="no aligned plan"):
            _C.csr_conv2d_starts((1, 16, 14, 14, 1, 1, 5, 5, 1, 1, 12, 12), True)
    finally:
        _C.set_isa_cap(previous)


def test_aligned_csr_plan_runs_under_every_isa(monkeypatch):
    # A plan made under AVX-512 is reused when the ISA cap is lowered afterwards (the call's fast
    # path keeps it): the portable form of the tap-row kernel then runs it.
    if "avx512" not in ISAS:
        pytest.skip("needs AVX-512")
    from pyhwp._ext import _C

    aligned = _record_csr_plans(monkeypatch)
    g_ = torch.Generator().manual_seed(77)
    w, sw = make_weight((32, 16, 3, 3), "csr", g_, sparsity=0.6)
    x = torch.randn(1, 16, 14, 14, generator=g_)
    previous = _C.active_isa()
    try:
        _C.set_isa_cap("avx512")
        outs = [pyhwp.conv2d(x, sw, None, 1, 1)]
        for name in ISAS:
            _C.set_isa_cap(name)
            outs.append(pyhwp.conv2d(x, sw, None, 1, 1))
    finally:
        _C.set_isa_cap(previous)
    assert len(aligned) >= len(outs) and all(aligned)
    for y in outs:
        assert_conv_close(y, x, w, None, 1, 1)


@pytest.mark.parametrize("batch, c_in, hw, padding, dilation", [
    (3, 70, (20, 23), 1, 1),          # 3 channel blocks, 4 column tiles per image
    (1, 70, (5, 5), (2, 0), (2, 1)),  # one column tile: rows split over threads
    (2, 9, (11, 8), "same", 2),
], ids=str)
@pytest.mark.parametrize("pattern", ["csr", "2:4"])
def test_implicit_gemm_conv_matches_the_op_path(pattern, batch, c_in, hw, padding, dilation):
    # Inference takes the pattern's implicit-GEMM kernel (csr_conv2d, sparse24_conv2d); with
    # autograd the op runs one GEMM per tap (CSR) or on im2col (2:4). Both must equal the dense conv.
    conv2d_module = __import__("sys").modules["pyhwp.ops.conv2d"]
    g_ = torch.Generator().manual_seed(c_in + batch)
    w, sw = make_weight((40, c_in, 3, 3), pattern, g_, sparsity=0.9)
    bias = torch.randn(40, generator=g_)
    x = torch.randn(batch, c_in, *hw, generator=g_)
    assert conv2d_module._implicit_kind(x, sw, bias, (3, 3), (1, 1)) == pattern
    y = pyhwp.conv2d(x, sw, bias, 1, padding, dilation)
    assert_conv_close(y, x, w, bias, 1, padding, dilation)
    xg = x.clone().requires_grad_()
    assert conv2d_module._implicit_kind(xg, sw, bias, (3, 3), (1, 1)) is None
    y_op = pyhwp.conv2d(xg, sw, bias, 1, padding, dilation)
    assert_conv_close(y_op.detach(), x, w, bias, 1, padding, dilation)


def test_sparse24_1x1_convs_keep_their_own_kernel():
    conv2d_module = __import__("sys").modules["pyhwp.ops.conv2d"]
    g_ = torch.Generator().manual_seed(7)
    w, sw = make_weight((16, 32, 1, 1), "2:4", g_)
    x = torch.randn(2, 32, 5, 5, generator=g_)
    assert conv2d_module._implicit_kind(x, sw, None, (1, 1), (1, 1)) is None
    assert_conv_close(pyhwp.conv2d(x, sw), x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, stride, padding, dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((5, 3), (2, 1), (2, 0), (1, 2)), ((1, 1), (2, 2), (0, 0), (1, 1)),
    ((7, 7), (2, 2), (3, 3), (1, 1)), ((3, 3), (1, 1), (0, 0), (2, 2))])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_im2col_equals_unfold(dtype, k, stride, padding, dilation, layout):
    """conv2d's patch matrix (a strided view of the padded image, copied once) is F.unfold's."""
    from pyhwp.ops.conv2d import _im2col

    x = torch.randn(2, 5, 11, 9).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    ref = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)
    ho = (11 + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (9 + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    for i in range(2):
        assert torch.equal(_im2col(x[i], k, dilation, padding, stride, (ho, wo)), ref[i])


def test_im2col_falls_back_to_unfold(monkeypatch):
    """With autograd (F.unfold's backward is a fold) and in compiled graphs conv2d's patch matrix
    is F.unfold's own, values and gradient."""
    from pyhwp.ops.conv2d import _im2col

    args = ((3, 3), (1, 1), (1, 1), (2, 2), (4, 5))
    x = torch.randn(3, 7, 9, requires_grad=True)
    cols = _im2col(x, *args)
    ref = F.unfold(x[None], (3, 3), padding=1, stride=2)[0]
    assert torch.equal(cols, ref)
    (g,) = torch.autograd.grad(cols.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert torch.equal(g, g_ref)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(_im2col(x.detach(), *args), ref)


def test_conv2d_reference_is_dense_conv():
    g_ = torch.Generator().manual_seed(500)
    w = random_sparse((6, 4, 3, 3), 0.5, g_)
    sw = pyhwp.to_sparse(w, "csr")
    x, b = torch.randn(2, 8, 9, 9, generator=g_), torch.randn(6, generator=g_)
    ref = conv2d_reference(x, sw, b, 2, 1, 2, 2)
    assert ref.dtype == torch.float64
    torch.testing.assert_close(ref, F.conv2d(x.double(), w.double(), b.double(), 2, 1, 2, 2))


def test_conv2d_capability_is_declared():
    from pyhwp.kernels import KERNELS

    serving = {k.pattern for k in KERNELS if k.provider == "pyhwp" and "conv2d" in k.ops}
    assert "csr" in serving


# -- row_slice: group g's GEMM weight ----------------------------------------------------

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("start, stop", [(0, 20), (3, 11), (19, 20)])
def test_row_slice_matches_dense_rows(pattern, start, stop):
    g_ = torch.Generator().manual_seed(600)
    w, sw = make_weight((20, 4, 3, 3), pattern, g_)
    part = sw.row_slice(start, stop)
    assert part.pattern == sw.pattern and part.shape == (stop - start, 4, 3, 3)
    assert torch.equal(part.to_dense(), w[start:stop])
    fallback = SparseWeight._row_slice(sw, start, stop)  # the generic path new patterns inherit
    assert torch.equal(fallback.to_dense(), w[start:stop])


def test_csr_row_slice_views_the_arrays():
    sw = pyhwp.to_sparse(random_sparse((10, 12), 0.5, torch.Generator().manual_seed(601)), "csr")
    part = sw.row_slice(2, 6)
    part.validate()
    a = int(sw.row_offsets[2])
    assert part.values.data_ptr() == sw.values.data_ptr() + a * 4
    assert int(part.row_offsets[0]) == 0 and part.nnz == int(sw.row_offsets[6]) - a
    for start in (0, 7, 10):  # empty slices, through the CSR path and the generic fallback
        for empty in (sw.row_slice(start, start), SparseWeight._row_slice(sw, start, start)):
            assert empty.shape == (0, 12) and empty.nnz == 0
            empty.validate()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_kernel_taps_are_the_weight_at_each_tap(pattern):
    g_ = torch.Generator().manual_seed(603)
    w, sw = make_weight((20, 8, 3, 5), pattern, g_)
    taps = sw.kernel_taps()
    if taps is None:
        pytest.skip(f"{pattern} does not split into kernel taps (conv2d uses im2col)")
    assert len(taps) == 15
    for t, wt in enumerate(taps):
        assert wt.pattern == pattern and wt.shape == (20, 8)
        wt.validate()
        assert torch.equal(wt.to_dense(), w[:, :, t // 5, t % 5])


@pytest.mark.parametrize("grad", [False, True], ids=["implicit-gemm", "per-tap"])
def test_cached_taps_and_plans_follow_in_place_weight_changes(grad):
    g_ = torch.Generator().manual_seed(604)
    w = random_sparse((6, 4, 3, 3), 0.5, g_)
    sw = pyhwp.to_sparse(w, "csr")
    x = torch.randn(1, 4, 8, 8, generator=g_).requires_grad_(grad)
    assert_conv_close(pyhwp.conv2d(x, sw, padding=1).detach(), x, w, padding=1)
    with torch.no_grad():
        sw.values.mul_(-2.0)  # e.g. an optimizer step on the stored values
    assert_conv_close(pyhwp.conv2d(x, sw, padding=1).detach(), x, -2.0 * w, padding=1)


@pytest.mark.parametrize("pattern", ["csr", "2:4"])
def test_repeated_implicit_gemm_calls_take_the_fast_path_only_where_it_applies(pattern, monkeypatch):
    import gc
    import importlib
    import weakref

    conv_mod = importlib.import_module("pyhwp.ops.conv2d")  # pyhwp.ops.conv2d is also the function
    g_ = torch.Generator().manual_seed(606)
    w = pattern_weight((16, 8, 3, 3), pattern, generator=g_)
    sw, b = pyhwp.to_sparse(w, pattern), torch.randn(16, generator=g_)
    x = torch.randn(2, 8, 7, 9, generator=g_)
    first = [pyhwp.conv2d(x, sw, bias, padding=1) for bias in (None, b)]

    def general_path(*args, **kwargs):
        raise AssertionError("took the general path")

    monkeypatch.setattr(conv_mod, "check_bias", general_path)
    for bias, y0 in zip((None, b), first):  # the same call again: the fast path, the same result
        y = pyhwp.conv2d(x, sw, bias, padding=1)
        assert torch.equal(y, y0)
        assert_conv_close(y, x, w, bias, padding=1)
    x_nan = x.clone()
    x_nan[1, 3, 2, 4] = float("nan")
    x_nan[0, 0, 0, 0] = float("inf")
    for call in (lambda: pyhwp.conv2d(x_nan, sw, padding=1),  # NaN/Inf: the kernel declines
                 lambda: pyhwp.conv2d(x, sw, padding=(1, 1)),  # other arguments as passed
                 lambda: pyhwp.conv2d(x[:1], sw, padding=1),
                 lambda: pyhwp.conv2d(x.contiguous(memory_format=torch.channels_last), sw, padding=1),
                 lambda: pyhwp.conv2d(x, sw, torch.randn(32)[::2], padding=1)):
        with pytest.raises(AssertionError, match="general path"):
            call()
    monkeypatch.undo()
    pads = [1, 1]
    pyhwp.conv2d(x, sw, padding=pads)
    pads[0] = 0  # a list argument is not remembered: its new value counts
    assert_conv_close(pyhwp.conv2d(x, sw, padding=pads), x, w, padding=(0, 1))
    ref = F.conv2d(x_nan.double(), w.double(), padding=1).float()
    torch.testing.assert_close(pyhwp.conv2d(x_nan, sw, padding=1), ref, equal_nan=True, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        sw.values.mul_(-1.0)  # a new version of the values: the general path derives again
    assert_conv_close(pyhwp.conv2d(x, sw, padding=1), x, -w, padding=1)
    alive = weakref.ref(sw)
    del sw
    gc.collect()
    assert alive() is None  # what the fast path keeps does not keep the weight alive


@pytest.mark.parametrize("pattern", ["2:4", "masked", "csr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_1x1_calls_take_the_fast_path(pattern, dtype, monkeypatch):
    import importlib

    conv_mod = importlib.import_module("pyhwp.ops.conv2d")
    g_ = torch.Generator().manual_seed(607)
    w = pattern_weight((24, 16, 1, 1), pattern, generator=g_, dtype=dtype)
    sw, b = pyhwp.to_sparse(w, pattern), torch.randn(24, generator=g_, dtype=dtype)
    x = torch.randn(3, 16, 5, 7, generator=g_, dtype=dtype)
    first = [pyhwp.conv2d(x, sw, bias) for bias in (None, b)]

    def general_path(*args, **kwargs):
        raise AssertionError("took the general path")

    monkeypatch.setattr(conv_mod, "check_bias", general_path)
    x_nan = x.clone()
    x_nan[2, 5, 1, 1] = float("nan")
    for bias, y0 in zip((None, b), first):
        y = pyhwp.conv2d(x, sw, bias)
        assert torch.equal(y, y0) and y.is_contiguous()
    # The implicit-GEMM kernels (CSR float32, bfloat16 on AMX) decline NaN/Inf; the matmuls do not.
    if conv_mod._implicit_kind(x, sw, None, (1, 1), (1, 1)) is None:
        y = pyhwp.conv2d(x_nan, sw)
        ref = F.conv2d(x_nan.double(), w.double()).to(dtype)
        torch.testing.assert_close(y, ref, equal_nan=True, rtol=2e-2, atol=2e-2)
    for call in (lambda: pyhwp.conv2d(x, sw, stride=2), lambda: pyhwp.conv2d(x[:2], sw),
                 lambda: pyhwp.conv2d(x.contiguous(memory_format=torch.channels_last), sw)):
        with pytest.raises(AssertionError, match="general path"):
            call()


def test_implicit_gemm_plans_are_per_input_geometry():
    # One cached plan per (input size, padding, dilation): alternating geometries reuse the right one.
    g_ = torch.Generator().manual_seed(605)
    w = random_sparse((20, 8, 3, 3), 0.7, g_)
    sw = pyhwp.to_sparse(w, "csr")
    for hw, padding, dilation in [((8, 8), 1, 1), ((5, 11), 0, 1), ((8, 8), 2, 2), ((8, 8), 1, 1), ((5, 11), 0, 1)]:
        x = torch.randn(2, 8, *hw, generator=g_)
        assert_conv_close(pyhwp.conv2d(x, sw, None, 1, padding, dilation), x, w, None, 1, padding, dilation)


@pytest.mark.parametrize("start, stop", [(-1, 2), (3, 2), (0, 11), (0.0, 2)])
def test_row_slice_bad_range(start, stop):
    sw = pyhwp.to_sparse(random_sparse((10, 12), 0.5, torch.Generator().manual_seed(602)), "csr")
    with pytest.raises(ValueError, match="row_slice"):
        sw.row_slice(start, stop)


# -- bad input ---------------------------------------------------------------------------

@pytest.fixture
def csr_conv():
    return pyhwp.to_sparse(random_sparse((6, 4, 3, 3), 0.5, torch.Generator().manual_seed(700)), "csr")


X = torch.randn(2, 4, 9, 9)


@pytest.mark.parametrize("call, exc, match", [
    (lambda sw: pyhwp.conv2d(X, torch.randn(6, 4, 3, 3)), TypeError, "weight must be a pyhwp.SparseWeight"),
    (lambda sw: pyhwp.conv2d(X.tolist(), sw), TypeError, "x must be a torch.Tensor"),
    (lambda sw: pyhwp.conv2d(X, pyhwp.to_sparse(torch.randn(6, 36), "csr")), ValueError, "4-D conv weight"),
    (lambda sw: pyhwp.conv2d(X[0, 0], sw), ValueError, r"x has shape \(9, 9\)"),
    (lambda sw: pyhwp.conv2d(torch.randn(2, 5, 9, 9), sw), ValueError, "x has 5 channels, expected"),
    (lambda sw: pyhwp.conv2d(torch.randn(2, 8, 9, 9), sw), ValueError, "x has 8 channels"),
    (lambda sw: pyhwp.conv2d(X, sw, groups=4), ValueError, "groups=4 must divide"),
    (lambda sw: pyhwp.conv2d(X, sw, groups=0), ValueError, "groups must be a positive int"),
    (lambda sw: pyhwp.conv2d(X, sw, groups=2.0), ValueError, "groups must be a positive int"),
    (lambda sw: pyhwp.conv2d(X, sw, padding=-1), ValueError, "padding must be non-negative"),
    (lambda sw: pyhwp.conv2d(X, sw, padding=(1, -2)), ValueError, "padding must be non-negative"),
    (lambda sw: pyhwp.conv2d(X, sw, padding="full"), ValueError, "'same' or 'valid'"),
    (lambda sw: pyhwp.conv2d(X, sw, padding=(1, 1, 1)), TypeError, "padding must be an int or a pair"),
    (lambda sw: pyhwp.conv2d(X, sw, stride=2, padding="same"), ValueError, "'same' is not supported for strided"),
    (lambda sw: pyhwp.conv2d(X, sw, stride=0), ValueError, "stride and dilation must be >= 1"),
    (lambda sw: pyhwp.conv2d(X, sw, dilation=(1, 0)), ValueError, "stride and dilation must be >= 1"),
    (lambda sw: pyhwp.conv2d(X, sw, stride=1.5), TypeError, "stride must be an int or a pair"),
    (lambda sw: pyhwp.conv2d(X[:, :, :2, :2], sw), ValueError, "smaller than the dilated kernel"),
    (lambda sw: pyhwp.conv2d(X, sw, dilation=5), ValueError, "smaller than the dilated kernel"),
    (lambda sw: pyhwp.conv2d(X.double(), sw), TypeError, "x has dtype torch.float64"),
    (lambda sw: pyhwp.conv2d(X.to("meta"), sw), ValueError, "x is on meta"),
    (lambda sw: pyhwp.conv2d(X, sw, torch.randn(4)), ValueError, r"bias has shape \(4,\)"),
    (lambda sw: pyhwp.conv2d(X, sw, torch.randn(6).double()), TypeError, "bias has dtype"),
    (lambda sw: pyhwp.conv2d(X, sw, [0.0] * 6), TypeError, "bias must be a torch.Tensor"),
    (lambda sw: pyhwp.conv2d(X.half(), SparseWeight.to(pyhwp.to_sparse(torch.randn(6, 4, 3, 3).half(), "csr"),
                                                         "cpu")), TypeError, "csr_matmul supports dtypes float32"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_conv2d_bad_input(csr_conv, call, exc, match):
    with pytest.raises(exc, match=match):
        call(csr_conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [1, 3])
def test_csr_weight_with_no_stored_values(dtype, kernel):
    """A CSR conv weight that stores nothing (an all-zero filter bank) through the implicit GEMM:
    its plan is empty (found by tests/fuzz_api.py: the plan's null offsets were refused)."""
    sw = pyhwp.to_sparse(torch.zeros(6, 4, kernel, kernel, dtype=dtype), "csr")
    assert sw.nnz == 0
    x = torch.randn(2, 4, 5, 5).to(dtype)
    bias = torch.randn(6).to(dtype)
    y = pyhwp.conv2d(x, sw, bias, padding=kernel // 2)
    assert torch.equal(y, bias.view(1, 6, 1, 1).expand(2, 6, 5, 5))
