"""The masked implicit-GEMM conv (csrc/masked/masked_conv2d_cpu.cpp): the AVX-512 wide and AVX2
narrow tile kernels reading x's padded planes through a table of offsets. Every ISA (the scalar one
falls back to im2col), strides, partial tiles, skipped tiles, threads, NaN/Inf, the fast path and
the kernel's status."""

from __future__ import annotations

import importlib

import pytest
import torch

import pyhwp
from pyhwp._ext import _C
from pyhwp.ops.masked import masked_conv2d_impl
from helpers import assert_conv_close

conv_mod = importlib.import_module("pyhwp.ops.conv2d")


def block_sparse(shape, keep, generator):
    """A conv weight whose (out, C*kh*kw) matrix keeps a fraction `keep` of its 16x16 tiles."""
    w = torch.randn(shape, generator=generator)
    out, k = shape[0], w[0].numel()
    tiles = torch.rand(-(-out // 16), -(-k // 16), generator=generator) < keep
    mask = tiles.repeat_interleave(16, 0).repeat_interleave(16, 1)[:out, :k]
    return (w.reshape(out, k) * mask).reshape(shape)


# (c_in, c_out, kernel, (h, w), stride, padding, dilation, batch, kept tiles)
CASES = [
    (64, 64, (3, 3), (20, 20), 1, 1, 1, 1, 0.25),     # K = 576: 36 k-tiles, a quarter stored
    (5, 20, (3, 3), (13, 11), 1, 1, 1, 2, 1.0),       # K = 45: a partial k-tile; a partial panel
    (8, 33, (5, 5), (17, 23), 1, 2, 1, 3, 0.5),       # three panels, the last one row
    (16, 48, (3, 3), (30, 30), 2, 1, 1, 1, 0.5),      # strided: the stride phases
    (3, 16, (7, 7), (40, 40), 2, 3, 1, 1, 1.0),       # a stem
    (12, 32, (3, 3), (18, 16), 1, 2, 2, 2, 0.5),      # dilated
    (16, 32, (3, 1), (12, 12), 1, (1, 0), 1, 1, 0.5),  # kw = 1: output rows straight into y
    (16, 64, (3, 3), (9, 9), 1, 1, 1, 4, 0.0),        # no stored tile: zeros plus bias
    (32, 16, (3, 3), (56, 56), 1, 1, 1, 1, 0.75),     # several column tiles (wide blocks of 1-3 vectors)
    (16, 32, (3, 1), (12, 12), 1, 0, 1, 2, 0.5),      # planes as in x (no copy), 120 pixels: a partial vector
    (8, 16, (3, 3), (15, 13), (1, 2), 1, (2, 1), 1, 0.5),  # width stride with height dilation
]


def _id(case):
    c_in, c_out, k, hw, stride, pad, dil, batch, keep = case
    return f"{c_in}-{c_out}-k{k[0]}x{k[1]}-{hw[0]}x{hw[1]}-s{stride}-p{pad}-d{dil}-b{batch}-t{keep}".replace(" ", "")


@pytest.fixture
def masked_calls(monkeypatch):
    """Counts the masked implicit-GEMM calls that ran (the kernel returned y), [0], and the calls
    conv2d's fast path served, [1]."""
    calls = [0, 0]
    real, real_fast = conv_mod.masked_conv2d_impl, conv_mod._FastConv.run

    def counted(*args, **kwargs):
        y = real(*args, **kwargs)
        calls[0] += y is not None
        return y

    def counted_fast(self, *args):
        calls[1] += 1
        return real_fast(self, *args)

    monkeypatch.setattr(conv_mod, "masked_conv2d_impl", counted)
    monkeypatch.setattr(conv_mod._FastConv, "run", counted_fast)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_dense_conv(isa, masked_calls, case, threads):
    c_in, c_out, kernel, hw, stride, padding, dilation, batch, keep = case
    g = torch.Generator().manual_seed(c_in * 31 + c_out + hw[1])
    w = block_sparse((c_out, c_in, *kernel), keep, g)
    sw, bias = pyhwp.to_sparse(w, "masked"), torch.randn(c_out, generator=g)
    x = torch.randn(batch, c_in, *hw, generator=g)
    stride2 = conv_mod._pair(stride, "stride")
    assert conv_mod._implicit_kind(x, sw, bias, kernel, stride2) == ("masked" if isa != "scalar" else None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = pyhwp.conv2d(x, sw, bias, stride, padding, dilation)
        y_fast = pyhwp.conv2d(x, sw, bias, stride, padding, dilation)
        y_nobias = pyhwp.conv2d(x, sw, None, stride, padding, dilation)
    finally:
        torch.set_num_threads(previous)
    # The AVX-512 and AVX2 kernels run it (the calls after the first through the fast path, whose
    # key leaves out the bias); the scalar ones take im2col.
    assert masked_calls == ([0, 0] if isa == "scalar" else [3, 2])
    assert torch.equal(y, y_fast)
    assert_conv_close(y, x, w, bias, stride, padding, dilation)
    assert_conv_close(y_nobias, x, w, None, stride, padding, dilation)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_inputs_propagate_like_dense(isa, value, stride):
    """x's NaN/Inf meet the skipped tiles' zeros in dense (0 * Inf = NaN): the kernel declines and
    the exact path gives dense's NaN/Inf pattern."""
    g = torch.Generator().manual_seed(5)
    w = block_sparse((32, 16, 3, 3), 0.4, g)
    sw = pyhwp.to_sparse(w, "masked")
    x = torch.randn(2, 16, 11, 11, generator=g)
    x[1, 3, 4, 5] = value
    y = pyhwp.conv2d(x, sw, None, stride, 1)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None, stride, 1)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(y[finite].double(), ref[finite], rtol=1e-4, atol=1e-4)


def test_pointwise_convs_keep_the_matmul():
    """1x1 convs without padding run the masked matmul on x's planes (no copy), not this kernel."""
    sw = pyhwp.to_sparse(torch.randn(32, 16, 1, 1), "masked")
    assert conv_mod._implicit_kind(torch.randn(1, 16, 8, 8), sw, None, (1, 1), (1, 1)) is None


def test_kernel_status():
    """0 done, 1 NaN/Inf in x, 2 where neither the AVX-512 nor the AVX2 kernels are in use (y
    untouched)."""
    g = torch.Generator().manual_seed(9)
    w = block_sparse((16, 8, 3, 3), 0.5, g)
    sw = pyhwp.to_sparse(w, "masked")
    geometry = (1, 8, 6, 6, 1, 1, 3, 3, 1, 1, 6, 6)
    x = torch.randn(1, 8, 6, 6, generator=g)
    args = (sw.tile_ptr, sw.tile_idx, sw.values, 16, geometry, None)
    if _C.active_isa() != "scalar":
        assert_conv_close(masked_conv2d_impl(x, *args), x, w, None, 1, 1)
        x_nan = x.clone()
        x_nan[0, 2, 3, 3] = float("nan")
        assert masked_conv2d_impl(x_nan, *args) is None
    previous = _C.active_isa()
    try:
        _C.set_isa_cap("scalar")
        y = torch.full((1, 16, 6, 6), 7.0)
        status = _C.masked_conv2d(16, 72, sw.tile_idx.shape[0], sw.tile_ptr.data_ptr(), sw.tile_idx.data_ptr(),
                                  sw.values.data_ptr(), geometry, x.data_ptr(), 0, y.data_ptr(), 1)
    finally:
        _C.set_isa_cap(previous)
    assert status == 2 and bool((y == 7).all())
    with pytest.raises(ValueError, match="columns"):
        _C.masked_conv2d(16, 70, sw.tile_idx.shape[0], sw.tile_ptr.data_ptr(), sw.tile_idx.data_ptr(),
                         sw.values.data_ptr(), geometry, x.data_ptr(), 0, y.data_ptr(), 1)
