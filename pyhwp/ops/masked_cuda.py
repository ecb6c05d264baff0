"""pyhwp::masked_matmul_cuda: the CUDA masked-dense kernel (csrc/masked/masked_matmul_cuda.cu).

W is passed dense, (N, K), with a uint8 flag per 16x16 tile (0 = the tile is all zeros and may be
skipped). float16 / bfloat16 run on tensor cores (mma.sync, sm_80+); float32 runs a SIMT path
with exact float32 products (no TF32), like torch's default float32 matmul.
"""

from __future__ import annotations

import torch

from pyhwp._ext import _C
from pyhwp.ops.csr import cuda_dtype_code, cuda_workspace

TILE = 16  # flag granularity, MaskedCudaConfig::kTile


def tile_flags(values: torch.Tensor) -> torch.Tensor:
    """uint8 (ceil(N/16), ceil(K/16)) flags of a dense (N, K) weight: 1 where the 16x16 tile holds
    any non-zero (NaN counts as non-zero), 0 where it is all zeros. Runs on values' device."""
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (N, K), got shape {tuple(values.shape)}")
    n, k = values.shape
    fr, fc = -(-n // TILE), -(-k // TILE)
    nz = torch.zeros((fr * TILE, fc * TILE), dtype=torch.bool, device=values.device)
    nz[:n, :k] = values != 0
    return nz.view(fr, TILE, fc, TILE).any(dim=3).any(dim=1).to(torch.uint8)


def _check(x, values, tile_flags, bias):
    if x.device.type != "cuda":
        raise ValueError(f"pyhwp::masked_matmul_cuda: x is on {x.device}; this op runs on CUDA tensors")
    if x.dim() != 2 or values.dim() != 2 or x.shape[1] != values.shape[1]:
        raise ValueError(f"pyhwp::masked_matmul_cuda: x {tuple(x.shape)} and values {tuple(values.shape)} "
                         "must be (P, K) and (N, K)")
    for name, t in (("values", values), ("tile_flags", tile_flags), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"pyhwp::masked_matmul_cuda: {name} is on {t.device}, x on {x.device}")
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"pyhwp::masked_matmul_cuda: values {values.dtype}, bias and x {x.dtype} must share a dtype")
    n, k = values.shape
    want = (-(-n // TILE), -(-k // TILE))
    if tile_flags.dtype != torch.uint8 or tuple(tile_flags.shape) != want:
        raise ValueError(f"pyhwp::masked_matmul_cuda: tile_flags must be uint8 of shape {want}, "
                         f"got {tile_flags.dtype} {tuple(tile_flags.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"pyhwp::masked_matmul_cuda: bias has shape {tuple(bias.shape)}, expected ({n},)")


@torch.library.custom_op("pyhwp::masked_matmul_cuda", mutates_args=())
def masked_matmul_cuda(x: torch.Tensor, values: torch.Tensor, tile_flags: torch.Tensor,
                       bias: torch.Tensor | None, transpose_out: bool = False) -> torch.Tensor:
    """x (P, K) @ W.T + bias on the GPU, W = values (N, K) with 16x16 tile flags.

    x: any strides. values: (N, K), unit column stride; a row stride that is a multiple of 8
    elements (16 bytes) and a 16-byte aligned start let the tensor cores read it in place (else
    it is copied per call). tile_flags: uint8 (ceil(N/16), ceil(K/16)), see `tile_flags`.
    Returns y (P, N), or with transpose_out the contiguous (N, P) transpose. NaN/Inf in x
    propagate as in the dense product.
    """
    _check(x, values, tile_flags, bias)
    p, k = x.shape
    n = values.shape[0]
    code = cuda_dtype_code(x.dtype, "masked_matmul_cuda")
    if values.stride(1) != 1:
        values = values.contiguous()
    tile_flags = tile_flags.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    y = torch.empty((n, p) if transpose_out else (p, n), dtype=x.dtype, device=x.device)
    y_stride_n, y_stride_p = (p, 1) if transpose_out else (1, n)
    ld = values.stride(0) if n > 1 else k
    with torch.cuda.device(x.device):
        nbytes = _C.masked_matmul_cuda_workspace(n, k, values.data_ptr(), ld, code, x.data_ptr(), p,
                                                 x.stride(1), x.stride(0), y.data_ptr(), y_stride_n, y_stride_p)
        ws = cuda_workspace(nbytes, x.device)
        _C.masked_matmul_cuda(
            n, k, values.data_ptr(), ld, tile_flags.data_ptr(), code, x.data_ptr(), p, x.stride(1),
            x.stride(0), 0 if bias is None else bias.data_ptr(), y.data_ptr(), y_stride_n, y_stride_p,
            ws.data_ptr(), ws.numel(), torch.cuda.current_stream(x.device).cuda_stream,
        )
    return y


@masked_matmul_cuda.register_fake
def _(x, values, tile_flags, bias, transpose_out=False):
    n = values.shape[0]
    return x.new_empty((n, x.shape[0]) if transpose_out else (x.shape[0], n))
