"""Strided k x k convs on the CPU implicit GEMMs (CSR and 2:4): the input copied as stride phases
(csrc/common/conv_geometry.h), every ISA and thread count, the padding and its edges, NaN/Inf, the
fast path, plans per stride, and the geometry the extension accepts."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

import pyhwp
from pyhwp._ext import _C
from helpers import assert_conv_close, pattern_weight

conv_mod = importlib.import_module("pyhwp.ops.conv2d")

# (c_in, c_out, kernel, (h, w), stride, padding, dilation, batch)
CASES = [
    (16, 24, (3, 3), (14, 14), 2, 1, 1, 1),        # the ResNet downsampling conv, even input
    (8, 20, (3, 3), (15, 13), 2, 1, 1, 2),         # odd sizes: the last phase row and column short
    (3, 16, (7, 7), (22, 22), 2, 3, 1, 1),         # a stem: 3 channels, wide padding
    (8, 12, (3, 3), (17, 19), 3, 0, 1, 2),         # stride 3, no padding (input columns left unread)
    (8, 12, (3, 3), (16, 11), (2, 1), 1, 1, 1),    # height stride only
    (8, 12, (3, 5), (9, 20), (1, 2), (1, 2), 1, 1),  # width stride only, a wide kernel
    (8, 12, (3, 3), (20, 20), 2, 2, 2, 1),         # dilation 2 with stride 2: taps share a phase
    (4, 8, (2, 2), (12, 12), 2, 0, 1, 3),          # kernel = stride: no tap reaches a next column
    (12, 40, (5, 5), (30, 26), (3, 2), 2, 1, 1),   # several column tiles and K blocks
    (8, 8, (3, 3), (6, 6), 4, 1, 1, 2),            # stride above the kernel: phases never read
    (32, 64, (3, 3), (28, 28), 2, 1, 1, 1),        # enough work for both threads, one image: rows split
]


def _id(case):
    c_in, c_out, k, hw, stride, pad, dil, batch = case
    return f"{c_in}-{c_out}-k{k[0]}x{k[1]}-{hw[0]}x{hw[1]}-s{stride}-p{pad}-d{dil}-b{batch}".replace(" ", "")


@pytest.fixture
def implicit_calls(monkeypatch):
    """Counts the CPU implicit-GEMM kernel calls that ran (returned y), by pattern, and the calls
    conv2d's fast path served ("fast")."""
    calls = {"csr": 0, "2:4": 0, "masked": 0, "fast": 0}
    real_fast = conv_mod._FastConv.run

    def counted_fast(self, *args):
        calls["fast"] += 1
        return real_fast(self, *args)

    monkeypatch.setattr(conv_mod._FastConv, "run", counted_fast)

    def counted(name, real):
        def call(*args, **kwargs):
            y = real(*args, **kwargs)
            calls[name] += y is not None
            return y
        return call

    for name, attr in (("csr", "csr_conv2d_impl"), ("2:4", "sparse24_conv2d_impl"), ("masked", "masked_conv2d_impl")):
        monkeypatch.setattr(conv_mod, attr, counted(name, getattr(conv_mod, attr)))
    return calls


@contextlib.contextmanager
def _threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pattern", ["csr", "2:4"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_dense_conv(isa, implicit_calls, case, pattern, threads):
    c_in, c_out, kernel, hw, stride, padding, dilation, batch = case
    g = torch.Generator().manual_seed(c_in * 31 + c_out + hw[0])
    w = pattern_weight((c_out, c_in, *kernel), pattern, 0.7, generator=g)
    sw, bias = pyhwp.to_sparse(w, pattern), torch.randn(c_out, generator=g)
    x = torch.randn(batch, c_in, *hw, generator=g)
    with _threads(threads):
        y = pyhwp.conv2d(x, sw, bias, stride, padding, dilation)
        y_fast = pyhwp.conv2d(x, sw, bias, stride, padding, dilation)  # the remembered call
        y_nobias = pyhwp.conv2d(x, sw, None, stride, padding, dilation)
    assert implicit_calls[pattern] == 3 and implicit_calls["fast"] == 2  # (the fast path's key leaves out the bias)
    assert torch.equal(y, y_fast)
    assert_conv_close(y, x, w, bias, stride, padding, dilation)
    assert_conv_close(y_nobias, x, w, None, stride, padding, dilation)


@pytest.mark.parametrize("pattern", ["csr", "2:4"])
def test_unbatched_and_channels_last_inputs(implicit_calls, pattern):
    g = torch.Generator().manual_seed(17)
    w = pattern_weight((16, 8, 3, 3), pattern, 0.7, generator=g)
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(2, 8, 13, 12, generator=g)
    assert_conv_close(pyhwp.conv2d(x[0], sw, None, 2, 1)[None], x[:1], w, None, 2, 1)
    y = pyhwp.conv2d(x.contiguous(memory_format=torch.channels_last), sw, None, 2, 1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_conv_close(y, x, w, None, 2, 1)
    assert implicit_calls[pattern] == 2


@pytest.mark.parametrize("pattern", ["csr", "2:4"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [(0, 0), (5, 6), (12, 12)], ids=["corner", "inside", "last"])
def test_nonfinite_inputs_propagate_like_dense(pattern, value, where):
    """A NaN/Inf anywhere in x (the phase copy sees every pixel the conv reads) gives dense's
    NaN/Inf pattern: 0 * Inf = NaN from the pruned weights included."""
    g = torch.Generator().manual_seed(23)
    w = pattern_weight((12, 4, 3, 3), pattern, 0.7, generator=g)
    w[:, :, 1, 1] = 0  # pruned taps that dense still multiplies
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(2, 4, 13, 13, generator=g)
    x[1, 2, where[0], where[1]] = value
    y = pyhwp.conv2d(x, sw, None, 2, 1)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None, 2, 1)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(y[finite].double(), ref[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pattern", ["csr", "2:4", "masked"])
def test_bfloat16_without_amx(isa, implicit_calls, pattern, stride):
    """bfloat16 k x k convs without the tile unit run the float32 implicit GEMMs on float32 copies,
    each output rounded once (the masked one but with the scalar kernels)."""
    if conv_mod.amx_available():
        pytest.skip("the AMX conv serves bfloat16 here (test_amx_conv.py)")
    g = torch.Generator().manual_seed(29)
    w = pattern_weight((16, 8, 3, 3), pattern, 0.8, generator=g).bfloat16()
    x = torch.randn(2, 8, 15, 15, generator=g).bfloat16()
    bias = torch.randn(16, generator=g).bfloat16()
    y = pyhwp.conv2d(x, pyhwp.to_sparse(w, pattern), bias, stride, 1)
    assert implicit_calls[pattern] == (0 if pattern == "masked" and isa == "scalar" else 1)
    assert_conv_close(y, x, w, bias, stride, 1)


def test_plans_are_per_stride():
    """One cached plan per geometry, stride included: alternating strides use the right one."""
    g = torch.Generator().manual_seed(31)
    w = pattern_weight((20, 8, 3, 3), "csr", 0.7, generator=g)
    sw = pyhwp.to_sparse(w, "csr")
    x = torch.randn(1, 8, 12, 12, generator=g)
    for stride in [1, 2, (2, 1), 3, 2, 1, (2, 1)]:
        assert_conv_close(pyhwp.conv2d(x, sw, None, stride, 1), x, w, None, stride, 1)


def test_extension_geometry_checks():
    """The geometry tuple has 12 entries (stride 1) or 14; a stride below 1 is refused."""
    sw = pyhwp.to_sparse(pattern_weight((4, 8, 3, 3), "2:4"), "2:4")
    x = torch.randn(1, 8, 6, 6)
    y = torch.empty(1, 4, 3, 3)

    def call(geometry):
        return _C.sparse24_conv2d(4, 72, sw.values.data_ptr(), sw.meta.data_ptr(), geometry, x.data_ptr(), 0,
                                  y.data_ptr(), 1)

    with pytest.raises(ValueError, match="12 or 14"):
        call((1, 8, 6, 6, 1, 1, 3, 3, 1, 1, 3, 3, 2))
    with pytest.raises(ValueError, match="bad geometry"):
        call((1, 8, 6, 6, 1, 1, 3, 3, 1, 1, 3, 3, 0, 2))
    assert call((1, 8, 6, 6, 1, 1, 3, 3, 1, 1, 3, 3, 2, 2)) is False
    assert_conv_close(y, x, sw.to_dense(), None, 2, 1)
