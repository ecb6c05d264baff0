"""CPU model of the CUDA 2:4 kernel's index arithmetic (csrc/sparse24/sparse24_matmul_cuda.cu):
the shared-memory swizzles, ldmatrix lane addresses, metadata byte permute and epilogue, run
against an independent model of the PTX-documented mma.sp.m16n8k32 fragment layouts. Also the
compression kernel's slot rule against Sparse24Weight.from_dense. No GPU needed; these mirror
the .cu formulas, so a change there must be mirrored here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyhwp
from pyhwp.formats.sparse24 import _slot_tables

STEP_K, STAGE_VALS = 64, 32  # Sparse24CudaConfig::kStepK; compressed values per row per stage
PAD_META = 0x44444444


# -- PTX ISA models (written from the documented layouts, not from the kernel) -----------------

def ldmatrix_x4(smem, lane_addr, trans=False):
    """ldmatrix.m8n8.x4.b16 (PTX 9.7.14.5.15): lanes 8i..8i+7 give row addresses (element offsets)
    of matrix i; lane l receives reg i = (row l//4, cols 2(l%4), +1), or with .trans
    (rows 2(l%4), +1 of column l//4)."""
    rows = [[smem[lane_addr[8 * i + r]:lane_addr[8 * i + r] + 8] for r in range(8)] for i in range(4)]
    out = []
    for lane in range(32):
        regs = []
        for i in range(4):
            m = rows[i]
            if trans:
                regs.append((m[2 * (lane % 4)][lane // 4], m[2 * (lane % 4) + 1][lane // 4]))
            else:
                regs.append((m[lane // 4][2 * (lane % 4)], m[lane // 4][2 * (lane % 4) + 1]))
        out.append(regs)
    return out


def byte_perm(x, y, s):
    """CUDA __byte_perm: result byte i = byte ((s >> 4i) & 7) of the 8 bytes y:x."""
    b = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(b[(s >> (4 * i)) & 7] << (8 * i) for i in range(4))


def mma_sp_16832(a, b, e):
    """D (16 x 8) of mma.sp::ordered_metadata.m16n8k32 with selector 0 (PTX 9.7.14.6.2.2):
    A reg i of lane (g, t) = the 2 kept values of group t + 4(i//2) of row g + 8(i%2), lower
    metadata index in the low half; the group's nibble sits in the register of lane
    4(row % 8) + group // 4, bits 16(row // 8) + 4(group % 4); B reg j of lane (g, t) = rows
    8j + 2t, +1 of column g. Returns D laid out per lane as (c0..c3): rows g, g, g+8, g+8,
    columns 2t, 2t+1."""
    A = np.zeros((16, 32))
    B = np.zeros((32, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            row, grp = g + 8 * (i % 2), t + 4 * (i // 2)
            nib = (e[4 * (row % 8) + grp // 4] >> (16 * (row // 8) + 4 * (grp % 4))) & 0xF
            i0, i1 = nib & 3, nib >> 2
            assert i0 < i1, f"metadata nibble {nib:04b} is not ordered (undefined for the instruction)"
            A[row, 4 * grp + i0] = a[lane][i][0]
            A[row, 4 * grp + i1] = a[lane][i][1]
        for j in range(4):
            B[8 * j + 2 * t, g], B[8 * j + 2 * t + 1, g] = b[lane][j]
    D = A @ B
    return [[D[lane // 4 + 8 * (c // 2), 2 * (lane % 4) + c % 2] for c in range(4)] for lane in range(32)]


# -- the kernel's formulas (mirrors of sparse24_matmul_cuda.cu) ----------------------------------

def swz_a(row, chunk):
    return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3)


def swz_bl(row, chunk):
    return row * 64 + ((chunk ^ (row & 7)) << 3)


def swz_bc(c, row, chunk):
    s = (row & 7) if c >= 8 else ((row * c // 8) & (c - 1))
    return row * (c * 8) + ((chunk ^ s) << 3)


def emulate(values, meta, x, bm, bn, wm, wn, conv):
    """Y (N, P) as the kernel computes it (one split), from values (N, Kp/2), meta (N, Kp/32)
    uint32 and X (K, P), all float64 / int."""
    n_rows, words = meta.shape
    k, p = x.shape
    ldv = words * 16
    steps = -(-words * 32 // STEP_K)
    y = np.full((n_rows, p), np.nan)
    chunks_b = bn // 8
    for n0 in range(0, n_rows, bm):
        for p0 in range(0, p, bn):
            acc = {}
            for step in range(steps):
                sa = np.zeros(bm * 32)
                sm = np.zeros(bm * 2, dtype=np.int64)
                sb = np.zeros(bn * STEP_K)
                c0 = step * STAGE_VALS
                for c in range(bm * 4):
                    row, ch = c >> 2, c & 3
                    gn, gc = n0 + row, c0 + ch * 8
                    if gn < n_rows and gc < ldv:
                        sa[swz_a(row, ch):swz_a(row, ch) + 8] = values[gn, gc:gc + 8]
                for c in range(bm * 2):
                    row, w = c // 2, c % 2
                    gn, gw = n0 + row, step * 2 + w
                    sm[c] = meta[gn, gw] if gn < n_rows and gw < words else PAD_META
                k0 = step * STEP_K
                if conv:
                    for c in range(STEP_K * chunks_b):
                        row, ch = c // chunks_b, c % chunks_b
                        gk, gp = k0 + row, p0 + ch * 8
                        if gk < k:
                            seg = x[gk, gp:min(gp + 8, p)]
                            sb[swz_bc(chunks_b, row, ch):swz_bc(chunks_b, row, ch) + len(seg)] = seg
                else:
                    for c in range(bn * 8):
                        row, ch = c >> 3, c & 7
                        gp, gk = p0 + row, k0 + ch * 8
                        if gp < p and gk < k:
                            seg = x[gk:min(gk + 8, k), gp]
                            sb[swz_bl(row, ch):swz_bl(row, ch) + len(seg)] = seg
                for warp in range(wm * wn):
                    warp_m, warp_n = warp // wn, warp % wn
                    wtm, wtn = bm // wm, bn // wn
                    for ks in range(2):
                        if step * 2 + ks >= words:
                            break
                        for mi in range(wtm // 16):
                            r0 = warp_m * wtm + mi * 16
                            af = ldmatrix_x4(sa, [swz_a(r0 + (lane & 15), ks * 2 + (lane >> 4)) for lane in range(32)])
                            ef = [byte_perm(int(sm[(r0 + (lane >> 2)) * 2 + ks]), int(sm[(r0 + (lane >> 2) + 8) * 2 + ks]),
                                            0x7632 if lane & 1 else 0x5410) for lane in range(32)]
                            for nj in range(wtn // 8):
                                cc = warp_n * wtn + nj * 8
                                if conv:
                                    addr = [swz_bc(chunks_b, ks * 32 + ((lane >> 3) << 3) + (lane & 7), cc >> 3)
                                            for lane in range(32)]
                                    bf = ldmatrix_x4(sb, addr, trans=True)
                                else:
                                    bf = ldmatrix_x4(sb, [swz_bl(cc + (lane & 7), ks * 4 + (lane >> 3)) for lane in range(32)])
                                d = mma_sp_16832(af, bf, ef)
                                for lane in range(32):
                                    key = (warp, mi, nj, lane)
                                    prev = acc.get(key, [0.0] * 4)
                                    acc[key] = [prev[i] + d[lane][i] for i in range(4)]
            for warp in range(wm * wn):
                warp_m, warp_n = warp // wn, warp % wn
                wtm, wtn = bm // wm, bn // wn
                for mi in range(wtm // 16):
                    for nj in range(wtn // 8):
                        for lane in range(32):
                            a = acc.get((warp, mi, nj, lane), [0.0] * 4)
                            for h in range(2):
                                gn = n0 + warp_m * wtm + mi * 16 + (lane >> 2) + h * 8
                                gp = p0 + warp_n * wtn + nj * 8 + (lane & 3) * 2
                                if gn >= n_rows or gp >= p:
                                    continue
                                y[gn, gp] = a[2 * h]
                                if gp + 1 < p:
                                    y[gn, gp + 1] = a[2 * h + 1]
    return y


TILES = {"decode8": (64, 8, 4, 1), "decode16": (64, 16, 4, 1), "small": (64, 64, 2, 2)}


@pytest.mark.parametrize("tile", sorted(TILES))
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("shape", [(20, 33, 5), (17, 96, 11), (70, 64, 3)], ids=str)
def test_kernel_layout_model_computes_the_product(tile, conv, shape):
    n, k, p = shape
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + p)
    dense = torch.randn(n, k, generator=g)
    # groups with 0, 1 and 2 nonzeros, and -0.0 at dropped positions
    keep = torch.rand(n, (k + 3) // 4, 4, generator=g).argsort(-1) < torch.randint(0, 3, (n, (k + 3) // 4, 1), generator=g)
    keep = keep.reshape(n, -1)[:, :k]
    dense = torch.where(keep, dense, torch.full_like(dense, -0.0))
    w = pyhwp.to_sparse(dense, "2:4")
    x = torch.randn(k, p, generator=g, dtype=torch.float64)
    meta = (w.meta.to(torch.int64) % 2**32).numpy()
    y = emulate(w.values.double().numpy(), meta, x.numpy(), *TILES[tile], conv)
    ref = dense.double() @ x
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-12, atol=1e-12)


def test_metadata_register_halves():
    # thread 4g: rows g / g+8, inputs 0-15 (low halves); thread 4g+1: inputs 16-31 (high halves)
    lo, hi = 0x87654321, 0xFEDCBA98
    assert byte_perm(lo, hi, 0x5410) == 0xBA984321
    assert byte_perm(lo, hi, 0x7632) == 0xFEDC8765


def test_compress_kernel_slot_rule_matches_from_dense():
    """The (first, second) rule of sparse24_compress_kernel for every keep pattern with <= 2 kept
    equals the CPU format's slot table (so CUDA and CPU compression give the same arrays)."""
    count, first, second = _slot_tables(torch.device("cpu"))
    for code in range(16):
        kept = bin(code).count("1")
        if kept > 2:
            continue
        f, s = 0, 1  # the kernel's rule
        if kept == 1:
            q = (code & -code).bit_length() - 1
            s = 1 if q == 0 else q
        elif kept == 2:
            f, s = (code & -code).bit_length() - 1, code.bit_length() - 1
        assert (f, s) == (int(first[code]), int(second[code])), code
        assert f < s  # valid, ordered mma.sp metadata


def test_every_format_nibble_is_valid_mma_metadata():
    g = torch.Generator().manual_seed(5)
    dense = torch.randn(8, 64, generator=g) * (torch.rand(8, 64, generator=g) < 0.4)
    dense = dense.view(8, 16, 4)
    dense[..., 2:] = torch.where(dense[..., :2] != 0, 0.0, dense[..., 2:])  # force 2:4
    w = pyhwp.to_sparse(dense.view(8, 64), "2:4")
    m = w.meta.to(torch.int64) % 2**32
    nibbles = torch.stack([(m >> (4 * j)) & 0xF for j in range(8)], -1)
    assert bool(((nibbles & 3) < (nibbles >> 2)).all())


@pytest.mark.parametrize("bn", [8, 16, 64, 128])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_count_stage_columns_match_the_swizzled_stage(bn, conv):
    """sparse24_mma_kernel's count_stage reads a landed X stage chunk by chunk in storage order
    and attributes element i of chunk c to a column; load_stage put X(k0 + k, p0 + p) there. Every
    element of the stage must map back to its own column, each exactly once."""
    chunks_b = bn // 8
    sb = [None] * (bn * STEP_K)
    for k in range(STEP_K):  # where load_stage puts element (k, p) of the stage
        for p in range(bn):
            if conv:
                pos = swz_bc(chunks_b, k, p // 8) + p % 8
            else:
                pos = swz_bl(p, k // 8) + k % 8
            assert sb[pos] is None
            sb[pos] = (k, p)
    seen = set()
    for c in range(bn * 8):  # the kernel's formula
        for i in range(8):
            if conv:
                row, pos = c // chunks_b, c % chunks_b
                sw = (row & 7) if chunks_b >= 8 else ((row * chunks_b // 8) & (chunks_b - 1))
                col = ((pos ^ sw) << 3) + i
            else:
                col = c >> 3
            k, p = sb[c * 8 + i]
            assert col == p, (c, i, col, p)
            seen.add((k, p))
    assert len(seen) == bn * STEP_K
