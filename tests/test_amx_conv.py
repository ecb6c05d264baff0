"""bfloat16 convs on the AMX tile unit (pyhwp/ops/amx_conv.py, csrc/common/amx_conv.h), for
every pattern: the tile layout (everywhere), then against float64 references where AMX runs:
sizes around the tiles (16 output channels, 32 input channels, 16-pixel blocks), padding,
dilation, batches, zero tiles, NaN/Inf, and the paths that decline; bfloat16 CSR convs without
AMX (the float32 implicit GEMM on widened copies)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import pyhwp
from helpers import BF16_ISAS, UNIT_ROUNDOFF, pattern_weight
from pyhwp._ext import _C
from pyhwp.ops.amx_conv import amx_conv_tiles

conv_mod = importlib.import_module("pyhwp.ops.conv2d")
HAS_AMX = "amx" in BF16_ISAS
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="needs AMX (Sapphire Rapids or later) and a build with it")


def test_tiles_layout():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 40, 3, 2, generator=g).bfloat16()
    w[:16, 32:] = 0  # a zero tile at (0, t, 1) for every tap
    w[0, 33, 1, 1] = -0.0  # -0.0 counts as zero
    tiles, nonzero = amx_conv_tiles(w)
    assert tiles.shape == (2, 6, 2, 16, 32) and tiles.dtype == torch.bfloat16 and tiles.is_contiguous()
    assert nonzero.shape == (2, 6, 2) and nonzero.dtype == torch.uint8
    for o in range(2):
        for t in range(6):
            r, s = divmod(t, 2)
            for c in range(2):
                block = torch.zeros(16, 32).bfloat16()  # (output channel, input channel)
                part = w[16 * o:16 * o + 16, 32 * c:32 * c + 32, r, s]
                block[:part.shape[0], :part.shape[1]] = part
                for q in range(16):  # row q: (channel 2q, channel 2q + 1) of every output channel
                    assert torch.equal(tiles[o, t, c, q].view(16, 2), block[:, 2 * q:2 * q + 2])
                assert nonzero[o, t, c] == (o == 1 or c == 0)


def _assert_close(y, x, w, bias, padding, dilation, stride=1):
    """One float32 summation (exact products) rounded once to bfloat16, as in
    helpers.assert_linear_close_bf16."""
    xd, wd = x.double(), w.double()
    bd = None if bias is None else bias.double()
    ref = F.conv2d(xd, wd, bd, stride, padding, dilation)
    mag = F.conv2d(xd.abs(), wd.abs(), None if bd is None else bd.abs(), stride, padding, dilation)
    n = w[0].numel() + 2
    u16, u32 = UNIT_ROUNDOFF[torch.bfloat16], UNIT_ROUNDOFF[torch.float32]
    tol = u16 * ref.abs() + (1 + u16) * n * u32 * mag + 1e-30
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3e}"


def _weight(shape, pattern, g):
    if pattern == "masked":  # 16x16 tiles of the (out, C*kh*kw) matrix, half of them zero
        w2 = pattern_weight((shape[0], shape[1] * shape[2] * shape[3]), "csr", 0.3, g)
        n, k = w2.shape
        keep = torch.rand(-(-n // 16), -(-k // 16), generator=g) >= 0.5
        w2 = w2 * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :k]
        return w2.reshape(shape).bfloat16()
    return pattern_weight(shape, pattern, generator=g).bfloat16()


@pytest.fixture
def amx_calls(monkeypatch):
    """Counts the AMX kernel's completed calls through conv2d."""
    done = []
    real = conv_mod.amx_conv2d_impl

    def counted(*args):
        y = real(*args)
        done.append(y is not None)
        return y

    monkeypatch.setattr(conv_mod, "amx_conv2d_impl", counted)
    return done


@needs_amx
@pytest.mark.parametrize("pattern", ["masked", "2:4", "csr"])
@pytest.mark.parametrize("out, c, k, size, padding, dilation, batch", [
    (64, 64, (3, 3), 14, 1, 1, 1),     # whole tiles
    (17, 33, (3, 3), 9, 1, 1, 2),      # a partial channel tile, an odd channel (half a pair)
    (40, 96, (5, 5), 11, 2, 1, 1),     # three channel blocks, 25 taps
    (32, 48, (3, 3), 10, 2, 2, 3),     # dilation, padding wider than the reach
    (16, 16, (3, 1), 7, 0, 1, 1),      # no padding, a non-square kernel
    (48, 64, (3, 3), 3, 1, 1, 2),      # a 3x3 image: one pixel group holds all of it
    (24, 8, (7, 7), 20, 3, 1, 1),      # fewer channels than a pair block
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(amx_calls, pattern, out, c, k, size, padding, dilation, batch, with_bias):
    g = torch.Generator().manual_seed(out * c + size)
    w = _weight((out, c, *k), pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(batch, c, size, size, generator=g).bfloat16()
    bias = torch.randn(out, generator=g).bfloat16() if with_bias else None
    y = pyhwp.conv2d(x, sw, bias, padding=padding, dilation=dilation)
    assert amx_calls == [True] and y.is_contiguous()
    _assert_close(y, x, w, bias, padding, dilation)
    # the fast path of the next identical call runs the same kernel
    assert torch.equal(pyhwp.conv2d(x, sw, bias, padding=padding, dilation=dilation), y)


@needs_amx
def test_zero_tiles_and_a_zero_weight(amx_calls):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, 3, 3, generator=g)
    w[:16] = 0  # a whole channel tile of zeros: every step of it skipped
    w[16:, 32:, 1, :] = 0  # zero tiles at three taps of the second block
    x = torch.randn(2, 64, 8, 8, generator=g).bfloat16()
    for weight in (w.bfloat16(), torch.zeros(32, 64, 3, 3).bfloat16()):
        y = pyhwp.conv2d(x, pyhwp.to_sparse(weight, "masked"), padding=1)
        _assert_close(y, x, weight, None, 1, 1)
    assert amx_calls == [True, True]


@needs_amx
@pytest.mark.parametrize("pattern", ["masked", "2:4", "csr"])
def test_nonfinite_inputs_take_the_exact_path(amx_calls, pattern):
    """NaN/Inf in x: the kernel declines (skipped zero tiles would drop 0 * Inf = NaN) and the
    im2col path propagates them as the dense conv does."""
    g = torch.Generator().manual_seed(4)
    w = _weight((32, 32, 3, 3), pattern, g)
    w[:, 5] = 0  # channel 5 stored nowhere
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(1, 32, 6, 6, generator=g).bfloat16()
    x[0, 5, 2, 3] = float("inf")
    y = pyhwp.conv2d(x, sw, padding=1)
    ref = F.conv2d(x.double(), w.double(), padding=1)
    assert amx_calls == [False]
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and bool(torch.isnan(y).any())
    assert torch.equal(torch.isinf(y), torch.isinf(ref))


@pytest.mark.parametrize("case", ["isa-capped", "float32", "autograd"])
def test_other_inputs_are_not_its_kind(case):
    w = _weight((16, 32, 3, 3), "masked", torch.Generator().manual_seed(5))
    x = torch.randn(1, 32, 6, 6).bfloat16()
    kernel = (3, 3)
    previous = _C.active_isa()
    try:
        if case == "isa-capped":
            _C.set_isa_cap("avx512" if HAS_AMX else previous)
        elif case == "float32":
            w, x = w.float(), x.float()
        elif case == "autograd":
            x.requires_grad_(True)
        sw = pyhwp.to_sparse(w, "masked")
        # (the masked float32 implicit GEMM, on float32 copies for bfloat16, but for the scalar
        # kernels: test_masked_conv.py)
        masked = case != "autograd" and _C.active_isa() != "scalar"
        assert conv_mod._implicit_kind(x, sw, None, kernel, (1, 1)) == ("masked" if masked else None)
        if case == "isa-capped" and HAS_AMX:
            _C.set_isa_cap("amx")
            assert conv_mod._implicit_kind(x, sw, None, kernel, (1, 1)) == "amx"
    finally:
        _C.set_isa_cap(previous)


@needs_amx
@pytest.mark.parametrize("pattern", ["masked", "2:4", "csr"])
@pytest.mark.parametrize("out, c, k, size, stride, padding, dilation, batch", [
    (32, 64, (3, 3), 14, (2, 2), 1, 1, 1),    # ResNet's downsampling 3x3
    (17, 33, (3, 3), 9, (2, 2), 1, 1, 2),     # odd sizes: phases of unequal size
    (24, 40, (7, 7), 15, (2, 2), 3, 1, 1),    # a 7x7 stem-like conv
    (16, 32, (3, 5), 12, (3, 1), (1, 2), 1, 1),  # a height stride of 3, width 1
    (16, 32, (3, 3), 13, (2, 2), 2, 2, 1),    # stride and dilation
    (16, 32, (2, 2), 8, (2, 2), 0, 1, 1),     # taps all in different phases
])
def test_strided_convs(amx_calls, pattern, out, c, k, size, stride, padding, dilation, batch):
    g = torch.Generator().manual_seed(out + c + size)
    w = _weight((out, c, *k), pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(batch, c, size, size, generator=g).bfloat16()
    bias = torch.randn(out, generator=g).bfloat16()
    y = pyhwp.conv2d(x, sw, bias, stride=stride, padding=padding, dilation=dilation)
    assert amx_calls == [True]
    _assert_close(y, x, w, bias, padding, dilation, stride)


def test_width_stride_above_2_and_groups_take_im2col(amx_calls):
    g = torch.Generator().manual_seed(6)
    w = _weight((16, 32, 3, 3), "masked", g)
    x = torch.randn(1, 32, 10, 10, generator=g).bfloat16()
    for stride, groups, weight in (((1, 3), 1, w), ((1, 1), 2, w[:, :16].contiguous())):
        y = pyhwp.conv2d(x, pyhwp.to_sparse(weight, "masked"), stride=stride, padding=1, groups=groups)
        ref = F.conv2d(x.double(), weight.double(), stride=stride, padding=1, groups=groups)
        torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    assert all(done is False for done in amx_calls)  # declined (width stride 3) or never asked


def test_kernel_reports_unavailable_when_capped():
    """Without the tile unit (capped below AMX, or not there) the kernel leaves y alone and says so."""
    w = torch.randn(16, 32, 3, 3).bfloat16()
    tiles, nonzero = amx_conv_tiles(w)
    x = torch.randn(1, 32, 5, 5).bfloat16()
    y = torch.full((1, 16, 5, 5), 7.0).bfloat16()
    previous = _C.active_isa()
    try:
        _C.set_isa_cap("avx512" if "avx512" in _C.build_info()["cpu_kernels"] else "scalar")
        status = _C.amx_conv2d_bf16(16, tiles.data_ptr(), nonzero.data_ptr(), (1, 32, 5, 5, 1, 1, 3, 3, 1, 1, 5, 5),
                                    False, x.data_ptr(), 0, y.data_ptr(), 1)
    finally:
        _C.set_isa_cap(previous)
    assert status == 2 and bool((y == 7).all())


@needs_amx
@pytest.mark.parametrize("c, stride", [(64, 1), (40, 2), (33, (2, 1))])
def test_channels_last_inputs_are_read_in_place(amx_calls, c, stride):
    """channels_last x: read and written in that layout (no conversions), the same values as the
    contiguous layout; and unbatched inputs."""
    g = torch.Generator().manual_seed(8 + c)
    w = _weight((20, c, 3, 3), "2:4", g)
    sw = pyhwp.to_sparse(w, "2:4")
    x = torch.randn(2, c, 9, 11, generator=g).bfloat16()
    bias = torch.randn(20, generator=g).bfloat16()
    xl = x.contiguous(memory_format=torch.channels_last)
    y = pyhwp.conv2d(xl, sw, bias, stride=stride, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, pyhwp.conv2d(x, sw, bias, stride=stride, padding=1))
    _assert_close(y, x, w, bias, 1, 1, stride)
    wd, bd = w.double(), bias.double()
    y1 = pyhwp.conv2d(x[1], sw, bias, stride=stride, padding=1)
    assert torch.equal(y1, y[1])
    assert amx_calls == [True, True, True]
    xl[1, 3, 4, 5] = float("nan")  # NaN in a channels_last x: the exact path, same layout
    y = pyhwp.conv2d(xl, sw, bias, stride=stride, padding=1)
    assert amx_calls[-1] is False and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(torch.isnan(y), torch.isnan(F.conv2d(xl.double(), wd, bd, stride, 1)))


@needs_amx
def test_reads_subnormal_inputs_as_zero(amx_calls):
    """As every AMX bfloat16 product (torch's dense one included): subnormal inputs count as zero."""
    w = torch.full((16, 32, 3, 3), 2.0**100).bfloat16()
    x = torch.zeros(1, 32, 4, 4)
    x[0, 0] = 2.0**-130  # subnormal in bfloat16
    y = pyhwp.conv2d(x.bfloat16(), pyhwp.to_sparse(w, "masked"), padding=1)
    assert amx_calls == [True] and torch.equal(y, torch.zeros(1, 16, 4, 4).bfloat16())


@pytest.mark.parametrize("with_bias", [False, True])
def test_csr_without_amx_widens_to_the_float32_implicit_gemm(monkeypatch, with_bias):
    """bfloat16 CSR k x k convs where AMX is not in use: the float32 implicit GEMM on float32
    copies, rounded once (exact bfloat16 products, float32 sums); NaN/Inf take the per-tap path."""
    calls = []
    real = conv_mod.csr_conv2d_impl

    def counted(x, *args):
        calls.append(x.dtype)
        return real(x, *args)

    monkeypatch.setattr(conv_mod, "csr_conv2d_impl", counted)
    g = torch.Generator().manual_seed(9)
    w = pattern_weight((20, 24, 3, 3), "csr", 0.8, g).bfloat16()
    sw = pyhwp.to_sparse(w, "csr")
    x = torch.randn(2, 24, 7, 7, generator=g).bfloat16()
    bias = torch.randn(20, generator=g).bfloat16() if with_bias else None
    previous = _C.active_isa()
    try:
        _C.set_isa_cap("avx512" if HAS_AMX else previous)
        assert conv_mod._implicit_kind(x, sw, bias, (3, 3), (1, 1)) == "csr"
        y = pyhwp.conv2d(x, sw, bias, padding=1, dilation=1)
        assert calls == [torch.float32]
        _assert_close(y, x, w, bias, 1, 1)
        assert torch.equal(pyhwp.conv2d(x, sw, bias, padding=1), y)  # the fast path, same kernel
        x[1, 3, 2, 2] = float("nan")
        y = pyhwp.conv2d(x, sw, bias, padding=1)
        ref = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), padding=1)
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
    finally:
        _C.set_isa_cap(previous)


@needs_amx
def test_large_batches_run_in_chunks(amx_calls):
    """The copy of the input is made a chunk of images at a time (at most 64 MiB): a 3-channel
    128x128 input padded to 32 channels takes 1.1 MB an image, so 64 images are two chunks."""
    g = torch.Generator().manual_seed(12)
    w = _weight((16, 3, 3, 3), "masked", g)
    x = torch.randn(64, 3, 128, 128, generator=g).bfloat16()
    y = pyhwp.conv2d(x, pyhwp.to_sparse(w, "masked"), padding=1)
    assert amx_calls == [True]
    for i in (0, 31, 61, 62, 63):  # both sides of the chunk boundary
        _assert_close(y[i:i + 1], x[i:i + 1], w, None, 1, 1)


@needs_amx
@pytest.mark.parametrize("pattern", ["masked", "2:4", "csr"])
@pytest.mark.parametrize("layout, stride", [("contiguous", 1), ("channels_last", 1), ("contiguous", 2)])
def test_1x1_convs(amx_calls, pattern, layout, stride):
    """2:4 and CSR 1x1 convs run on the tile unit too (faster than their matmul kernels there),
    masked ones keep the masked AMX matmul (which skips every zero 16x16 tile): contiguous or
    channels_last input, stride 2 on the subsampled pixels; the fast path of a repeated call."""
    g = torch.Generator().manual_seed(13)
    w = _weight((40, 64, 1, 1), pattern, g)
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(2, 64, 9, 10, generator=g).bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(40, generator=g).bfloat16()
    y = pyhwp.conv2d(x, sw, bias, stride=stride)
    assert amx_calls == ([] if pattern == "masked" else [True])
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    _assert_close(y, x, w, bias, 0, 1, stride)
    assert torch.equal(pyhwp.conv2d(x, sw, bias, stride=stride), y)
