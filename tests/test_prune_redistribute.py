"""Weight redistribution: least-squares re-fit of kept weights against float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pyhwp.metrics import omega
from pyhwp.prune import apply_masks, input_grams, make_mask, prunable_layers, redistribute, redistribute_weight
from tiny_models import single_thread, tiny_chain  # noqa: F401 (autouse fixture)


def _correlated(p, k, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(p, k // 2 + 1, generator=g, dtype=torch.float64)
    mix = torch.randn(k // 2 + 1, k, generator=g, dtype=torch.float64)
    return base @ mix + 0.1 * torch.randn(p, k, generator=g, dtype=torch.float64) + 0.5


def _gram(x):
    aug = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    return (aug.T @ aug)[None]


@pytest.mark.parametrize("pattern", ["unstructured", "n:m", "channel"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_per_row_least_squares(pattern, with_bias):
    x = _correlated(200, 16, seed=0)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64) if with_bias else None
    mask = make_mask(w, None if pattern == "n:m" else 0.5, pattern)
    new_w, new_b = redistribute_weight(w, mask, _gram(x), b, ridge=0.0)
    assert bool((new_w[~mask] == 0).all())
    target = x @ w.T + (0 if b is None else b)
    for i in range(6):
        cols = mask[i].nonzero().flatten()
        a = x[:, cols]
        if with_bias:
            a = torch.cat([a, torch.ones(200, 1, dtype=a.dtype)], 1)
        if a.shape[1] == 0:
            assert bool((new_w[i] == 0).all())
            continue
        ref = torch.linalg.lstsq(a, target[:, i:i + 1]).solution.flatten()
        torch.testing.assert_close(new_w[i, cols], ref[:cols.numel()], rtol=1e-7, atol=1e-8)
        if with_bias:
            torch.testing.assert_close(new_b[i], ref[-1], rtol=1e-7, atol=1e-8)
    # and it is never worse than just masking
    fitted = x @ new_w.T + (0 if new_b is None else new_b)
    masked = x @ (w * mask).T + (0 if b is None else b)
    assert (fitted - target).norm() <= (masked - target).norm() + 1e-9


def test_full_mask_is_unchanged_and_ridge_pulls_to_original():
    x = _correlated(100, 12, seed=2)
    w = torch.randn(4, 12, dtype=torch.float64)
    full = torch.ones_like(w, dtype=torch.bool)
    new_w, _ = redistribute_weight(w, full, _gram(x), ridge=1e-3)
    torch.testing.assert_close(new_w, w, rtol=1e-9, atol=1e-9)
    mask = make_mask(w, 0.5)
    big, _ = redistribute_weight(w, mask, _gram(x), ridge=1e6)
    torch.testing.assert_close(big, w * mask, rtol=0, atol=1e-4)


def test_grouped_conv_weight():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    model = nn.Sequential(conv)
    # spatially smooth inputs: neighbouring pixels correlate, so kept taps can stand in for pruned ones
    xs = [nn.functional.interpolate(torch.randn(4, 4, 3, 3, dtype=torch.float64), size=(6, 6), mode="bilinear")
          for _ in range(3)]
    gram = input_grams(model, xs)["0"]
    mask = make_mask(conv.weight, 0.6)
    new_w, new_b = redistribute_weight(conv.weight, mask, gram, conv.bias, groups=2, ridge=0.0)
    x = torch.cat(xs)
    err_fit = (conv(x) - nn.functional.conv2d(x, new_w, new_b, padding=1, groups=2)).norm()
    err_mask = (conv(x) - nn.functional.conv2d(x, conv.weight * mask, conv.bias, padding=1, groups=2)).norm()
    assert err_fit < 0.8 * err_mask


@pytest.mark.parametrize("sequential", [True, False])
def test_model_redistribution_beats_masking(sequential):
    dense = tiny_chain()
    g = torch.Generator().manual_seed(4)
    calib = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(4)]
    masks = {n: make_mask(m.weight, 0.7) for n, m in prunable_layers(dense).items()}
    masked = apply_masks(copy.deepcopy(dense), masks)
    refit = copy.deepcopy(dense)
    report = redistribute(refit, masks, calib, sequential=sequential)
    assert report.keys() == masks.keys()
    for n, layer in prunable_layers(refit).items():
        assert bool((layer.weight[~masks[n]] == 0).all())
        assert report[n]["omega_masked"] == pytest.approx(omega(masked.get_submodule(n).weight))
        assert report[n]["omega_redistributed"] == pytest.approx(omega(layer.weight))
    x = torch.cat(calib)
    with torch.no_grad():
        ref = dense(x)
        assert (refit(x) - ref).norm() < (masked(x) - ref).norm()


def test_bad_arguments():
    w = torch.randn(4, 8)
    mask = make_mask(w, 0.5)
    with pytest.raises(ValueError, match="gram has shape"):
        redistribute_weight(w, mask, torch.eye(8)[None])
    with pytest.raises(ValueError, match="mask a bool tensor"):
        redistribute_weight(w, mask.float(), torch.eye(9)[None])
    with pytest.raises(ValueError, match="groups must be"):
        redistribute_weight(w, mask, torch.eye(9)[None], groups=3)
    with pytest.raises(ValueError, match="ridge must be"):
        redistribute_weight(w, mask, torch.eye(9)[None], ridge=-1.0)
