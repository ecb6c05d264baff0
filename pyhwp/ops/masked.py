"""torch.library custom op over the masked tile kernels (csrc/masked), with its autograd, its
float64 torch path and its export decomposition."""

from __future__ import annotations

import torch

from pyhwp._ext import _C
from pyhwp.formats.masked import dense_from_tiles, tile_panels, tile_shape, tiles_from_dense, unpack_bits
from pyhwp.kernels import kernel_named
from pyhwp.ops.autograd import MatmulPattern, register_matmul_autograd, torch_matmul
from pyhwp.ops.decompositions import register_matmul_decomposition

# device type -> dtypes the compiled kernels serve; the op runs everything else on the torch path.
_NATIVE = {k.device: k.dtypes for k in map(kernel_named, ("masked_matmul",))}


def _positions(tile_ptr, tile_idx, values, mask_bits):
    """(rows, cols) of every entry of values (tile t, column c, row r), rows clamped into the
    weight: padding rows hold zeros, so their (clamped) contributions vanish."""
    tn, tk = tile_shape()
    t = tile_idx.numel()
    panel = tile_panels(tile_ptr, t)
    r = torch.arange(tn, device=values.device)
    c = torch.arange(tk, device=values.device)
    rows = (panel[:, None, None] * tn + r[None, None, :]).expand(t, tk, tn).reshape(-1)
    cols = (tile_idx.long()[:, None, None] * tk + c[None, :, None]).expand(t, tk, tn).reshape(-1)
    return rows.clamp(max=max(mask_bits.shape[0] - 1, 0)), cols


def _dense(k, tile_ptr, tile_idx, values, mask_bits):
    # Masking here keeps the torch path's derivative equal to the backward's: pruned entries of
    # values are zero by invariant, and do not influence the output either way.
    return dense_from_tiles(tile_ptr, tile_idx, values, mask_bits.shape[0], k) * unpack_bits(mask_bits, k)


def _grad_values(gy, x, tile_ptr, tile_idx, values, mask_bits):
    """grad_W = gy.T @ x at the kept positions (zero where pruned or padding), tiled like values."""
    keep = unpack_bits(mask_bits, x.shape[1])
    g = (gy.t() @ x) * keep
    return tiles_from_dense(g, tile_ptr, tile_idx)


MASKED_PATTERN = MatmulPattern(
    n_arrays=4, values_index=2, positions=_positions,
    out_features=lambda tile_ptr, tile_idx, values, mask_bits: mask_bits.shape[0],
    padded_in_features=lambda k, tile_ptr, tile_idx, values, mask_bits: -(-k // tile_shape()[1]) * tile_shape()[1],
    dense_weight=_dense, grad_values=_grad_values,
)


def masked_matmul_impl(x: torch.Tensor, tile_ptr: torch.Tensor, tile_idx: torch.Tensor, values: torch.Tensor,
                       mask_bits: torch.Tensor, bias: torch.Tensor | None,
                       transpose_out: bool = False) -> torch.Tensor:
    """x (P, K) @ W.T + bias with W (N, K) in the masked tile layout (MaskedWeight: tile_ptr,
    tile_idx, values; mask_bits (N, ceil(K/8)) names the kept positions for the gradient and
    gives N); x may have any strides.

    Returns y (P, N), or with transpose_out=True its transpose Y = W @ x.T + bias[:, None] as a
    contiguous (N, P) tensor (the layout of a conv output image). Dtypes the CPU kernel does not
    serve (float64, for gradcheck) run the torch path on the dense weight (masked_matmul_torch).
    """
    if x.dtype not in _NATIVE.get(x.device.type, ()):
        return torch_matmul(MASKED_PATTERN, x, (tile_ptr, tile_idx, values, mask_bits), bias, transpose_out)
    p, n = x.shape[0], mask_bits.shape[0]
    y = torch.empty((n, p) if transpose_out else (p, n), dtype=x.dtype, device=x.device)
    masked_matmul_into(y.t() if transpose_out else y, x, tile_ptr, tile_idx, values, mask_bits, bias)
    return y


def masked_matmul_into(y: torch.Tensor, x: torch.Tensor, tile_ptr: torch.Tensor, tile_idx: torch.Tensor,
                       values: torch.Tensor, mask_bits: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Writes x @ W.T + bias into y (P, N) of any strides (not overlapping x): masked_matmul_impl
    without the output allocation, for pyhwp.linear(..., out=)."""
    if x.dtype not in _NATIVE.get(x.device.type, ()):
        y.copy_(torch_matmul(MASKED_PATTERN, x, (tile_ptr, tile_idx, values, mask_bits), bias, False))
        return
    p, k = x.shape
    n = mask_bits.shape[0]
    values = values.contiguous()
    _C.masked_matmul(
        n, k, tile_idx.shape[0], tile_ptr.data_ptr(), tile_idx.data_ptr(), values.data_ptr(),
        x.data_ptr(), p, x.stride(1), x.stride(0), 0 if bias is None else bias.data_ptr(),
        y.data_ptr(), y.stride(1), y.stride(0), torch.get_num_threads(),
    )


masked_matmul = torch.library.custom_op("pyhwp::masked_matmul", mutates_args=())(masked_matmul_impl)


@masked_matmul.register_fake
def _(x, tile_ptr, tile_idx, values, mask_bits, bias, transpose_out=False):
    n = mask_bits.shape[0]
    return x.new_empty((n, x.shape[0]) if transpose_out else (x.shape[0], n))


register_matmul_autograd(masked_matmul, MASKED_PATTERN)
register_matmul_decomposition(masked_matmul, MASKED_PATTERN)
