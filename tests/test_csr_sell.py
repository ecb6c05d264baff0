"""The sliced-ELL copy of CSR weights (csrc/csr/csr_sell.h): what pyhwp.linear reads at batches up
to 8 on AVX-512 CPUs, against float64 references, and when it is (not) read."""

from __future__ import annotations

import pytest
import torch

import pyhwp
from helpers import assert_linear_close, assert_linear_close_bf16, random_sparse
from pyhwp._ext import _C
from pyhwp.formats import csr as csr_format

AVX512 = "avx512" in _C.build_info()["cpu_kernels"] and bool(_C.cpu_features()["avx512"])
needs_avx512 = pytest.mark.skipif(not AVX512, reason="the sliced-ELL copy serves AVX-512 CPUs only")


def _ragged(n, k, g):
    """Row i stores i % 71 weights at random columns (0 up to 70: every slot count in a window)."""
    w = torch.zeros(n, k)
    for i in range(n):
        c = min(i % 71, k)
        w[i, torch.randperm(k, generator=g)[:c]] = torch.randn(c, generator=g)
    return w


def _op(x, sw, bias=None, sell=None, transpose_out=False):
    return torch.ops.pyhwp.csr_matmul(x, sw.row_offsets, sw.kernel_col_indices, sw.values, bias, transpose_out,
                                      None, sell)


def _close(y, x, w, bias, terms):
    (assert_linear_close if y.dtype == torch.float32 else assert_linear_close_bf16)(y, x, w, bias, terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(71, 300), (16, 64), (33, 16), (9, 7), (5, 33), (140, 1000)])
def test_linear_small_batches(isa, n, k, dtype):
    """Partial last slices (rows not a multiple of 16) and windows (k not a multiple of 32, a
    window of one column, k of 16 and below), batches 1 to 9 (1-4 columns per pass, then two passes; 9
    takes the CSR paths), with and without bias, 2-D and 3-D x; float32 and bfloat16 (values
    widened in the kernel, one rounding of each output)."""
    g = torch.Generator().manual_seed(n * k)
    w = _ragged(n, k, g).to(dtype)
    sw = pyhwp.to_sparse(w, "csr")
    terms = int(sw.row_offsets.diff().max())
    bias = torch.randn(n, generator=g).to(dtype)
    for batch in range(1, 10):
        x = torch.randn(batch, k, generator=g).to(dtype)
        for b in (None, bias):
            _close(pyhwp.linear(x, sw, b), x, w, b, terms)
    x3 = torch.randn(2, 3, k, generator=g).to(dtype)
    _close(pyhwp.linear(x3, sw, bias), x3, w, bias, terms)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_is_read_where_it_applies(isa, dtype):
    """The kernel reads only the copy where it applies: given the copy of another weight of the
    same shape, the op computes that weight's product at batches 1-8 of finite x (k-strided x
    too), and its own arrays' at batch 9, or with an Inf in x (which the copy's padding would turn
    into NaN where dense gives +-Inf)."""
    g = torch.Generator().manual_seed(5)
    w, other = random_sparse((40, 100), 0.8, g).to(dtype), random_sparse((40, 100), 0.8, g).to(dtype)
    sw, so = pyhwp.to_sparse(w, "csr"), pyhwp.to_sparse(other, "csr")
    sell = so.kernel_sell()
    uses_copy = isa.startswith("avx512")
    for batch in (1, 5, 8, 9):
        x = torch.randn(batch, 100, generator=g).to(dtype)
        expect = other if batch <= 8 and uses_copy else w
        _close(_op(x, sw, sell=sell), x, expect, None, 100)
    strided = torch.randn(100, 4, generator=g).to(dtype).t()  # (4, 100), k not contiguous
    _close(_op(strided, sw, sell=sell), strided, other if uses_copy else w, None, 100)
    x = torch.randn(2, 100, generator=g).to(dtype)
    x[1, 7] = float("inf")
    y, ref = _op(x, sw, sell=sell), torch.nn.functional.linear(x.float(), w.float())
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(y[:1], _op(x[:1], sw))


@needs_avx512
def test_output_layouts_and_out(isa):
    """The (N, P) output of transpose_out (rows P apart) and a strided out= are written row by row."""
    g = torch.Generator().manual_seed(6)
    w = random_sparse((45, 70), 0.7, g)
    sw = pyhwp.to_sparse(w, "csr")
    x, bias = torch.randn(3, 70, generator=g), torch.randn(45, generator=g)
    yt = _op(x, sw, bias, sw.kernel_sell(), transpose_out=True)
    assert yt.shape == (45, 3) and yt.is_contiguous()
    assert_linear_close(yt.t(), x, w, bias, 70)
    out = torch.empty(45, 3).t()
    pyhwp.linear(x, sw, bias, out=out)
    assert_linear_close(out, x, w, bias, 70)


@needs_avx512
def test_copy_follows_the_values():
    """The copy holds the values: it is rebuilt, and the linear fast path's plan with it, when they
    change in place or are replaced."""
    g = torch.Generator().manual_seed(7)
    w = random_sparse((32, 64), 0.9, g)
    sw = pyhwp.to_sparse(w, "csr")
    x = torch.randn(1, 64, generator=g)
    first = sw.kernel_sell()
    assert first is sw.kernel_sell() and first.numel() == _C.csr_sell_bytes(
        32, 64, sw.nnz, sw.row_offsets.data_ptr(), 0, sw.kernel_col_indices.data_ptr())
    y = pyhwp.linear(x, sw)
    with torch.no_grad():
        sw.values.mul_(-2)
    assert sw.kernel_sell() is not first
    assert_linear_close(pyhwp.linear(x, sw), x, -2 * w, terms=64)
    assert torch.allclose(pyhwp.linear(x, sw), -2 * y)
    sw.values.data = sw.values * -0.5  # new storage, the original values
    assert_linear_close(pyhwp.linear(x, sw), x, w, terms=64)


def test_training_does_not_remake_the_copy(monkeypatch):
    """A call that records the values' gradient makes the copy once but does not remake a stale
    one (an optimizer step's new values would cost a repack per forward pass); calls above 8 rows
    of x never ask for it; inference remakes it."""
    g = torch.Generator().manual_seed(10)
    w = random_sparse((32, 64), 0.8, g)
    sw = pyhwp.to_sparse(w, "csr")
    values = torch.nn.Parameter(sw.values.clone())
    object.__setattr__(sw, "values", values)
    packs = []
    pack = _C.csr_sell_pack
    monkeypatch.setattr(_C, "csr_sell_pack", lambda *a: packs.append(1) or pack(*a))
    x, big = torch.randn(4, 64, generator=g), torch.randn(16, 64, generator=g)
    pyhwp.linear(big, sw).sum().backward()
    assert packs == [] and values.grad is not None
    pyhwp.linear(x, sw).sum().backward()
    assert len(packs) == int(AVX512)  # the first: a model run for inference without no_grad
    with torch.no_grad():
        values.mul_(2)  # an optimizer step
    y = pyhwp.linear(x, sw)
    y.sum().backward()
    assert len(packs) == int(AVX512)
    assert_linear_close(y.detach(), x, 2 * w, terms=64)
    with torch.no_grad():
        assert_linear_close(pyhwp.linear(x, sw), x, 2 * w, terms=64)
    assert len(packs) == 2 * int(AVX512)


def test_copy_only_where_read(monkeypatch):
    """No copy for float16 values, conv weights, a weight without stored values, or a copy over
    the cache budget; bfloat16 copies hold 2-byte values."""
    g = torch.Generator().manual_seed(8)
    assert pyhwp.to_sparse(random_sparse((16, 32), 0.5, g).half(), "csr").kernel_sell() is None
    assert pyhwp.to_sparse(random_sparse((8, 4, 3, 3), 0.5, g), "csr").kernel_sell() is None
    assert pyhwp.to_sparse(torch.zeros(16, 32), "csr").kernel_sell() is None
    w = random_sparse((16, 32), 0.5, g)
    sell, sell16 = pyhwp.to_sparse(w, "csr").kernel_sell(), pyhwp.to_sparse(w.bfloat16(), "csr").kernel_sell()
    assert (sell is not None) == AVX512 and (sell16 is not None) == AVX512
    assert not AVX512 or sell16.numel() < sell.numel()
    monkeypatch.setattr(csr_format, "sell_budget_bytes", lambda: 0)
    assert pyhwp.to_sparse(random_sparse((16, 32), 0.5, g), "csr").kernel_sell() is None



@needs_avx512
def test_copies_share_one_budget(monkeypatch):
    """The copies of all live weights fit sell_budget_bytes() together, first come, first served:
    a second weight gets none while the first holds its copy (decided once, like a copy, until its
    values change), and a weight made once the first is gone gets one; pyhwp.linear is right
    either way."""
    import gc

    g = torch.Generator().manual_seed(12)
    dense = [random_sparse((64, 96), 0.7, g) for _ in range(2)]
    first, second = (pyhwp.to_sparse(w, "csr") for w in dense)
    size = first.kernel_sell().numel()
    csr_format._SELL.pop(first)
    others = csr_format._copies_bytes(excluding=first)  # copies of weights earlier tests left alive
    monkeypatch.setattr(csr_format, "sell_budget_bytes", lambda: others + size + size // 2)
    assert first.kernel_sell() is not None
    assert second.kernel_sell() is None
    assert first.kernel_sell() is not None  # its own copy does not count against it
    x = torch.randn(3, 96, generator=g)
    with torch.no_grad():
        assert_linear_close(pyhwp.linear(x, second), x, dense[1], terms=96)
        del first
        gc.collect()
        assert second.kernel_sell() is None
        third = pyhwp.to_sparse(dense[1], "csr")
        assert third.kernel_sell() is not None
        assert_linear_close(pyhwp.linear(x, third), x, dense[1], terms=96)

@needs_avx512
def test_bad_copies_are_refused():
    g = torch.Generator().manual_seed(9)
    sw = pyhwp.to_sparse(random_sparse((20, 40), 0.5, g), "csr")
    x = torch.randn(1, 40, generator=g)
    with pytest.raises(TypeError, match="sell must be"):
        _op(x, sw, sell=torch.zeros(128))
    wrong = pyhwp.to_sparse(random_sparse((20, 48), 0.5, g), "csr").kernel_sell()
    with pytest.raises(ValueError, match="packed for 20x48, the matrix is 20x40"):
        _op(x, sw, sell=wrong)
    with pytest.raises(ValueError, match="not written by csr_sell_pack"):
        _op(x, sw, sell=torch.zeros(256, dtype=torch.uint8))
    ro, dup = torch.tensor([0, 40]), torch.zeros(40, dtype=torch.int32)  # 40 weights in one column
    with pytest.raises(ValueError, match="column index 0 at position 1 of row 0 is out of range or not increasing"):
        _C.csr_sell_bytes(1, 64, 40, ro.data_ptr(), dup.data_ptr(), 0)
    ro2, wide = torch.tensor([0, 2]), torch.tensor([3, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match="column index 64 at position 1 of row 0 is out of range"):
        _C.csr_sell_bytes(1, 64, 2, ro2.data_ptr(), wide.data_ptr(), 0)
    bf = pyhwp.to_sparse(sw.to_dense().bfloat16(), "csr")
    with pytest.raises(ValueError, match="packed with 4-byte values, the matrix has 2-byte values"):
        _op(x.bfloat16(), bf, sell=sw.kernel_sell())


def test_budget_from_the_environment(monkeypatch):
    try:
        for value, expect in (("0", 0), ("123456", 123456)):
            monkeypatch.setenv("PYHWP_SELL_BUDGET", value)
            csr_format.sell_budget_bytes.cache_clear()
            assert csr_format.sell_budget_bytes() == expect
        monkeypatch.setenv("PYHWP_SELL_BUDGET", "8M")
        csr_format.sell_budget_bytes.cache_clear()
        with pytest.raises(ValueError, match="PYHWP_SELL_BUDGET must be a number of bytes"):
            csr_format.sell_budget_bytes()
        monkeypatch.delenv("PYHWP_SELL_BUDGET")
        csr_format.sell_budget_bytes.cache_clear()
        assert csr_format.sell_budget_bytes() > 0
    finally:
        csr_format.sell_budget_bytes.cache_clear()
