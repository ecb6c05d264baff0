"""torch.library custom ops over the CSR kernels (csrc/csr)."""

from __future__ import annotations

import torch

from pyhwp._ext import _C


@torch.library.custom_op("pyhwp::csr_matmul", mutates_args=())
def csr_matmul(x: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
               values: torch.Tensor, bias: torch.Tensor | None, transpose_out: bool = False) -> torch.Tensor:
    """x (P, K) @ W.T + bias with W (N, K) in CSR; x may have any strides.

    Returns y (P, N), or with transpose_out=True its transpose Y = W @ x.T + bias[:, None] as a
    contiguous (N, P) tensor (the layout of a conv output image).
    """
    p, k = x.shape
    n = row_offsets.shape[0] - 1
    y = torch.empty((n, p) if transpose_out else (p, n), dtype=x.dtype, device=x.device)
    y_stride_n, y_stride_p = (p, 1) if transpose_out else (1, n)
    _C.csr_matmul(
        n, k, values.shape[0], row_offsets.data_ptr(), col_indices.data_ptr(), values.data_ptr(),
        x.data_ptr(), p, x.stride(1), x.stride(0), 0 if bias is None else bias.data_ptr(),
        y.data_ptr(), y_stride_n, y_stride_p, torch.get_num_threads(),
    )
    return y


@csr_matmul.register_fake
def _(x, row_offsets, col_indices, values, bias, transpose_out=False):
    n = row_offsets.shape[0] - 1
    return x.new_empty((n, x.shape[0]) if transpose_out else (x.shape[0], n))
