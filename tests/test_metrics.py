"""pyhwp.metrics: performance change, compression ratio, parameter/FLOP counts, Omega, accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyhwp
from pyhwp.metrics import accuracy, compression_ratio, count_flops, count_params, omega, performance_change
from pyhwp.prune import make_mask


def test_performance_change():
    assert performance_change(90.0, 81.0) == pytest.approx(-10.0)
    assert performance_change(50.0, 55.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="nonzero"):
        performance_change(0.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        performance_change(float("nan"), 1.0)


def test_compression_ratio_from_nbytes():
    w = torch.randn(64, 128)
    sw = pyhwp.to_sparse(w, "csr", mask=make_mask(w, 0.9))
    nnz = round(0.1 * w.numel())
    stored = nnz * 4 + nnz * 4 + 65 * 8 + 64 * 4  # values, int32 columns, int64 row offsets, int32 row order
    assert sw.nbytes == stored
    assert compression_ratio(sw) == pytest.approx(w.numel() * 4 / stored)
    sw2 = pyhwp.to_sparse(torch.randn(8, 8), "csr")
    assert compression_ratio([sw, sw2]) == pytest.approx((w.numel() + 64) * 4 / (stored + sw2.nbytes))
    with pytest.raises(TypeError, match="SparseWeight"):
        compression_ratio([w])


def test_omega():
    w = torch.tensor([[1.0, -2.0, 4.0], [0.0, 0.0, 0.0], [3.0, 3.0, 0.0]])
    assert omega(w) == pytest.approx(7 / 4 + 0 + 2)
    conv = torch.ones(2, 3, 2, 2)
    assert omega(conv) == pytest.approx(24.0)


def test_params_and_flops():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False), nn.Flatten(), nn.Linear(6 * 16, 5))
    x = torch.randn(2, 4, 8, 8)
    params = count_params(model)
    total = (6 * 4 * 9 + 6) + 6 * 2 * 9 + (5 * 96 + 5)
    assert params == {"total": total, "nonzero": total}
    flops = count_flops(model, x)
    dense = 2 * (2 * 16 * 6 * 4 * 9 + 2 * 16 * 6 * 2 * 9 + 2 * 5 * 96)
    assert flops == {"dense": dense, "sparse": dense}
    masks = {"0": make_mask(model[0].weight, 0.5), "4": make_mask(model[4].weight, 0.75)}
    sparse = count_flops(model, x, masks)["sparse"]
    kept0, kept4 = int(masks["0"].sum()), int(masks["4"].sum())
    assert sparse == 2 * (2 * 16 * kept0 + 2 * 16 * 6 * 2 * 9 + 2 * kept4)
    assert count_params(model, masks)["nonzero"] == kept0 + 6 + 6 * 2 * 9 + kept4 + 5
    with torch.no_grad():
        model[2].weight[0] = 0
    assert count_params(model)["nonzero"] == total - 18


def test_accuracy():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.eye(3)
    assert accuracy(model, [(x, torch.tensor([0, 1, 2])), (x, torch.tensor([0, 0, 0]))]) == pytest.approx(400 / 6)
    with pytest.raises(ValueError, match="no samples"):
        accuracy(model, [])
