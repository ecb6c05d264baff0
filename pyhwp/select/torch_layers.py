"""Layers that run torch's own sparse kernels, for when the selector finds torch's kernel the fastest."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def _to_csr(w: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return w.to_sparse_csr()


class TorchCSRLinear(nn.Module):
    """y = x @ W.T + bias through torch.sparse.mm on a torch CSR weight (the `torch_csr` kernel).

    weight: (out, in) dense tensor, zeros where pruned (a `mask`, True = keep, zeroes the rest);
    the CSR tensor is a buffer (inference only: torch.sparse.mm's CSR gradient is not used here).
    x: (..., in), any strides; returns (..., out).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"TorchCSRLinear: weight must be (out, in), got shape {tuple(weight.shape)}")
        w = weight.detach() if mask is None else weight.detach() * mask.to(weight.device)
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight_csr", _to_csr(w.contiguous()))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_dense(cls, module: nn.Linear, pattern: str = "csr", mask: torch.Tensor | None = None) -> TorchCSRLinear:
        if pattern != "csr" or not isinstance(module, nn.Linear):
            raise TypeError("TorchCSRLinear.from_dense takes an nn.Linear and pattern 'csr'")
        return cls(module.weight, module.bias, mask)

    @property
    def nbytes(self) -> int:
        w = self.weight_csr
        return sum(t.numel() * t.element_size() for t in (w.crow_indices(), w.col_indices(), w.values()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight_csr, x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight_csr.values().numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, kernel='torch_csr', "
                f"density={nnz / max(1, self.in_features * self.out_features):.4f}")


# Kernel name -> module class with from_dense(module, pattern, mask): the torch kernels a selected layer
# can be deployed on. pyhwp's own kernels deploy through pyhwp.sparsify.
TORCH_LAYERS: dict[str, type[nn.Module]] = {"torch_csr": TorchCSRLinear, "torch_csr_cuda": TorchCSRLinear}
