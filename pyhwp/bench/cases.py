"""Benchmark cases as data: the protocol's shapes, batches, sparsities and patterns, and pruning.

A `Case` names one measurement (op, weight shape, batch, sparsity, pattern, dtype); the suites
below are lists of them. Weights are pruned by magnitude to the case's sparsity in the case's
pattern (see `prune`), so every pattern's kernel is measured on the weights it would really get.
Adding a pattern to the suite means adding a pruning rule to PRUNERS and its sparsities to
SPARSITIES; the runner finds the kernel through pyhwp.formats.patterns() and pyhwp.kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

# -- the protocol (../shared/BENCHMARKS.md) -----------------------------------------------------

LINEAR_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (11008, 4096), (3072, 768), (768, 3072), (1536, 384))
LINEAR_BATCHES: tuple[int, ...] = (1, 16, 128)


@dataclass(frozen=True)
class ConvShape:
    """A ResNet-50 convolution: weight (out, in, k, k), input image (in, size, size), stride 1,
    padding k // 2 (so the output image is size x size)."""

    out_channels: int
    in_channels: int
    kernel: int
    size: int

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, self.kernel, self.kernel)

    @property
    def padding(self) -> int:
        return self.kernel // 2

    def __str__(self) -> str:
        return f"{self.in_channels}->{self.out_channels} {self.kernel}x{self.kernel} @{self.size}x{self.size}"


CONV_SHAPES: tuple[ConvShape, ...] = (
    ConvShape(64, 64, 3, 56), ConvShape(128, 128, 3, 28), ConvShape(256, 256, 3, 14),
    ConvShape(1024, 256, 1, 14), ConvShape(2048, 512, 1, 7),
)
CONV_BATCHES: tuple[int, ...] = (1, 32)

# Sparsity per pattern. For "csr" and "2:4" it is the fraction of pruned weights; for "masked"
# the fraction of all-zero 16x16 tiles (0.0: a dense weight through the tile kernel).
SPARSITIES: dict[str, tuple[float, ...]] = {
    "csr": (0.5, 0.7, 0.8, 0.9, 0.95),
    "2:4": (0.5,),
    "masked": (0.0, 0.5, 0.75, 0.9),
}
MASK_TILE = 16  # tile edge of the "masked" pattern (csrc/masked)


# -- cases ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One measurement.

    op: "linear" (x (batch, in) @ W.T), "conv2d" (x (batch, in, size, size)) or "matmul" (the DLMC
        product W @ B with B (in, batch) dense: `batch` is the DLMC N).
    shape: GEMM-form weight shape (out, in) for linear/matmul, (out, in, k, k) for conv2d.
    section: the table it is reported in ("linear", "conv", "dlmc", "bf16", "scaling").
    threads: run with this many threads (None: the suite's thread count).
    source: for DLMC cases, the .smtx.gz file the sparsity pattern comes from.
    """

    op: str
    shape: tuple[int, ...]
    batch: int
    sparsity: float
    pattern: str
    dtype: str = "float32"
    section: str = "linear"
    conv: ConvShape | None = None
    threads: int | None = None
    source: str | None = field(default=None, compare=False)
    label: str = field(default="", compare=False)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def columns(self) -> int:
        """Columns of the GEMM form: rows of x (linear), images x output pixels (conv), DLMC N."""
        if self.op == "conv2d":
            return self.batch * self.conv.size * self.conv.size
        return self.batch

    @property
    def name(self) -> str:
        what = self.label or (str(self.conv) if self.conv else "x".join(map(str, self.shape)))
        parts = [self.op, what, f"b{self.batch}", self.pattern, f"{self.sparsity:.0%}"]
        if self.dtype != "float32":
            parts.append(self.dtype)
        if self.threads:
            parts.append(f"t{self.threads}")
        return " ".join(parts)


def linear_case(shape, batch, pattern, sparsity, **kw) -> Case:
    return Case("linear", tuple(shape), batch, sparsity, pattern, **kw)


def conv_case(conv: ConvShape, batch, pattern, sparsity, **kw) -> Case:
    kw.setdefault("section", "conv")
    return Case("conv2d", conv.weight_shape, batch, sparsity, pattern, conv=conv, **kw)


def quick_cases() -> list[Case]:
    """The target table of BENCHMARKS.md, one case per target cell (DLMC cases come separately)."""
    cases = []
    for shape in LINEAR_SHAPES:
        for batch in LINEAR_BATCHES:
            cases.append(linear_case(shape, batch, "csr", 0.9))
        cases.append(linear_case(shape, 1, "csr", 0.7))
        cases.append(linear_case(shape, 1, "2:4", 0.5))
        cases.append(linear_case(shape, 128, "2:4", 0.5))
    for shape in LINEAR_SHAPES:  # K3's targets are at batch 16 and 128; batch 1 on two shapes
        for batch in ((1, 16, 128) if shape in ((4096, 4096), (3072, 768)) else (16, 128)):
            for zero_tiles in (0.0, 0.75):
                cases.append(linear_case(shape, batch, "masked", zero_tiles))
    for conv in CONV_SHAPES:
        cases.append(conv_case(conv, 1, "csr", 0.9))
        cases.append(conv_case(conv, 1, "2:4", 0.5))
        if conv.kernel > 1:  # the masked implicit GEMM: no zero tiles (the fallback), 75% of them
            for zero_tiles in (0.0, 0.75):
                cases.append(conv_case(conv, 1, "masked", zero_tiles))
    for batch in LINEAR_BATCHES:
        cases.append(linear_case((4096, 4096), batch, "csr", 0.9, dtype="bfloat16", section="bf16"))
        cases.append(linear_case((4096, 4096), batch, "2:4", 0.5, dtype="bfloat16", section="bf16"))
        cases.append(linear_case((4096, 4096), batch, "masked", 0.75, dtype="bfloat16", section="bf16"))
    for batch in (16, 128):  # the masked pattern's low-sparsity fallback against AMX dense
        cases.append(linear_case((4096, 4096), batch, "masked", 0.0, dtype="bfloat16", section="bf16"))
    for conv in CONV_SHAPES:
        if conv.kernel > 1:  # k x k bfloat16 convs: the AMX implicit GEMM where the CPU has AMX
            cases.append(conv_case(conv, 1, "masked", 0.75, dtype="bfloat16", section="bf16"))
            cases.append(conv_case(conv, 1, "2:4", 0.5, dtype="bfloat16", section="bf16"))
    return cases


def full_cases() -> list[Case]:
    """Every shape x batch x sparsity x pattern of the protocol, fp32, plus bfloat16 rows."""
    cases = []
    for pattern, sparsities in SPARSITIES.items():
        for sparsity in sparsities:
            for shape in LINEAR_SHAPES:
                for batch in LINEAR_BATCHES:
                    cases.append(linear_case(shape, batch, pattern, sparsity))
            for conv in CONV_SHAPES:
                for batch in CONV_BATCHES:
                    cases.append(conv_case(conv, batch, pattern, sparsity))
            for shape in LINEAR_SHAPES:
                for batch in LINEAR_BATCHES:
                    cases.append(linear_case(shape, batch, pattern, sparsity, dtype="bfloat16", section="bf16"))
            for conv in CONV_SHAPES:
                for batch in CONV_BATCHES:
                    cases.append(conv_case(conv, batch, pattern, sparsity, dtype="bfloat16", section="bf16"))
    return cases


def scaling_cases(threads: int) -> list[Case]:
    """The same cases at 1 thread and at `threads`: the thread-scaling section."""
    if threads < 2:
        return []
    cases = []
    for shape, batch in (((4096, 4096), 1), ((4096, 4096), 16), ((4096, 4096), 128), ((3072, 768), 128)):
        for t in (1, threads):
            cases.append(linear_case(shape, batch, "csr", 0.9, threads=t, section="scaling"))
    return cases


def suite_cases(suite: str, device: str, threads: int) -> list[Case]:
    """The cases of `suite` ("quick", "full" or "tiny") for `device`, sorted so cases sharing a
    weight run one after another (the runner keeps the last weight)."""
    if suite == "quick":
        cases = quick_cases() + scaling_cases(threads)
    elif suite == "full":
        cases = full_cases() + scaling_cases(threads)
    elif suite == "tiny":  # the suite machinery's own test: small shapes, one of each kind
        cases = [linear_case((64, 48), 1, "csr", 0.9), linear_case((64, 48), 16, "csr", 0.7),
                 linear_case((32, 64), 4, "2:4", 0.5), linear_case((32, 32), 2, "masked", 0.5),
                 conv_case(ConvShape(8, 4, 3, 6), 1, "csr", 0.8),
                 linear_case((64, 48), 3, "csr", 0.9, dtype="bfloat16", section="bf16"),
                 linear_case((32, 64), 4, "2:4", 0.5, dtype="bfloat16", section="bf16"),
                 linear_case((32, 32), 2, "masked", 0.5, dtype="bfloat16", section="bf16")]
        cases += [linear_case((64, 48), 8, "csr", 0.9, threads=t, section="scaling") for t in (1, threads)] \
            if threads >= 2 else []
    else:
        raise ValueError(f"suite must be 'quick', 'full' or 'tiny', got {suite!r}")
    if device.startswith("cuda"):
        # GPU targets are half precision; fp32 rows are kept for the CSR comparison with cuSPARSE.
        cases = [c for c in cases if c.section != "bf16"]
        cases += [replace(c, dtype="float16", section="fp16") for c in cases
                  if c.section == "linear" and c.pattern in ("2:4", "masked")]
    return sorted(cases, key=lambda c: (c.section == "scaling", c.op, c.shape, c.pattern, c.sparsity, c.dtype))


# -- magnitude pruning per pattern -----------------------------------------------------------------

def _prune_unstructured(w2: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the |w| above the round(sparsity * numel)-th smallest (exact for distinct magnitudes)."""
    numel = w2.numel()
    drop = round(sparsity * numel)
    mags = w2.abs().float()
    if drop == 0:
        return torch.ones_like(mags, dtype=torch.bool)
    # A selection, not a sort: 11008x4096 takes a fraction of a second.
    threshold = mags.flatten().kthvalue(drop).values
    return mags > threshold


def _prune_24(w2: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the 2 largest |w| of each group of 4 consecutive inputs (sparsity must be 0.5)."""
    if sparsity != 0.5:
        raise ValueError(f"the 2:4 pattern has sparsity 0.5, got {sparsity}")
    n, k = w2.shape
    if k % 4:
        raise ValueError(f"2:4 needs in_features divisible by 4, got {k}")
    groups = w2.abs().float().reshape(n, k // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(n, k)


def _prune_tiles(w2: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the `sparsity` fraction of 16x16 tiles with the smallest L1 norm; keep the rest whole."""
    n, k = w2.shape
    t = MASK_TILE
    tn, tk = -(-n // t), -(-k // t)
    padded = torch.zeros(tn * t, tk * t, dtype=torch.float32, device=w2.device)
    padded[:n, :k] = w2.abs()
    norms = padded.reshape(tn, t, tk, t).sum(dim=(1, 3)).flatten()
    keep_tiles = torch.ones(tn * tk, dtype=torch.bool, device=w2.device)
    drop = round(sparsity * norms.numel())
    if drop:
        keep_tiles[torch.topk(norms, drop, largest=False, sorted=False).indices] = False
    mask = keep_tiles.reshape(tn, 1, tk, 1).expand(tn, t, tk, t).reshape(tn * t, tk * t)
    return mask[:n, :k].contiguous()


# pattern -> fn(weight (out, in_features), sparsity) -> bool keep-mask of the same shape.
PRUNERS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "csr": _prune_unstructured,
    "2:4": _prune_24,
    "masked": _prune_tiles,
}


def prune(weight: torch.Tensor, pattern: str, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude-prune `weight` (linear or conv shape) in `pattern`'s structure.

    Returns (pruned weight, keep mask), both of weight's shape; the mask is what to_sparse keeps.
    """
    if pattern not in PRUNERS:
        raise ValueError(f"no pruning rule for pattern {pattern!r}; known: {sorted(PRUNERS)}")
    w2 = weight.reshape(weight.shape[0], -1)
    mask = PRUNERS[pattern](w2, sparsity).reshape(weight.shape)
    return weight * mask, mask
