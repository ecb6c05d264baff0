"""CPU model of the CUDA masked kernel's index arithmetic for tile storage (csrc/masked/
masked_matmul_cuda.cu, kTiled): the tile map, the tile gather into n-contiguous shared memory,
the ldmatrix(.trans) lane addresses and the epilogue, against an independent model of the
PTX-documented mma.m16n8k16 fragments. No GPU needed; these mirror the .cu formulas, so a change
there must be mirrored here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyhwp
from pyhwp.formats.masked import dense_from_tiles, tile_map
from test_sparse24_mma_layout import ldmatrix_x4

TILE, BK = 16, 32  # MaskedCudaConfig::kTile, kMmaK


def mma_16816(a, b):
    """D (16 x 8) of mma.m16n8k16 (PTX 9.7.14.5.8): A reg i of lane (g, t) = row g + 8(i%2),
    columns 2t + 8(i//2), +1; B reg j = rows 2t + 8j, +1 of column g. D per lane (c0..c3): rows
    g, g, g+8, g+8, columns 2t, 2t+1."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            r, c = g + 8 * (i % 2), 2 * t + 8 * (i // 2)
            A[r, c], A[r, c + 1] = a[lane][i]
        for j in range(2):
            B[2 * t + 8 * j, g], B[2 * t + 8 * j + 1, g] = b[lane][j]
    D = A @ B
    return [[D[lane // 4 + 8 * (c // 2), 2 * (lane % 4) + c % 2] for c in range(4)] for lane in range(32)]


# -- mirrors of masked_matmul_cuda.cu ------------------------------------------------------------

def swz_k(row, chunk):
    return row * BK + ((chunk ^ ((row >> 1) & 3)) << 3)


def swz_n(bn, row, chunk):
    return row * bn + ((chunk ^ (row & 7)) << 3)


def load_w_tiles(bw, smem, tmap, tiles, w0, step):
    flag_rows, flag_cols = tmap.shape
    for c in range(bw * 4):
        half, kr, panel = c & 1, (c >> 1) & (BK - 1), c // (2 * BK)
        fr, fc = w0 // TILE + panel, step * (BK // TILE) + kr // TILE
        t = tmap[fr, fc] if fr < flag_rows and fc < flag_cols else -1
        dst = swz_n(bw, kr, panel * 2 + half)
        smem[dst:dst + 8] = tiles[t * TILE * TILE + (kr % TILE) * TILE + half * 8:][:8] if t >= 0 else 0


def load_k_contig(rows, smem, mat, r0, k0):
    """The kernel's k-contiguous operand load: mat (R, K) rows r0.., 4 chunks of 8 per row."""
    for c in range(rows * 4):
        row, ch = c >> 2, c & 3
        dst = swz_k(row, ch)
        smem[dst:dst + 8] = 0
        gm, gk = r0 + row, k0 + ch * 8
        if gm < mat.shape[0] and gk < mat.shape[1]:
            seg = mat[gm, gk:gk + 8]
            smem[dst:dst + len(seg)] = seg


def load_n_contig(bn, smem, mat, k0, n0):
    """The conv form's X load: mat (K, P) p-contiguous, BK rows of bn / 8 chunks."""
    chunks = bn // 8
    for c in range(BK * chunks):
        row, ch = c // chunks, c % chunks
        dst = swz_n(bn, row, ch)
        smem[dst:dst + 8] = 0
        gk, gn = k0 + row, n0 + ch * 8
        if gk < mat.shape[0] and gn < mat.shape[1]:
            seg = mat[gk, gn:gn + 8]
            smem[dst:dst + len(seg)] = seg


def active_steps(tmap, w0, w_count, nsteps):
    flag_rows, flag_cols = tmap.shape
    fr0, fr1 = w0 // TILE, min(-(-(w0 + w_count) // TILE), flag_rows)
    out = []
    for s in range(nsteps):
        fc0, fc1 = s * BK // TILE, min(-(-(s * BK + BK) // TILE), flag_cols)
        if any(tmap[fr, fc] >= 0 for fr in range(fr0, fr1) for fc in range(fc0, fc1)):
            out.append(s)
    return out


def run_block(conv, bm, bn, warps_m, warps_n, bx, by, w, x, tmap, tiles):
    """One block of masked_mma_kernel<kTiled = true>: C tile (bm x bn) at block (bx, by).
    Linear form: C(p, n) with A = X^T (P, K), B = W; conv form: C(n, p) with A = W, B = X (K, P)."""
    n_w, k = w.shape
    p = x.shape[0]
    M, Ng = (n_w, p) if conv else (p, n_w)
    m0, n0 = bx * bm, by * bn
    wtm, wtn = bm // warps_m, bn // warps_n
    kmi, knj = wtm // 16, wtn // 16
    acc = np.zeros((warps_m, warps_n, kmi, 2 * knj, 32, 4))
    w0 = m0 if conv else n0
    for step in active_steps(tmap, w0, bm if conv else bn, -(-k // BK)):
        sa, sb = np.zeros(bm * BK), np.zeros(bn * BK)
        if conv:
            load_w_tiles(bm, sa, tmap, tiles, m0, step)
            load_n_contig(bn, sb, x.T, step * BK, n0)
        else:
            load_k_contig(bm, sa, x, m0, step * BK)
            load_w_tiles(bn, sb, tmap, tiles, n0, step)
        for wm in range(warps_m):
            for wn in range(warps_n):
                for ks in range(BK // 16):
                    af = []
                    for mi in range(kmi):
                        if conv:
                            addr = [swz_n(bm, ks * 16 + (ln & 7) + ((ln >> 4) << 3),
                                          (wm * wtm + mi * 16) // 8 + ((ln >> 3) & 1)) for ln in range(32)]
                            af.append(ldmatrix_x4(sa, addr, trans=True))
                        else:
                            addr = [swz_k(wm * wtm + mi * 16 + (ln & 15), ks * 2 + (ln >> 4)) for ln in range(32)]
                            af.append(ldmatrix_x4(sa, addr))
                    bf = []
                    for nj in range(knj):
                        addr = [swz_n(bn, ks * 16 + (ln & 7) + (((ln >> 3) & 1) << 3),
                                      (wn * wtn + nj * 16) // 8 + (ln >> 4)) for ln in range(32)]
                        r = ldmatrix_x4(sb, addr, trans=True)
                        bf.append([[r[ln][0], r[ln][1]] for ln in range(32)])
                        bf.append([[r[ln][2], r[ln][3]] for ln in range(32)])
                    for mi in range(kmi):
                        for nb in range(2 * knj):
                            acc[wm, wn, mi, nb] += np.array(mma_16816(af[mi], bf[nb]))
    c = np.full((M, Ng), np.nan)
    for wm in range(warps_m):
        for wn in range(warps_n):
            for mi in range(kmi):
                for nb in range(2 * knj):
                    for ln in range(32):
                        for h in range(2):
                            gm = m0 + wm * wtm + mi * 16 + (ln >> 2) + h * 8
                            gn = n0 + wn * wtn + nb * 8 + (ln & 3) * 2
                            for e in range(2):
                                if gm < M and gn + e < Ng:
                                    c[gm, gn + e] = acc[wm, wn, mi, nb, ln, 2 * h + e]
    return c


def _weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (n, k), generator=g).float()  # small integers: exact sums
    keep = torch.rand(-(-n // 16), -(-k // 16), generator=g) >= 0.5
    w *= keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :k]
    return w


@pytest.mark.parametrize("conv", [False, True], ids=["linear-form", "conv-form"])
@pytest.mark.parametrize("cfg", [(64, 64, 2, 2), (128, 128, 2, 4)], ids=["small", "big"])
def test_tiled_block_matches_the_product(conv, cfg):
    bm, bn, wm, wn = cfg
    n, k, p = (bm + 20, 80, bn + 9) if conv else (bn + 20, 80, bm + 9)  # partial panels, K % 32 != 0
    w = _weight(n, k, seed=bm + conv)
    x = torch.randint(-3, 4, (p, k), generator=torch.Generator().manual_seed(7)).float()
    mw = pyhwp.to_sparse(w, "masked")
    tmap = tile_map(mw.tile_ptr, mw.tile_idx, n, k).numpy()
    tiles = mw.values.reshape(-1).numpy()
    ref = (w @ x.T if conv else x @ w.T).numpy()
    M, Ng = ref.shape
    got = np.full_like(ref, np.nan)
    for bx in range(-(-M // bm)):
        for by in range(-(-Ng // bn)):
            c = run_block(conv, bm, bn, wm, wn, bx, by, w.numpy(), x.numpy(), tmap, tiles)
            sl = np.s_[bx * bm:(bx + 1) * bm, by * bn:(by + 1) * bn]
            got[sl] = c[sl]
    np.testing.assert_array_equal(got, ref)


def test_tile_map_addresses_every_stored_tile():
    w = _weight(50, 70, seed=3)
    mw = pyhwp.to_sparse(w, "masked")
    m = tile_map(mw.tile_ptr, mw.tile_idx, 50, 70)
    assert m.dtype == torch.int32 and m.shape == (4, 5)
    assert sorted(m[m >= 0].tolist()) == list(range(mw.ntiles))
    assert torch.equal(m >= 0, mw.tile_flags().bool())
    # The map alone rebuilds the dense weight from the tiles (the kernel's view of W).
    dense = torch.zeros(64, 80)
    for (i, j), t in np.ndenumerate(m.numpy()):
        if t >= 0:
            dense[16 * i:16 * i + 16, 16 * j:16 * j + 16] = mw.values[t].t()
    assert torch.equal(dense[:50, :70], w)
    assert torch.equal(dense_from_tiles(mw.tile_ptr, mw.tile_idx, mw.values, 50, 70), w)


def test_tile_map_of_an_all_zero_weight_is_all_unstored():
    mw = pyhwp.to_sparse(torch.zeros(20, 33), "masked")
    m = tile_map(mw.tile_ptr, mw.tile_idx, 20, 33)
    assert m.shape == (2, 3) and bool((m == -1).all())


def test_cpu_weights_carry_no_tile_map_and_count_their_arrays():
    mw = pyhwp.to_sparse(_weight(40, 48, seed=5), "masked")
    assert mw.kernel_tile_map is None
    fields = (mw.tile_ptr, mw.tile_idx, mw.values, mw.mask_bits)
    assert mw.nbytes == sum(t.numel() * t.element_size() for t in fields)
