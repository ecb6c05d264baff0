"""Masked format and masked_matmul: float64 references over shapes, tile patterns, batches and ISAs."""

from __future__ import annotations

import pytest
import torch

import pyhwp
from pyhwp import MaskedWeight
from pyhwp.formats.masked import pack_bits, unpack_bits
from helpers import assert_linear_close, random_sparse

TN, TK = pyhwp._C.masked_tile()
# Below, at and above the 16-row / 16-column tile, odd sizes, several panels and k-tiles.
SHAPES = [(1, 1), (1, 17), (17, 1), (15, 16), (16, 16), (17, 33), (64, 64), (65, 127), (300, 200)]
# Around the register blocks (AVX2 6, scalar 8, AVX-512 28 columns) and their balanced splits.
BATCHES = [1, 5, 6, 7, 16, 28, 29, 57, 130]


def block_sparse(shape, zero_tiles, g, tile=(TN, TK)):
    """Normal weights with a random zero_tiles fraction of their tiles entirely zero."""
    n, k = shape
    tn, tk = tile
    np_, kt = -(-n // tn), -(-k // tk)
    keep = torch.rand(np_, kt, generator=g) >= zero_tiles
    keep = keep.repeat_interleave(tn, 0).repeat_interleave(tk, 1)[:n, :k]
    return torch.randn(shape, generator=g) * keep


def _terms(sw):
    return sw.in_features


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("zero_tiles", [0.0, 0.5, 1.0])
def test_linear_matches_reference(isa, shape, zero_tiles):
    g = torch.Generator().manual_seed(hash((shape, zero_tiles)) % 2**31)
    w = block_sparse(shape, zero_tiles, g)
    sw = pyhwp.to_sparse(w, "masked")
    bias = torch.randn(shape[0], generator=g)
    for batch in BATCHES:
        x = torch.randn(batch, shape[1], generator=g)
        for b in (None, bias):
            assert_linear_close(pyhwp.linear(x, sw, b), x, w, b)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_unstructured_sparsity(isa, sparsity):
    g = torch.Generator().manual_seed(11)
    w = random_sparse((70, 90), sparsity, g)
    sw = pyhwp.to_sparse(w, "masked")
    for batch in (3, 40):
        x = torch.randn(batch, 90, generator=g)
        assert_linear_close(pyhwp.linear(x, sw), x, w)


def test_zero_rows_columns_and_panels(isa):
    g = torch.Generator().manual_seed(12)
    w = torch.randn(50, 70, generator=g)
    w[16:32] = 0          # a whole panel
    w[5] = 0              # one row inside a stored panel
    w[:, 40:45] = 0       # columns across tile boundaries
    w[32:, :16] = 0       # one tile column of the last panels
    sw = pyhwp.to_sparse(w, "masked")
    assert sw.tile_ptr[2] == sw.tile_ptr[1]  # the zero panel stores nothing
    bias = torch.randn(50, generator=g)
    for batch in (1, 9, 33):
        x = torch.randn(batch, 70, generator=g)
        y = pyhwp.linear(x, sw, bias)
        assert_linear_close(y, x, w, bias)
        assert torch.equal(y[:, 16:32], bias[16:32].expand(batch, 16))  # bias only, exactly


def test_all_zero_weight(isa):
    sw = pyhwp.to_sparse(torch.zeros(20, 30), "masked")
    assert sw.ntiles == 0 and sw.nnz == 0
    bias = torch.randn(20)
    x = torch.randn(4, 30)
    assert torch.equal(pyhwp.linear(x, sw), torch.zeros(4, 20))
    assert torch.equal(pyhwp.linear(x, sw, bias), bias.expand(4, 20))


def test_large_batch_and_k_chunks(isa):
    # K = 4096 and 300 columns: more than one K chunk of packed x, several p-blocks per panel.
    g = torch.Generator().manual_seed(13)
    w = block_sparse((40, 4096), 0.6, g)
    sw = pyhwp.to_sparse(w, "masked")
    bias = torch.randn(40, generator=g)
    x = torch.randn(300, 4096, generator=g)
    assert_linear_close(pyhwp.linear(x, sw, bias), x, w, bias)


def test_3d_input(isa):
    g = torch.Generator().manual_seed(1)
    w = block_sparse((96, 80), 0.5, g)
    sw = pyhwp.to_sparse(w, "masked")
    x = torch.randn(3, 50, 80, generator=g)
    y = pyhwp.linear(x, sw)
    assert y.shape == (3, 50, 96)
    assert_linear_close(y, x, w)


@pytest.mark.parametrize("make", [
    lambda g: torch.randn(33, 80, generator=g).t(),             # transposed
    lambda g: torch.randn(20, 66, generator=g)[:, ::2],          # strided columns
    lambda g: torch.randn(1, 33, generator=g).expand(9, 33),     # stride-0 rows
    lambda g: torch.randn(4, 5, 33, generator=g).transpose(0, 1),
    lambda g: torch.randn(40, 33, generator=g)[3:37],            # offset rows (unaligned start)
], ids=["transposed", "strided", "expanded", "3d-transposed", "offset"])
def test_non_contiguous_input(isa, make):
    g = torch.Generator().manual_seed(2)
    w = block_sparse((40, 33), 0.4, g)
    sw = pyhwp.to_sparse(w, "masked")
    x = make(g)
    assert_linear_close(pyhwp.linear(x, sw), x, w)


@pytest.mark.parametrize("p", [1, 7, 16, 45, 200])
def test_transpose_out_conv_layout(isa, p):
    g = torch.Generator().manual_seed(3)
    w = block_sparse((37, 50), 0.5, g)
    sw = pyhwp.to_sparse(w, "masked")
    bias = torch.randn(37, generator=g)
    xt = torch.randn(50, p, generator=g)  # conv patches: (K, P) with p contiguous
    y = torch.ops.pyhwp.masked_matmul(xt.t(), sw.tile_ptr, sw.tile_idx, sw.values, sw.mask_bits, bias, True)
    assert y.shape == (37, p) and y.is_contiguous()
    assert_linear_close(y.t(), xt.t(), w, bias)
    y2 = torch.ops.pyhwp.masked_matmul(xt.t().contiguous(), sw.tile_ptr, sw.tile_idx, sw.values, sw.mask_bits, None, True)
    assert_linear_close(y2.t(), xt.t(), w)


def test_matmuls_table_entry():
    from pyhwp.ops.linear import MATMULS

    g = torch.Generator().manual_seed(4)
    w = block_sparse((20, 24), 0.5, g)
    sw = pyhwp.to_sparse(w, "masked")
    x = torch.randn(6, 24, generator=g)
    assert_linear_close(MATMULS["masked_matmul"](x, sw, None), x, w)
    assert_linear_close(MATMULS["masked_matmul"](x, sw, None, True).t(), x, w)


def test_nonfinite_inputs_propagate_like_dense(isa):
    g = torch.Generator().manual_seed(5)
    w = block_sparse((50, 40), 0.5, g)
    w[:16, :16] = 0      # a skipped tile: NaN/Inf in columns 0..15 must still poison rows 0..15
    w[20, 3] = 0         # a zero inside a stored tile
    sw = pyhwp.to_sparse(w, "masked")
    for batch in (1, 20, 40):
        x = torch.randn(batch, 40, generator=g)
        x[0, 3] = float("nan")
        x[-1, 7] = float("inf")
        x[-1, 9] = float("-inf")
        if batch > 2:
            x[1, 30] = float("inf")
        y = pyhwp.linear(x, sw)
        ref = torch.nn.functional.linear(x, w)
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert torch.equal(torch.isinf(y), torch.isinf(ref))
        assert torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])
        yt = torch.ops.pyhwp.masked_matmul(x, sw.tile_ptr, sw.tile_idx, sw.values, sw.mask_bits, None, True)
        assert torch.equal(torch.isnan(yt), torch.isnan(ref.t()))


# -- format --------------------------------------------------------------------------------

def test_tile_layout_and_properties():
    g = torch.Generator().manual_seed(6)
    w = block_sparse((33, 70), 0.5, g)
    w[0, 0], w[0, 1] = -0.0, 0.0  # -0.0 counts as zero
    sw = pyhwp.to_sparse(w, "masked")
    assert sw.pattern == "masked" and sw.shape == (33, 70) and sw.tile == (TN, TK) == (16, 16)
    assert torch.equal(sw.to_dense(), w)
    nnz = int((w != 0).sum())
    assert sw.nnz == nnz and sw.density == pytest.approx(nnz / w.numel())
    assert sw.dtype == torch.float32 and sw.device == torch.device("cpu")
    # Tile t of panel j holds W[16 j + r, 16 tile_idx[t] + c] at values[t, c, r].
    for j in range(3):
        for t in range(int(sw.tile_ptr[j]), int(sw.tile_ptr[j + 1])):
            c0 = 16 * int(sw.tile_idx[t])
            block = torch.zeros(16, 16)
            src = w[16 * j:16 * j + 16, c0:c0 + 16]
            block[:src.shape[0], :src.shape[1]] = src
            assert torch.equal(sw.values[t], block.t())
    present = (w != 0).reshape(33, 70)
    expect = sum(bool(present[16 * j:16 * j + 16, 16 * t:16 * t + 16].any()) for j in range(3) for t in range(5))
    assert sw.ntiles == expect and sw.tile_density == pytest.approx(expect / 15)
    flags = sw.tile_flags()
    assert flags.dtype == torch.uint8 and flags.shape == (3, 5) and int(flags.sum()) == expect
    for j in range(3):
        for t in range(5):
            assert flags[j, t] == bool(present[16 * j:16 * j + 16, 16 * t:16 * t + 16].any())
    assert sw.nbytes == sw.ntiles * 256 * 4 + 4 * 8 + sw.ntiles * 4 + 33 * 9
    assert "MaskedWeight" in repr(sw) and "pattern='masked'" in repr(sw)


def test_mask_keeps_exact_positions_including_zero_values():
    w = torch.randn(20, 40)
    w[0, :6] = 0.0
    w[:, 32:] = 0.0
    mask = torch.zeros(20, 40, dtype=torch.bool)
    mask[0, :4] = True      # kept positions whose values are zero
    mask[1:, ::3] = True
    sw = pyhwp.to_sparse(w, "masked", mask=mask)
    assert sw.nnz == int(mask.sum())
    assert torch.equal(sw.mask(), mask)
    torch.testing.assert_close(sw.to_dense(), w * mask, rtol=0, atol=0)
    assert sw.ntiles == 2 * 3  # every tile holds a kept position, zeros included (columns 32..39)
    x = torch.randn(3, 40)
    assert_linear_close(pyhwp.linear(x, sw), x, w * mask)


def test_mask_excludes_nonfinite_pruned_weights():
    w = torch.randn(16, 16)
    w[0, 0] = float("nan")
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[0, 0] = False
    sw = pyhwp.to_sparse(w, "masked", mask=mask)
    assert sw.to_dense()[0, 0] == 0 and torch.isfinite(sw.values).all()


def test_conv_shaped_weight_round_trips():
    w = random_sparse((8, 3, 3, 3), 0.5, torch.Generator().manual_seed(4))
    sw = pyhwp.to_sparse(w, "masked")
    assert sw.shape == (8, 3, 3, 3) and sw.in_features == 27
    assert torch.equal(sw.to_dense(), w)
    assert torch.equal(sw.mask(), w != 0)
    with pytest.raises(ValueError, match="conv2d"):
        pyhwp.linear(torch.randn(2, 27), sw)


def test_bit_packing_round_trip():
    g = torch.Generator().manual_seed(8)
    for k in (1, 7, 8, 9, 64, 65):
        keep = torch.rand(5, k, generator=g) < 0.5
        bits = pack_bits(keep)
        assert bits.dtype == torch.uint8 and bits.shape == (5, (k + 7) // 8)
        assert torch.equal(unpack_bits(bits, k), keep)
    assert pack_bits(torch.tensor([[True, False, False, True, False, False, False, False, True]])).tolist() == [[9, 1]]


def test_pickle_and_to_device_round_trip():
    import pickle

    sw = pyhwp.to_sparse(block_sparse((30, 20), 0.5, torch.Generator().manual_seed(9)), "masked")
    for other in (pickle.loads(pickle.dumps(sw)), sw.to("cpu")):
        assert isinstance(other, MaskedWeight)
        assert torch.equal(other.to_dense(), sw.to_dense()) and torch.equal(other.mask(), sw.mask())


def test_empty_batch_and_empty_shapes():
    sw = pyhwp.to_sparse(torch.randn(5, 4), "masked")
    assert pyhwp.linear(torch.randn(0, 4), sw).shape == (0, 5)
    sw0 = pyhwp.to_sparse(torch.zeros(5, 0), "masked")  # no input features: y = bias
    y0 = torch.ops.pyhwp.masked_matmul(torch.randn(3, 0), sw0.tile_ptr, sw0.tile_idx, sw0.values, sw0.mask_bits,
                                       torch.ones(5), False)
    assert torch.equal(y0, torch.ones(3, 5))
    sw1 = pyhwp.to_sparse(torch.zeros(0, 4), "masked")
    assert pyhwp.linear(torch.randn(3, 4), sw1).shape == (3, 0)


# -- bad input ---------------------------------------------------------------------------

@pytest.fixture
def sw():
    return pyhwp.to_sparse(random_sparse((6, 5), 0.5, torch.Generator().manual_seed(7)), "masked")


@pytest.mark.parametrize("call, exc, match", [
    (lambda sw: pyhwp.linear(torch.randn(2, 4), sw), ValueError, r"x has shape \(2, 4\)"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5, dtype=torch.float64), sw), TypeError, "dtype"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5), sw, torch.randn(5)), ValueError, "bias has shape"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5), sw, torch.randn(6).double()), TypeError, "bias has dtype"),
    (lambda sw: pyhwp.linear(torch.randn(2, 5, device="meta"), sw), ValueError, "x is on meta"),
])
def test_linear_bad_input(sw, call, exc, match):
    with pytest.raises(exc, match=match):
        call(sw)


def test_float64_runs_on_the_torch_path_and_float16_is_refused():
    w = torch.randn(20, 19, dtype=torch.float64)
    w[w.abs() < 0.5] = 0
    sw = pyhwp.to_sparse(w, "masked")
    assert sw.dtype == torch.float64
    x = torch.randn(3, 19, dtype=torch.float64)
    torch.testing.assert_close(pyhwp.linear(x, sw), x @ w.t(), rtol=1e-12, atol=1e-12)
    sw16 = pyhwp.to_sparse(torch.randn(4, 4).half(), "masked")
    with pytest.raises(TypeError, match="masked_matmul supports dtypes float32"):
        pyhwp.linear(torch.randn(2, 4).half(), sw16)


def _raw(n=20, k=20, **override):
    """Raw arrays of a valid 20x20 masked weight (2 panels x 2 k-tiles, 3 stored tiles)."""
    w = torch.randn(n, k)
    w[16:, :16] = 0
    good = pyhwp.to_sparse(w, "masked")
    arrays = dict(tile_ptr=good.tile_ptr.clone(), tile_idx=good.tile_idx.clone(), values=good.values.clone(),
                  mask_bits=good.mask_bits.clone())
    arrays.update(override)
    return arrays


def test_from_valid_raw_arrays():
    arrays = _raw()
    sw = MaskedWeight((20, 20), **arrays)
    assert sw.ntiles == 3 and sw.nnz == 20 * 20 - 4 * 16


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(tile_ptr=torch.tensor([0, 2])), r"panels \+ 1"),
    (lambda a: a.update(tile_ptr=torch.tensor([0, 3, 2])), "decreases"),
    (lambda a: a.update(tile_ptr=torch.tensor([1, 2, 3])), r"tile_ptr\[0\]"),
    (lambda a: a.update(tile_ptr=torch.tensor([0, 2, 2])), "expected the number of tiles"),
    (lambda a: a["tile_idx"].__setitem__(2, 5), "outside"),
    (lambda a: a["tile_idx"].__setitem__(1, 0), "strictly increasing"),
    (lambda a: a.update(tile_idx=a["tile_idx"].long()), "int32"),
    (lambda a: a.update(values=a["values"][:, :8]), "values has shape"),
    (lambda a: a.update(mask_bits=a["mask_bits"][:, :2]), "mask_bits must be a uint8"),
    (lambda a: a["mask_bits"].__setitem__((17, 0), 1), "tile is not stored"),
    (lambda a: a["mask_bits"].__setitem__((0, 2), 0xFF), "past in_features"),
    (lambda a: a["mask_bits"].__setitem__((0, 0), 0xFE), "must be zero where mask_bits prunes"),
    (lambda a: a["values"].__setitem__((2, 15, 15), 1.0), "must be zero where mask_bits prunes"),  # padding
])
def test_raw_arrays_are_validated(change, match):
    arrays = _raw()
    change(arrays)
    with pytest.raises(ValueError, match=match):
        MaskedWeight((20, 20), **arrays)


def test_kernel_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="masked_matmul"):
        pyhwp._C.masked_matmul(2, 3, 0, 0, 0, 0, 0, 1, 1, 3, 0, 0, 1, 2, 1)
