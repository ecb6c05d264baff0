"""The DLMC subset (real pruned weight patterns): .smtx(.gz) loading and its benchmark cases.

Layout and protocol: ../shared/data/dlmc/README.md. Each file holds a sparsity pattern only
(line 1 "rows, cols, nnz", line 2 the rows+1 row offsets, line 3 the nnz column indices); the
benchmark fills it with random values and times W @ B with B dense (cols x N): N = 256 for the
Transformer, the output pixels per image for ResNet-50 (56*56 in group1 ... 7*7 in group4,
1 for the final dense layer).
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import torch

from pyhwp.bench.cases import Case

TRANSFORMER_N = 256
RN50_N = {"group1": 56 * 56, "group2": 28 * 28, "group3": 14 * 14, "group4": 7 * 7, "final_dense": 1}


def default_path() -> Path:
    """../shared/data/dlmc relative to the repository root (the checkout holding pyhwp/)."""
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dlmc"


def load_smtx(path: str | Path) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor]:
    """Read a .smtx or .smtx.gz pattern.

    Returns ((rows, cols), row_offsets int64 (rows + 1,), col_indices int32 (nnz,)); raises
    ValueError naming the file when the header and the arrays disagree.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        header = f.readline()
        offsets_line = f.readline()
        indices_line = f.readline()
    try:
        rows, cols, nnz = (int(float(v)) for v in header.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"{path}: line 1 must be 'rows, cols, nnz', got {header.strip()[:80]!r}") from None
    row_offsets = torch.tensor([int(v) for v in offsets_line.split()], dtype=torch.int64)
    col_indices = torch.tensor([int(v) for v in indices_line.split()], dtype=torch.int32)
    if row_offsets.numel() != rows + 1 or col_indices.numel() != nnz or int(row_offsets[-1]) != nnz:
        raise ValueError(f"{path}: header says {rows}x{cols} with {nnz} nonzeros, arrays have "
                         f"{row_offsets.numel()} offsets and {col_indices.numel()} indices")
    if nnz and (int(col_indices.min()) < 0 or int(col_indices.max()) >= cols):
        raise ValueError(f"{path}: column index outside [0, {cols})")
    return (rows, cols), row_offsets, col_indices


def columns_for(path: str | Path) -> int:
    """The DLMC N of a file: 256 for the Transformer, output pixels per image for ResNet-50."""
    parts = Path(path).parts
    name = Path(path).name
    if "transformer" in parts:
        return TRANSFORMER_N
    if "rn50" in parts:
        for key, n in RN50_N.items():
            if re.search(rf"{key}(?![0-9])", name):
                return n
    raise ValueError(f"{path}: cannot tell the DLMC N (not a transformer/ or rn50/ group file)")


def find_files(root: str | Path) -> list[Path]:
    """Every .smtx / .smtx.gz under root, sorted; [] when root does not exist."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.name.endswith((".smtx", ".smtx.gz")))


def dlmc_cases(root: str | Path) -> list[Case]:
    """One "matmul" case per DLMC file (pattern "csr"); shapes read from each header."""
    cases = []
    root = Path(root)
    for path in find_files(root):
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
            rows, cols, nnz = (int(float(v)) for v in f.readline().replace(",", " ").split())
        rel = path.relative_to(root)
        model = rel.parts[0]
        sparsity = 1.0 - nnz / (rows * cols) if rows * cols else 0.0
        label = f"{model}/{rel.parts[-2]}/{path.name.removesuffix('.gz').removesuffix('.smtx')}"
        cases.append(Case("matmul", (rows, cols), columns_for(path), round(sparsity, 4), "csr",
                          section="dlmc", source=str(path), label=label))
    return cases


def dense_from_pattern(shape: tuple[int, int], row_offsets: torch.Tensor, col_indices: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """A dense float32 (rows, cols) weight with random normal values at the pattern's positions
    (the values are nonzero with probability 1, so to_sparse keeps exactly the pattern)."""
    rows, cols = shape
    dense = torch.zeros(rows * cols)
    if col_indices.numel():
        row_of = torch.repeat_interleave(torch.arange(rows), row_offsets.diff())
        dense[row_of * cols + col_indices.long()] = torch.randn(col_indices.numel(), generator=generator)
    return dense.reshape(rows, cols)
