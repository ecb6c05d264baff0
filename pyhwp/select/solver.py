"""Budgeted per-layer choice (multiple-choice knapsack by dynamic programming, as in HALP/SPDY).

Every layer offers candidates (dense, CSR at some sparsity, 2:4, ...), each with a measured
latency and an additive accuracy cost. Two questions are answered exactly up to the resolution
of the budget grid, rounding every candidate's resource *up* so the budget is never exceeded:
  - "fastest model within an accuracy budget":  min sum(latency) s.t. sum(cost) <= max_cost;
  - "most accurate model within a latency budget": min sum(cost) s.t. sum(latency) <= max_latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """One way to run one layer.

    pattern: "dense", "csr", "2:4", "masked", "channel", ...; sparsity in [0, 1];
    kernel: the kernel that runs it (ours or torch's); latency_s: measured median seconds;
    cost: accuracy-cost proxy, >= 0, additive across layers (0 for dense).
    """

    layer: str
    pattern: str
    sparsity: float
    kernel: str
    latency_s: float
    cost: float = 0.0
    nbytes: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"{self.layer}/{self.pattern}: latency_s must be finite and >= 0, got {self.latency_s}")
        if not (self.cost >= 0 and math.isfinite(self.cost)):
            raise ValueError(f"{self.layer}/{self.pattern}: cost must be finite and >= 0, got {self.cost}")


def useful_candidates(cands: list[Candidate]) -> list[Candidate]:
    """Drop candidates no budget would pick: slower than dense, or dominated (another is no
    slower and no costlier, and better in one). Dense (cost 0) must be among `cands`."""
    dense = [c for c in cands if c.pattern == "dense"]
    if not dense:
        raise ValueError(f"layer {cands[0].layer if cands else '?'}: a dense candidate is required")
    dense_latency = min(c.latency_s for c in dense)
    keep = [c for c in cands if c.latency_s <= dense_latency]
    out = []
    for c in keep:
        dominated = any(
            o is not c and o.latency_s <= c.latency_s and o.cost <= c.cost
            and (o.latency_s < c.latency_s or o.cost < c.cost) for o in keep
        )
        if not dominated:
            out.append(c)
    # Exact ties: keep the first of each (latency, cost) pair.
    seen, unique = set(), []
    for c in out:
        if (c.latency_s, c.cost) not in seen:
            seen.add((c.latency_s, c.cost))
            unique.append(c)
    return unique


def _knapsack(layers: list[list[Candidate]], resource, objective, budget: float, bins: int) -> list[Candidate]:
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    scale = bins / budget if budget > 0 else 0.0
    inf = math.inf
    # dp[b]: best objective with total (rounded-up) resource exactly <= b after the layers so far.
    dp = np.zeros(bins + 1)
    choice: list[np.ndarray] = []
    for cands in layers:
        new = np.full(bins + 1, inf)
        arg = np.full(bins + 1, -1, dtype=np.int64)
        for i, c in enumerate(cands):
            r = resource(c)
            w = 0 if r == 0 else (math.ceil(r * scale - 1e-9) if scale else bins + 1)
            if w > bins:
                continue
            shifted = np.full(bins + 1, inf)
            shifted[w:] = dp[: bins + 1 - w] + objective(c)
            better = shifted < new
            new[better] = shifted[better]
            arg[better] = i
        dp = new
        choice.append(arg)
    if not math.isfinite(dp[bins]):
        raise ValueError("no combination of candidates fits the budget")
    # Walk back from the full budget.
    picks: list[Candidate] = []
    b = bins
    for cands, arg in zip(reversed(layers), reversed(choice)):
        c = cands[int(arg[b])]
        picks.append(c)
        r = resource(c)
        b -= 0 if r == 0 else math.ceil(r * scale - 1e-9)
    return picks[::-1]


def solve(layers: dict[str, list[Candidate]], *, max_cost: float | None = None,
          max_latency_s: float | None = None, bins: int = 2000) -> dict[str, Candidate]:
    """Pick one candidate per layer under exactly one budget.

    max_cost: fastest model whose summed cost stays <= max_cost.
    max_latency_s: least summed cost whose summed latency stays <= max_latency_s.
    Returns {layer: chosen candidate}. Raises ValueError when no choice fits.
    """
    if (max_cost is None) == (max_latency_s is None):
        raise ValueError("give exactly one of max_cost or max_latency_s")
    names = list(layers)
    pruned = [useful_candidates(layers[n]) for n in names]
    if max_cost is not None:
        picks = _knapsack(pruned, lambda c: c.cost, lambda c: c.latency_s, float(max_cost), bins)
    else:
        picks = _knapsack(pruned, lambda c: c.latency_s, lambda c: c.cost, float(max_latency_s), bins)
    return dict(zip(names, picks))
