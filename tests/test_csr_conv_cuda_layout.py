"""CPU model of the CUDA implicit-GEMM CSR conv's index arithmetic (csrc/csr/csr_matmul_cuda.cu
csr_conv2d_cuda and pyhwp.ops.csr.csr_conv2d_cuda_plan): padded planes, per-nnz offsets, the
wide output with wrapped columns dropped, the element loads that stop at the last column, and
the non-finite check's window walk, against F.conv2d in float64. No GPU needed; these mirror the
.cu formulas, so a change there must be mirrored here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyhwp
from pyhwp._ext import _C


def planes(ho, wo, kh, kw, dh, dw):
    """conv_planes in csr_matmul_cuda.cu."""
    hp = ho + dh * (kh - 1) + (1 if kw > 1 else 0)
    wp = wo + dw * (kw - 1)
    return hp, wp, (hp * wp + 15) // 16 * 16


def emulate(x, w, pads, dil, out_hw, vec):
    """y (images, out, ho, wo) as the pad kernel + the tile kernel in conv mode compute it, with
    every x read bounds-checked against the padded buffer."""
    n, c, h, wd = x.shape
    out, _, kh, kw = w.shape
    (pt, pl), (dh, dw), (ho, wo) = pads, dil, out_hw
    hp, wp, plane = planes(ho, wo, kh, kw, dh, dw)
    assert pt + h <= hp and pl + wd <= wp
    xp = torch.zeros(n * c * plane, dtype=torch.float64)  # csr_conv2d_pad_kernel
    for i in range(n * c * plane):
        q, o = divmod(i, plane)
        a, b = divmod(o, wp)
        r, cc = a - pt, b - pl
        if a < hp and 0 <= r < h and 0 <= cc < wd:
            xp[i] = x.reshape(-1)[(q * h + r) * wd + cc]
    sw = pyhwp.to_sparse(w, "csr")
    cols = sw.col_indices.long()
    offs = (cols // (kh * kw)) * plane + ((cols % (kh * kw)) // kw) * (dh * wp) + (cols % kw) * dw  # the plan
    x_image, P = c * plane, ho * wp
    y = torch.full((n, out, ho, wo), float("nan"), dtype=torch.float64)
    ro, vals = sw.row_offsets, sw.values.double()
    for img in range(n):
        for row in range(out):
            acc = torch.zeros(-(-P // vec) * vec, dtype=torch.float64)
            for j in range(int(ro[row]), int(ro[row + 1])):
                base = img * x_image + int(offs[j])
                for p0 in range(0, P, vec):  # load_x<T, true>: elements p0 .. min(p0 + vec, P) - 1
                    for e in range(min(vec, P - p0)):
                        idx = base + p0 + e
                        assert 0 <= idx < (img + 1) * x_image, "read outside the image's planes"
                        acc[p0 + e] += vals[j] * xp[idx]
            for p in range(P):  # the conv-mode store
                a, b = divmod(p, wp)
                if b < wo:
                    y[img, row, a, b] = acc[p]
    return y, xp, offs, (hp, wp, plane)


CASES = [
    ((6, 3, 3, 3), (2, 3, 5, 6), (1, 1, 1, 1), (1, 1)),
    ((4, 2, 5, 5), (1, 2, 7, 6), (2, 2, 2, 2), (1, 1)),
    ((5, 3, 3, 3), (2, 3, 9, 8), (2, 2, 2, 2), (2, 2)),
    ((4, 2, 2, 4), (1, 2, 6, 7), (0, 1, 1, 2), (1, 1)),  # asymmetric (pt, pb, pl, pr)
    ((7, 4, 1, 1), (2, 4, 3, 5), (0, 0, 0, 0), (1, 1)),
    ((3, 2, 3, 1), (1, 2, 6, 4), (1, 1, 0, 0), (2, 1)),  # kw == 1: no spare row
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("vec", [4, 8])
def test_implicit_gemm_model_matches_conv(case, vec):
    wshape, xshape, (pt, pb, pl, pr), dil = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    w = torch.randn(wshape, generator=g) * (torch.rand(wshape, generator=g) < 0.6)
    x = torch.randn(xshape, generator=g, dtype=torch.float64)
    kh, kw = wshape[2:]
    ho = xshape[2] + pt + pb - dil[0] * (kh - 1)
    wo = xshape[3] + pl + pr - dil[1] * (kw - 1)
    y, _, _, _ = emulate(x, w, (pt, pl), dil, (ho, wo), vec)
    ref = F.conv2d(F.pad(x, (pl, pr, pt, pb)), w.double(), dilation=dil)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_nonfinite_window_walk_matches_dense(case):
    """csr_conv2d_nonfinite_kernel's rule on the padded planes: NaN where the window holds more
    non-finite inputs than the row's stored taps see; otherwise the tile kernel's own value."""
    wshape, xshape, (pt, pb, pl, pr), dil = case
    g = torch.Generator().manual_seed(7)
    w = torch.randn(wshape, generator=g) * (torch.rand(wshape, generator=g) < 0.5)
    x = torch.randn(xshape, generator=g, dtype=torch.float64)
    x[0, 0, 1, 1] = float("inf")
    x[-1, -1, -1, 0] = float("nan")
    kh, kw = wshape[2:]
    ho = xshape[2] + pt + pb - dil[0] * (kh - 1)
    wo = xshape[3] + pl + pr - dil[1] * (kw - 1)
    y, xp, offs, (hp, wp, plane) = emulate(x, w, (pt, pl), dil, (ho, wo), 8)
    sw = pyhwp.to_sparse(w, "csr")
    c = xshape[1]
    for img in range(xshape[0]):
        for n in range(wshape[0]):
            for a in range(ho):
                for b in range(wo):
                    base = img * c * plane + a * wp + b
                    need = sum(not torch.isfinite(xp[base + ch * plane + r * dil[0] * wp + s * dil[1]])
                               for ch in range(c) for r in range(kh) for s in range(kw))
                    seen = sum(not torch.isfinite(xp[base + int(offs[j])])
                               for j in range(int(sw.row_offsets[n]), int(sw.row_offsets[n + 1])))
                    if seen < need:
                        y[img, n, a, b] = float("nan")
    ref = F.conv2d(F.pad(x, (pl, pr, pt, pb)), w.double(), dilation=dil)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))


@pytest.mark.skipif(not hasattr(_C, "csr_conv2d_cuda_planes"), reason="pyhwp built without CUDA")
def test_planes_mirror_the_extension():
    for geometry in [(2, 3, 5, 6, 1, 1, 3, 3, 1, 1, 5, 6), (1, 2, 6, 4, 1, 0, 3, 1, 2, 1, 4, 4),
                     (1, 4, 3, 5, 0, 0, 1, 1, 1, 1, 3, 5)]:
        assert tuple(_C.csr_conv2d_cuda_planes(geometry)) == planes(*geometry[10:12], *geometry[6:10])
