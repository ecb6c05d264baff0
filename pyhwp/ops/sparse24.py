"""torch.library custom op over the CPU 2:4 kernels (csrc/sparse24)."""

from __future__ import annotations

import torch

from pyhwp._ext import _C


@torch.library.custom_op("pyhwp::sparse24_matmul", mutates_args=())
def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                    transpose_out: bool = False) -> torch.Tensor:
    """x (P, K) @ W.T + bias with W (N, K) in 2:4 storage (Sparse24Weight values (N, Kp/2) float32
    and meta (N, Kp/32) int32, Kp = K rounded up to 32); x may have any strides.

    Returns y (P, N), or with transpose_out=True its transpose Y = W @ x.T + bias[:, None] as a
    contiguous (N, P) tensor (the layout of a conv output image).
    """
    p, k = x.shape
    n = values.shape[0]
    values, meta = values.contiguous(), meta.contiguous()
    y = torch.empty((n, p) if transpose_out else (p, n), dtype=x.dtype, device=x.device)
    y_stride_n, y_stride_p = (p, 1) if transpose_out else (1, n)
    _C.sparse24_matmul(
        n, k, values.data_ptr(), meta.data_ptr(), x.data_ptr(), p, x.stride(1), x.stride(0),
        0 if bias is None else bias.data_ptr(), y.data_ptr(), y_stride_n, y_stride_p,
        torch.get_num_threads(),
    )
    return y


@sparse24_matmul.register_fake
def _(x, values, meta, bias, transpose_out=False):
    n = values.shape[0]
    return x.new_empty((n, x.shape[0]) if transpose_out else (x.shape[0], n))
