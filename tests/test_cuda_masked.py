"""The masked pattern on CUDA through pyhwp.linear / pyhwp.conv2d: MaskedWeight's stored tiles read
in place by the CUDA kernel through its tile map, against float64 CPU references; every dtype,
both operand layouts, zero tiles / rows / whole matrices, odd sizes, NaN/Inf, conv cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyhwp
from helpers import assert_linear_close_accum
from pyhwp.formats.masked import MaskedWeight, tiles_from_dense
from pyhwp.kernels import find_kernel
from test_cuda_kernels import _assert_nonfinite_like_dense, _block_sparse, _conv_call, _gen, _nonfinite_x, _rand

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}


def _op(x2, mw, bias, transpose_out=False, tile_map="weight"):
    tm = mw.kernel_tile_map if tile_map == "weight" else tile_map
    return torch.ops.pyhwp.masked_matmul(x2, mw.tile_ptr, mw.tile_idx, mw.values, mw.mask_bits, bias,
                                         transpose_out, tm)


def test_find_kernel_resolves_masked_on_cuda():
    for op in ("linear", "conv2d"):
        for dt in DTYPES:
            assert find_kernel(op, "masked", torch.device("cuda"), dt).name == "masked_matmul_cuda"
        assert find_kernel(op, "masked", torch.device("cuda"), torch.float64).name == "masked_matmul_torch_cuda"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (17, 33), (64, 64), (127, 129), (129, 200), (300, 520)],
                         ids=str)
@pytest.mark.parametrize("zero_tiles", [0.0, 0.5, 0.9, 1.0])
def test_masked_linear_cuda_matches_reference(dtype, shape, zero_tiles):
    g = _gen("masked-linear", dtype, shape, zero_tiles)
    w = _block_sparse(shape, zero_tiles, g, dtype)
    mw = pyhwp.to_sparse(w.cuda(), "masked")
    assert mw.kernel_tile_map is not None and mw.kernel_tile_map.is_cuda
    bias = _rand(shape[0], g, dtype).cuda()
    for batch in [1, 7, 8, 63, 64, 65, 128, 129, 300]:
        x = _rand((batch, shape[1]), g, dtype).cuda()
        for b in (None, bias):
            assert_linear_close_accum(pyhwp.linear(x, mw, b), x, w, b)
            assert_linear_close_accum(_conv_call(lambda xx, *a: _op(xx, mw, b, *a), x), x, w, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cuda_zero_rows_and_whole_zero_matrix(dtype):
    g = _gen("masked-zero", dtype)
    w = _block_sparse((70, 90), 0.3, g, dtype)
    w[16:32] = 0  # a whole panel stores no tile: its outputs are the bias alone
    w[40] = 0     # one zero row inside stored tiles
    bias = _rand(70, g, dtype)
    x = _rand((33, 90), g, dtype)
    for weight in (w, torch.zeros_like(w)):
        mw = pyhwp.to_sparse(weight.cuda(), "masked")
        y = pyhwp.linear(x.cuda(), mw, bias.cuda())
        assert_linear_close_accum(y, x.cuda(), weight, bias)
    mw = pyhwp.to_sparse(torch.zeros(70, 90, dtype=dtype, device="cuda"), "masked")
    assert mw.ntiles == 0 and mw.values.numel() == 0
    assert torch.equal(pyhwp.linear(x.cuda(), mw).cpu(), torch.zeros(33, 70, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("big", [False, True], ids=["small-tiles", "big-tiles"])
def test_masked_cuda_large_both_forms(dtype, big):
    g = _gen("masked-tiled-large", dtype, big)
    n, k, batch = (2048, 256, 2048) if big else (512, 384, 200)
    w = _block_sparse((n, k), 0.5, g, dtype)
    mw = pyhwp.to_sparse(w.cuda(), "masked")
    x = _rand((batch, k), g, dtype).cuda()
    assert_linear_close_accum(pyhwp.linear(x, mw), x, w)
    assert_linear_close_accum(_conv_call(lambda xx, *a: _op(xx, mw, None, *a), x), x, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cuda_long_k_and_strided_x(dtype):
    g = _gen("masked-tiled-longk", dtype)
    k = 33_000 if dtype != torch.float32 else 8_300  # several step windows of the kernel
    w = _block_sparse((40, k), 0.5, g, dtype)
    mw = pyhwp.to_sparse(w.cuda(), "masked")
    x = _rand((24, k), g, dtype).cuda()
    assert_linear_close_accum(pyhwp.linear(x, mw), x, w)
    big = _rand((30, k + 1), g, dtype).cuda()
    for xs in (big[:, 1:], big[::2, :k]):  # misaligned rows / strided rows: x copied by the kernel
        assert_linear_close_accum(pyhwp.linear(xs, mw), xs, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cuda_tile_map_built_per_call_and_misaligned_values(dtype):
    g = _gen("masked-nomap", dtype)
    w = _block_sparse((45, 70), 0.4, g, dtype)
    mw = pyhwp.to_sparse(w.cuda(), "masked")
    x = _rand((20, 70), g, dtype).cuda()
    assert_linear_close_accum(_op(x, mw, None, False, None), x, w)  # op builds the map
    # values as an unaligned view (offset by one element) is copied to an aligned buffer first
    flat = torch.cat([mw.values.new_zeros(1), mw.values.reshape(-1)])
    shifted = flat[1:].view_as(mw.values)
    y = torch.ops.pyhwp.masked_matmul(x, mw.tile_ptr, mw.tile_idx, shifted, mw.mask_bits, None, False,
                                      mw.kernel_tile_map)
    assert_linear_close_accum(y, x, w)
    with pytest.raises(ValueError, match="tile_map"):
        _op(x, mw, None, False, mw.kernel_tile_map[:, :1])


def test_masked_cuda_weight_moves_and_counts_its_map():
    w = _block_sparse((50, 70), 0.5, _gen("masked-move"), torch.float16)
    cpu = pyhwp.to_sparse(w, "masked")
    gpu = cpu.to("cuda")
    assert isinstance(gpu, MaskedWeight) and cpu.kernel_tile_map is None
    m = gpu.kernel_tile_map
    assert m.shape == (4, 5) and torch.equal((m >= 0).cpu(), cpu.tile_flags().bool())
    assert gpu.nbytes == cpu.nbytes + m.numel() * 4
    x = _rand((9, 70), _gen("masked-move-x"), torch.float16)
    assert_linear_close_accum(pyhwp.linear(x.cuda(), gpu), x.cuda(), w)
    out = torch.full((9, 50), float("nan"), dtype=torch.float16, device="cuda")
    pyhwp.linear(x.cuda(), gpu, out=out)
    assert_linear_close_accum(out, x.cuda(), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cuda_nonfinite_inputs_propagate_like_dense(dtype):
    g = _gen("masked-tiled-nonfinite", dtype)
    w = _block_sparse((50, 40), 0.5, g, dtype)
    w[:16, :16] = 0   # tiles that are not stored
    w[16:32, 16:32] = 0
    w[33, :] = 0      # a zero row inside stored tiles: 0 * Inf computed for real
    mw = pyhwp.to_sparse(w.cuda(), "masked")
    for batch in (1, 20, 70):
        x = _nonfinite_x(batch, 40, g, dtype)
        _assert_nonfinite_like_dense(pyhwp.linear(x.cuda(), mw), x, w)
        _assert_nonfinite_like_dense(_conv_call(lambda xx, *a: _op(xx, mw, None, *a), x.cuda()), x, w)


def test_masked_cuda_gradients_match_the_cpu():
    g = _gen("masked-grad")
    w = _block_sparse((40, 48), 0.5, g, torch.float32)
    mw = pyhwp.to_sparse(w.cuda(), "masked")
    values = mw.values.clone().requires_grad_()
    x = _rand((6, 48), g, torch.float32).cuda().requires_grad_()
    y = torch.ops.pyhwp.masked_matmul(x, mw.tile_ptr, mw.tile_idx, values, mw.mask_bits, None, False,
                                      mw.kernel_tile_map)
    y.square().sum().backward()
    wd = w.cuda().requires_grad_()
    xd = x.detach().clone().requires_grad_()
    F.linear(xd, wd).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-4, atol=1e-4)
    keep = (w != 0).cuda()  # to_sparse keeps the non-zeros: their gradient, zero elsewhere
    expected = tiles_from_dense(wd.grad * keep, mw.tile_ptr, mw.tile_idx)
    torch.testing.assert_close(values.grad, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(shape=(16, 8, 3, 3), x=(2, 8, 9, 9), padding=1),
    dict(shape=(40, 16, 1, 1), x=(2, 16, 7, 7), padding=0),
    dict(shape=(24, 6, 3, 3), x=(1, 12, 8, 8), padding=1, groups=2),
    dict(shape=(20, 5, 3, 3), x=(3, 5, 11, 10), padding=2, stride=2, dilation=2),
    dict(shape=(33, 7, 5, 5), x=(2, 7, 13, 12), padding="same"),
], ids=["3x3", "1x1", "grouped", "strided", "5x5-same"])
def test_masked_cuda_conv2d(dtype, case):
    g = _gen("masked-conv", dtype, str(case))
    case = dict(case)
    shape = case.pop("shape")
    w2 = _block_sparse((shape[0], shape[1] * shape[2] * shape[3]), 0.5, g, dtype)
    w = w2.view(shape)
    x = torch.randn(case.pop("x"), generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    sw = pyhwp.to_sparse(w.cuda(), "masked")
    y = pyhwp.conv2d(x.cuda(), sw, bias.cuda(), **case)
    ref = F.conv2d(x.double(), w.double(), bias.double(), **case)
    mag = F.conv2d(x.double().abs(), w.double().abs(), bias.double().abs(), **case)
    tol = 4 * (w[0].numel() + 2) * 2**-24 * mag + 2 * U[dtype] * ref.abs() + 1e-30
    assert y.shape == ref.shape and ((y.double().cpu() - ref).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cuda_conv2d_nonfinite_like_dense(dtype):
    g = _gen("masked-conv-nonfinite", dtype)
    w = _block_sparse((16, 8 * 9), 0.5, g, dtype).view(16, 8, 3, 3)
    x = torch.randn(2, 8, 6, 6, generator=g).to(dtype)
    x[0, 1, 2, 3] = float("inf")
    x[1, 4, 0, 0] = float("nan")
    y = pyhwp.conv2d(x.cuda(), pyhwp.to_sparse(w.cuda(), "masked"), padding=1).double().cpu()
    ref = F.conv2d(x.double(), w.double(), padding=1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
