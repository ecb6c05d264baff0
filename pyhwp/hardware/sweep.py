"""Sparsity sweeps: each sparse pattern against dense over a few sparsities, and where it starts to win."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pyhwp.hardware.latency import LatencyResult, make_case, nm_sparsity, parse_dtype, runner_for
from pyhwp.kernels import KERNELS

# Representative layers from shared BENCHMARKS.md: an LLM projection at decode (batch 1) and
# small-batch sizes, and a BERT-base MLP at batch 128.
DEFAULT_CASES = (("linear", (4096, 4096), 1), ("linear", (4096, 4096), 16), ("linear", (3072, 768), 128))
QUICK_CASES = (("linear", (1024, 1024), 1), ("linear", (768, 3072), 16))
DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
QUICK_SPARSITIES = (0.5, 0.8, 0.95)


def sweep_patterns(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Sparse patterns with at least one kernel that can run `op` on `device` in `dtype`."""
    out = []
    for k in KERNELS:
        if k.pattern == "dense" or k.pattern in out or runner_for(k) is None:
            continue
        if not k.unsupported_reasons(op, device, dtype):
            out.append(k.pattern)
    return out


def pattern_sparsities(pattern: str, sparsities: tuple[float, ...]) -> tuple[float, ...]:
    """The sweep of `pattern`: its fixed sparsity for N:M patterns, else `sparsities`."""
    fixed = nm_sparsity(pattern)
    return (fixed,) if fixed is not None else tuple(sparsities)


def crossover_point(points: list[tuple[float, float]]) -> tuple[float | None, str]:
    """(sparsity, verdict) where speedup over dense first reaches 1, from (sparsity, speedup) points.

    Between the last losing and the first winning sparsity the crossover is interpolated
    linearly in log(speedup). Below the sweep it is the lowest sparsity (verdict '<= s'); above
    it, None. A single point (an N:M pattern) either wins or loses at its fixed sparsity.
    """
    points = sorted(points)
    if not points:
        return None, "not measured"
    if len(points) == 1:
        s, r = points[0]
        return (s, f"wins at its fixed {s:.0%} ({r:.2f}x)") if r >= 1 else \
            (None, f"loses at its fixed {s:.0%} ({r:.2f}x)")
    s0, r0 = points[0]
    if r0 >= 1:
        return s0, f"<= {s0:.0%}"
    for (sa, ra), (sb, rb) in zip(points, points[1:]):
        if ra < 1 <= rb:
            s = sa + (sb - sa) * (-math.log(ra)) / (math.log(rb) - math.log(ra))
            return s, f"~{s:.0%}"
    return None, f"> {points[-1][0]:.0%}"


@dataclass
class Crossover:
    """One pattern at one layer: speedup over the fastest dense kernel at each swept sparsity."""

    op: str
    shape: tuple[int, ...]
    batch: int
    pattern: str
    dtype: str
    speedup: dict[float, float]  # sparsity -> fastest dense time / fastest time of the pattern
    fastest: dict[float, str]  # sparsity -> which kernel of the pattern that was
    per_kernel: dict[str, dict[float, float]]  # kernel -> sparsity -> its speedup over dense
    sparsity: float | None
    verdict: str
    kernel_verdicts: dict[str, str]

    def to_dict(self) -> dict:
        pairs = lambda d: [[s, v] for s, v in sorted(d.items())]  # noqa: E731 - JSON keys must be str
        return {"op": self.op, "shape": list(self.shape), "batch": self.batch, "pattern": self.pattern,
                "dtype": self.dtype, "speedup": pairs(self.speedup), "fastest": pairs(self.fastest),
                "per_kernel": {k: pairs(v) for k, v in self.per_kernel.items()}, "sparsity": self.sparsity,
                "verdict": self.verdict, "kernel_verdicts": self.kernel_verdicts}


def crossover(results: list[LatencyResult]) -> Crossover:
    """The Crossover of one (op, shape, batch, pattern, dtype) from its results at several sparsities."""
    r0 = results[0]
    speedup, fastest, per_kernel = {}, {}, {}
    for r in results:
        best = r.fastest(r.pattern)
        if best is None or r.fastest("dense") is None:
            continue
        speedup[r.sparsity] = r.speedup(best.kernel)
        fastest[r.sparsity] = best.kernel
        for t in r.timings.values():
            if t.pattern == r.pattern:
                per_kernel.setdefault(t.kernel, {})[r.sparsity] = r.speedup(t.kernel)
    s, verdict = crossover_point(list(speedup.items()))
    return Crossover(r0.op, r0.shape, r0.batch, r0.pattern, r0.dtype, speedup, fastest, per_kernel, s, verdict,
                     {k: crossover_point(list(v.items()))[1] for k, v in per_kernel.items()})


def plan(cases, sparsities, device, dtype, patterns=None) -> list[tuple]:
    """Every kernel_latency case of the sweep: (op, shape, batch, pattern, sparsity), validated."""
    device, dtype = torch.device(device), parse_dtype(dtype)
    out = []
    for op, shape, batch, *rest in cases:
        sweep = tuple(rest[0]) if rest and rest[0] else tuple(sparsities)
        for pattern in patterns or sweep_patterns(op, device, dtype):
            for s in pattern_sparsities(pattern, sweep):
                make_case(op, shape, batch, pattern, s, dtype, device)  # fail before measuring anything
                out.append((op, tuple(shape), batch, pattern, s))
    return out


def run_sweep(prof, cases=DEFAULT_CASES, sparsities=DEFAULT_SPARSITIES, dtype="float32", *, patterns=None,
              budget_s: float = 0.5, refresh: bool = False,
              on_case: Callable[[tuple], None] | None = None) -> tuple[list[LatencyResult], list[Crossover]]:
    """Measure (or read from the cache) every case of plan() on `prof`'s device; one Crossover per
    (case, pattern). `cases` hold (op, shape, batch) or (op, shape, batch, sparsities)."""
    results: dict[tuple, list[LatencyResult]] = {}
    flat = []
    for op, shape, batch, pattern, s in plan(cases, sparsities, prof.device, dtype, patterns):
        r = prof.kernel_latency(op, shape, batch, pattern, s, dtype, budget_s=budget_s, refresh=refresh)
        results.setdefault((op, shape, batch, pattern), []).append(r)
        flat.append(r)
        if on_case is not None:
            on_case((op, shape, batch, pattern, s))
    return flat, [crossover(rs) for rs in results.values()]


__all__ = ["DEFAULT_CASES", "DEFAULT_SPARSITIES", "QUICK_CASES", "QUICK_SPARSITIES", "Crossover", "crossover",
           "crossover_point", "plan", "run_sweep", "sweep_patterns"]
