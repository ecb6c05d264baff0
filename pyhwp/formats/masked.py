"""Masked storage: the non-zero 16x16 tiles of the GEMM-form weight, packed for the kernel, plus the
bit-packed element mask."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, cached_property

import torch

from pyhwp.formats.base import SparseWeight, register_pattern

_INT32_MAX = 2**31 - 1


@cache
def tile_shape() -> tuple[int, int]:
    """(rows, cols) of a tile: the kernel's constant (csrc/masked/masked_matmul.h)."""
    from pyhwp._ext import _C

    tn, tk = _C.masked_tile()
    return int(tn), int(tk)


def _popcount_table(device: torch.device) -> torch.Tensor:
    return torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=device)


def _bit_weights(device: torch.device) -> torch.Tensor:
    # 2**arange rather than torch.tensor([...]): export traces it as ops, not a lifted constant.
    return torch.pow(2, torch.arange(8, device=device)).to(torch.uint8)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """(N, K) bool -> (N, ceil(K/8)) uint8; element k is bit k % 8 (least significant first)."""
    n, k = keep.shape
    kb = (k + 7) // 8
    padded = torch.zeros((n, kb * 8), dtype=torch.uint8, device=keep.device)
    padded[:, :k] = keep
    return (padded.view(n, kb, 8) * _bit_weights(keep.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_bits: (N, ceil(K/8)) uint8 -> (N, K) bool."""
    n, kb = bits.shape
    return (bits.unsqueeze(-1) & _bit_weights(bits.device)).ne(0).view(n, kb * 8)[:, :k]


def _tiled(m: torch.Tensor, tn: int, tk: int) -> torch.Tensor:
    """(N, K) -> (panels, ktiles, tk, tn) view of the zero-padded matrix, a tile k-major."""
    n, k = m.shape
    np_, kt = -(-n // tn), -(-k // tk)
    padded = m.new_zeros((np_ * tn, kt * tk))
    padded[:n, :k] = m
    return padded.view(np_, tn, kt, tk).permute(0, 2, 3, 1)


def tile_panels(tile_ptr: torch.Tensor, ntiles: int) -> torch.Tensor:
    """int64 (ntiles,): the row panel of every stored tile."""
    panels = tile_ptr.numel() - 1
    arange = torch.arange(panels, device=tile_ptr.device)
    if torch.onnx.is_in_onnx_export():  # the ONNX repeat_interleave does not take output_size
        return torch.repeat_interleave(arange, tile_ptr.diff())
    # output_size keeps the shape static for fake tensors (torch.compile, opcheck).
    return torch.repeat_interleave(arange, tile_ptr.diff(), output_size=ntiles)


def dense_from_tiles(tile_ptr: torch.Tensor, tile_idx: torch.Tensor, values: torch.Tensor, n: int,
                     k: int) -> torch.Tensor:
    """The (n, k) dense matrix of stored tiles (see MaskedWeight), zeros elsewhere."""
    tn, tk = tile_shape()
    np_, kt = -(-n // tn), -(-k // tk)
    tiles = values.new_zeros((np_, kt, tk, tn))
    tiles = tiles.index_put((tile_panels(tile_ptr, tile_idx.numel()), tile_idx.long()), values)
    return tiles.permute(0, 3, 1, 2).reshape(np_ * tn, kt * tk)[:n, :k]


def tile_map(tile_ptr: torch.Tensor, tile_idx: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """int32 (ceil(n/16), ceil(k/16)): the index into values of the stored tile at (panel, k-tile),
    -1 where no tile is stored. What the CUDA kernel reads the tiles through (MaskedWeight.
    kernel_tile_map); built on tile_ptr's device without a host sync."""
    tn, tk = tile_shape()
    t = tile_idx.numel()
    m = torch.full((-(-n // tn), -(-k // tk)), -1, dtype=torch.int32, device=tile_idx.device)
    m[tile_panels(tile_ptr, t), tile_idx.long()] = torch.arange(t, dtype=torch.int32, device=tile_idx.device)
    return m


def tiles_from_dense(dense: torch.Tensor, tile_ptr: torch.Tensor, tile_idx: torch.Tensor) -> torch.Tensor:
    """The stored tiles' entries of an (n, k) matrix, shaped like MaskedWeight.values."""
    tn, tk = tile_shape()
    return _tiled(dense, tn, tk)[tile_panels(tile_ptr, tile_idx.numel()), tile_idx.long()]


@register_pattern
@dataclass(frozen=True, eq=False, repr=False)  # SparseWeight.__repr__: a summary, not the arrays
class MaskedWeight(SparseWeight):
    """Dense tiles of the (out, in_features) matrix; tiles without a kept weight are not stored.

    With (tn, tk) = `tile` (16 x 16), rows form ceil(out/tn) panels and columns ceil(in/tk)
    k-tiles. A tile is stored when it holds at least one kept position.

    tile_ptr: int64 (panels + 1,): panel j stores tiles tile_ptr[j] .. tile_ptr[j+1]-1.
    tile_idx: int32 (ntiles,): their k-tile index, strictly increasing within a panel.
    values: (ntiles, tk, tn): tile t holds W[tn*j + r, tk*tile_idx[t] + c] at values[t, c, r]
        (k-major, the layout the kernel streams), zeros at pruned and padding positions.
    mask_bits: uint8 (out, ceil(in/8)): the kept mask, bit k % 8 of byte k // 8, so a kept weight
        whose value is zero stays kept (fine-tuning and gradients need the exact positions).
    """

    tile_ptr: torch.Tensor
    tile_idx: torch.Tensor
    values: torch.Tensor
    mask_bits: torch.Tensor
    pattern = "masked"

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> MaskedWeight:
        shape = tuple(weight.shape)
        w2 = weight.reshape(shape[0], math.prod(shape[1:]))
        n, k = w2.shape
        tn, tk = tile_shape()
        if -(-k // tk) > _INT32_MAX:
            raise ValueError(f"weight has {k} input features; masked tile indices are int32")
        keep = (w2 != 0) if mask is None else mask.reshape(w2.shape)
        vals = torch.where(keep, w2, torch.zeros((), dtype=w2.dtype, device=w2.device))
        present = _tiled(keep, tn, tk).any(-1).any(-1)  # (panels, ktiles)
        values = _tiled(vals, tn, tk)[present].contiguous()
        tile_ptr = torch.zeros(present.shape[0] + 1, dtype=torch.int64, device=w2.device)
        torch.cumsum(present.sum(1), 0, out=tile_ptr[1:])
        tile_idx = present.nonzero()[:, 1].to(torch.int32).contiguous()
        mw = cls._unchecked(shape, tile_ptr=tile_ptr, tile_idx=tile_idx, values=values,
                            mask_bits=pack_bits(keep))
        mw.kernel_tile_map  # noqa: B018 - derive the CUDA kernel's map now, not on the first call
        return mw

    @cached_property
    def kernel_tile_map(self) -> torch.Tensor | None:
        """For a weight on CUDA, the int32 (panels, ktiles) map from tile position to stored tile
        (`tile_map`, -1 = not stored) through which the CUDA kernel reads `values` in place; None
        on the CPU (the CPU kernels walk tile_ptr / tile_idx). Derived once per weight (at
        to_sparse; weights from .to() or raw arrays on first use), 4 bytes per 16x16 tile
        position, counted in nbytes."""
        if self.device.type != "cuda":
            return None
        return tile_map(self.tile_ptr, self.tile_idx, self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: tile_ptr, tile_idx, values (the stored tiles, padding included) and
        mask_bits; on CUDA also the kernel's tile map (kernel_tile_map, 4 bytes per tile
        position). The CUDA kernel reads the tiles in place: there is no dense copy."""
        m = self.kernel_tile_map
        return super().nbytes + (0 if m is None else m.numel() * m.element_size())

    @property
    def tile(self) -> tuple[int, int]:
        """(rows, cols) of the tiles that are stored or skipped as a whole."""
        return tile_shape()

    @property
    def ntiles(self) -> int:
        """Stored tiles."""
        return self.tile_idx.numel()

    @property
    def tile_density(self) -> float:
        """Stored tiles / all tiles (1.0 for an empty weight): the fraction of dense work done."""
        tn, tk = self.tile
        total = -(-self.out_features // tn) * -(-self.in_features // tk)
        return self.ntiles / total if total else 1.0

    @property
    def nnz(self) -> int:
        popcount = _popcount_table(self.mask_bits.device)
        return int(popcount[self.mask_bits.long()].sum())

    def tile_flags(self) -> torch.Tensor:
        """uint8 (panels, ktiles): 1 where a tile is stored, 0 where it is skipped (all zeros); the
        flags the CUDA masked kernel takes next to the dense weight."""
        tn, tk = self.tile
        np_, kt = -(-self.out_features // tn), -(-self.in_features // tk)
        flags = torch.zeros((np_, kt), dtype=torch.uint8, device=self.device)
        panel = torch.repeat_interleave(torch.arange(np_, device=self.device), self.tile_ptr.diff(),
                                        output_size=self.ntiles)
        flags[panel, self.tile_idx.long()] = 1
        return flags

    def mask(self) -> torch.Tensor:
        """The kept mask, bool, in `shape`."""
        return unpack_bits(self.mask_bits, self.in_features).reshape(self.shape)

    def to_dense(self) -> torch.Tensor:
        dense = dense_from_tiles(self.tile_ptr, self.tile_idx, self.values, self.out_features, self.in_features)
        return dense.reshape(self.shape).contiguous()

    def validate(self) -> None:
        n, k = self.out_features, self.in_features
        tn, tk = tile_shape()
        np_, kt = -(-n // tn), -(-k // tk)
        tp, ti, v, mb = self.tile_ptr, self.tile_idx, self.values, self.mask_bits
        for name, t, dt in (("tile_ptr", tp, torch.int64), ("tile_idx", ti, torch.int32)):
            if not isinstance(t, torch.Tensor) or t.dtype != dt or t.dim() != 1:
                raise ValueError(f"masked {name} must be a 1-D {dt} tensor")
        if not isinstance(mb, torch.Tensor) or mb.dtype != torch.uint8 or tuple(mb.shape) != (n, (k + 7) // 8):
            raise ValueError(f"masked mask_bits must be a uint8 tensor of shape ({n}, {(k + 7) // 8})")
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise ValueError("masked values must be a floating-point tensor")
        if tuple(v.shape) != (ti.numel(), tk, tn):
            raise ValueError(f"masked values has shape {tuple(v.shape)}, expected ({ti.numel()}, {tk}, {tn})")
        if tp.numel() != np_ + 1:
            raise ValueError(f"masked tile_ptr has {tp.numel()} entries, expected panels + 1 = {np_ + 1}")
        if kt > _INT32_MAX:
            raise ValueError(f"masked in_features {k} needs more than int32 tile indices")
        if not (tp.device == ti.device == v.device == mb.device):
            raise ValueError("masked arrays are on different devices")
        if tp.device.type == "cpu":
            from pyhwp._ext import _C

            tpc, tic = tp.contiguous(), ti.contiguous()
            _C.masked_validate(n, k, ti.numel(), tpc.data_ptr(), tic.data_ptr(), v.data_ptr())
        else:
            if int(tp[0]) != 0 or int(tp[-1]) != ti.numel() or bool((tp.diff() < 0).any()):
                raise ValueError("masked tile_ptr must rise from 0 to the number of tiles")
            if ti.numel() and (int(ti.min()) < 0 or int(ti.max()) >= kt):
                raise ValueError(f"masked tile index outside [0, {kt})")
            if ti.numel() > 1:
                starts = torch.zeros(ti.numel(), dtype=torch.bool, device=ti.device)
                first = tp[:-1]
                starts[first[first < ti.numel()]] = True
                if bool(((ti[1:] <= ti[:-1]) & ~starts[1:]).any()):
                    raise ValueError("masked tile indices must strictly increase within each panel")
        # The mask and the values against the tiles: kept positions lie in stored tiles, and
        # stored values are zero wherever the mask (or the padding) prunes them.
        if k % 8 and bool((mb[:, -1] >> (k % 8)).any()):
            raise ValueError("masked mask_bits has bits set past in_features")
        keep = _tiled(unpack_bits(mb, k), tn, tk)
        present = torch.zeros(keep.shape[:2], dtype=torch.bool, device=keep.device)
        panel = torch.repeat_interleave(torch.arange(np_, device=tp.device), tp.diff(), output_size=ti.numel())
        present[panel, ti.long()] = True
        if bool((keep.any(-1).any(-1) & ~present).any()):
            raise ValueError("masked mask_bits keeps a position whose tile is not stored")
        if ti.numel() and bool(((v != 0) & ~keep[panel, ti.long()]).any()):
            raise ValueError("masked values must be zero where mask_bits prunes (and in the padding)")
