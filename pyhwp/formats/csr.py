"""CSR storage: kept values, int32 column indices and int64 row offsets of the GEMM-form weight."""

from __future__ import annotations

import functools
import math
import os
import weakref
from dataclasses import dataclass
from functools import cached_property

import torch

from pyhwp.formats.base import SparseWeight, register_pattern
from pyhwp.kernels import _cuda_built

_INT32_MAX = 2**31 - 1
_UINT16_COLS = 2**16  # in_features up to this: the CPU kernels read 16-bit column indices

# CSRWeight -> (address and version of the values it was built from, sliced-ELL blob or None).
_SELL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Every CSRWeight made in this process that is still alive (live_kernel_bytes), how many were ever
# registered, and the last live_kernel_bytes with the (registrations, live count) it was summed at:
# the set changed since exactly when one of the two did (weights only join by registering).
_LIVE: weakref.WeakSet = weakref.WeakSet()
_registered = 0
_live_bytes: tuple[tuple[int, int], int] = ((-1, -1), 0)


def row_order_by_length(row_offsets: torch.Tensor) -> torch.Tensor:
    """The rows of a CSR matrix, longest first (equal lengths in row order), as int32 (out,).

    The CUDA kernels walk rows in this order: neighbouring thread groups get rows of nearly equal
    length and the longest rows start first (Sputnik's row swizzle). Runs on row_offsets' device.
    """
    return torch.argsort(row_offsets.diff(), descending=True, stable=True).to(torch.int32)



@functools.cache
def _avx512() -> bool:
    """Whether this build has AVX-512 kernels and the CPU runs them."""
    from pyhwp._ext import _C

    return "avx512" in _C.build_info()["cpu_kernels"] and bool(_C.cpu_features()["avx512"])


@functools.cache
def sell_budget_bytes() -> int:
    """The most bytes the sliced-ELL copies of all live weights take together (CSRWeight.kernel_sell
    makes them first come, first served): the environment variable PYHWP_SELL_BUDGET (bytes; 0
    makes none) where set, else a quarter of the last-level cache (8 MiB where the OS does not say).
    Copies within it are likely still in cache at their weight's next call, where they read 2-3x
    faster than the CSR gathers; from DRAM their extra bytes make them 1.2-2x slower (Zen 4, batch 1
    at 90%, NOTES.md stops 29 and 30). A model whose weights exceed the cache reads every layer's
    from DRAM, so a budget per copy would lose there: 24 layers of 3072x768 / 768x3072 at 90%, batch
    1, each with its copy, ran 1.3x slower than with none (stop 30). Read once."""
    env = os.environ.get("PYHWP_SELL_BUDGET")
    if env is not None:
        if not env.strip().isdigit():
            raise ValueError(f"PYHWP_SELL_BUDGET must be a number of bytes (0: no copies), got {env!r}")
        return int(env)
    from pyhwp.hardware.cpu import caches, largest_cache_bytes

    llc = largest_cache_bytes(caches())
    return (llc or 32 << 20) // 4


def _register(weight: CSRWeight) -> None:
    # Not while torch.compile traces a module's forward (which rebuilds its weight): dynamo cannot
    # trace the weak set, and compiled graphs take no plan, so nothing reads the count there.
    global _registered
    if not torch.compiler.is_compiling():
        _LIVE.add(weight)
        _registered += 1


def live_kernel_bytes() -> int:
    """Bytes the CPU kernels read of all live CSR weights on the CPU (values, kernel column
    indices, row offsets), each values storage once: a module's weight and the to_sparse weight
    it was made from share theirs. Summed again only after the live set changed: the CPU
    kernels' direct calls ask on every call (kernel_resident), and a model holds hundreds of
    weights (500 live ones made a batch-16 call at 64x64 take 670 us instead of 14)."""
    global _live_bytes
    state = (_registered, len(_LIVE))
    if _live_bytes[0] != state:
        seen: dict[int, int] = {}
        for w in list(_LIVE):
            values = w.values
            if values.is_cpu:
                index_bytes = 2 if w.in_features <= _UINT16_COLS else 4
                seen[values.untyped_storage().data_ptr()] = (values.numel() * (values.element_size() + index_bytes)
                                                             + 8 * (w.out_features + 1))
        _live_bytes = (state, sum(seen.values()))
    return _live_bytes[1]


def _copies_bytes(excluding: CSRWeight) -> int:
    """Bytes of the sliced-ELL copies that live weights other than `excluding` hold."""
    return sum(blob.numel() for weight, (_, blob) in list(_SELL.items())
               if blob is not None and weight is not excluding)


@register_pattern
@dataclass(frozen=True, eq=False, repr=False)
class CSRWeight(SparseWeight):
    """Compressed sparse rows of the (out, in_features) matrix.

    row_offsets: int64 (out + 1,), from 0 to nnz, non-decreasing.
    col_indices: int32 (nnz,), strictly increasing within a row, each in [0, in_features).
    values: (nnz,), the kept weights (zeros allowed: a kept weight may be zero).
    row_order: int32 (out,), a permutation of the rows, longest first (row_order_by_length):
        the schedule of the CUDA kernels, computed once here on the weight's device. Built from
        raw arrays without it, it is computed at construction.
    """

    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    row_order: torch.Tensor | None = None
    pattern = "csr"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.row_order is None:
            object.__setattr__(self, "row_order", row_order_by_length(self.row_offsets))
        _register(self)

    @classmethod
    def _unchecked(cls, shape: tuple[int, ...], **arrays: torch.Tensor) -> CSRWeight:
        self = super()._unchecked(shape, **arrays)
        _register(self)
        return self

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> CSRWeight:
        shape = tuple(weight.shape)
        w2 = weight.reshape(shape[0], math.prod(shape[1:]))  # -1 is ambiguous for 0 rows
        if w2.shape[1] > _INT32_MAX:
            raise ValueError(f"weight has {w2.shape[1]} input features; CSR column indices are int32")
        keep = (w2 != 0) if mask is None else mask.reshape(w2.shape)
        rows, cols = keep.nonzero(as_tuple=True)  # row-major order: sorted within each row
        counts = torch.bincount(rows, minlength=shape[0])
        row_offsets = torch.zeros(shape[0] + 1, dtype=torch.int64, device=weight.device)
        torch.cumsum(counts, 0, out=row_offsets[1:])
        values = w2[rows, cols].contiguous()
        sw = cls._unchecked(shape, row_offsets=row_offsets, col_indices=cols.to(torch.int32).contiguous(),
                            values=values, row_order=row_order_by_length(row_offsets))
        sw.kernel_col_indices  # noqa: B018 - derive the kernel's index array now, not on the first call
        return sw

    @cached_property
    def kernel_col_indices(self) -> torch.Tensor:
        """The column indices the CPU kernels read: an int16 tensor holding them as uint16 bits
        when in_features <= 65536 on the CPU (6 instead of 8 bytes per stored weight, which is what
        batch-1 products are bound by), else col_indices itself. Derived once per weight; not
        counted in nbytes, not moved by .to() (recomputed there)."""
        ci = self.col_indices
        if ci.device.type != "cpu" or self.in_features > _UINT16_COLS:
            return ci
        # uint16 bits in an int16 tensor: indices >= 2**15 become negative.
        return torch.where(ci >= 2**15, ci - _UINT16_COLS, ci).to(torch.int16).contiguous()

    def kernel_sell(self, remake: bool = True) -> torch.Tensor | None:
        """The sliced-ELL copy of a 2-D float32 or bfloat16 CPU weight (csrc/csr/csr_sell.h) as a
        uint8 blob, or None (other weights, a CPU without AVX-512, or a copy larger than what
        sell_budget_bytes() leaves after the copies other live weights hold: decided at the first
        call and kept, like a copy, until the values change). The CPU kernels read it instead of
        the CSR arrays at batches up to 8, where they run 2-3x faster from cache. 16 rows share
        each vector and x's terms come from permutes of 32-input windows; rows shorter than the
        longest of their 16 in a window are padded with zeros, so it takes more bytes than the CSR
        arrays (at 90% random sparsity about 1.7x with float32 values, 1.5x with bfloat16). It
        copies the values: built on first use and again after they change (moved or modified in
        place), unless `remake` is False, which returns None for a stale copy instead (remaking
        one takes about 0.4-2 ms at 1536x384 to 3072x768, 90%). None for inference-tensor values
        (made under torch.inference_mode by other means than to_sparse), whose changes in place
        nothing could detect. Not counted in nbytes."""
        values = self.values
        if values.is_inference():  # no version counter to tell a stale copy: none
            return None
        key = (values.data_ptr(), values._version)
        cached = _SELL.get(self)
        if cached is not None and (cached[0] == key or not remake):
            return cached[1] if cached[0] == key else None
        blob = None
        if (len(self.shape) == 2 and values.dtype in (torch.float32, torch.bfloat16) and values.is_cpu
                and self.nnz > 0 and _avx512()):
            from pyhwp._ext import _C

            ro, ci = self.row_offsets.contiguous(), self.kernel_col_indices.contiguous()
            ci16 = ci.data_ptr() if ci.dtype == torch.int16 else 0
            sizes = (self.out_features, self.in_features, self.nnz, ro.data_ptr(), 0 if ci16 else ci.data_ptr())
            bf16 = values.dtype == torch.bfloat16
            nbytes = _C.csr_sell_bytes(*sizes, ci16, bf16)
            if nbytes <= sell_budget_bytes() - _copies_bytes(excluding=self):
                blob = torch.empty(nbytes, dtype=torch.uint8)  # 64-byte aligned
                _C.csr_sell_pack(*sizes, values.detach().contiguous().data_ptr(), ci16, blob.data_ptr(), bf16)
        _SELL[self] = (key, blob)
        return blob

    def kernel_resident(self) -> bool:
        """Whether the CPU kernels may expect this weight's arrays in cache at its calls: the CSR
        weights alive in this process (live_kernel_bytes) fit sell_budget_bytes() together. Where
        they do not, a model reads each layer's weights from DRAM, and the 16-column tile kernel
        (batches up to 16 off the gather and sliced-ELL paths) prefetches them: 15-20% faster
        from DRAM, about 10% slower from L2 or L3 (NOTES.md stop 30). Performance only: the sums
        are the same. pyhwp.linear asks at a weight's first call (when its plan is built)."""
        return live_kernel_bytes() <= sell_budget_bytes()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def _row_slice(self, start: int, stop: int) -> CSRWeight:
        # O(stop - start): values and indices are views; only the offsets are rebased.
        ro = self.row_offsets[start:stop + 1]
        a, b = (int(v) for v in self.row_offsets[[start, stop]].tolist())
        return CSRWeight._unchecked((stop - start, *self.shape[1:]), row_offsets=ro - a,
                                    col_indices=self.col_indices[a:b], values=self.values[a:b])

    def kernel_taps(self) -> tuple[CSRWeight, ...]:
        if len(self.shape) != 4:
            raise ValueError(f"kernel_taps needs a 4-D conv weight, this one has shape {self.shape}")
        out, in_g, kh, kw = self.shape
        taps = kh * kw
        rows = torch.repeat_interleave(torch.arange(out, device=self.device), self.row_offsets.diff(),
                                       output_size=self.nnz)
        cols = self.col_indices.long()
        key = (cols % taps) * out + rows  # column c*kh*kw + tap goes to row `rows` of tap's weight
        # Stable: entries of one (tap, row) keep their column order, so channels stay increasing.
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=taps * out).view(taps, out)
        offsets = torch.zeros(taps, out + 1, dtype=torch.int64, device=self.device)
        offsets[:, 1:] = counts.cumsum(1)
        channels = (cols[order] // taps).to(torch.int32)
        values = self.values[order]
        bounds = [0, *offsets[:, -1].cumsum(0).tolist()]
        return tuple(CSRWeight._unchecked((out, in_g), row_offsets=offsets[t],
                                          col_indices=channels[bounds[t]:bounds[t + 1]],
                                          values=values[bounds[t]:bounds[t + 1]]) for t in range(taps))

    def to_dense(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if self.device.type == "cuda" and self.dtype == torch.float32 and _cuda_built():
            from pyhwp._ext import _C

            dense = torch.empty((n, k), dtype=self.dtype, device=self.device)
            _C.csr_to_dense_cuda(n, k, self.row_offsets.data_ptr(), self.col_indices.data_ptr(),
                                 self.values.data_ptr(), dense.data_ptr(),
                                 torch.cuda.current_stream(self.device).cuda_stream)
            return dense.reshape(self.shape)
        dense = torch.zeros(n * k, dtype=self.dtype, device=self.device)
        if self.nnz:
            rows = torch.repeat_interleave(
                torch.arange(n, device=self.device), self.row_offsets.diff(), output_size=self.nnz
            )
            dense[rows * k + self.col_indices.long()] = self.values
        return dense.reshape(self.shape)

    def validate(self) -> None:
        n, k = self.out_features, self.in_features
        ro, ci, v = self.row_offsets, self.col_indices, self.values
        for name, t, dt in (("row_offsets", ro, torch.int64), ("col_indices", ci, torch.int32)):
            if not isinstance(t, torch.Tensor) or t.dtype != dt or t.dim() != 1:
                raise ValueError(f"CSR {name} must be a 1-D {dt} tensor")
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
            raise ValueError("CSR values must be a 1-D floating-point tensor")
        if ro.numel() != n + 1:
            raise ValueError(f"CSR row_offsets has {ro.numel()} entries, expected out + 1 = {n + 1}")
        if ci.numel() != v.numel():
            raise ValueError(f"CSR col_indices has {ci.numel()} entries but values has {v.numel()}")
        if k > _INT32_MAX:
            raise ValueError(f"CSR in_features {k} does not fit int32 column indices")
        if not (ro.device == ci.device == v.device):
            raise ValueError("CSR arrays are on different devices")
        order = self.row_order
        if order is not None:
            if not isinstance(order, torch.Tensor) or order.dtype != torch.int32 or order.shape != (n,):
                raise ValueError(f"CSR row_order must be a 1-D int32 tensor of out = {n} entries")
            if order.device != ro.device:
                raise ValueError("CSR row_order is on a different device than the other arrays")
            if n and not torch.equal(torch.sort(order).values, torch.arange(n, dtype=torch.int32, device=order.device)):
                raise ValueError("CSR row_order must be a permutation of the rows 0..out-1")
        if ro.device.type == "cpu":
            from pyhwp._ext import _C

            ro, ci, v = ro.contiguous(), ci.contiguous(), v.contiguous()
            _C.csr_validate(n, k, v.numel(), ro.data_ptr(), ci.data_ptr(), v.data_ptr())
            return
        if int(ro[0]) != 0 or int(ro[-1]) != v.numel() or bool((ro.diff() < 0).any()):
            raise ValueError("CSR row_offsets must rise from 0 to nnz")
        if ci.numel() and (int(ci.min()) < 0 or int(ci.max()) >= k):
            raise ValueError(f"CSR column index outside [0, {k})")
        if ci.numel() > 1:
            starts = torch.zeros(ci.numel(), dtype=torch.bool, device=ci.device)
            first = ro[:-1]
            starts[first[first < ci.numel()]] = True
            if bool(((ci[1:] <= ci[:-1]) & ~starts[1:]).any()):
                raise ValueError("CSR column indices must strictly increase within each row")
