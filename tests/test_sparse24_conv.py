"""The 2:4 implicit-GEMM conv (csrc/sparse24/sparse24_conv2d_cpu.cpp): every ISA, the aligned
shifted-copy layout and the unaligned one, K blocks, row blocks, thread counts, NaN/Inf, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import pyhwp
from pyhwp._ext import _C
from pyhwp.ops.sparse24 import sparse24_conv2d_impl
from helpers import assert_conv_close, assert_conv_close_bf16, pattern_weight

conv_mod = importlib.import_module("pyhwp.ops.conv2d")


def _geometry(x, sw, padding, dilation):
    n, c, h, w = x.shape
    (kh, kw), (dh, dw) = sw.shape[2:], conv_mod._pair(dilation, "dilation")
    pt, pb, pl, pr = conv_mod._resolve_padding(padding, (kh, kw), (1, 1), (dh, dw))
    out_hw = (h + pt + pb - dh * (kh - 1), w + pl + pr - dw * (kw - 1))
    return conv_mod._geometry(x, (pt, pb, pl, pr), (kh, kw), (dh, dw), out_hw)


def _layout(x, sw, padding, dilation, threads):
    """(segments, bands) of the layout sparse24_conv2d reads x in ((0, 1): plain)."""
    c, (kh, kw) = x.shape[1], sw.shape[2:]
    return _C.sparse24_conv2d_layout(sw.shape[0], c * kh * kw, _geometry(x, sw, padding, dilation), threads)


# (c_in, c_out, kernel, (h, w), padding, dilation, batch)
CASES = [
    (3, 20, (3, 3), (16, 16), 1, 1, 1),         # K = 27: one partial metadata word; shifted copies
    (16, 136, (3, 3), (14, 14), 1, 1, 3),       # two row blocks of kTileRows; a batch per thread
    (24, 40, (3, 3), (28, 30), 1, 1, 1),        # 7 column tiles, several K blocks
    (8, 16, (5, 5), (12, 12), 2, 1, 2),         # five shifted copies
    (8, 16, (3, 3), (12, 12), 2, 2, 1),         # dilated copies (shift 2)
    (8, 16, (3, 3), (7, 7), 1, 1, 2),           # wo = 7: unaligned windows, the spare row
    (10, 12, (3, 1), (9, 11), (1, 0), 1, 1),    # kw = 1: written straight into the output
    (6, 8, (1, 3), (5, 21), (0, 1), 1, 3),      # kh = 1, unaligned (32 columns against 23)
    (4, 8, (2, 4), (10, 13), "same", 1, 1),     # even kernel, asymmetric "same" padding
    (5, 16, (3, 3), (18, 18), 0, 1, 2),         # shifted copies without padding, wo = wp = 16
    (6, 20, (3, 1), (8, 8), "valid", 1, 2),     # x read in place (no padding, 64-float planes)
    (8, 24, (3, 3), (8, 8), 1, 1, 5),           # two images a group, the last group half empty
    (64, 8, (3, 3), (56, 56), 1, 1, 2),         # two bands per image, for L2
    (12, 24, (3, 3), (18, 20), 1, 1, 1),        # four bands of one image a row, the last past ho
]


def _id(case):
    c_in, c_out, k, hw, pad, dil, batch = case
    return f"{c_in}-{c_out}-k{k[0]}x{k[1]}-{hw[0]}x{hw[1]}-p{pad}-d{dil}-b{batch}".replace(" ", "")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_dense_conv(isa, case, threads):
    c_in, c_out, kernel, hw, padding, dilation, batch = case
    g = torch.Generator().manual_seed(c_in * 31 + c_out)
    w = pattern_weight((c_out, c_in, *kernel), "2:4", generator=g)
    sw, bias = pyhwp.to_sparse(w, "2:4"), torch.randn(c_out, generator=g)
    x = torch.randn(batch, c_in, *hw, generator=g)
    assert conv_mod._implicit_kind(x, sw, bias, kernel, (1, 1)) == "2:4"
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # conv2d (on AVX-512 some of these take the CSR tap-row kernel instead: _sparse24_taps),
        # and the 2:4 kernel itself
        y = pyhwp.conv2d(x, sw, bias, 1, padding, dilation)
        y_nobias = pyhwp.conv2d(x, sw, None, 1, padding, dilation)
        y_kernel = sparse24_conv2d_impl(x, sw.values, sw.meta, _geometry(x, sw, padding, dilation), bias)
    finally:
        torch.set_num_threads(previous)
    assert_conv_close(y, x, w, bias, 1, padding, dilation)
    assert_conv_close(y_nobias, x, w, None, 1, padding, dilation)
    assert_conv_close(y_kernel, x, w, bias, 1, padding, dilation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_geometries_take_the_csr_tap_rows(isa, monkeypatch, dtype):
    # Where the CSR conv's aligned plan applies (csr_conv2d_aligned: AVX-512, kw <= 3, rows that
    # round up to whole lines cheaply), 2:4 kxk convs run the CSR tap-row kernel on their kept
    # values (_sparse24_taps), the second call through conv2d's fast path; bfloat16 ones (no AMX)
    # on float32 copies, rounded once.
    calls, run = [], conv_mod.csr_conv2d_impl

    def spy(x, row_offsets, values, plan, geometry, bias):
        calls.append(plan.aligned)
        return run(x, row_offsets, values, plan, geometry, bias)

    monkeypatch.setattr(conv_mod, "csr_conv2d_impl", spy)
    g = torch.Generator().manual_seed(5)
    w = pattern_weight((24, 16, 3, 3), "2:4", generator=g).to(dtype)
    sw, bias = pyhwp.to_sparse(w, "2:4"), torch.randn(24, generator=g).to(dtype)
    x = torch.randn(2, 16, 14, 14, generator=g).to(dtype)
    ys = [pyhwp.conv2d(x, sw, bias, 1, 1) for _ in range(2)]
    taps = isa == "avx512" and not (dtype == torch.bfloat16 and conv_mod.amx_available())
    assert calls == ([True, True] if taps else [])
    for y in ys:
        if dtype == torch.float32:
            assert_conv_close(y, x, w, bias, 1, 1)
        else:
            assert_conv_close_bf16(y, x, w, bias, 1, 1)


def test_strided_weight_arrays():
    # A weight whose arrays are views with other strides (built by hand; validate() accepts them).
    g = torch.Generator().manual_seed(11)
    w = pattern_weight((24, 8, 3, 3), "2:4", generator=g)
    sw = pyhwp.to_sparse(w, "2:4")
    strided = type(sw)._unchecked(sw.shape, values=sw.values.t().contiguous().t(), meta=sw.meta.t().contiguous().t())
    assert not strided.values.is_contiguous() and not strided.meta.is_contiguous()
    strided.validate()
    x = torch.randn(1, 8, 16, 16, generator=g)
    assert_conv_close(pyhwp.conv2d(x, strided, padding=1), x, w, padding=1)


def test_cases_cover_every_layout():
    layouts, batches = [], [case[-1] for case in CASES]
    for c_in, c_out, kernel, hw, padding, dilation, batch in CASES:
        sw = pyhwp.to_sparse(pattern_weight((c_out, c_in, *kernel), "2:4"), "2:4")
        layouts.append(_layout(torch.zeros(batch, c_in, *hw), sw, padding, dilation, 2))
    assert (0, 1) in layouts                                                    # plain
    assert (1, 1) in layouts                                                    # shifted, a band a row
    assert any(s == 1 and b > 1 for s, b in layouts)                            # bands for L2
    assert any(s > 1 and b == 1 for s, b in layouts)                            # several images a row
    assert any(s > 1 and b > 1 and n == 1 for (s, b), n in zip(layouts, batches))  # bands of one image
    assert any(s > 1 and n * b % s for (s, b), n in zip(layouts, batches))     # empty segments


@pytest.mark.parametrize("hw", [(16, 16), (7, 7)], ids=["shifted", "unaligned"])
def test_nonfinite_inputs_propagate_like_dense(hw):
    # The kernel declines (returns None) on NaN/Inf; conv2d then takes im2col, dense-exact.
    g = torch.Generator().manual_seed(9)
    w = pattern_weight((12, 8, 3, 3), "2:4", generator=g)
    sw = pyhwp.to_sparse(w, "2:4")
    x = torch.randn(2, 8, *hw, generator=g)
    x[0, 3, 2, 5] = float("nan")
    x[1, 7, hw[0] - 1, 0] = float("-inf")
    geometry = (2, 8, *hw, 1, 1, 3, 3, 1, 1, *hw)
    assert sparse24_conv2d_impl(x, sw.values, sw.meta, geometry, None) is None
    y = pyhwp.conv2d(x, sw, padding=1)
    ref = F.conv2d(x.double(), w.double(), padding=1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite].double(), ref[finite], rtol=1e-4, atol=1e-4)


def test_kernel_rejects_bad_arguments():
    g = torch.Generator().manual_seed(10)
    sw = pyhwp.to_sparse(pattern_weight((4, 8, 3, 3), "2:4", generator=g), "2:4")
    x = torch.randn(1, 8, 6, 6, generator=g)
    y = torch.empty(1, 4, 6, 6)
    good = (1, 8, 6, 6, 1, 1, 3, 3, 1, 1, 6, 6)
    call = lambda geometry, cols=72, threads=1: _C.sparse24_conv2d(  # noqa: E731
        4, cols, sw.values.data_ptr(), sw.meta.data_ptr(), geometry, x.data_ptr(), 0, y.data_ptr(), threads)
    assert call(good) is False
    with pytest.raises(ValueError, match="expected C\\*kh\\*kw = 72"):
        call(good, cols=64)
    with pytest.raises(ValueError, match="bad geometry"):
        call((1, 8, 6, 6, -1, 1, 3, 3, 1, 1, 6, 6))
    with pytest.raises(ValueError, match="num_threads"):
        call(good, threads=0)
    with pytest.raises(ValueError, match="2\\^31"):
        call((1, 8, 1 << 15, 1 << 15, 1, 1, 3, 3, 1, 1, 1 << 15, 1 << 15))
