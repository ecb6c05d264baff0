"""Pure-PyTorch references for every op: the test oracle (float64 on the CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyhwp.formats import SparseWeight


def linear_reference(x: torch.Tensor, weight: SparseWeight, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """F.linear on the dense weight, computed in `dtype` on the CPU."""
    w = weight.to_dense().to("cpu", dtype)
    b = None if bias is None else bias.to("cpu", dtype)
    return F.linear(x.to("cpu", dtype), w, b)


def conv2d_reference(x: torch.Tensor, weight: SparseWeight, bias: torch.Tensor | None = None, stride=1,
                     padding=0, dilation=1, groups: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """F.conv2d on the dense weight, computed in `dtype` on the CPU."""
    w = weight.to_dense().to("cpu", dtype)
    b = None if bias is None else bias.to("cpu", dtype)
    return F.conv2d(x.to("cpu", dtype), w, b, stride, padding, dilation, groups)
