"""The performance targets of ../shared/BENCHMARKS.md as data, and their check against result rows.

A target selects result rows (section, op, pattern, sparsity, batch, dtype, device) and requires
a ratio to a baseline: for every selected row ("each": the worst row counts) or as the geometric
mean over them ("geomean"). "best_torch" is the faster of torch dense and torch CSR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    kernel: str
    case: str
    baseline: str  # "torch_dense", "torch_csr" or "best_torch"
    minimum: float
    section: str
    pattern: str
    sparsity: float | None = None
    batches: tuple[int, ...] | None = None
    how: str = "each"  # "each" or "geomean"
    device: str = "cpu"
    dtype: str = "float32"

    def selects(self, row: dict) -> bool:
        return (row.get("section") == self.section and row.get("pattern") == self.pattern
                and row.get("device", "cpu").split(":")[0] == self.device and row.get("dtype") == self.dtype
                and (self.sparsity is None or abs(row.get("sparsity", -1) - self.sparsity) < 1e-9)
                and (self.batches is None or row.get("batch") in self.batches))


CPU_TARGETS: tuple[Target, ...] = (
    Target("CSR", "90%, every linear shape, batch 1", "torch_dense", 4.0, "linear", "csr", 0.9, (1,)),
    Target("CSR", "90%, every linear shape, batch 1", "torch_csr", 2.0, "linear", "csr", 0.9, (1,)),
    Target("CSR", "90%, batch 16 and 128", "best_torch", 2.0, "linear", "csr", 0.9, (16, 128)),
    Target("CSR", "70%, batch 1", "torch_dense", 1.5, "linear", "csr", 0.7, (1,)),
    Target("CSR", "DLMC subset (geomean)", "torch_csr", 2.0, "dlmc", "csr", how="geomean"),
    Target("CSR", "DLMC subset (geomean)", "torch_dense", 2.0, "dlmc", "csr", how="geomean"),
    Target("2:4", "every linear shape, batch 1", "torch_dense", 1.5, "linear", "2:4", 0.5, (1,)),
    Target("2:4", "batch 128", "torch_dense", 1.3, "linear", "2:4", 0.5, (128,)),
    Target("masked", "0% zero tiles", "torch_dense", 0.85, "linear", "masked", 0.0),
    Target("masked", "16x16 blocks, 75% zero tiles", "torch_dense", 3.0, "linear", "masked", 0.75),
    Target("conv (CSR 90%)", "ResNet-50 shapes, batch 1", "torch_dense", 2.5, "conv", "csr", 0.9, (1,)),
    Target("conv (2:4)", "ResNet-50 shapes, batch 1", "torch_dense", 1.3, "conv", "2:4", 0.5, (1,)),
)


def ratio(row: dict, baseline: str) -> float | None:
    """pyhwp's speedup over `baseline` in a row (None when that baseline did not run)."""
    r = row.get("ratio", {})
    if baseline == "best_torch":
        have = [r[b] for b in ("torch_dense", "torch_csr") if b in r]
        return min(have) if have else None
    return r.get(baseline)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def evaluate(rows: list[dict], targets: tuple[Target, ...] = CPU_TARGETS) -> list[dict]:
    """One dict per target: the measured value (worst row or geomean), rows counted, pass/fail,
    or status "not measured" when no row of it ran (e.g. the pattern is not merged yet)."""
    out = []
    for t in targets:
        picked = [(r, ratio(r, t.baseline)) for r in rows if "skipped" not in r and t.selects(r)]
        picked = [(r, v) for r, v in picked if v is not None]
        result = {"kernel": t.kernel, "case": t.case, "baseline": t.baseline, "minimum": t.minimum,
                  "how": t.how, "rows": len(picked)}
        if not picked:
            result.update(value=None, status="not measured")
        else:
            if t.how == "geomean":
                value, where = geomean([v for _, v in picked]), "geomean"
            else:
                worst_row, value = min(picked, key=lambda rv: rv[1])
                where = worst_row["name"]
            result.update(value=value, worst=where, status="met" if value >= t.minimum else "missed")
        out.append(result)
    return out
