"""SparseWeight: the base of every storage pattern, and the registry behind to_sparse."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

_PATTERNS: dict[str, type[SparseWeight]] = {}


def register_pattern(cls: type[SparseWeight]) -> type[SparseWeight]:
    """Class decorator: make `cls` the storage for `cls.pattern` in to_sparse."""
    _PATTERNS[cls.pattern] = cls
    return cls


def patterns() -> tuple[str, ...]:
    """Names of the storage patterns to_sparse accepts."""
    return tuple(_PATTERNS)


@dataclass(frozen=True, eq=False)
class SparseWeight:
    """A pruned weight in one storage pattern.

    `shape` is the logical dense shape: (out, in) for linear layers or
    (out, in/groups, kh, kw) for conv layers. Storage always views the weight as the matrix
    (out, prod(shape[1:])), the GEMM form of both ops. Instances are immutable; every field is
    a tensor or a plain value, so they pickle, deepcopy and move with `.to()`.
    """

    shape: tuple[int, ...]
    pattern: ClassVar[str] = ""
    # Every pattern also has a tensor field `values` holding the stored weights; dtype and
    # device are read from it.

    def __post_init__(self) -> None:
        shape = self.shape
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) not in (2, 4):
            raise ValueError(f"shape must be a 2-D or 4-D tuple of sizes, got {shape!r}")
        if not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"shape must hold non-negative ints, got {shape!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        self.validate()

    @classmethod
    def _unchecked(cls, shape: tuple[int, ...], **arrays: torch.Tensor) -> SparseWeight:
        """Build without validate(): for arrays valid by construction (from_dense, modules
        rebuilding a weight from their parameters every forward). Callers own the invariants."""
        self = object.__new__(cls)
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        for name, value in arrays.items():
            object.__setattr__(self, name, value)
        return self

    # -- the API every pattern implements -------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> SparseWeight:
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The dense weight (zeros where pruned), in `shape`, dtype and device of the storage."""
        raise NotImplementedError

    def validate(self) -> None:
        """Check every invariant the kernels rely on; raise ValueError naming the first broken."""
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        """Number of stored (kept) weights."""
        raise NotImplementedError

    def row_slice(self, start: int, stop: int) -> SparseWeight:
        """Output rows [start, stop) as a weight of shape (stop - start, *shape[1:]), same pattern.

        Grouped conv2d runs group g's GEMM on rows [g*out/groups, (g+1)*out/groups) of the GEMM
        form. Patterns override `_row_slice` with a cheap slice of their arrays (CSR: a view of
        the values and indices plus rebased row offsets); the generic fallback rebuilds the rows
        from the dense weight (same products; kept zeros are dropped, which changes no result).
        """
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= self.shape[0]):
            raise ValueError(f"row_slice: need 0 <= start <= stop <= {self.shape[0]}, got [{start}, {stop})")
        return self._row_slice(start, stop)

    def _row_slice(self, start: int, stop: int) -> SparseWeight:
        return type(self).from_dense(self.to_dense()[start:stop])

    def kernel_taps(self) -> tuple[SparseWeight, ...] | None:
        """For a 4-D weight (out, in/groups, kh, kw): the kh*kw weights W[:, :, r, s], each 2-D
        (out, in/groups) in this pattern, in row-major (r, s) order; None when the pattern cannot
        split its storage this way cheaply.

        conv2d with stride 1 then runs one GEMM per tap on shifted views of the padded input
        (no im2col copy) and sums them. Patterns whose storage groups run across taps (2:4
        groups along in/groups*kh*kw) return None and get im2col.
        """
        return None

    # -- shared properties ----------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the GEMM form: in (linear) or in/groups * kh * kw (conv)."""
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def density(self) -> float:
        """Fraction of kept weights, nnz / numel (1.0 for an empty weight)."""
        return self.nnz / self.numel if self.numel else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def nbytes(self) -> int:
        """Bytes of storage: values plus every index and metadata array."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def to(self, device: torch.device | str) -> SparseWeight:
        """The same weight with every array on `device`."""
        moved = {k: v.to(device) for k, v in self._tensors().items()}
        return type(self)(**{**self._plain_fields(), **moved})

    def _plain_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pattern={self.pattern!r}, shape={tuple(self.shape)}, "
            f"dtype={self.dtype}, device={self.device}, density={self.density:.4f}, "
            f"nbytes={self.nbytes})"
        )


def to_sparse(weight: torch.Tensor, pattern: str, *, mask: torch.Tensor | None = None) -> SparseWeight:
    """Convert a dense weight to a SparseWeight in `pattern`.

    Args:
        weight: (out, in) linear or (out, in/groups, kh, kw) conv weight, floating point.
        pattern: one of `pyhwp.formats.patterns()`, e.g. "csr".
        mask: optional bool tensor of `weight`'s shape: True keeps a weight. Without it, the
            nonzeros of `weight` are kept (-0.0 counts as zero). Kept weights are stored even
            when their value is zero, so a mask survives fine-tuning exactly.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(pattern, str) or pattern not in _PATTERNS:
        raise ValueError(f"pattern must be one of {sorted(_PATTERNS)}, got {pattern!r}")
    if weight.dim() not in (2, 4):
        raise ValueError(
            f"weight must be 2-D (out, in) or 4-D (out, in/groups, kh, kw), got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.requires_grad:
        weight = weight.detach()
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
        if mask.shape != weight.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected weight's shape {tuple(weight.shape)}")
        if mask.device != weight.device:
            raise ValueError(f"mask is on {mask.device}, weight on {weight.device}")
    # Built outside inference mode even when called inside it: inference tensors have no version
    # counter, which the kernels' cached plans and copies are keyed on, so a weight holding them
    # would take the uncached paths on every call.
    with torch.inference_mode(False):
        return _PATTERNS[pattern].from_dense(weight, mask)
