"""bfloat16 k x k convs on the AMX tile unit (csrc/common/amx_conv.h), for masked and 2:4 weights.

The kernel reads the weight as A tiles of its dense values, 16 output channels by 32 input
channels at one kernel tap, and skips the tiles whose values are all zero; the input is copied
once into padded planes of channel pairs (no im2col). amx_conv_tiles builds the tiles (once per
weight: conv2d keeps them with the weight's other derived data).
"""

from __future__ import annotations

import torch

from pyhwp._ext import _C

_DONE, _NONFINITE, _UNAVAILABLE = 0, 1, 2


def amx_available() -> bool:
    """Whether the AMX kernels run here now (CPU, OS permission, build, and the ISA cap)."""
    return _C.active_isa() == "amx"


def amx_conv_tiles(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles, nonzero) of a dense bfloat16 conv weight (out, C, kh, kw), the kernel's B operand:
    tiles (ceil(out/16), kh*kw, ceil(C/32), 16, 32) bfloat16, tile (o, t, c) holding output
    channels 16o.. by input channels 32c.. at tap t = r*kw + s in the unit's pair layout (row q:
    for each output channel n, the values of input channels 32c + 2q and 32c + 2q + 1), zeros past
    out and C; nonzero (ceil(out/16), kh*kw, ceil(C/32)) uint8, 0 where a tile's values are all
    (+-) zero."""
    out, c, kh, kw = dense.shape
    o_tiles, c_blocks = -(-out // 16), -(-c // 32)
    padded = dense.new_zeros(o_tiles * 16, c_blocks * 32, kh * kw)
    padded[:out, :c] = dense.reshape(out, c, kh * kw)
    # (o, n, c, q, e, t) -> (o, t, c, q, n, e): channel 32c + 2q + e of output 16o + n
    tiles = padded.view(o_tiles, 16, c_blocks, 16, 2, kh * kw).permute(0, 5, 2, 3, 1, 4)
    tiles = tiles.reshape(o_tiles, kh * kw, c_blocks, 16, 32)
    magnitude = tiles.view(torch.int16) & 0x7FFF  # -0.0 counts as zero
    nonzero = magnitude.ne(0).flatten(3).any(-1).to(torch.uint8)
    return tiles, nonzero


def amx_conv2d_impl(x: torch.Tensor, tiles: torch.Tensor, nonzero: torch.Tensor, out: int,
                    geometry: tuple[int, ...], bias: torch.Tensor | None) -> torch.Tensor | None:
    """conv2d (groups 1) of x (N, C, H, W) bfloat16 CPU with the weight as amx_conv_tiles;
    geometry = (images, C, H, W, pad_top, pad_left, kh, kw, dil_h, dil_w, H_out, W_out, stride_h,
    stride_w) (csrc/common/conv_geometry.h). Returns y (N, out, H_out, W_out), channels_last when x is (read in
    place either way; other layouts are copied contiguous first), or None when x holds a NaN/Inf
    (the caller must take a path with dense-exact 0 * Inf propagation) or the kernel does not
    serve the call here (no usable tile unit; a width stride above 2). Inference only; bias
    contiguous bfloat16 or None."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not channels_last:
        x = x.contiguous()
    y = torch.empty(x.shape[0], out, geometry[10], geometry[11], dtype=x.dtype,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    status = _C.amx_conv2d_bf16(out, tiles.data_ptr(), nonzero.data_ptr(), geometry, channels_last,
                                x.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                                torch.get_num_threads())
    return y if status == _DONE else None
