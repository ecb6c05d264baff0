"""Tiny dense models, pattern-valid pruned weights and dtype choice for the nn / autograd tests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyhwp
from pyhwp.kernels import find_kernel

PATTERNS = pyhwp.formats.patterns()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def prune_for(pattern: str, w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A copy of w pruned so that `pattern` accepts it: 2 of every 4 along the flattened input
    axis for "2:4", otherwise about 60% random zeros (some rows left empty)."""
    w2 = w.detach().clone().reshape(w.shape[0], -1)
    if pattern == "2:4":
        groups = w2.reshape(w2.shape[0], -1, 4)
        drop = groups.abs().argsort(-1)[..., :2]
        groups.scatter_(-1, drop, 0.0)
    else:
        w2[torch.rand(w2.shape, generator=generator) < 0.6] = 0
        w2[0] = 0  # an empty row
    return w2.reshape(w.shape)


def supported_dtype(pattern: str, device: str) -> torch.dtype:
    """float32 where a pyhwp kernel serves it, else float64 (the torch path)."""
    for dtype in (torch.float32, torch.float64):
        try:
            find_kernel("linear", pattern, torch.device(device), dtype)
            return dtype
        except (TypeError, ValueError):
            continue
    pytest.skip(f"no pyhwp kernel for {pattern!r} on {device}")


class TinyNet(nn.Module):
    """conv (4 -> 8, 3x3) -> relu -> flatten -> linear -> relu -> nested linear."""

    def __init__(self, hw: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(8 * hw * hw, 16), nn.ReLU(),
                                  nn.Sequential(nn.Linear(16, 8, bias=False)))
        self.hw = hw

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))

    def input(self, batch: int, generator: torch.Generator, dtype=torch.float32, device="cpu"):
        return torch.randn(batch, 4, self.hw, self.hw, generator=generator, dtype=dtype).to(device)


SPARSE_NAMES = ("conv", "head.0", "head.2.0")


def sparse_tiny_net(pattern: str, seed: int = 0, dtype=torch.float32, device="cpu"):
    """(sparse model, dense twin with the same pruned weights, masks by module name)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dense = TinyNet().to(dtype)
    masks = {}
    with torch.no_grad():
        for name in SPARSE_NAMES:
            mod = dense.get_submodule(name)
            mod.weight.copy_(prune_for(pattern, mod.weight, g))
            masks[name] = mod.weight != 0
    dense = dense.to(device)
    sparse = pyhwp.sparsify(copy.deepcopy(dense), {n: pattern for n in SPARSE_NAMES})
    return sparse, dense, masks
