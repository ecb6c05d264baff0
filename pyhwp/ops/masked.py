"""torch.library custom op over the masked tile kernels (csrc/masked)."""

from __future__ import annotations

import torch

from pyhwp._ext import _C


@torch.library.custom_op("pyhwp::masked_matmul", mutates_args=())
def masked_matmul(x: torch.Tensor, tile_ptr: torch.Tensor, tile_idx: torch.Tensor, values: torch.Tensor,
                  out_features: int, bias: torch.Tensor | None, transpose_out: bool = False) -> torch.Tensor:
    """x (P, K) @ W.T + bias with W (out_features, K) in the masked tile layout (see MaskedWeight);
    x may have any strides, float32 on the CPU.

    Returns y (P, N), or with transpose_out=True its transpose Y = W @ x.T + bias[:, None] as a
    contiguous (N, P) tensor (the layout of a conv output image).
    """
    p, k = x.shape
    n = out_features
    y = torch.empty((n, p) if transpose_out else (p, n), dtype=x.dtype, device=x.device)
    y_stride_n, y_stride_p = (p, 1) if transpose_out else (1, n)
    _C.masked_matmul(
        n, k, tile_idx.shape[0], tile_ptr.data_ptr(), tile_idx.data_ptr(), values.data_ptr(),
        x.data_ptr(), p, x.stride(1), x.stride(0), 0 if bias is None else bias.data_ptr(),
        y.data_ptr(), y_stride_n, y_stride_p, torch.get_num_threads(),
    )
    return y


@masked_matmul.register_fake
def _(x, tile_ptr, tile_idx, values, out_features, bias, transpose_out=False):
    return x.new_empty((out_features, x.shape[0]) if transpose_out else (x.shape[0], out_features))
