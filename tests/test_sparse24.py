"""2:4 format and sparse24_matmul: float64 references over shapes, batches, layouts and ISAs."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyhwp
from pyhwp import Sparse24Weight
from pyhwp._ext import _C
from pyhwp.formats.sparse24 import padded_cols
from helpers import assert_linear_close

# K around groups (4), metadata words (32) and K blocks of the tile kernels (128); N around the
# row tiles (2, 4) and row blocks (16).
SHAPES = [(1, 1), (1, 5), (3, 3), (17, 6), (5, 31), (16, 32), (17, 33), (4, 64), (33, 100), (9, 129),
          (65, 130), (20, 300)]
# Around the permute/tile switch (8), column blocks of 4/2/1, and 16/32/64-wide tiles.
BATCHES = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 65, 130]


def random_24(shape, generator, kept=None):
    """Normal weights, 2:4 along the flattened input dim, each group keeping 0, 1 or 2 (random)."""
    n = shape[0]
    k = 1
    for s in shape[1:]:
        k *= s
    kp = -(-k // 4) * 4
    w = torch.randn(n, kp, generator=generator)
    scores = torch.rand(n, kp // 4, 4, generator=generator)
    keep_count = torch.randint(0, 3, (n, kp // 4, 1), generator=generator) if kept is None else kept
    rank = scores.argsort(-1).argsort(-1)
    w = w * (rank < keep_count).reshape(n, kp)
    return w[:, :k].contiguous().reshape(shape)


def terms(w):
    return int((w.reshape(w.shape[0], -1) != 0).sum(1).max()) if w.numel() else 0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_matches_reference(isa, shape):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    w = random_24(shape, g)
    sw = pyhwp.to_sparse(w, "2:4")
    bias = torch.randn(shape[0], generator=g)
    for batch in BATCHES:
        x = torch.randn(batch, shape[1], generator=g)
        for b in (None, bias):
            assert_linear_close(pyhwp.linear(x, sw, b), x, w, b, terms(w))


def test_full_groups_and_large_shape(isa):
    g = torch.Generator().manual_seed(1)
    w = random_24((70, 1000), g, kept=2)  # every group holds exactly 2 nonzeros
    sw = pyhwp.to_sparse(w, "2:4")
    assert sw.nnz == 70 * 500
    for batch in (1, 6, 200):
        x = torch.randn(batch, 1000, generator=g)
        assert_linear_close(pyhwp.linear(x, sw), x, w, terms=500)


@pytest.mark.parametrize("batch", [64, 100, 200])
def test_long_rows_tile_path(isa, batch):
    # LLM-sized K on the tile kernels: K = 4100 ends in a partial metadata word and a partial K
    # block, 150 rows end in a partial work item (Sparse24CpuConfig::kTileRows = 128); also the
    # transposed output.
    g = torch.Generator().manual_seed(batch)
    w = random_24((150, 4100), g)
    sw = pyhwp.to_sparse(w, "2:4")
    bias = torch.randn(150, generator=g)
    x = torch.randn(batch, 4100, generator=g)
    assert_linear_close(pyhwp.linear(x, sw, bias), x, w, bias, terms(w))
    y_t = torch.ops.pyhwp.sparse24_matmul(x, sw.values, sw.meta, bias, transpose_out=True)
    assert_linear_close(y_t.t(), x, w, bias, terms(w))


def test_3d_input(isa):
    g = torch.Generator().manual_seed(2)
    w = random_24((96, 80), g)
    sw = pyhwp.to_sparse(w, "2:4")
    for lead in ((3, 50), (2, 1), (1, 3)):
        x = torch.randn(*lead, 80, generator=g)
        y = pyhwp.linear(x, sw)
        assert y.shape == (*lead, 96)
        assert_linear_close(y, x, w, terms=terms(w))


@pytest.mark.parametrize("make", [
    lambda g: torch.randn(33, 70, generator=g).t(),              # transposed
    lambda g: torch.randn(20, 66, generator=g)[:, ::2],           # strided columns
    lambda g: torch.randn(1, 33, generator=g).expand(9, 33),      # stride-0 rows
    lambda g: torch.randn(1, 33, generator=g).expand(3, 33),      # stride-0 rows, permute path
    lambda g: torch.randn(4, 5, 33, generator=g).transpose(0, 1),
    lambda g: torch.randn(33, 3, generator=g).t(),                # transposed, permute path
], ids=["transposed", "strided", "expanded", "expanded-small", "3d-transposed", "transposed-small"])
def test_non_contiguous_input(isa, make):
    g = torch.Generator().manual_seed(3)
    w = random_24((40, 33), g)
    sw = pyhwp.to_sparse(w, "2:4")
    x = make(g)
    assert_linear_close(pyhwp.linear(x, sw), x, w, terms=terms(w))


@pytest.mark.parametrize("batch", [1, 3, 8, 70])
def test_transpose_out(isa, batch):
    g = torch.Generator().manual_seed(4)
    w = random_24((37, 45), g)
    sw = pyhwp.to_sparse(w, "2:4")
    x = torch.randn(batch, 45, generator=g)
    bias = torch.randn(37, generator=g)
    yt = torch.ops.pyhwp.sparse24_matmul(x, sw.values, sw.meta, bias, True)
    assert yt.shape == (37, batch) and yt.is_contiguous()
    assert_linear_close(yt.t(), x, w, bias, terms(w))


@pytest.mark.parametrize("batch", [1, 5, 40, 300])  # 300: three X panels (128 + 128 + 44 columns)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_writes_only_its_outputs(isa, batch, threads):
    """Strided y with gaps, poisoned, in both layouts ((P, N) and (N, P), the conv planes'): every
    output written, nothing between them touched."""
    g = torch.Generator().manual_seed(5)
    n, k = 19, 70
    w = random_24((n, k), g)
    sw = pyhwp.to_sparse(w, "2:4")
    x = torch.randn(batch, k, generator=g)
    buf = torch.full((batch, n + 3), float("nan"))
    _C.sparse24_matmul(n, k, sw.values.data_ptr(), sw.meta.data_ptr(), x.data_ptr(), batch, 1, k, 0,
                       buf.data_ptr(), 1, n + 3, threads)
    assert_linear_close(buf[:, :n], x, w, terms=terms(w))
    assert torch.isnan(buf[:, n:]).all()
    planes = torch.full((n, batch + 5), float("nan"))
    _C.sparse24_matmul(n, k, sw.values.data_ptr(), sw.meta.data_ptr(), x.data_ptr(), batch, 1, k, 0,
                       planes.data_ptr(), batch + 5, 1, threads)
    assert_linear_close(planes[:, :batch].t(), x, w, terms=terms(w))
    assert torch.isnan(planes[:, batch:]).all()


def test_mask_defines_kept_positions():
    w = torch.randn(3, 8)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, [0, 3]] = True
    mask[1, [5]] = True
    w[0, 0] = 0.0  # a kept weight that is zero stays stored
    sw = pyhwp.to_sparse(w, "2:4", mask=mask)
    assert torch.equal(sw.to_dense(), w * mask)
    assert sw.nnz == 3 * 4  # every group stores 2 slots
    # the mask's positions, not the weight's nonzeros, decide: w itself is dense here
    bad = mask.clone()
    bad[2, 4:7] = True
    with pytest.raises(ValueError, match=r"row 2, group 1 \(inputs 4\.\.7\) mask keeps 3"):
        pyhwp.to_sparse(w, "2:4", mask=bad)


def test_round_trip_and_properties():
    g = torch.Generator().manual_seed(6)
    w = random_24((33, 70), g)
    w[0, :4] = torch.tensor([-0.0, 1.0, -0.0, 2.0])  # -0.0 counts as zero
    w[1, :4] = torch.tensor([-0.0, -0.0, -0.0, 0.0])
    sw = pyhwp.to_sparse(w, "2:4")
    assert torch.equal(sw.to_dense(), w)
    assert sw.to_dense().reshape(-1)[:4].tolist() == [0.0, 1.0, 0.0, 2.0]
    kp = padded_cols(70)
    assert kp == 96 and sw.values.shape == (33, 48) and sw.meta.shape == (33, 3)
    assert sw.meta.dtype == torch.int32 and sw.values.dtype == torch.float32
    assert sw.pattern == "2:4" and sw.shape == (33, 70)
    assert sw.nnz == 33 * 36  # 70 inputs: 17 full groups (34 slots) + a group of 2 valid inputs
    assert sw.density == pytest.approx(36 / 70)
    assert sw.nbytes == 33 * 48 * 4 + 33 * 3 * 4
    assert "Sparse24Weight" in repr(sw) and "nbytes" in repr(sw)
    again = Sparse24Weight(sw.shape, sw.values.clone(), sw.meta.clone())  # raw arrays validate
    assert torch.equal(again.to_dense(), w)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, 7])
def test_partial_last_group_nnz(k):
    sw = pyhwp.to_sparse(torch.randn(4, k) * torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])[:k], "2:4")
    assert sw.nnz == 4 * (2 * (k // 4) + min(2, k % 4))


def test_conv_shaped_weight_round_trips():
    g = torch.Generator().manual_seed(7)
    w = random_24((8, 3, 3, 3), g)  # groups run along the flattened (3*3*3 = 27) input dim
    sw = pyhwp.to_sparse(w, "2:4")
    assert sw.shape == (8, 3, 3, 3) and sw.in_features == 27
    assert torch.equal(sw.to_dense(), w)
    with pytest.raises(ValueError, match="conv2d"):
        pyhwp.linear(torch.randn(2, 27), sw)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 9), k=st.integers(0, 70), seed=st.integers(0, 2**31 - 1))
def test_round_trip_property(n, k, seed):
    w = random_24((n, k), torch.Generator().manual_seed(seed)) if n and k else torch.zeros(n, k)
    sw = pyhwp.to_sparse(w, "2:4")
    assert torch.equal(sw.to_dense(), w)
    assert torch.equal(pyhwp.to_sparse(sw.to_dense(), "2:4").meta, sw.meta)


def test_sub_patterns_of_2_4():
    """1:4 and 2:8 weights are 2:4 too; 4:8 is not."""
    g = torch.Generator().manual_seed(8)
    one_four = random_24((6, 32), g, kept=1)
    two_eight = torch.zeros(6, 32)
    two_eight[:, 1::8] = 1.0
    two_eight[:, 6::8] = 2.0
    for w in (one_four, two_eight):
        assert torch.equal(pyhwp.to_sparse(w, "2:4").to_dense(), w)
    four_eight = torch.zeros(6, 32)
    four_eight[:, 8:11] = 1.0  # 3 in group 2
    four_eight[:, 11] = 0.0
    with pytest.raises(ValueError, match=r"row 0, group 2 \(inputs 8\.\.11\) weight has 3 nonzeros"):
        pyhwp.to_sparse(four_eight, "2:4")


def test_not_2_4_names_row_and_group():
    w = random_24((5, 23), torch.Generator().manual_seed(9))
    w[3, 20:23] = 1.0  # the last, partial group: inputs 20..22
    with pytest.raises(ValueError, match=r"row 3, group 5 \(inputs 20\.\.22\) weight has 3 nonzeros"):
        pyhwp.to_sparse(w, "2:4")


@pytest.mark.parametrize("batch", [1, 4, 20, 200])  # 200: every NaN/Inf in the second X panel
def test_nonfinite_inputs_propagate_like_dense(isa, batch):
    g = torch.Generator().manual_seed(10)
    w = random_24((50, 43), g)
    w[:, 3] = 0.0  # never stored: NaN must come from propagation
    w[:5, 40] = 0.0
    w[5:, 40] = 1.5  # stored nonzero: Inf stays Inf (or NaN where signs cancel)
    w[:, 41:43] = 0.0
    sw = pyhwp.to_sparse(w, "2:4")
    x = torch.randn(batch, 43, generator=g)
    x[0 if batch <= 128 else -1, 3] = float("nan")
    x[-1, 40] = float("inf")
    x[-1, 42] = float("-inf") if batch > 1 else x[-1, 42]
    y = pyhwp.linear(x, sw)
    ref = torch.nn.functional.linear(x, w)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-4, atol=1e-4)


def test_empty_batch_and_empty_weight():
    sw = pyhwp.to_sparse(torch.zeros(5, 4), "2:4")
    assert pyhwp.linear(torch.randn(0, 4), sw).shape == (0, 5)
    assert torch.equal(pyhwp.linear(torch.randn(3, 4), sw, torch.ones(5)), torch.ones(3, 5))
    no_inputs = pyhwp.to_sparse(torch.zeros(5, 0), "2:4")
    assert no_inputs.values.shape == (5, 0) and no_inputs.nnz == 0
    assert torch.equal(pyhwp.linear(torch.randn(70, 0), no_inputs, torch.ones(5)), torch.ones(70, 5))
    assert torch.equal(pyhwp.linear(torch.randn(2, 0), no_inputs, torch.ones(5)), torch.ones(2, 5))
    no_outputs = pyhwp.to_sparse(torch.zeros(0, 9), "2:4")
    assert pyhwp.linear(torch.randn(2, 9), no_outputs).shape == (2, 0)


# -- torch's semi-structured layout --------------------------------------------------------

def _cutlass_tensor(dense):
    from torch.sparse import SparseSemiStructuredTensorCUTLASS
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*prototype stage")
        return SparseSemiStructuredTensorCUTLASS(dense.shape, packed=packed, meta=meta, packed_t=None,
                                                 meta_t=None, compressed_swizzled_bitmask=None)


def test_from_semi_structured_cutlass_layout_exact():
    """torch's CUTLASS layout (packed values + reordered meta) decodes exactly, on any device."""
    w = random_24((64, 128), torch.Generator().manual_seed(11)).half()
    sw = Sparse24Weight.from_semi_structured(_cutlass_tensor(w))
    assert sw.dtype == torch.float16 and torch.equal(sw.to_dense(), w)


def test_semi_structured_bad_input():
    sw = pyhwp.to_sparse(random_24((32, 64), torch.Generator().manual_seed(12)), "2:4")
    with pytest.raises(ValueError, match="CUDA-only"):
        sw.to_semi_structured()
    with pytest.raises(TypeError, match="SparseSemiStructuredTensor"):
        Sparse24Weight.from_semi_structured(torch.randn(4, 4))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_round_trip_cuda(dtype):
    w = random_24((128, 256), torch.Generator().manual_seed(13), kept=2).to(dtype)
    sw = pyhwp.to_sparse(w, "2:4").to("cuda")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*prototype stage")
        t = sw.to_semi_structured()
        back = Sparse24Weight.from_semi_structured(t)
        x = torch.randn(256, 8, dtype=dtype, device="cuda")
        torch.testing.assert_close(torch.mm(t, x), torch.mm(w.cuda(), x))
    assert torch.equal(back.to_dense().cpu(), w)


@pytest.mark.cuda
def test_semi_structured_float32_is_1_2_cuda():
    w = torch.zeros(32, 64)
    w[:, 0:2] = 1.0  # 2:4 but a pair with 2 nonzeros
    with pytest.raises(ValueError, match="1:2"):
        pyhwp.to_sparse(w, "2:4").to("cuda").to_semi_structured()


# -- bad input ----------------------------------------------------------------------------

@pytest.fixture
def sw():
    return pyhwp.to_sparse(random_24((6, 5), torch.Generator().manual_seed(14)), "2:4")


@pytest.mark.parametrize("call, exc, match", [
    (lambda sw: pyhwp.linear(torch.randn(2, 4), sw), ValueError, r"x has shape \(2, 4\)"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5, dtype=torch.float64), sw), TypeError, "dtype"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5), sw, torch.randn(5)), ValueError, "bias has shape"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5), sw, torch.randn(6).double()), TypeError, "bias has dtype"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5, device="meta"), sw), ValueError, "x is on meta"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5).half(), pyhwp.to_sparse(torch.zeros(6, 5).half(), "2:4")),
     TypeError, "sparse24_matmul supports dtypes float32"),
])
def test_linear_bad_input(sw, call, exc, match):
    with pytest.raises(exc, match=match):
        call(sw)


def _raw(**kw):
    sw = pyhwp.to_sparse(random_24((3, 40), torch.Generator().manual_seed(15)), "2:4")
    args = {"shape": (3, 40), "values": sw.values.clone(), "meta": sw.meta.clone()} | kw
    return Sparse24Weight(**args)


def _meta_with(word):
    meta = pyhwp.to_sparse(random_24((3, 40), torch.Generator().manual_seed(15)), "2:4").meta.clone()
    meta[1, 0] = word
    return meta


def _padding_value():
    v = pyhwp.to_sparse(random_24((3, 40), torch.Generator().manual_seed(15)), "2:4").values.clone()
    v[2, 30] = 1.0  # slot 30 -> group 15 -> inputs 60..63, beyond in_features 40
    return v


@pytest.mark.parametrize("kw, match", [
    ({"values": torch.randn(3, 32).double().int()}, "floating-point"),
    ({"values": torch.randn(3, 31)}, r"values has shape \(3, 31\), expected .* \(3, 32\)"),
    ({"meta": torch.zeros(3, 2, dtype=torch.int64)}, "torch.int32"),
    ({"meta": torch.zeros(3, 3, dtype=torch.int32)}, r"meta has shape \(3, 3\), expected .* \(3, 2\)"),
    ({"meta": _meta_with(0b0001)}, r"row 1, group 0 stores positions \[1, 0\]"),
    ({"meta": _meta_with(0b1111)}, r"row 1, group 0 stores positions \[3, 3\]"),
    ({"values": _padding_value()}, r"row 2, slot 30 weights input 60 >= in_features 40"),
    ({"values": torch.randn(3, 32, device="meta")}, "values are on meta but meta on cpu"),
])
def test_raw_arrays_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        _raw(**kw)
