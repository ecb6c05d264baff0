"""csr_matmul's work paths: K blocks, column-tile parallelism, transposed tiles, 16/32-bit
indices, conv layouts (aligned or not) and bfloat16, each against a float64 reference."""

from __future__ import annotations

import pytest
import torch

import pyhwp
from helpers import UNIT_ROUNDOFF, assert_linear_close, random_sparse
from pyhwp._ext import _C


def _terms(sw):
    return int(sw.row_offsets.diff().max()) if sw.out_features else 0


@pytest.mark.parametrize("n, k, sparsity, batch", [
    (40, 2100, 0.95, 130),   # 128-wide tiles, X panel over 1 MiB: two K blocks, accumulate
    (33, 4200, 0.97, 70),    # K blocks with a partial last tile
    (24, 300, 0.8, 600),     # many column tiles, few rows: tiles spread over threads
    (70, 90, 0.5, 129),      # one full 128 tile plus a 1-column tile
])
def test_tile_paths(isa, n, k, sparsity, batch):
    g = torch.Generator().manual_seed(n * k + batch)
    w = random_sparse((n, k), sparsity, g)
    sw = pyhwp.to_sparse(w, "csr")
    x = torch.randn(batch, k, generator=g)
    bias = torch.randn(n, generator=g)
    assert_linear_close(pyhwp.linear(x, sw, bias), x, w, bias, _terms(sw))


@pytest.mark.parametrize("batch", [16, 9, 40])
def test_resident_weights_skip_only_the_prefetches(isa, batch):
    """CsrMatrix::resident (W expected in cache) only drops the 16-column kernel's software
    prefetches: the raw kernel gives the same bits either way, and the reference."""
    g = torch.Generator().manual_seed(31 + batch)
    w = random_sparse((300, 500), 0.9, g)
    sw = pyhwp.to_sparse(w, "csr")
    x = torch.randn(batch, 500, generator=g)
    bias = torch.randn(300, generator=g)
    ro, ci, v = sw.row_offsets, sw.kernel_col_indices, sw.values
    ys = []
    for resident in (False, True):
        y = torch.empty(batch, 300)
        _C.csr_matmul(300, 500, v.numel(), ro.data_ptr(), 0, v.data_ptr(), x.data_ptr(), batch, 1, 500,
                      bias.data_ptr(), y.data_ptr(), 1, 300, 2, ci.data_ptr(), 0, resident)
        ys.append(y)
    assert torch.equal(ys[0], ys[1])
    assert_linear_close(ys[0], x, w, bias, _terms(sw))


def test_kernel_resident_counts_live_weights_once(monkeypatch):
    """kernel_resident: the live CSR weights' kernel bytes against sell_budget_bytes(); a module's
    weight shares its storage with the to_sparse weight it came from and counts once."""
    import gc

    from pyhwp.formats import csr as csr_format

    gc.collect()
    g = torch.Generator().manual_seed(33)
    sw = pyhwp.to_sparse(random_sparse((64, 96), 0.5, g), "csr")
    before = csr_format.live_kernel_bytes()
    layer = pyhwp.nn.SparseLinear(sw, None, requires_grad=False)
    assert layer.weight is not sw and layer.weight.values.data_ptr() == sw.values.data_ptr()
    assert csr_format.live_kernel_bytes() == before
    other = pyhwp.to_sparse(random_sparse((64, 96), 0.5, g), "csr")
    assert csr_format.live_kernel_bytes() == before + other.nnz * (4 + 2) + 8 * 65
    monkeypatch.setattr(csr_format, "sell_budget_bytes", lambda: csr_format.live_kernel_bytes())
    assert sw.kernel_resident()
    monkeypatch.setattr(csr_format, "sell_budget_bytes", lambda: csr_format.live_kernel_bytes() - 1)
    assert not sw.kernel_resident()


def _csr_op(x, sw, bias=None):
    """The CSR op on the kernel's 16-bit indices, without the sliced-ELL copy."""
    return torch.ops.pyhwp.csr_matmul(x, sw.row_offsets, sw.kernel_col_indices, sw.values, bias, False)


@pytest.fixture(params=[0, 1], ids=["gathers", "scalar-loads"])
def slow_gathers(request):
    """Both gather kernels on any x86 CPU: hardware gathers, and x's terms by scalar loads (what
    CPUs with slow gathers get, which also serves 2 columns on that path)."""
    previous = _C.set_slow_gathers(request.param)
    yield request.param
    _C.set_slow_gathers(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kernels(isa, slow_gathers, dtype):
    """Row i stores i weights (0 to 70: every remainder of the 32-, 16- and 8-term steps), at
    batches 1 to 3 (gather path, and the tile path from 2 or 3 columns); the 16-bit and 32-bit
    index copies give the same bits, and so does a column computed with another; NaN/Inf in x
    propagate as in the dense product. The op without the weight's sliced-ELL copy (which
    pyhwp.linear would read at these batches; see test_csr_sell.py)."""
    g = torch.Generator().manual_seed(27 + slow_gathers)
    k = 300
    w = torch.zeros(71, k)
    for i in range(71):
        w[i, torch.randperm(k, generator=g)[:i]] = torch.randn(i, generator=g)
    w = w.to(dtype)
    sw = pyhwp.to_sparse(w, "csr")
    assert sw.kernel_col_indices.dtype == torch.int16
    for batch in (1, 2, 3):
        x = torch.randn(batch, k, generator=g).to(dtype)
        bias = torch.randn(71, generator=g).to(dtype)
        y = _csr_op(x, sw, bias)
        if dtype == torch.float32:
            assert_linear_close(y, x, w, bias, terms=70)
        else:
            _assert_bf16_close(y, x, w, bias)
        wide = torch.ops.pyhwp.csr_matmul(x, sw.row_offsets, sw.col_indices, sw.values, bias, False)
        assert torch.equal(wide, y)
        if batch == 2:  # scalar loads take two columns in one pass: each column's bits as alone
            for q in range(2):
                assert torch.equal(_csr_op(x[q:q + 1], sw, bias), y[q:q + 1])
        x[0, 5] = float("nan")
        x[-1, 9] = float("inf")
        y, ref = pyhwp.linear(x, sw), torch.nn.functional.linear(x.float(), w.float())
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert torch.equal(torch.isinf(y), torch.isinf(ref))


def test_set_slow_gathers_rejects_bad_modes():
    previous = _C.set_slow_gathers(-1)
    try:
        with pytest.raises(ValueError, match="mode must be -1, 0 or 1"):
            _C.set_slow_gathers(2)
        assert _C.set_slow_gathers(1) == -1 and _C.set_slow_gathers(-1) == 1
    finally:
        _C.set_slow_gathers(previous)


@pytest.mark.parametrize("k", [40000, 70000])
def test_wide_inputs_use_right_index_width(isa, k):
    # 40000 columns: 16-bit indices with values above 2**15; 70000: int32 indices.
    g = torch.Generator().manual_seed(k)
    w = random_sparse((20, k), 0.999, g)
    w[:, -1] = 1.5  # the last column is stored in every row
    sw = pyhwp.to_sparse(w, "csr")
    ci = sw.kernel_col_indices
    assert ci.dtype == (torch.int16 if k <= 65536 else torch.int32)
    assert torch.equal(ci.to(torch.int32) & 0xFFFF if k <= 65536 else ci, sw.col_indices)
    for batch in (1, 3, 16, 17):  # 16: the 16-column tile kernel on a packed panel (rows 64 bytes apart)
        x = torch.randn(batch, k, generator=g)
        assert_linear_close(pyhwp.linear(x, sw), x, w, terms=_terms(sw))


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("p", [5, 16, 48, 200])
def test_conv_layout(isa, offset, p):
    """X given as (K, P) with p contiguous (an image's patch matrix) and transpose_out."""
    g = torch.Generator().manual_seed(p + offset)
    w = random_sparse((37, 64), 0.8, g)
    sw = pyhwp.to_sparse(w, "csr")
    base = torch.randn(64 * p + 16, generator=g)
    xk = base[offset: offset + 64 * p].view(64, p)  # (K, P), rows p-contiguous
    y = torch.ops.pyhwp.csr_matmul(xk.t(), sw.row_offsets, sw.kernel_col_indices, sw.values, None, True)
    assert y.shape == (37, p) and y.is_contiguous()
    assert_linear_close(y.t(), xk.t(), w, terms=_terms(sw))


def _conv_layout_x(k, p, offset, g):
    """(K, P) with p contiguous, rows 64-byte aligned when offset is 0 and p % 16 == 0."""
    base = torch.randn(k * p + 16, generator=g)
    return base[offset: offset + k * p].view(k, p)


@pytest.mark.parametrize("rows, sparsity", [(37, 0.8), (300, 0.5)], ids=["in-place", "packed"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("p", [1000, 200])
def test_conv_layout_in_place_and_nonfinite(isa, rows, sparsity, offset, p):
    """X (K, P) read in place (aligned rows, or rows used fewer than 32 times on average) or
    packed; P = 1000 spreads groups of column tiles over threads, each scanning its own panel
    for NaN/Inf, P = 200 splits rows with the scan shared out by K. Values, then NaN/Inf in the
    first and last column tiles propagate exactly as in the dense product."""
    g = torch.Generator().manual_seed(p + offset + rows)
    w = random_sparse((rows, 64), sparsity, g)
    w[:, 5] = 0  # a column no row stores: a NaN there reaches every output of its pixel
    sw = pyhwp.to_sparse(w, "csr")
    xk = _conv_layout_x(64, p, offset, g)

    def run():
        return torch.ops.pyhwp.csr_matmul(xk.t(), sw.row_offsets, sw.kernel_col_indices, sw.values, None, True)

    assert_linear_close(run().t(), xk.t(), w, terms=_terms(sw))
    clean = xk.clone()
    # One at a time: any NaN/Inf found sends the whole output through the exact fix-up, so each
    # part of the scan needs its own probe.
    for k, q, v in [(5, 3, "nan"), (17, p - 1, "inf"), (40, p // 2, "-inf"), (63, p - 17, "nan")]:
        xk.copy_(clean)
        xk[k, q] = float(v)
        y, ref = run(), w @ xk
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), (k, q, v)
        assert torch.equal(torch.isinf(y), torch.isinf(ref)), (k, q, v)
        assert torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])
        if k == 5:  # stored in no row: 0 * NaN in every output of that pixel
            assert bool(torch.isnan(y[:, q]).all())


def _assert_bf16_close(y, x, w, bias=None):
    """bfloat16 output of a float32-accumulated product: one final rounding (2^-8 relative)
    plus the float32 summation bound."""
    assert y.dtype == torch.bfloat16
    xd, wd = x.double(), w.double()
    ref = torch.nn.functional.linear(xd, wd, None if bias is None else bias.double())
    mag = torch.nn.functional.linear(xd.abs(), wd.abs(), None if bias is None else bias.double().abs())
    tol = UNIT_ROUNDOFF[torch.bfloat16] * ref.abs() + (w.shape[1] + 2) * UNIT_ROUNDOFF[torch.float32] * mag + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nan_inf"])
def test_small_x_packed_by_every_thread(isa, dtype, nonfinite):
    """An X small enough (K * P <= kPrivatePack) is packed by each of 2 threads into its own
    scratch inside the kernels' parallel region: the reference, NaN/Inf propagated as dense."""
    g = torch.Generator().manual_seed(77)
    w = random_sparse((300, 500), 0.9, g).to(dtype)
    sw = pyhwp.to_sparse(w, "csr")
    x = torch.randn(16, 500, generator=g).to(dtype)
    if nonfinite:
        x[3, 17], x[9, 400] = float("nan"), float("inf")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = pyhwp.linear(x, sw)
    finally:
        torch.set_num_threads(threads)
    ref = torch.nn.functional.linear(x.double(), w.double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    rows = [i for i in range(16) if not nonfinite or i not in (3, 9)]
    if dtype == torch.float32:
        assert_linear_close(y[rows], x[rows], w, None, _terms(sw))
    else:
        _assert_bf16_close(y[rows], x[rows], w)


@pytest.mark.parametrize("pattern", ["csr", "2:4"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_packed_blocks_find_each_nonfinite_kind(isa, pattern, value):
    """Whole 16x16 blocks of a k-contiguous X are packed and checked for NaN/Inf in one pass
    (AVX-512: vfpclassps on the loaded rows): one value of each kind, in a whole block and in the
    partial last one, gives dense's NaN/Inf pattern."""
    g = torch.Generator().manual_seed(5)
    w = random_sparse((64, 200), 0.5, g)
    if pattern == "2:4":
        groups = w.reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
        w = (groups * keep).reshape(w.shape)
    sw = pyhwp.to_sparse(w, pattern)
    for p, k in ((5, 37), (31, 195)):  # k = 195: the last, partial block of 200 columns
        x = torch.randn(32, 200, generator=g)
        x[p, k] = value
        y = pyhwp.linear(x, sw)
        ref = torch.nn.functional.linear(x.double(), w.double())
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
        assert torch.equal(torch.signbit(y[torch.isinf(y)]), torch.signbit(ref[torch.isinf(ref)]))


@pytest.mark.parametrize("n, batch", [(301, 16), (77, 200), (1000, 40)])
def test_row_blocks_claimed_across_threads(isa, n, batch):
    """Row blocks of each thread's chunk are claimed from its front by that thread and from its back
    by a thread done with its own: every row computed once, by the same kernel call whichever
    thread makes it (the same bits at 1, 2 and 3 threads), chunks of rows not a multiple of 16, one
    column tile or two (batch 200), one row holding most of the weights."""
    g = torch.Generator().manual_seed(n + batch)
    w = random_sparse((n, 640), 0.9, g)
    w[n // 3] = torch.randn(640, generator=g)  # one dense row: chunks of very unequal row counts
    sw = pyhwp.to_sparse(w, "csr")
    x = torch.randn(batch, 640, generator=g)  # k contiguous: packed, not read in place
    bias = torch.randn(n, generator=g)
    threads = torch.get_num_threads()
    ys = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            # into NaN, so that a row block no thread computes shows
            ys.append(pyhwp.linear(x, sw, bias, out=torch.full((batch, n), float("nan"))))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])
    assert_linear_close(ys[0], x, w, bias, _terms(sw))


@pytest.mark.parametrize("batch", [1, 5, 16, 130])
def test_bfloat16(isa, batch):
    g = torch.Generator().manual_seed(batch)
    w = random_sparse((45, 77), 0.8, g).bfloat16()
    sw = pyhwp.to_sparse(w, "csr")
    assert sw.dtype == torch.bfloat16
    x = torch.randn(batch, 77, generator=g).bfloat16()
    bias = torch.randn(45, generator=g).bfloat16()
    _assert_bf16_close(pyhwp.linear(x, sw, bias), x, w, bias)
    _assert_bf16_close(pyhwp.linear(x.t().contiguous().t(), sw), x, w)  # strided x


def test_bfloat16_nonfinite_like_dense():
    w = random_sparse((30, 20), 0.8, torch.Generator().manual_seed(9)).bfloat16()
    sw = pyhwp.to_sparse(w, "csr")
    for batch in (1, 20):
        x = torch.randn(batch, 20).bfloat16()
        x[0, 3] = float("nan")
        x[-1, 7] = float("inf")
        y = pyhwp.linear(x, sw)
        ref = torch.nn.functional.linear(x.float(), w.float())
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert torch.equal(torch.isinf(y), torch.isinf(ref))


def test_bfloat16_rejects_mixed_dtypes():
    sw = pyhwp.to_sparse(random_sparse((6, 5), 0.5).bfloat16(), "csr")
    with pytest.raises(TypeError, match="dtype"):
        pyhwp.linear(torch.randn(2, 5), sw)
    with pytest.raises(TypeError, match="bias has dtype"):
        pyhwp.linear(torch.randn(2, 5).bfloat16(), sw, torch.randn(6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_blocks_in_conv_layout(isa, dtype):
    """K blocks accumulating straight into a p-contiguous output (and into bfloat16 scratch)."""
    g = torch.Generator().manual_seed(11)
    w = random_sparse((20, 2100), 0.95, g).to(dtype)
    sw = pyhwp.to_sparse(w, "csr")
    xk = torch.randn(2100, 144, generator=g).to(dtype)  # (K, P), aligned rows
    bias = torch.randn(20, generator=g).to(dtype)
    y = torch.ops.pyhwp.csr_matmul(xk.t(), sw.row_offsets, sw.kernel_col_indices, sw.values, bias, True)
    if dtype == torch.float32:
        assert_linear_close(y.t(), xk.t(), w, bias, _terms(sw))
    else:
        _assert_bf16_close(y.t(), xk.t(), w, bias)
