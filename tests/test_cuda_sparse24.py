"""CUDA 2:4 kernels (sparse24_matmul_cuda on mma.sp, sparse24_compress_cuda) against float64 CPU
references: float16 / bfloat16, batches 1-16 (n8 tiles), 17 and 128, odd K, both operand layouts,
strided x, bias, poisoned outputs, groups with 0/1/2 nonzeros and -0.0, NaN/Inf, split-K, conv2d,
device moves and torch semi-structured interop."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import pyhwp
from helpers import assert_linear_close_accum
from pyhwp._ext import _C
from pyhwp.formats.sparse24 import Sparse24Weight
from pyhwp.ops.csr import CUDA_DTYPE_CODES

pytestmark = pytest.mark.cuda

DTYPES = [torch.float16, torch.bfloat16]
# 1-8: one n8 tile; 9-16: two; 17: the 64x64 tile; 128: the 128x128 tile (when the grid fills the GPU).
BATCHES = [1, 2, 3, 5, 8, 9, 12, 16, 17, 33, 128]


def _gen(*key):
    return torch.Generator().manual_seed(hash(key) % 2**31)


def random_24(shape, g, dtype):
    """A 2:4 weight (groups along the flattened input dim) with groups of 0, 1 and 2 nonzeros,
    -0.0 at some dropped positions; values exactly representable in `dtype`."""
    n, k = shape[0], int(torch.tensor(shape[1:]).prod())
    groups = (k + 3) // 4
    kept = torch.randint(0, 3, (n, groups, 1), generator=g)
    keep = (torch.rand(n, groups, 4, generator=g).argsort(-1) < kept).reshape(n, -1)[:, :k]
    w = torch.randn(n, k, generator=g).to(dtype).float()
    w = torch.where(keep, w, torch.where(torch.rand(n, k, generator=g) < 0.3, -0.0, 0.0))
    return w.to(dtype).reshape(shape)


def _terms(k):
    return (k + 1) // 2  # at most 2 products per group of 4


def assert_close(y, x, w, bias=None):
    """Float64 reference; float32 accumulation bound (tensor-core slack) plus one rounding."""
    assert_linear_close_accum(y, x, w, bias, _terms(w.shape[1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 4, 31, 32, 33, 64, 95, 96, 200, 1000])
def test_compress_cuda_matches_cpu_format(dtype, k):
    g = _gen("compress", dtype, k)
    w = random_24((37, k), g, dtype)
    sw = pyhwp.to_sparse(w.cuda(), "2:4")
    ref = Sparse24Weight.from_dense(w.float())  # CPU torch path
    assert sw.values.dtype == dtype and sw.values.is_cuda
    assert torch.equal(sw.meta.cpu(), ref.meta)
    assert torch.equal(sw.values.cpu().float().view(torch.int32), ref.values.view(torch.int32))  # +0.0 fills
    assert torch.equal(sw.to_dense().cpu(), w)
    sw.validate()


@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES], ids=str)
def test_compress_cuda_rejects_non_24(dtype):
    w = torch.zeros(5, 40, dtype=dtype)
    w[3, 8:11] = 1.0  # row 3, group 2 keeps 3
    w[4, 0:4] = 1.0
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 3, group 2 .* 3 nonzeros"):
        pyhwp.to_sparse(w.cuda(), "2:4")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (16, 32), (17, 33), (64, 64), (65, 127), (130, 96), (300, 200)], ids=str)
def test_sparse24_cuda_matches_reference(dtype, shape):
    g = _gen("ref", dtype, shape)
    w = random_24(shape, g, dtype)
    sw = pyhwp.to_sparse(w.cuda(), "2:4")
    bias = torch.randn(shape[0], generator=g).to(dtype)
    for batch in BATCHES:
        x = torch.randn(batch, shape[1], generator=g).to(dtype)
        assert_close(pyhwp.linear(x.cuda(), sw), x, w)
        assert_close(pyhwp.linear(x.cuda(), sw, bias.cuda()), x, w, bias)
        # conv layout: X (K, P) p-contiguous in, Y (N, P) out
        xc = x.t().contiguous().cuda()
        y = torch.ops.pyhwp.sparse24_matmul(xc.t(), sw.values, sw.meta, bias.cuda(), True)
        assert y.is_contiguous() and y.shape == (shape[0], batch)
        assert_close(y.t(), x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [
    lambda g, d: torch.randn(81, 33, generator=g).to(d).cuda().t(),          # transposed
    lambda g, d: torch.randn(20, 162, generator=g).to(d).cuda()[:, ::2],     # strided columns
    lambda g, d: torch.randn(1, 81, generator=g).to(d).cuda().expand(40, 81),  # stride-0 rows
    lambda g, d: torch.randn(70, 83, generator=g).to(d).cuda()[:, 1:82],     # not 16-byte aligned
], ids=["transposed", "strided", "expanded", "misaligned"])
def test_sparse24_cuda_non_contiguous_input(dtype, make):
    g = _gen("strides", dtype)
    w = random_24((40, 81), g, dtype)
    sw = pyhwp.to_sparse(w.cuda(), "2:4")
    x = make(g, dtype)
    assert x.shape[1] == 81 and not x.is_contiguous()
    assert_close(pyhwp.linear(x, sw), x.cpu(), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("y_layout", ["pn", "np_padded"])
def test_sparse24_cuda_writes_every_output_and_nothing_else(dtype, y_layout):
    g = _gen("poison", dtype, y_layout)
    n, k = 77, 150
    w = random_24((n, k), g, dtype)
    sw = pyhwp.to_sparse(w.cuda(), "2:4")
    bias = torch.randn(n, generator=g).to(dtype).cuda()
    code = CUDA_DTYPE_CODES[dtype]
    for batch in (1, 7, 12, 40, 100):
        x = torch.randn(batch, k, generator=g).to(dtype).cuda()
        if y_layout == "pn":
            buf = torch.full((batch, n), float("nan"), dtype=dtype, device="cuda")
            y, y_sn, y_sp = buf, 1, n
        else:
            buf = torch.full((n, batch + 5), float("nan"), dtype=dtype, device="cuda")
            y, y_sn, y_sp = buf, batch + 5, 1
        nbytes = _C.sparse24_matmul_cuda_workspace(n, k, code, x.data_ptr(), batch, 1, k, y.data_ptr(), y_sn, y_sp)
        ws = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8, device="cuda")  # poisoned scratch
        _C.sparse24_matmul_cuda(n, k, sw.values.data_ptr(), sw.meta.data_ptr(), code, x.data_ptr(), batch, 1, k,
                                bias.data_ptr(), y.data_ptr(), y_sn, y_sp, ws.data_ptr(), ws.numel(),
                                torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        out = buf if y_layout == "pn" else buf[:, :batch].t()
        assert not torch.isnan(out).any(), "some outputs were not written"
        if y_layout == "np_padded":
            assert torch.isnan(buf[:, batch:]).all(), "the kernel wrote outside y"
        assert_close(out, x.cpu(), w, bias.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_sparse24_cuda_decode_split_k(dtype, batch):
    """Long K and few rows: the decode tiles split K over blocks (float32 partials, one reduce)."""
    g = _gen("splitk", dtype, batch)
    w = random_24((64, 8192), g, dtype)
    sw = pyhwp.to_sparse(w.cuda(), "2:4")
    bias = torch.randn(64, generator=g).to(dtype)
    x = torch.randn(batch, 8192, generator=g).to(dtype)
    assert_close(pyhwp.linear(x.cuda(), sw, bias.cuda()), x, w, bias)


def _raw_sparse24_cuda(sw, x, bias, y, y_sn, y_sp, fill):
    """One sparse24_matmul_cuda call on x (P, K) row-major with a workspace of `fill` bytes."""
    p, k = x.shape
    n = sw.values.shape[0]
    code = CUDA_DTYPE_CODES[x.dtype]
    nbytes = _C.sparse24_matmul_cuda_workspace(n, k, code, x.data_ptr(), p, 1, k, y.data_ptr(), y_sn, y_sp)
    ws = torch.full((max(nbytes, 1),), fill, dtype=torch.uint8, device="cuda")
    _C.sparse24_matmul_cuda(n, k, sw.values.data_ptr(), sw.meta.data_ptr(), code, x.data_ptr(), p, 1, k,
                            0 if bias is None else bias.data_ptr(), y.data_ptr(), y_sn, y_sp, ws.data_ptr(),
                            ws.numel(), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return nbytes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fill", [0x00, 0x7F, 0xFF])
def test_sparse24_cuda_split_k_poisoned_workspace(dtype, fill):
    """Split-K partials and the per-split non-finite counts live in the workspace and are never
    zeroed: every byte read must have been written in the same call, whatever the scratch held
    (0x7F bytes read as int counts would turn every output into NaN; 0xFF as float partials NaN)."""
    g = _gen("split-poison", dtype, fill)
    n, k = 96, 8192
    w = random_24((n, k), g, dtype)
    sw = pyhwp.to_sparse(w.cuda(), "2:4")
    bias = torch.randn(n, generator=g).to(dtype).cuda()
    for batch in (1, 3, 16, 20):
        x = torch.randn(batch, k, generator=g).to(dtype).cuda()
        y = torch.full((batch, n), float("nan"), dtype=dtype, device="cuda")
        nbytes = _raw_sparse24_cuda(sw, x, bias, y, 1, n, fill)
        assert nbytes >= 4 * batch * n * 2, "expected a split-K plan (float32 partials of >= 2 splits)"
        assert not torch.isnan(y).any()
        assert_close(y, x.cpu(), w, bias.cpu())


def _assert_nonfinite_like_dense(y, x, w):
    ref = F.linear(x.double(), w.double())
    y = y.double().cpu()
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse24_cuda_nonfinite_inputs_propagate_like_dense(dtype):
    g = _gen("nonfinite", dtype)
    w = random_24((50, 40), g, dtype)
    w[:, 4:8] = 0      # group 1 stores only zeros: x[:, 7] = Inf gives NaN (0 * Inf) in every row
    w[0, 8:12] = 0
    w[0, 9] = 1.0      # row 0 keeps input 9: -Inf there
    w[1, 8:12] = 0     # row 1 stores input 9 as a completion zero: 0 * -Inf = NaN on the tensor cores
    w[2, 8:12] = 0
    w[2, 10] = 2.0     # row 2 stores inputs 8 and 10, not 9: NaN from the fix-up pass
    sw = pyhwp.to_sparse(w.cuda(), "2:4")
    for batch in (1, 8, 20, 70):
        x = torch.randn(batch, 40, generator=g).to(dtype)
        x[0, 3] = float("nan")
        x[-1, 7] = float("inf")
        x[-1, 9] = float("-inf")
        _assert_nonfinite_like_dense(pyhwp.linear(x.cuda(), sw), x, w)
        y = torch.ops.pyhwp.sparse24_matmul(x.t().contiguous().cuda().t(), sw.values, sw.meta, None, True)
        _assert_nonfinite_like_dense(y.t(), x, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse24_weight_moves_between_devices(dtype):
    g = _gen("move", dtype)
    w = random_24((24, 70), g, dtype)
    cpu = Sparse24Weight.from_dense(w)  # CPU torch path, values in dtype
    gpu = cpu.to("cuda")
    assert torch.equal(gpu.meta.cpu(), cpu.meta) and torch.equal(gpu.to_dense().cpu(), w)
    back = pyhwp.to_sparse(w.cuda(), "2:4").to("cpu")
    assert torch.equal(back.meta, cpu.meta) and torch.equal(back.to_dense(), w)
    x = torch.randn(3, 70, generator=g).to(dtype)
    assert_close(pyhwp.linear(x.cuda(), gpu), x, w)


def test_sparse24_cuda_float32_is_refused_clearly():
    sw = pyhwp.to_sparse(torch.zeros(8, 32, device="cuda"), "2:4")
    with pytest.raises(TypeError, match="supports dtypes float16, bfloat16"):
        pyhwp.linear(torch.zeros(2, 32, device="cuda"), sw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(shape=(16, 8, 3, 3), x=(2, 8, 9, 9), padding=1),
    dict(shape=(32, 16, 1, 1), x=(2, 16, 7, 7), padding=0),
    dict(shape=(24, 6, 3, 3), x=(1, 12, 8, 8), padding=1, groups=2),
    dict(shape=(8, 5, 3, 3), x=(3, 5, 11, 10), padding=2, stride=2, dilation=2),
], ids=["3x3", "1x1", "grouped", "strided"])
def test_sparse24_cuda_conv2d(dtype, case):
    g = _gen("conv", dtype, str(case))
    case = dict(case)
    w = random_24(case.pop("shape"), g, dtype)
    x = torch.randn(case.pop("x"), generator=g).to(dtype)
    bias = torch.randn(w.shape[0], generator=g).to(dtype)
    sw = pyhwp.to_sparse(w.cuda(), "2:4")
    y = pyhwp.conv2d(x.cuda(), sw, bias.cuda(), **case)
    ref = F.conv2d(x.double(), w.double(), bias.double(), **case)
    k = w[0].numel()
    mag = F.conv2d(x.double().abs(), w.double().abs(), bias.double().abs(), **case)
    tol = 4 * (_terms(k) + 2) * 2**-24 * mag + 2 * (2**-11 if dtype == torch.float16 else 2**-8) * ref.abs() + 1e-30
    assert ((y.double().cpu() - ref).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_semi_structured_round_trip(dtype):
    """torch's semi-structured tensor <-> Sparse24Weight (where torch runs 2:4 on this GPU)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch semi-structured needs compute capability >= 8.0")
    g = _gen("semi", dtype)
    w = torch.zeros(64, 128, dtype=dtype)
    w.view(64, 32, 4)[..., 1] = torch.randn(64, 32, generator=g).to(dtype)
    w.view(64, 32, 4)[..., 2] = torch.randn(64, 32, generator=g).to(dtype)
    sw = pyhwp.to_sparse(w.cuda(), "2:4")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*prototype stage")
        semi = sw.to_semi_structured()
        assert torch.equal(semi.to_dense().cpu(), w)
        back = Sparse24Weight.from_semi_structured(semi)
    assert torch.equal(back.meta.cpu(), sw.meta.cpu()) and torch.equal(back.values.cpu(), sw.values.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 5, 16, 40])
def test_sparse24_cuda_nonfinite_split_k_and_single(dtype, batch):
    """NaN/Inf counted while the mma kernel loads X: with split-K (counts per split, patched in the
    reduce; the non-finite inputs in different splits) and without (patched by the non-finite
    kernel), in both operand layouts, with poisoned scratch."""
    g = _gen("nonfinite-split", dtype, batch)
    for n, k in ((64, 8192), (300, 96)):  # split-K decode / one split
        w = random_24((n, k), g, dtype)
        w[:, 4:8] = 0          # group 1 stores zeros only: Inf at input 7 -> NaN on the tensor cores
        w[:, k - 4:] = 0       # the last group too, in the last split
        w[0, 9] = 1.0          # rows 0 / 1: input 9 stored with a value / not at all
        w[1, 8:12] = 0
        w[1, 10] = 3.0
        sw = pyhwp.to_sparse(w.cuda(), "2:4")
        x = torch.randn(batch, k, generator=g).to(dtype)
        x[0, 7] = float("inf")
        x[0, k - 1] = float("nan")
        x[-1, 9] = float("-inf")
        x[-1, k // 2 + 3] = float("inf")  # a middle split
        if batch > 2:
            x[1, 9] = float("inf")
        y = torch.empty(batch, n, dtype=dtype, device="cuda")
        _raw_sparse24_cuda(sw, x.cuda(), None, y, 1, n, 0x7F)
        _assert_nonfinite_like_dense(y, x, w)
        _assert_nonfinite_like_dense(pyhwp.linear(x.cuda(), sw), x, w)
        yc = torch.ops.pyhwp.sparse24_matmul(x.t().contiguous().cuda().t(), sw.values, sw.meta, None, True)
        _assert_nonfinite_like_dense(yc.t(), x, w)
        finite = torch.randn(batch, k, generator=g).to(dtype)
        assert_close(pyhwp.linear(finite.cuda(), sw), finite, w)  # nothing left over from the last call
