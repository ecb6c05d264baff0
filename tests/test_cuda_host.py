"""Host-side pieces of the CUDA kernels that run anywhere: the CSR row order, masked tile flags,
the capability table entries and the ops' CPU behaviour with the new arguments."""

from __future__ import annotations

import pytest
import torch

import pyhwp
from helpers import random_sparse
from pyhwp.formats.csr import CSRWeight, row_order_by_length
from pyhwp.kernels import KERNELS, find_kernel
from pyhwp.ops.masked_cuda import tile_flags


def test_row_order_is_a_stable_longest_first_permutation():
    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(0, 6, (200,), generator=g)
    ro = torch.zeros(201, dtype=torch.int64)
    ro[1:] = torch.cumsum(lengths, 0)
    order = row_order_by_length(ro)
    assert order.dtype == torch.int32 and order.shape == (200,)
    assert torch.equal(torch.sort(order).values, torch.arange(200, dtype=torch.int32))
    ordered = lengths[order.long()]
    assert bool((ordered[:-1] >= ordered[1:]).all())
    for length in range(6):  # ties keep row order
        rows = order[ordered == length]
        assert torch.equal(rows, torch.sort(rows).values)


def test_to_sparse_stores_the_row_order_and_raw_construction_computes_it():
    w = random_sparse((37, 50), 0.7, torch.Generator().manual_seed(12))
    sw = pyhwp.to_sparse(w, "csr")
    assert torch.equal(sw.row_order, row_order_by_length(sw.row_offsets))
    raw = CSRWeight(sw.shape, sw.row_offsets, sw.col_indices, sw.values)
    assert torch.equal(raw.row_order, sw.row_order)
    moved = sw.to("cpu")
    assert torch.equal(moved.row_order, sw.row_order)
    assert pyhwp.to_sparse(torch.zeros(0, 4), "csr").row_order.shape == (0,)


@pytest.mark.parametrize("order, match", [
    (torch.arange(3, dtype=torch.int64), "int32"),
    (torch.arange(2, dtype=torch.int32), "int32"),
    (torch.tensor([0, 0, 2], dtype=torch.int32), "permutation"),
    (torch.tensor([0, 1, 3], dtype=torch.int32), "permutation"),
])
def test_bad_row_order_is_rejected(order, match):
    with pytest.raises(ValueError, match=match):
        CSRWeight((3, 4), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2], dtype=torch.int32),
                  torch.randn(3), order)


def test_cpu_op_accepts_and_ignores_row_order():
    g = torch.Generator().manual_seed(13)
    w = random_sparse((30, 20), 0.5, g)
    sw = pyhwp.to_sparse(w, "csr")
    x = torch.randn(9, 20, generator=g)
    args = (x, sw.row_offsets, sw.col_indices, sw.values, None)
    a = torch.ops.pyhwp.csr_matmul(*args, False, sw.row_order)
    b = torch.ops.pyhwp.csr_matmul(*args, False, torch.randperm(30, generator=g).to(torch.int32))
    c = torch.ops.pyhwp.csr_matmul(*args)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (17, 33), (40, 100)], ids=str)
def test_tile_flags_match_brute_force(shape):
    g = torch.Generator().manual_seed(14)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) < 0.97] = 0
    w[0, 0] = float("nan")  # NaN is not zero
    flags = tile_flags(w)
    fr, fc = -(-shape[0] // 16), -(-shape[1] // 16)
    assert flags.dtype == torch.uint8 and flags.shape == (fr, fc)
    for i in range(fr):
        for j in range(fc):
            tile = w[16 * i:16 * i + 16, 16 * j:16 * j + 16]
            assert flags[i, j] == int(bool((tile != 0).any()))


def test_tile_flags_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        tile_flags(torch.zeros(3))


def test_cuda_kernel_entries_and_dispatch_errors():
    entry = next(k for k in KERNELS if k.name == "csr_matmul_cuda")
    assert entry.device == "cuda" and entry.needs_cuda_build and entry.min_cuda_arch == (8, 0)
    assert set(entry.dtypes) == {torch.float32, torch.float16, torch.bfloat16}
    # On the CPU a float16 CSR weight is a dtype problem (TypeError), not a device problem.
    with pytest.raises(TypeError, match="float16"):
        find_kernel("linear", "csr", torch.device("cpu"), torch.float16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="csr_matmul_cuda"):
            find_kernel("linear", "csr", torch.device("cuda"), torch.float16)


def test_masked_op_refuses_cpu_tensors():
    w = torch.randn(20, 32)
    with pytest.raises(ValueError, match="runs on CUDA"):
        torch.ops.pyhwp.masked_matmul_cuda(torch.randn(3, 32), w, tile_flags(w), None, False)
