"""CUDA kernels (csr_matmul_cuda, masked_matmul_cuda) against float64 CPU references: every dtype,
both operand layouts, tile edges, empty rows / zero tiles, poisoned outputs, non-finite inputs."""

from __future__ import annotations

import pytest
import torch

import pyhwp
from helpers import assert_linear_close_accum, random_sparse
from pyhwp._ext import _C
from pyhwp.formats.csr import CSRWeight, row_order_by_length
from pyhwp.ops.csr import CUDA_DTYPE_CODES
from pyhwp.ops.masked_cuda import masked_matmul_cuda, tile_flags

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Around the gather/tile switch (8) and the 16 / 32 / 64-column tiles of the CSR kernel, and the
# 64 / 128 block tiles of the masked kernel.
BATCHES = [1, 2, 5, 8, 9, 16, 17, 33, 64, 65, 129, 257]


def assert_close(y, x, w, bias=None, terms=None):
    """Float64 reference; float32 accumulation bound plus one rounding to y's dtype."""
    assert_linear_close_accum(y, x, w, bias, terms)


def _gen(*key):
    return torch.Generator().manual_seed(hash(key) % 2**31)


def _terms(w):
    return int((w != 0).sum(dim=1).max()) if w.numel() else 0


def _rand(shape, g, dtype):
    """Normal values rounded to `dtype` (the reference then sees exactly the kernel's inputs)."""
    return torch.randn(shape, generator=g).to(dtype)


def _conv_call(op, x, *args):
    """Run `op` in the conv layout: X (K, P) p-contiguous in, Y (N, P) contiguous out."""
    xc = x.t().contiguous()  # (K, P)
    y = op(xc.t(), *args, True)
    assert y.is_contiguous()
    return y.t()


# -- CSR -------------------------------------------------------------------------------------

def _csr_op(x2, sw, bias, transpose_out=False):
    return torch.ops.pyhwp.csr_matmul(x2, sw.row_offsets, sw.col_indices, sw.values, bias,
                                      transpose_out, sw.row_order)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (64, 64), (65, 127), (300, 200), (257, 1000)], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_csr_cuda_matches_reference(dtype, shape, sparsity):
    g = _gen("csr", dtype, shape, sparsity)
    w = random_sparse(shape, sparsity, g).to(dtype)
    sw = pyhwp.to_sparse(w.cuda(), "csr")
    bias = _rand(shape[0], g, dtype).cuda()
    for batch in BATCHES:
        x = _rand((batch, shape[1]), g, dtype).cuda()
        for b in (None, bias):
            assert_close(pyhwp.linear(x, sw, b), x, w, b, _terms(w))
            y = _conv_call(lambda xx, *a: _csr_op(xx, sw, b, *a), x)
            assert_close(y, x, w, b, _terms(w))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_csr_cuda_uneven_rows_and_empty_rows(dtype):
    # Rows from empty to dense: exercises the length order, long rows (many staged passes) and
    # rows whose output is the bias alone.
    g = _gen("uneven", dtype)
    n, k = 203, 700
    w = torch.zeros(n, k)
    lengths = torch.randint(0, k + 1, (n,), generator=g)
    lengths[::7] = 0
    lengths[3] = k
    for i in range(n):
        cols = torch.randperm(k, generator=g)[: int(lengths[i])]
        w[i, cols] = torch.randn(len(cols), generator=g)
    w = w.to(dtype)
    sw = pyhwp.to_sparse(w.cuda(), "csr")
    bias = _rand(n, g, dtype).cuda()
    for batch in (1, 3, 8, 40, 136):
        x = _rand((batch, k), g, dtype).cuda()
        assert_close(pyhwp.linear(x, sw, bias), x, w, bias, _terms(w))


def _raw_csr(sw, x, bias, y, y_sn, y_sp, dtype):
    p, k = x.shape
    n = sw.out_features
    code = CUDA_DTYPE_CODES[dtype]
    nbytes = _C.csr_matmul_cuda_workspace(n, k, sw.nnz, code, x.data_ptr(), p, x.stride(1), x.stride(0),
                                          y.data_ptr(), y_sn, y_sp)
    ws = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8, device="cuda")  # poisoned scratch too
    _C.csr_matmul_cuda(n, k, sw.nnz, sw.row_offsets.data_ptr(), sw.col_indices.data_ptr(),
                       sw.values.data_ptr(), sw.row_order.data_ptr(), code, x.data_ptr(), p, x.stride(1),
                       x.stride(0), 0 if bias is None else bias.data_ptr(), y.data_ptr(), y_sn, y_sp,
                       ws.data_ptr(), ws.numel(), torch.cuda.current_stream().cuda_stream)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("y_layout", ["pn", "np", "np_padded"])
def test_csr_cuda_writes_every_output_and_nothing_else(dtype, y_layout):
    g = _gen("poison", dtype, y_layout)
    n, k = 77, 150
    w = random_sparse((n, k), 0.8, g).to(dtype)
    w[5] = 0  # an empty row
    sw = pyhwp.to_sparse(w.cuda(), "csr")
    bias = _rand(n, g, dtype).cuda()
    for batch in (1, 7, 12, 40, 100):
        x = _rand((batch, k), g, dtype).cuda()
        # y (N, P) inside a NaN-filled buffer with spare columns: the spare ones must stay NaN.
        pad = 5 if y_layout == "np_padded" else 0
        if y_layout == "pn":
            buf = torch.full((batch, n), float("nan"), dtype=dtype, device="cuda")
            y, y_sn, y_sp = buf, 1, n
        else:
            buf = torch.full((n, batch + pad), float("nan"), dtype=dtype, device="cuda")
            y, y_sn, y_sp = buf, batch + pad, 1
        _raw_csr(sw, x, bias, y, y_sn, y_sp, dtype)
        torch.cuda.synchronize()
        out = buf if y_layout == "pn" else buf[:, :batch].t()
        assert not torch.isnan(out).any(), "some outputs were not written"
        if pad:
            assert torch.isnan(buf[:, batch:]).all(), "the kernel wrote outside y"
        assert_close(out, x, w, bias, _terms(w))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [
    lambda g, d: _rand((81, 33), g, d).cuda().t(),            # transposed: stride_p = 1
    lambda g, d: _rand((20, 162), g, d).cuda()[:, ::2],       # strided columns
    lambda g, d: _rand((1, 81), g, d).cuda().expand(40, 81),  # stride-0 rows
    lambda g, d: _rand((70, 83), g, d).cuda()[:, 1:82],       # start not 16-byte aligned
], ids=["transposed", "strided", "expanded", "misaligned"])
def test_csr_cuda_non_contiguous_input(dtype, make):
    g = _gen("strides", dtype)
    w = random_sparse((40, 81), 0.6, g).to(dtype)
    sw = pyhwp.to_sparse(w.cuda(), "csr")
    x = make(g, dtype)
    assert x.shape[1] == 81 and not x.is_contiguous()
    assert_close(pyhwp.linear(x, sw), x, w, terms=_terms(w))


def _nonfinite_x(batch, k, g, dtype):
    x = _rand((batch, k), g, dtype)
    x[0, 3] = float("nan")
    x[-1, 7] = float("inf")
    x[-1, 9] = float("-inf")
    return x


def _assert_nonfinite_like_dense(y, x, w, bias=None):
    ref = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double().cpu())
    y = y.double().cpu()
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_csr_cuda_nonfinite_inputs_propagate_like_dense(dtype):
    g = _gen("nonfinite", dtype)
    w = random_sparse((50, 40), 0.8, g).to(dtype)
    w[:, 7] = 0   # nobody stores column 7: its Inf becomes NaN everywhere (0 * Inf)
    w[0, 9] = 1.0  # row 0 stores column 9: -Inf there
    sw = pyhwp.to_sparse(w.cuda(), "csr")
    for batch in (1, 8, 20, 70):
        x = _nonfinite_x(batch, 40, g, dtype)
        _assert_nonfinite_like_dense(pyhwp.linear(x.cuda(), sw), x, w)
        y = _conv_call(lambda xx, *a: _csr_op(xx, sw, None, *a), x.cuda())
        _assert_nonfinite_like_dense(y, x, w)


def test_csr_cuda_any_row_order_and_none():
    g = _gen("order")
    w = random_sparse((90, 64), 0.7, g)
    base = pyhwp.to_sparse(w.cuda(), "csr")
    assert torch.equal(base.row_order.cpu(), row_order_by_length(base.row_offsets.cpu()))
    shuffled = CSRWeight(base.shape, base.row_offsets, base.col_indices, base.values,
                         torch.randperm(90, generator=g).to(torch.int32).cuda())
    unordered = CSRWeight._unchecked(base.shape, row_offsets=base.row_offsets,
                                     col_indices=base.col_indices, values=base.values)
    assert unordered.row_order is None
    for batch in (4, 48):
        x = torch.randn(batch, 64, generator=g).cuda()
        for sw in (shuffled, unordered):
            assert_close(pyhwp.linear(x, sw), x, w, terms=_terms(w))


def test_csr_cuda_large_batch_and_side_stream():
    g = _gen("large")
    w = random_sparse((1024, 2048), 0.9, g).half()
    sw = pyhwp.to_sparse(w.cuda(), "csr")
    x = _rand((256, 2048), g, torch.float16).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = pyhwp.linear(x, sw)
    torch.cuda.current_stream().wait_stream(s)
    assert_close(y, x, w, terms=_terms(w))


def test_csr_cuda_empty_batch_weight_and_k():
    sw = pyhwp.to_sparse(torch.zeros(5, 4, device="cuda"), "csr")
    assert pyhwp.linear(torch.randn(0, 4, device="cuda"), sw).shape == (0, 5)
    for batch in (3, 30):
        y = pyhwp.linear(torch.randn(batch, 4, device="cuda"), sw, torch.ones(5, device="cuda"))
        assert torch.equal(y.cpu(), torch.ones(batch, 5))


def test_csr_cuda_to_dense_and_round_trip_every_dtype():
    for dtype in DTYPES:
        w = random_sparse((300, 129), 0.9, _gen("rt", dtype)).to(dtype)
        sw = pyhwp.to_sparse(w.cuda(), "csr")
        assert sw.row_offsets.is_cuda and sw.row_order.is_cuda and sw.values.dtype == dtype
        assert torch.equal(sw.to_dense().cpu(), w)


def test_csr_cuda_bad_dtype():
    sw = pyhwp.to_sparse(torch.randn(6, 5, dtype=torch.float64, device="cuda"), "csr")
    with pytest.raises(TypeError, match="float64"):
        pyhwp.linear(torch.randn(2, 5, dtype=torch.float64, device="cuda"), sw)


# -- masked ----------------------------------------------------------------------------------

def _block_sparse(shape, zero_tiles, g, dtype):
    """Normal weights with a fraction `zero_tiles` of its 16x16 tiles all zero, and a few zeros
    sprinkled inside the kept tiles."""
    n, k = shape
    fr, fc = -(-n // 16), -(-k // 16)
    keep = torch.rand(fr, fc, generator=g) >= zero_tiles
    mask = keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :k]
    w = torch.randn(shape, generator=g) * mask
    w[torch.rand(shape, generator=g) < 0.1] = 0
    return w.to(dtype)


def _masked(x, w, flags, bias, transpose_out=False):
    return masked_matmul_cuda(x, w, flags, bias, transpose_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (17, 33), (64, 64), (127, 129), (129, 200), (300, 520)],
                         ids=str)
@pytest.mark.parametrize("zero_tiles", [0.0, 0.5, 0.9, 1.0])
def test_masked_cuda_matches_reference(dtype, shape, zero_tiles):
    g = _gen("masked", dtype, shape, zero_tiles)
    w = _block_sparse(shape, zero_tiles, g, dtype)
    wc = w.cuda()
    flags = tile_flags(wc)
    bias = _rand(shape[0], g, dtype).cuda()
    for batch in [1, 7, 8, 63, 64, 65, 128, 129, 300]:
        x = _rand((batch, shape[1]), g, dtype).cuda()
        for b in (None, bias):
            assert_close(_masked(x, wc, flags, b), x, w, b)
            y = _conv_call(lambda xx, *a: _masked(xx, wc, flags, b, *a), x)
            assert_close(y, x, w, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cuda_flags_may_overstate(dtype):
    # All-ones flags on a block-sparse weight: every tile computed, same result.
    g = _gen("overstate", dtype)
    w = _block_sparse((100, 96), 0.7, g, dtype).cuda()
    ones = torch.ones_like(tile_flags(w))
    x = _rand((70, 96), g, dtype).cuda()
    assert_close(_masked(x, w, ones, None), x, w.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("big", [False, True], ids=["small-tiles", "big-tiles"])
def test_masked_cuda_large_both_forms(dtype, big):
    # Big enough for the 128x128 block tiles in both forms (blocks >= multiprocessors).
    g = _gen("masked-large", dtype, big)
    n, k, batch = (2048, 256, 2048) if big else (512, 384, 200)
    w = _block_sparse((n, k), 0.5, g, dtype)
    wc = w.cuda()
    flags = tile_flags(wc)
    x = _rand((batch, k), g, dtype).cuda()
    assert_close(_masked(x, wc, flags, None), x, w)
    y = _conv_call(lambda xx, *a: _masked(xx, wc, flags, None, *a), x)
    assert_close(y, x, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cuda_long_k_spans_several_step_windows(dtype):
    # K beyond MaskedCudaConfig::kStepWindow k-steps (1024 x 32 on tensor cores, 1024 x 8 SIMT).
    g = _gen("longk", dtype)
    k = 33_000 if dtype != torch.float32 else 8_300
    w = _block_sparse((40, k), 0.5, g, dtype)
    wc = w.cuda()
    x = _rand((24, k), g, dtype).cuda()
    assert_close(_masked(x, wc, tile_flags(wc), None), x, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cuda_unaligned_operands_take_the_copy_path(dtype):
    g = _gen("unaligned", dtype)
    n, k = 45, 37  # rows of 37 elements: not 16-byte multiples
    w = _block_sparse((n, k), 0.3, g, dtype)
    wc = w.cuda()
    flags = tile_flags(wc)
    big = _rand((30, k + 1), g, dtype).cuda()
    for x in (big[:, 1:], big[:, :k], big[::2, 1:].t().contiguous().t()):
        assert_close(_masked(x, wc, flags, None), x, w)
    # W as a column slice of a wider, aligned buffer (row stride 48, a multiple of 8).
    wide = torch.zeros(n, 48, dtype=dtype, device="cuda")
    wide[:, :k] = wc
    x = _rand((19, k), g, dtype).cuda()
    assert_close(_masked(x, wide[:, :k], flags, None), x, w)


def _raw_masked(w, flags, x, bias, y, y_sn, y_sp, dtype):
    p, k = x.shape
    n = w.shape[0]
    code = CUDA_DTYPE_CODES[dtype]
    nbytes = _C.masked_matmul_cuda_workspace(n, k, w.data_ptr(), w.stride(0), code, x.data_ptr(), p,
                                             x.stride(1), x.stride(0), y.data_ptr(), y_sn, y_sp)
    ws = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8, device="cuda")
    _C.masked_matmul_cuda(n, k, w.data_ptr(), w.stride(0), flags.data_ptr(), code, x.data_ptr(), p,
                          x.stride(1), x.stride(0), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                          y_sn, y_sp, ws.data_ptr(), ws.numel(), torch.cuda.current_stream().cuda_stream)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("y_layout", ["pn", "np_padded"])
def test_masked_cuda_writes_every_output_and_nothing_else(dtype, y_layout):
    g = _gen("masked-poison", dtype, y_layout)
    n, k = 150, 96
    w = _block_sparse((n, k), 0.6, g, dtype)
    w[16:32] = 0  # a whole tile row of zeros: its outputs are the bias alone
    wc = w.cuda()
    flags = tile_flags(wc)
    bias = _rand(n, g, dtype).cuda()
    for batch in (1, 9, 64, 130):
        x = _rand((batch, k), g, dtype).cuda()
        if y_layout == "pn":
            buf = torch.full((batch, n), float("nan"), dtype=dtype, device="cuda")
            _raw_masked(wc, flags, x, bias, buf, 1, n, dtype)
            out = buf
        else:
            buf = torch.full((n, batch + 3), float("nan"), dtype=dtype, device="cuda")
            _raw_masked(wc, flags, x, bias, buf, batch + 3, 1, dtype)
            out = buf[:, :batch].t()
        torch.cuda.synchronize()
        assert not torch.isnan(out).any(), "some outputs were not written"
        if y_layout != "pn":
            assert torch.isnan(buf[:, batch:]).all(), "the kernel wrote outside y"
        assert_close(out, x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cuda_nonfinite_inputs_propagate_like_dense(dtype):
    g = _gen("masked-nonfinite", dtype)
    w = _block_sparse((50, 40), 0.5, g, dtype)
    w[:16, :16] = 0   # a zero tile that the kernel skips
    w[16:32, 16:32] = 0
    wc = w.cuda()
    flags = tile_flags(wc)
    for batch in (1, 20, 70):
        x = _nonfinite_x(batch, 40, g, dtype)
        _assert_nonfinite_like_dense(_masked(x.cuda(), wc, flags, None), x, w)
        y = _conv_call(lambda xx, *a: _masked(xx, wc, flags, None, *a), x.cuda())
        _assert_nonfinite_like_dense(y, x, w)


def test_masked_cuda_bad_input():
    w = torch.randn(20, 32, device="cuda")
    flags = tile_flags(w)
    x = torch.randn(3, 32, device="cuda")
    with pytest.raises(ValueError, match="tile_flags"):
        masked_matmul_cuda(x, w, flags[:, :1], None)
    with pytest.raises(TypeError, match="dtype"):
        masked_matmul_cuda(x.half(), w, flags, None)
    with pytest.raises(ValueError, match="runs on CUDA"):
        masked_matmul_cuda(x.cpu(), w.cpu(), flags.cpu(), None)
    with pytest.raises(TypeError, match="float64"):
        masked_matmul_cuda(x.double(), w.double(), flags, None)




def test_interleaved_cuda_medians_reports_every_function():
    from pyhwp.bench.timing import interleaved_cuda_medians
    a = torch.randn(256, 256, device="cuda")
    t = interleaved_cuda_medians({"mm": lambda: a @ a, "add": lambda: a + a}, min_reps=3, max_reps=5)
    assert set(t) == {"mm", "add"} and all(v > 0 for v in t.values())
