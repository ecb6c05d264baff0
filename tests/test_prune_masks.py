"""make_mask and make_masks_global: every pattern x criterion, exact counts, ties, validation."""

from __future__ import annotations

import math

import pytest
import torch

from pyhwp.prune import CRITERIA, PATTERNS, make_mask, make_masks_global

SHAPES = [(8, 16), (5, 12), (6, 4, 3, 3), (7, 8, 1, 1)]  # linear and conv; K divisible by 4


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    scores = torch.rand(shape, generator=g, dtype=torch.float64)
    acts = torch.rand(shape[1:], generator=g) + 0.1
    return w, scores, acts


def _gemm(t):
    return t.reshape(t.shape[0], -1)


def _kwargs(criterion, scores, acts):
    return {"magnitude": {}, "taylor": {"scores": scores}, "wanda": {"activations": acts},
            "hybrid": {"activations": acts}}[criterion]


def _element_scores(criterion, w, scores, acts):
    if criterion == "magnitude":
        return w.abs().double()
    if criterion == "taylor":
        return scores
    return w.abs().double() * acts.double()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_unstructured_exact_count(shape, criterion, sparsity):
    w, scores, acts = _inputs(shape)
    mask = make_mask(w, sparsity, "unstructured", criterion, **_kwargs(criterion, scores, acts))
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int((~mask).sum()) == math.floor(sparsity * w.numel() + 0.5)
    if criterion != "hybrid":  # single-criterion masks prune exactly the lowest scores
        s = _element_scores(criterion, w, scores, acts)
        if mask.any() and (~mask).any():
            assert s[~mask].max() <= s[mask].min()


NM_CASES = [(shape, n, m) for shape in SHAPES for n, m in [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2)]
            if math.prod(shape[1:]) % m == 0]


@pytest.mark.parametrize("shape,n,m", NM_CASES, ids=str)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_nm_property(shape, criterion, n, m):
    w, scores, acts = _inputs(shape, seed=1)
    k = math.prod(shape[1:])
    mask = make_mask(w, None, "n:m", criterion, n=n, m=m, **_kwargs(criterion, scores, acts))
    groups = _gemm(mask).reshape(shape[0], k // m, m)
    assert bool((groups.sum(-1) == n).all()), "every group of m along the flattened input keeps exactly n"
    if criterion != "hybrid":
        s = _gemm(_element_scores(criterion, w, scores, acts)).reshape(shape[0], k // m, m)
        kept_min = torch.where(groups, s, torch.inf).amin(-1)
        pruned_max = torch.where(groups, -torch.inf, s).amax(-1)
        assert bool((pruned_max <= kept_min).all())


def test_nm_groups_run_along_flattened_conv_input():
    # Weight (2, 2, 1, 2): K = in * kh * kw = 4, one group per output row over (c, kh, kw) order.
    w = torch.tensor([[[[1.0, 4.0]], [[3.0, 2.0]]], [[[9.0, 1.0]], [[1.5, 8.0]]]])
    mask = make_mask(w, 0.5, "n:m")
    assert mask.reshape(2, 4).tolist() == [[False, True, True, False], [True, False, False, True]]


@pytest.mark.parametrize("shape,block", [((32, 48), (16, 16)), ((20, 36), (16, 16)), ((8, 2, 3, 3), (4, 4)),
                                         ((9, 10), (3, 5))], ids=str)
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_block_pattern(shape, block, criterion, sparsity):
    w, scores, acts = _inputs(shape, seed=2)
    mask = make_mask(w, sparsity, "block", criterion, block=block, **_kwargs(criterion, scores, acts))
    m2 = _gemm(mask)
    n, k = m2.shape
    bh, bw = block
    nblocks = math.ceil(n / bh) * math.ceil(k / bw)
    pruned_blocks = 0
    for i in range(0, n, bh):
        for j in range(0, k, bw):
            tile = m2[i:i + bh, j:j + bw]
            assert bool(tile.all()) or not bool(tile.any()), "a block is kept or pruned as a whole"
            pruned_blocks += int(not tile.any())
    assert pruned_blocks == math.floor(sparsity * nblocks + 0.5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.75])
def test_channel_pattern_removes_whole_output_channels(shape, criterion, sparsity):
    w, scores, acts = _inputs(shape, seed=3)
    mask = make_mask(w, sparsity, "channel", criterion, **_kwargs(criterion, scores, acts))
    rows = _gemm(mask)
    assert bool((rows.all(1) | ~rows.any(1)).all())
    assert int((~rows.any(1)).sum()) == math.floor(sparsity * shape[0] + 0.5)
    if criterion == "magnitude":
        mean = _gemm(w.abs()).mean(1)
        assert mean[~rows[:, 0]].max() <= mean[rows[:, 0]].min()


def test_threshold_rule_zeroes_every_weight_below_theta():
    w, _, _ = _inputs((16, 32))
    mask = make_mask(w, threshold=0.7)
    assert torch.equal(mask, w.abs() >= 0.7)
    chan = make_mask(w, pattern="channel", threshold=0.8)
    assert torch.equal(chan[:, 0], w.abs().double().mean(1) >= 0.8)


def test_ties_break_to_lower_index_and_repeat():
    w = torch.ones(4, 8)
    mask = make_mask(w, 0.25)
    assert (~mask).flatten().nonzero().flatten().tolist() == list(range(8))
    assert torch.equal(make_mask(w, 0.5, "n:m"), torch.tensor([[False, False, True, True] * 2] * 4))
    w2 = torch.randn(64, 64)
    assert torch.equal(make_mask(w2, 0.37), make_mask(w2.clone(), 0.37))


def test_rounding_half_up():
    w = torch.randn(2, 5)  # 10 weights, 0.25 -> 2.5 -> 3 pruned
    assert int((~make_mask(w, 0.25)).sum()) == 3
    assert int((~make_mask(w, 0.35)).sum()) == 4


def test_grouped_conv_activations_full_shape():
    w, _, _ = _inputs((4, 2, 3, 3))
    acts = torch.rand(4, 2, 3, 3) + 0.1
    mask = make_mask(w, 0.5, "unstructured", "wanda", activations=acts)
    s = (w.abs() * acts).flatten()
    assert s[~mask.flatten()].max() <= s[mask.flatten()].min()
    flat = make_mask(w[:, :, :, :], 0.5, "unstructured", "wanda", activations=acts[0].flatten())
    assert torch.equal(flat, make_mask(w, 0.5, "unstructured", "wanda", activations=acts[0]))


def test_hybrid_two_passes():
    # Coarse pass by |w| takes half of the pruned units, the importance pass the rest.
    w = torch.tensor([[0.1, 0.2, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]])
    scores = torch.tensor([[9.0, 9.0, 1.0, 2.0, 9.0, 9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = make_mask(w, 0.5, "unstructured", "hybrid", scores=scores)
    assert (~mask[0]).nonzero().flatten().tolist() == [0, 1, 2, 3]
    mask = make_mask(w, 0.25, "unstructured", "hybrid", scores=scores, coarse=0.0)
    assert (~mask[0]).nonzero().flatten().tolist() == [2, 3]
    # threshold: every |w| < 0.15 (one weight) goes first, then importance
    mask = make_mask(w, 0.25, "unstructured", "hybrid", scores=scores, threshold=0.15)
    assert (~mask[0]).nonzero().flatten().tolist() == [0, 2]
    # a threshold catching more than the budget prunes only the lowest |w| up to the budget
    mask = make_mask(w, 0.25, "unstructured", "hybrid", scores=scores, threshold=100.0)
    assert (~mask[0]).nonzero().flatten().tolist() == [0, 1]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_global_masks(pattern, criterion):
    g = torch.Generator().manual_seed(4)
    weights = {"a": torch.randn(16, 32, generator=g), "b": 3 * torch.randn(16, 4, 2, 2, generator=g)}
    scores = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in weights.items()}
    acts = {k: torch.rand(v.shape[1:], generator=g) + 0.1 for k, v in weights.items()}
    kw = _kwargs(criterion, scores, acts)
    sparsity = None if pattern == "n:m" else 0.6
    masks = make_masks_global(weights, sparsity, pattern, criterion, block=(4, 4), **kw)
    assert masks.keys() == weights.keys()
    if pattern == "n:m":
        for k, w in weights.items():
            local = make_mask(w, None, "n:m", criterion, **{a: b[k] for a, b in kw.items()})
            assert torch.equal(masks[k], local)
        return
    if pattern == "unstructured":
        total = sum(w.numel() for w in weights.values())
        assert sum(int((~m).sum()) for m in masks.values()) == math.floor(0.6 * total + 0.5)
        if criterion in ("magnitude", "taylor"):
            s = {k: (weights[k].abs().double() if criterion == "magnitude" else scores[k]) for k in weights}
            kept = torch.cat([s[k][masks[k]] for k in weights])
            pruned = torch.cat([s[k][~masks[k]] for k in weights])
            assert pruned.max() <= kept.min()
            # the larger-scale layer keeps more of its weights
            if criterion == "magnitude":
                assert masks["b"].float().mean() > masks["a"].float().mean()
    if pattern == "channel":
        n = sum(w.shape[0] for w in weights.values())
        removed = sum(int((~_gemm(m).any(1)).sum()) for m in masks.values())
        assert removed == math.floor(0.6 * n + 0.5)


def test_global_keeps_one_unit_per_layer():
    weights = {"tiny": torch.full((4, 4), 1e-6), "big": torch.randn(4, 4) + 10}
    masks = make_masks_global(weights, 0.5, "channel")
    assert masks["tiny"].any() and int((~masks["tiny"].all(1)).sum()) == 3
    with pytest.raises(ValueError, match="must keep at least one"):
        make_masks_global(weights, 1.0, "channel")


def test_global_threshold_is_local():
    weights = {"a": torch.randn(8, 8), "b": torch.randn(4, 8)}
    masks = make_masks_global(weights, threshold=0.5)
    for k, w in weights.items():
        assert torch.equal(masks[k], w.abs() >= 0.5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda w: make_mask(w, 0.5, "diagonal"), ValueError, "pattern must be one of"),
    (lambda w: make_mask(w, 0.5, "unstructured", "random"), ValueError, "criterion must be one of"),
    (lambda w: make_mask(w, 1.5), ValueError, r"sparsity must be a number in \[0, 1\]"),
    (lambda w: make_mask(w, True), ValueError, "sparsity must be a number"),
    (lambda w: make_mask(w), ValueError, "exactly one of sparsity"),
    (lambda w: make_mask(w, 0.5, threshold=0.1), ValueError, "exactly one of sparsity"),
    (lambda w: make_mask(w, threshold=float("nan")), ValueError, "threshold must be a finite number"),
    (lambda w: make_mask(w, 0.7, "n:m"), ValueError, "has sparsity 0.5"),
    (lambda w: make_mask(w, None, "n:m", n=5, m=4), ValueError, "0 <= n <= m"),
    (lambda w: make_mask(w, None, "n:m", m=3), ValueError, "does not divide"),
    (lambda w: make_mask(w, None, "n:m", threshold=0.1), ValueError, "does not apply to pattern 'n:m'"),
    (lambda w: make_mask(w, 0.5, "block", block=(0, 4)), ValueError, "block must be a pair"),
    (lambda w: make_mask(w, 0.5, "block", block=16), ValueError, "block must be a pair"),
    (lambda w: make_mask(w, 0.5, criterion="taylor"), ValueError, "needs scores="),
    (lambda w: make_mask(w, 0.5, criterion="wanda"), ValueError, "needs activations="),
    (lambda w: make_mask(w, 0.5, criterion="hybrid"), ValueError, "importance pass"),
    (lambda w: make_mask(w, criterion="hybrid", threshold=0.1), ValueError, "needs sparsity="),
    (lambda w: make_mask(w, 0.5, criterion="hybrid", scores=torch.rand(8, 8), coarse=2.0), ValueError, "coarse"),
    (lambda w: make_mask(w, 0.5, criterion="taylor", scores=torch.rand(8, 7)), ValueError, "scores has shape"),
    (lambda w: make_mask(w, 0.5, criterion="wanda", activations=torch.rand(7)), ValueError, "activations has shape"),
    (lambda w: make_mask(w, 0.5, criterion="wanda", activations=-torch.rand(8)), ValueError, "non-negative"),
    (lambda w: make_mask(w, 0.5, criterion="taylor", scores=torch.full((8, 8), float("nan"))), ValueError, "NaN"),
    (lambda w: make_mask(w.numpy(), 0.5), TypeError, "weight must be a torch.Tensor"),
    (lambda w: make_mask(w[0], 0.5), ValueError, "2-D"),
    (lambda w: make_mask(w.int(), 0.5), TypeError, "floating point"),
    (lambda w: make_mask(w / 0, 0.5), ValueError, "NaN or Inf"),
    (lambda w: make_masks_global({}, 0.5), ValueError, "non-empty mapping"),
    (lambda w: make_masks_global({"a": w}, 0.5, criterion="taylor", scores=[w]), TypeError, "mapping"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments(call, exc, match):
    w = torch.randn(8, 8)
    w[0, 0] = 1.0
    with pytest.raises(exc, match=match):
        call(w)
