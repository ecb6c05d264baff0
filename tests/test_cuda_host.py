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


# -- host-side planning of the CUDA entry points (pure arithmetic: fake device addresses) -----

needs_cuda_build = pytest.mark.skipif(not __import__("pyhwp._ext", fromlist=["_C"])._C.build_info()["cuda"],
                                      reason="pyhwp built without the CUDA kernels")
F32, F16 = 0, 1
X, Y, W = 0x10000, 0x20000, 0x30000  # 16-byte aligned fake addresses


@needs_cuda_build
def test_csr_workspace_plan():
    from pyhwp._ext import _C
    ws = _C.csr_matmul_cuda_workspace
    # (rows, cols, nnz, dtype, x, p, x_stride_k, x_stride_p, y, y_stride_n, y_stride_p)
    assert ws(100, 64, 10, F16, X, 8, 1, 64, Y, 1, 100) == 256             # gather: record only
    assert ws(100, 64, 10, F16, X, 64, 64, 1, Y, 64, 1) == 512             # conv layout in place
    assert ws(100, 64, 10, F16, X, 64, 1, 64, Y, 1, 100) == 512 + 64 * 64 * 2 + 100 * 64 * 2  # linear: copies
    assert ws(100, 64, 10, F16, X + 2, 64, 64, 1, Y, 64, 1) == 512 + 64 * 64 * 2  # misaligned x: copied
    assert ws(100, 64, 10, F32, X, 62, 62, 1, Y, 62, 1) == 256 + 64 * 64 * 4 + 100 * 64 * 4  # P % 4 != 0
    with pytest.raises(ValueError, match="unknown dtype"):
        ws(100, 64, 10, 7, X, 8, 1, 64, Y, 1, 100)


@needs_cuda_build
def test_masked_workspace_plan():
    from pyhwp._ext import _C
    ws = _C.masked_matmul_cuda_workspace
    # (rows, cols, values, ld, dtype, x, p, x_stride_k, x_stride_p, y, y_stride_n, y_stride_p)
    assert ws(40, 64, W, 64, F16, X, 30, 1, 64, Y, 1, 40) == 256                # linear form in place
    assert ws(40, 64, W, 64, F16, X, 30, 32, 1, Y, 30, 1) == 256                # conv form in place
    # K = 37: x and W copied with rows padded to 40, each copy rounded up to 256 bytes
    assert ws(40, 37, W, 37, F16, X, 30, 1, 37, Y, 1, 40) == 256 + 2560 + 3328
    assert ws(40, 37, W, 37, F32, X, 30, 1, 37, Y, 1, 40) == 256                # SIMT reads any strides
    with pytest.raises(ValueError, match="row stride"):
        ws(40, 64, W, 60, F16, X, 30, 1, 64, Y, 1, 40)
    # Tile storage (MaskedWeight on CUDA): W is read in place through the tile map, never copied,
    # and ld is ignored; only x is copied when its rows do not suit 16-byte loads.
    M = 0x40000
    assert ws(40, 64, W, 0, F16, X, 30, 1, 64, Y, 1, 40, tile_map=M) == 256
    assert ws(40, 37, W, 0, F16, X, 30, 1, 37, Y, 1, 40, tile_map=M) == 256 + 2560


@needs_cuda_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_cuda_failures_become_runtime_errors():
    from pyhwp._ext import _C
    import os
    if os.path.exists("/dev/nvidia0"):
        pytest.skip("a GPU device node exists: fake addresses must not reach a real device")
    # Valid sizes and a large enough workspace: the first CUDA call (the memset) fails for lack of
    # a device, and its status must arrive as RuntimeError, not a crash.
    with pytest.raises(RuntimeError, match="CUDA error"):
        _C.csr_matmul_cuda(100, 64, 0, W, 0, 0, 0, F16, X, 8, 1, 64, 0, Y, 1, 100, 0x40000, 1 << 20, 0)
    with pytest.raises(RuntimeError, match="CUDA error"):
        _C.masked_matmul_cuda(40, 64, W, 64, W + 0x1000, F16, X, 30, 1, 64, 0, Y, 1, 40, 0x40000, 1 << 20, 0)


@needs_cuda_build
def test_cuda_entry_points_reject_bad_arguments_before_any_cuda_call():
    from pyhwp._ext import _C
    with pytest.raises(ValueError, match="workspace of 16 bytes"):
        _C.csr_matmul_cuda(100, 64, 0, W, 0, 0, 0, F16, X, 8, 1, 64, 0, Y, 1, 100, 0x40000, 16, 0)
    with pytest.raises(ValueError, match="row_offsets is null"):
        _C.csr_matmul_cuda(100, 64, 0, 0, 0, 0, 0, F16, X, 8, 1, 64, 0, Y, 1, 100, 0x40000, 1 << 20, 0)
    with pytest.raises(ValueError, match="not 256-byte aligned"):
        _C.csr_matmul_cuda(100, 64, 0, W, 0, 0, 0, F16, X, 8, 1, 64, 0, Y, 1, 100, 0x40010, 1 << 20, 0)
    with pytest.raises(ValueError, match="workspace"):
        _C.masked_matmul_cuda(40, 64, W, 64, W, F16, X, 30, 1, 64, 0, Y, 1, 40, 0x40000, 8, 0)


def test_cuda_timer_needs_functions():
    from pyhwp.bench.timing import interleaved_cuda_medians
    with pytest.raises(ValueError, match="at least one"):
        interleaved_cuda_medians({})
