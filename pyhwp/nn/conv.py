"""SparseConv2d: drop-in nn.Conv2d whose weight is a SparseWeight, forward through pyhwp.conv2d."""

from __future__ import annotations

import torch
from torch import nn

from pyhwp.formats import SparseWeight, to_sparse
from pyhwp.nn.module import SparseModule
from pyhwp.ops.conv2d import conv2d


class SparseConv2d(SparseModule):
    """nn.Conv2d semantics (zero padding) with the (out, in/groups, kh, kw) weight pruned and stored
    in one pattern; the 2:4 groups and CSR rows run along the flattened in/groups*kh*kw axis.

    Parameters: `values` and `bias` (out_channels,) or None. Buffers: the pattern's index arrays.
    """

    def __init__(self, weight: SparseWeight, bias: torch.Tensor | None = None, stride=1, padding=0,
                 dilation=1, groups: int = 1, requires_grad: bool = True):
        super().__init__()
        if not isinstance(weight, SparseWeight) or len(weight.shape) != 4:
            raise TypeError("SparseConv2d: weight must be a 4-D pyhwp.SparseWeight (out, in/groups, kh, kw)")
        out, cin_g, kh, kw = weight.shape
        self.in_channels, self.out_channels = cin_g * groups, out
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._set_weight(weight, requires_grad)
        self._set_bias(bias, requires_grad)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, pattern: str, mask: torch.Tensor | None = None) -> SparseConv2d:
        """The layer with `module`'s weight in `pattern` (its nonzeros kept, or exactly `mask`)."""
        if not isinstance(module, nn.Conv2d) or isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise TypeError(f"SparseConv2d.from_dense: module must be an initialised torch.nn.Conv2d, "
                            f"got {type(module).__name__}")
        if module.padding_mode != "zeros":
            raise ValueError(f"SparseConv2d.from_dense: padding_mode={module.padding_mode!r} is not supported "
                             f"(only 'zeros')")
        weight = to_sparse(module.weight.detach(), pattern, mask=mask)
        return cls(weight, module.bias, module.stride, module.padding, module.dilation, module.groups,
                   requires_grad=module.weight.requires_grad)

    def to_dense(self) -> nn.Conv2d:
        """An nn.Conv2d with the dense weight (zeros where pruned), same dtype and device."""
        w = self.weight.to_dense().detach()
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.groups, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.weight.requires_grad_(self.values.requires_grad)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, {super().extra_repr()}")
