"""torch.library custom ops over the CSR kernels (csrc/csr)."""

from __future__ import annotations

import torch

from pyhwp._ext import _C


@torch.library.custom_op("pyhwp::csr_matmul", mutates_args=())
def csr_matmul(x: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
               values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y (P, N) = x (P, K) @ W.T + bias, W (N, K) in CSR. x may have any strides."""
    p, k = x.shape
    n = row_offsets.shape[0] - 1
    y = torch.empty((p, n), dtype=x.dtype, device=x.device)
    _C.csr_matmul(
        n, k, values.shape[0], row_offsets.data_ptr(), col_indices.data_ptr(), values.data_ptr(),
        x.data_ptr(), p, x.stride(1), x.stride(0), 0 if bias is None else bias.data_ptr(),
        y.data_ptr(), 1, n, torch.get_num_threads(),
    )
    return y


@csr_matmul.register_fake
def _(x, row_offsets, col_indices, values, bias):
    return x.new_empty((x.shape[0], row_offsets.shape[0] - 1))
