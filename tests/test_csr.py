"""CSR format and csr_matmul: float64 references over shapes, sparsities, batches and ISAs."""

from __future__ import annotations

import warnings

import pytest
import torch

import pyhwp
from pyhwp import CSRWeight
from helpers import assert_linear_close, random_sparse

SHAPES = [(1, 1), (1, 17), (17, 1), (15, 16), (16, 16), (17, 33), (64, 64), (65, 127), (300, 200)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
BATCHES = [1, 7, 8, 16, 65, 130]  # around the gather/tile switch (8) and the 16/64-wide tiles


def _terms(sw):
    return int(sw.row_offsets.diff().max()) if sw.out_features else 0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_linear_matches_reference(isa, shape, sparsity):
    g = torch.Generator().manual_seed(hash((shape, sparsity)) % 2**31)
    w = random_sparse(shape, sparsity, g)
    sw = pyhwp.to_sparse(w, "csr")
    bias = torch.randn(shape[0], generator=g)
    for batch in BATCHES:
        x = torch.randn(batch, shape[1], generator=g)
        for b in (None, bias):
            assert_linear_close(pyhwp.linear(x, sw, b), x, w, b, _terms(sw))


def test_3d_input_and_large_batch(isa):
    g = torch.Generator().manual_seed(1)
    w = random_sparse((96, 80), 0.7, g)
    sw = pyhwp.to_sparse(w, "csr")
    x = torch.randn(3, 50, 80, generator=g)
    y = pyhwp.linear(x, sw)
    assert y.shape == (3, 50, 96)
    assert_linear_close(y, x, w, terms=_terms(sw))


@pytest.mark.parametrize("make", [
    lambda g: torch.randn(33, 80, generator=g).t(),             # transposed
    lambda g: torch.randn(20, 66, generator=g)[:, ::2],          # strided columns
    lambda g: torch.randn(1, 33, generator=g).expand(9, 33),     # stride-0 rows
    lambda g: torch.randn(4, 5, 33, generator=g).transpose(0, 1),
], ids=["transposed", "strided", "expanded", "3d-transposed"])
def test_non_contiguous_input(isa, make):
    g = torch.Generator().manual_seed(2)
    w = random_sparse((40, 33), 0.6, g)
    sw = pyhwp.to_sparse(w, "csr")
    x = make(g)
    assert_linear_close(pyhwp.linear(x, sw), x, w, terms=_terms(sw))


def test_mask_keeps_exact_positions_including_zero_values():
    w = torch.randn(8, 12)
    w[0, :6] = 0.0
    mask = torch.zeros(8, 12, dtype=torch.bool)
    mask[0, :4] = True  # four kept positions whose values are zero
    mask[1:, ::3] = True
    sw = pyhwp.to_sparse(w, "csr", mask=mask)
    assert sw.nnz == int(mask.sum())
    torch.testing.assert_close(sw.to_dense(), w * mask, rtol=0, atol=0)


def test_round_trip_and_properties():
    w = random_sparse((33, 70), 0.8, torch.Generator().manual_seed(3))
    w[0, 0], w[0, 1] = -0.0, 0.0  # -0.0 counts as zero
    sw = pyhwp.to_sparse(w, "csr")
    assert torch.equal(sw.to_dense(), w)
    nnz = int((w != 0).sum())
    assert sw.pattern == "csr" and sw.shape == (33, 70) and sw.nnz == nnz
    assert sw.dtype == torch.float32 and sw.device == torch.device("cpu")
    assert sw.density == pytest.approx(nnz / w.numel())
    assert sw.nbytes == nnz * 4 + nnz * 4 + 34 * 8 + 33 * 4  # values, col_indices, row_offsets, row_order
    assert "CSRWeight" in repr(sw)


def test_conv_shaped_weight_round_trips():
    w = random_sparse((8, 3, 3, 3), 0.5, torch.Generator().manual_seed(4))
    sw = pyhwp.to_sparse(w, "csr")
    assert sw.shape == (8, 3, 3, 3) and sw.in_features == 27
    assert torch.equal(sw.to_dense(), w)
    with pytest.raises(ValueError, match="conv2d"):
        pyhwp.linear(torch.randn(2, 27), sw)


def test_nonfinite_inputs_propagate_like_dense(isa):
    g = torch.Generator().manual_seed(5)
    w = random_sparse((50, 40), 0.8, g)
    sw = pyhwp.to_sparse(w, "csr")
    for batch in (1, 20):
        x = torch.randn(batch, 40, generator=g)
        x[0, 3] = float("nan")
        x[-1, 7] = float("inf")
        x[-1, 9] = float("-inf")
        y = pyhwp.linear(x, sw)
        ref = torch.nn.functional.linear(x, w)
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert torch.equal(torch.isinf(y), torch.isinf(ref))
        assert torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])


def test_empty_batch_and_empty_weight():
    sw = pyhwp.to_sparse(torch.zeros(5, 4), "csr")
    assert pyhwp.linear(torch.randn(0, 4), sw).shape == (0, 5)
    y = pyhwp.linear(torch.randn(3, 4), sw, torch.ones(5))
    assert torch.equal(y, torch.ones(3, 5))


def test_matches_torch_sparse_csr():
    w = random_sparse((64, 48), 0.9, torch.Generator().manual_seed(6))
    sw = pyhwp.to_sparse(w, "csr")
    with warnings.catch_warnings():  # torch warns "beta" once per process, whichever test is first
        warnings.filterwarnings("ignore", message=".*beta.*", category=UserWarning)
        t = w.to_sparse_csr()
    assert torch.equal(sw.row_offsets, t.crow_indices())
    assert torch.equal(sw.col_indices.long(), t.col_indices())
    assert torch.equal(sw.values, t.values())


# -- bad input ---------------------------------------------------------------------------

@pytest.fixture
def sw():
    return pyhwp.to_sparse(random_sparse((6, 5), 0.5, torch.Generator().manual_seed(7)), "csr")


@pytest.mark.parametrize("call, exc, match", [
    (lambda sw: pyhwp.linear(torch.randn(2, 4), sw), ValueError, r"x has shape \(2, 4\)"),
    (lambda sw: pyhwp.linear(torch.tensor(1.0), sw), ValueError, "x has shape"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5, dtype=torch.float64), sw), TypeError, "dtype"),
    (lambda sw: pyhwp.linear([[1.0] * 5], sw), TypeError, "x must be a torch.Tensor"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5), torch.randn(6, 5)), TypeError, "SparseWeight"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5), sw, torch.randn(5)), ValueError, "bias has shape"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5), sw, torch.randn(6).double()), TypeError, "bias has dtype"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5), sw, [0.0] * 6), TypeError, "bias must be"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5, device="meta"), sw), ValueError, "x is on meta"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5).bfloat16(), sw.to("cpu")), TypeError, "dtype"),
])
def test_linear_bad_input(sw, call, exc, match):
    with pytest.raises(exc, match=match):
        call(sw)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: pyhwp.to_sparse([[1.0]], "csr"), TypeError, "weight must be a torch.Tensor"),
    (lambda: pyhwp.to_sparse(torch.randn(3), "csr"), ValueError, "2-D"),
    (lambda: pyhwp.to_sparse(torch.ones(3, 3, dtype=torch.int32), "csr"), TypeError, "floating"),
    (lambda: pyhwp.to_sparse(torch.randn(3, 3), "bogus"), ValueError, "pattern must be one of"),
    (lambda: pyhwp.to_sparse(torch.randn(3, 3), "csr", mask=torch.ones(3, 4, dtype=torch.bool)),
     ValueError, "mask has shape"),
    (lambda: pyhwp.to_sparse(torch.randn(3, 3), "csr", mask=torch.ones(3, 3)), TypeError, "torch.bool"),
])
def test_to_sparse_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("ro, ci, match", [
    ([0, 2, 1, 3], [0, 1, 2], "decrease"),
    ([1, 2, 3, 3], [0, 1, 2], r"row_offsets\[0\]"),
    ([0, 1, 2, 4], [0, 1, 2], "entries|nnz"),
    ([0, 1, 2, 3], [0, 1, 9], "outside"),
    ([0, 2, 2, 3], [1, 0, 2], "strictly increasing"),
    ([0, 1, 3], [0, 1, 2], "out \\+ 1"),
])
def test_csr_from_raw_arrays_is_validated(ro, ci, match):
    with pytest.raises(ValueError, match=match):
        CSRWeight((3, 4), torch.tensor(ro), torch.tensor(ci, dtype=torch.int32), torch.randn(3))


def test_csr_from_valid_raw_arrays():
    sw = CSRWeight((2, 3), torch.tensor([0, 1, 3]), torch.tensor([2, 0, 1], dtype=torch.int32),
                   torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(sw.to_dense(), torch.tensor([[0.0, 0.0, 1.0], [2.0, 3.0, 0.0]]))


@pytest.mark.cuda
def test_cuda_to_dense_matches_cpu():
    w = random_sparse((300, 129), 0.9, torch.Generator().manual_seed(8))
    sw = pyhwp.to_sparse(w, "csr").to("cuda")
    assert torch.equal(sw.to_dense().cpu(), w)
