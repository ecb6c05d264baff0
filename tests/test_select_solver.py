"""The budgeted per-layer choice on synthetic latency tables, checked against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from pyhwp.select import Candidate, solve, useful_candidates
from pyhwp.select.retime import check_pick


def _layer(name, rows):
    return [Candidate(name, p, s, f"k_{p}", lat, cost) for p, s, lat, cost in rows]


def _brute(layers, max_cost=None, max_latency=None):
    best = None
    for combo in itertools.product(*layers.values()):
        lat = sum(c.latency_s for c in combo)
        cost = sum(c.cost for c in combo)
        if max_cost is not None and cost <= max_cost:
            key = (lat, cost)
        elif max_latency is not None and lat <= max_latency:
            key = (cost, lat)
        else:
            continue
        if best is None or key < best[0]:
            best = (key, combo)
    return best


def test_dense_wins_when_sparse_kernels_are_slower():
    layers = {"fc": _layer("fc", [("dense", 0, 1.0, 0), ("csr", 0.5, 1.5, 0.1), ("2:4", 0.5, 1.2, 0.05)])}
    pick = solve(layers, max_cost=10.0)
    assert pick["fc"].pattern == "dense"


def test_never_slower_than_dense():
    cands = _layer("a", [("dense", 0, 1.0, 0), ("csr", 0.9, 2.0, 0.0), ("masked", 0.5, 0.8, 0.3)])
    kept = useful_candidates(cands)
    assert all(c.latency_s <= 1.0 for c in kept)
    assert {c.pattern for c in kept} == {"dense", "masked"}


def test_dense_candidate_required():
    with pytest.raises(ValueError, match="dense candidate"):
        useful_candidates(_layer("a", [("csr", 0.5, 1.0, 0.1)]))


def test_exactly_one_budget():
    layers = {"a": _layer("a", [("dense", 0, 1.0, 0)])}
    with pytest.raises(ValueError, match="exactly one"):
        solve(layers)
    with pytest.raises(ValueError, match="exactly one"):
        solve(layers, max_cost=1, max_latency_s=1)


def test_infeasible_latency_budget_raises():
    layers = {"a": _layer("a", [("dense", 0, 1.0, 0), ("csr", 0.9, 0.5, 1.0)])}
    with pytest.raises(ValueError, match="fits the budget"):
        solve(layers, max_latency_s=0.1)


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force_and_respects_budgets(seed):
    rng = random.Random(seed)
    layers = {}
    for i in range(rng.randint(1, 4)):
        rows = [("dense", 0.0, rng.uniform(1, 3), 0.0)]
        for p in ("csr", "2:4", "masked"):
            rows.append((p, rng.random(), rng.uniform(0.2, 3.5), rng.uniform(0, 1)))
        layers[f"l{i}"] = _layer(f"l{i}", rows)
    max_cost = rng.uniform(0, 1.5)
    pick = solve(layers, max_cost=max_cost, bins=4000)
    total_cost = sum(c.cost for c in pick.values())
    total_lat = sum(c.latency_s for c in pick.values())
    assert total_cost <= max_cost + 1e-12
    (best_lat, _), _ = _brute(layers, max_cost=max_cost)
    # Rounding costs up to the grid can only cost a little optimality, never feasibility.
    assert total_lat <= best_lat * 1.05 + 1e-12

    dense_lat = sum(min(c.latency_s for c in v if c.pattern == "dense") for v in layers.values())
    max_lat = rng.uniform(0.5, 1.0) * dense_lat
    brute = _brute(layers, max_latency=max_lat)
    if brute is None:
        with pytest.raises(ValueError):
            solve(layers, max_latency_s=max_lat, bins=4000)
        return
    pick = solve(layers, max_latency_s=max_lat, bins=4000)
    assert sum(c.latency_s for c in pick.values()) <= max_lat + 1e-12
    assert sum(c.cost for c in pick.values()) <= brute[0][0] + 0.05


def _cand(layer, pattern, s, lat, cost):
    return Candidate(layer, pattern, s, f"k_{pattern}", lat, cost)


def test_candidate_plans_are_budget_solutions_fastest_first():
    from pyhwp.optimize import candidate_plans

    layers = {
        "a": [_cand("a", "dense", 0, 1.0, 0), _cand("a", "csr", 0.9, 0.3, 0.5), _cand("a", "csr", 0.5, 1.4, 0.1),
              _cand("a", "channel", 0.5, 0.6, 0.2)],
        "b": [_cand("b", "dense", 0, 2.0, 0), _cand("b", "2:4", 0.5, 1.5, 0.05), _cand("b", "csr", 0.9, 0.5, 0.8)],
    }
    plans = candidate_plans(layers)
    lat = [sum(c.latency_s for c in p.values()) for p in plans]
    assert lat == sorted(lat)
    assert all(c.pattern == "dense" for c in plans[-1].values())  # the slowest plan prunes nothing
    assert plans[0]["a"].pattern == "csr" and plans[0]["b"].pattern == "csr"  # no budget: fastest everywhere
    assert len({tuple((c.pattern, c.sparsity) for c in p.values()) for p in plans}) == len(plans)
    for p in plans:
        assert all(c.pattern != "csr" or c.sparsity != 0.5 for c in p.values()), "slower than dense: never picked"
    # The latency budget: most accurate within it, and respected.
    pick = solve(layers, max_latency_s=2.2)
    assert sum(c.latency_s for c in pick.values()) <= 2.2
    assert sum(c.cost for c in pick.values()) == pytest.approx(0.25)  # channel on a, 2:4 on b


def test_check_pick_compares_with_admissible_candidates():
    cands = [_cand("a", "dense", 0, 1.0, 0), _cand("a", "csr", 0.9, 0.3, 0.5), _cand("a", "2:4", 0.5, 0.6, 0.1)]
    retimed = {"dense": 1.0, "csr@0.9": 0.2, "2:4@0.5": 0.62}
    ok = check_pick(cands[2], cands, retimed)
    assert ok["passes"] and ok["fastest_admissible"] == "2:4@0.5" and ok["fastest_any"] == "csr@0.9"
    bad = check_pick(cands[0], cands, {"dense": 1.0, "csr@0.9": 0.2, "2:4@0.5": 0.62})
    assert bad["passes"]  # dense costs nothing: nothing cheaper competes with it
    slow = check_pick(cands[1], cands, {"dense": 0.25, "csr@0.9": 0.3, "2:4@0.5": 0.62})
    assert not slow["passes"] and slow["fastest_admissible"] == "dense" and slow["ratio"] == pytest.approx(1.2)


def test_dense_wins_everywhere_when_no_sparse_kernel_is_faster():
    from pyhwp.optimize import candidate_plans

    layers = {n: [_cand(n, "dense", 0, 1.0, 0), _cand(n, "csr", 0.9, 1.3, 0.4), _cand(n, "2:4", 0.5, 1.01, 0.1)]
              for n in ("a", "b", "c")}
    plans = candidate_plans(layers)
    assert len(plans) == 1 and all(c.pattern == "dense" for c in plans[0].values())
    assert all(c.pattern == "dense" for c in solve(layers, max_latency_s=3.1).values())
