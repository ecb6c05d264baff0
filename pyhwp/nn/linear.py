"""SparseLinear: drop-in nn.Linear whose weight is a SparseWeight, forward through pyhwp.linear."""

from __future__ import annotations

import torch
from torch import nn

from pyhwp.formats import SparseWeight, to_sparse
from pyhwp.nn.module import SparseModule
from pyhwp.ops.linear import linear


class SparseLinear(SparseModule):
    """y = x @ W.T + bias with W pruned and stored in one pattern.

    Parameters: `values` (the kept weights, pattern's layout) and `bias` (out_features,) or None.
    Buffers: the pattern's index arrays (for "csr": row_offsets, col_indices).
    """

    def __init__(self, weight: SparseWeight, bias: torch.Tensor | None = None, requires_grad: bool = True):
        super().__init__()
        if not isinstance(weight, SparseWeight) or len(weight.shape) != 2:
            raise TypeError("SparseLinear: weight must be a 2-D pyhwp.SparseWeight (out_features, in_features)")
        self.out_features, self.in_features = weight.shape
        self._set_weight(weight, requires_grad)
        self._set_bias(bias, requires_grad)

    @classmethod
    def from_dense(cls, module: nn.Linear, pattern: str, mask: torch.Tensor | None = None) -> SparseLinear:
        """The layer with `module`'s weight in `pattern` (its nonzeros kept, or exactly `mask`)."""
        if not isinstance(module, nn.Linear) or isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise TypeError(f"SparseLinear.from_dense: module must be an initialised torch.nn.Linear, "
                            f"got {type(module).__name__}")
        weight = to_sparse(module.weight.detach(), pattern, mask=mask)
        return cls(weight, module.bias, requires_grad=module.weight.requires_grad)

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with the dense weight (zeros where pruned), same dtype and device."""
        w = self.weight.to_dense().detach()
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.weight.requires_grad_(self.values.requires_grad)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {super().extra_repr()}")
