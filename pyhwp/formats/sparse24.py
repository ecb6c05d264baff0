"""2:4 storage: half the weights plus 2-bit in-group positions (layout of csrc/sparse24), one
layout on every device: the CUDA kernel (mma.sp) reads the CPU layout in place."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyhwp.formats.base import SparseWeight, register_pattern

GROUP = 4  # consecutive inputs per group
KEEP = 2  # slots per group
CHUNK = 32  # inputs per metadata word (16 slots of 2 bits)


# pyhwp::DType codes of the CUDA compression kernel (csrc/common/dtype.h).
_CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _has_cuda_compress() -> bool:
    from pyhwp._ext import _C

    return hasattr(_C, "sparse24_compress_cuda")


def padded_cols(k: int) -> int:
    """in_features rounded up to a whole number of 32-input metadata words (Kp)."""
    return -(-k // CHUNK) * CHUNK


def _slot_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each 4-bit keep pattern of a group (bit i = position i kept): the number kept, and the
    two stored positions (the kept ones, completed with the lowest unused positions, increasing)."""
    count, first, second = [], [], []
    for code in range(16):
        kept = [i for i in range(GROUP) if code >> i & 1]
        slots = sorted((kept + [i for i in range(GROUP) if i not in kept])[:KEEP]) if len(kept) <= KEEP else [0, 1]
        count.append(len(kept))
        first.append(slots[0])
        second.append(slots[1])
    as_u8 = lambda v: torch.tensor(v, dtype=torch.uint8, device=device)  # noqa: E731
    return as_u8(count), as_u8(first), as_u8(second)


def _decode_positions(meta: torch.Tensor) -> torch.Tensor:
    """(N, Kp/32) int32 metadata -> (N, Kp/2) int64 input position of every slot."""
    n, words = meta.shape
    # Remainders rather than shifts and masks: the same integers, in ops the ONNX export of the
    # sparse layers (which decodes this in its graph) translates exactly. Field j is
    # (m mod 4^(j+1) - m mod 4^j) / 4^j; the quotient's operands are r * 4^j and 4^j, exact even
    # where an exporter divides in floating point.
    m = meta.to(torch.int64) % 2**32  # the uint32 bit patterns
    scales = 4 ** torch.arange(17, device=meta.device)
    low = m.unsqueeze(-1) % scales  # (N, words, 17): m mod 4^j
    within = (low[..., 1:] - low[..., :-1]).div(scales[:-1], rounding_mode="floor")  # (N, words, 16)
    group_base = GROUP * torch.arange(words * 16, device=meta.device).div(KEEP, rounding_mode="floor")
    return within.reshape(n, words * 16) + group_base


@register_pattern
@dataclass(frozen=True, eq=False, repr=False)  # repr: SparseWeight.__repr__ (a summary)
class Sparse24Weight(SparseWeight):
    """2:4 structured sparsity of the (out, in_features) matrix: at most 2 nonzeros in every group
    of 4 consecutive inputs [4g, 4g+4).

    in_features is padded with zero weights to Kp = padded_cols(in_features) (a multiple of 32).
    Every group stores 2 slots; slot s of a row weights input 4*(s//2) + its 2-bit position.

    values: (out, Kp/2) float, row-major; the weight of each slot. A group with fewer than 2 kept
        weights is completed with unused positions holding 0; slots at inputs >= in_features hold 0.
    meta: (out, Kp/32) int32 holding uint32 bit patterns: bits [2j, 2j+1] of word c of a row are the
        position in [0, 4) of slot 16c+j; the two positions of a group strictly increase.

    Bytes per weight: 2 + 1/8 (dense float32: 4). Weights that are 1:4 or 2:8 sparse are 2:4 too
    and store the same way.

    Devices: one layout everywhere. The CPU kernels take float32 values; on CUDA, float16 and
    bfloat16 values run on sparse tensor cores, which read these arrays in place (a meta word is
    one row's eight 4-bit groups, the halves of the mma.sp metadata registers; every nibble has
    first < second, valid ordered metadata). So .to(device) is a plain copy of both arrays, and
    from_dense of a CUDA weight runs one compression kernel that gives the same arrays.
    """

    values: torch.Tensor
    meta: torch.Tensor
    pattern = "2:4"

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> Sparse24Weight:
        """Compress a weight whose nonzeros (or `mask`'s True positions) are 2:4; -0.0 counts as zero.

        Raises ValueError naming the first row and group with more than 2 nonzeros (kept positions).
        """
        shape = tuple(weight.shape)
        n, k, dev = shape[0], math.prod(shape[1:]), weight.device
        w2 = weight.reshape(n, k)
        kp = padded_cols(k)
        if mask is None and dev.type == "cuda" and weight.dtype in _CUDA_DTYPE_CODES and _has_cuda_compress():
            return cls._from_dense_cuda(shape, w2)
        keep = (w2 != 0) if mask is None else mask.reshape(n, k)
        code = torch.zeros((n, kp), dtype=torch.uint8, device=dev)
        code[:, :k] = keep
        code = code.view(n, kp // GROUP, GROUP)
        code = code[..., 0] | code[..., 1] << 1 | code[..., 2] << 2 | code[..., 3] << 3  # (N, G)
        count, first, second = _slot_tables(dev)
        over = count[code.long()] > KEEP
        if bool(over.any()):
            row, group = (int(i) for i in over.nonzero()[0])
            what = "mask keeps" if mask is not None else "weight has"
            kept = int(count[code[row, group].long()])
            raise ValueError(
                f"not 2:4 sparse: row {row}, group {group} (inputs {GROUP * group}..{min(GROUP * group + 3, k - 1)})"
                f" {what} {kept} nonzeros; at most {KEEP} of every {GROUP} consecutive inputs may be kept"
            )
        pos = torch.stack((first[code.long()], second[code.long()]), dim=-1)  # (N, G, 2) uint8
        dense = torch.zeros((n, kp), dtype=weight.dtype, device=dev)
        dense[:, :k] = torch.where(keep, w2, torch.zeros((), dtype=weight.dtype, device=dev))
        values = dense.view(n, kp // GROUP, GROUP).gather(-1, pos.long()).reshape(n, kp // KEEP)
        nibble = (pos[..., 0] | pos[..., 1] << 2).view(n, kp // CHUNK, CHUNK // GROUP).to(torch.int64)
        word = torch.zeros((n, kp // CHUNK), dtype=torch.int64, device=dev)
        for i in range(CHUNK // GROUP):
            word |= nibble[..., i] << (4 * i)
        meta = (word - (word >= 2**31).to(torch.int64) * 2**32).to(torch.int32)
        return cls._unchecked(shape, values=values.contiguous(), meta=meta)

    @classmethod
    def _from_dense_cuda(cls, shape: tuple[int, ...], w2: torch.Tensor) -> Sparse24Weight:
        """from_dense of a CUDA (N, K) weight by one compression kernel (csrc/sparse24/
        sparse24_compress_cuda.cu), bit-identical to the torch ops path; one host sync for the
        2:4 check."""
        from pyhwp._ext import _C

        n, k = w2.shape
        kp = padded_cols(k)
        if w2.stride(1) != 1 or (n > 1 and w2.stride(0) < k):
            w2 = w2.contiguous()
        values = torch.empty((n, kp // KEEP), dtype=w2.dtype, device=w2.device)
        meta = torch.empty((n, kp // CHUNK), dtype=torch.int32, device=w2.device)
        no_bad = 2**63 - 1
        bad = torch.full((1,), no_bad, dtype=torch.int64, device=w2.device)
        with torch.cuda.device(w2.device):
            _C.sparse24_compress_cuda(n, k, w2.data_ptr(), w2.stride(0) if n > 1 else k, _CUDA_DTYPE_CODES[w2.dtype],
                                      values.data_ptr(), meta.data_ptr(), bad.data_ptr(),
                                      torch.cuda.current_stream(w2.device).cuda_stream)
        first = int(bad.item())
        if first != no_bad:
            row, group = divmod(first, kp // GROUP)
            kept = int((w2[row, GROUP * group:GROUP * group + GROUP] != 0).sum())
            raise ValueError(
                f"not 2:4 sparse: row {row}, group {group} (inputs {GROUP * group}..{min(GROUP * group + 3, k - 1)})"
                f" weight has {kept} nonzeros; at most {KEEP} of every {GROUP} consecutive inputs may be kept"
            )
        return cls._unchecked(shape, values=values, meta=meta)

    @property
    def padded_in_features(self) -> int:
        return padded_cols(self.in_features)

    @property
    def nnz(self) -> int:
        """Stored slots at inputs < in_features (kept weights, zeros completing a group included)."""
        n, k = self.out_features, self.in_features
        slots = n * (self.padded_in_features // KEEP)
        if n == 0 or k == self.padded_in_features:
            return slots
        last = _decode_positions(self.meta[:, -1:]) + (self.padded_in_features - CHUNK)
        return slots - int((last >= k).sum())

    def to_dense(self) -> torch.Tensor:
        n, k, kp = self.out_features, self.in_features, self.padded_in_features
        dense = torch.zeros((n, kp), dtype=self.dtype, device=self.device)
        if n and kp:
            dense.scatter_(1, _decode_positions(self.meta), self.values)
        return dense[:, :k].reshape(self.shape)

    def validate(self) -> None:
        n, k, kp = self.out_features, self.in_features, self.padded_in_features
        v, m = self.values, self.meta
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or not v.is_floating_point():
            raise ValueError("2:4 values must be a 2-D floating-point tensor")
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.dtype != torch.int32:
            raise ValueError("2:4 meta must be a 2-D torch.int32 tensor")
        if v.device != m.device:
            raise ValueError(f"2:4 values are on {v.device} but meta on {m.device}")
        if tuple(v.shape) != (n, kp // KEEP):
            raise ValueError(f"2:4 values has shape {tuple(v.shape)}, expected (out, padded_cols(in) / 2) = "
                             f"({n}, {kp // KEEP})")
        if tuple(m.shape) != (n, kp // CHUNK):
            raise ValueError(f"2:4 meta has shape {tuple(m.shape)}, expected (out, padded_cols(in) / 32) = "
                             f"({n}, {kp // CHUNK})")
        if n == 0 or kp == 0:
            return
        pos = _decode_positions(m)
        within = (pos % GROUP).view(n, kp // GROUP, KEEP)
        bad = within[..., 0] >= within[..., 1]
        if bool(bad.any()):
            row, group = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"2:4 meta: row {row}, group {group} stores positions {within[row, group].tolist()};"
                             " the two positions of a group must strictly increase")
        pad = (pos >= k) & (v != 0)
        if bool(pad.any()):
            row, slot = (int(i) for i in pad.nonzero()[0])
            raise ValueError(f"2:4 values: row {row}, slot {slot} weights input {int(pos[row, slot])} >= "
                             f"in_features {k} (padding) but holds {float(v[row, slot])}; padding must be 0")

    # -- torch's semi-structured layout (CUDA only in torch) ---------------------------------
    def to_semi_structured(self, dtype: torch.dtype | None = None):
        """This weight as torch.sparse.SparseSemiStructuredTensor (torch runs those on CUDA only).

        dtype: float16 or bfloat16 (torch's 2:4 layouts), or float32, which torch stores as 1:2
        (at most one nonzero in every pair): a float32 weight that is not 1:2 raises ValueError.
        torch also requires shape multiples (e.g. 32 x 64 for float16) and raises otherwise.
        """
        if self.device.type != "cuda":
            raise ValueError(f"to_semi_structured: torch's semi-structured tensors are CUDA-only; the "
                             f"weight is on {self.device} (move it with .to('cuda'))")
        if len(self.shape) != 2:
            raise ValueError(f"to_semi_structured: needs a 2-D (out, in) weight, got shape {self.shape}")
        dense = self.to_dense().to(dtype or self.dtype)
        if dense.dtype == torch.float32 and self.in_features % 2 == 0:
            pairs = (dense != 0).view(self.out_features, -1, 2).sum(-1)
            if bool((pairs > 1).any()):
                raise ValueError("to_semi_structured: torch stores float32 semi-structured weights as 1:2, "
                                 "and this weight has a pair with 2 nonzeros; pass dtype=torch.float16 "
                                 "or torch.bfloat16 for 2:4")
        return torch.sparse.to_sparse_semi_structured(dense)

    @classmethod
    def from_semi_structured(cls, tensor: torch.Tensor) -> Sparse24Weight:
        """A Sparse24Weight with the nonzeros of a torch SparseSemiStructuredTensor, same device.

        The CUTLASS layout (packed values + meta) is decoded exactly on any device; the cuSPARSELt
        layout is opaque and goes through torch's to_dense (exact for float16/bfloat16).
        """
        from torch.sparse import SparseSemiStructuredTensor

        if not isinstance(tensor, SparseSemiStructuredTensor):
            raise TypeError(f"from_semi_structured: expected a torch.sparse.SparseSemiStructuredTensor, "
                            f"got {type(tensor).__name__}")
        if getattr(tensor, "packed", None) is not None and getattr(tensor, "meta", None) is not None:
            from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

            dense = sparse_semi_structured_to_dense_cutlass(tensor.packed, tensor.meta)
        else:
            dense = tensor.to_dense()
        return cls.from_dense(dense)
