"""torch.library custom op over the masked tile kernels (csrc/masked): the CPU kernels and, for CUDA
tensors, the tensor-core kernel reading the stored tiles in place, with its autograd, its float64
torch path and its export decomposition."""

from __future__ import annotations

import torch

from pyhwp._ext import _C
from pyhwp.formats.masked import dense_from_tiles, tile_panels, tile_shape, tiles_from_dense, unpack_bits
from pyhwp.formats.masked import tile_map as build_tile_map
from pyhwp.kernels import kernel_named
from pyhwp.ops.autograd import MatmulPattern, register_matmul_autograd, torch_matmul
from pyhwp.ops.csr import cuda_dtype_code, cuda_workspace
from pyhwp.ops.decompositions import register_matmul_decomposition
from pyhwp.ops.eager import cpu_kernel_call

# device type -> dtypes the compiled kernels serve; the op runs everything else on the torch path.
_NATIVE = {k.device: k.dtypes for k in map(kernel_named, ("masked_matmul", "masked_matmul_cuda"))}


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


_KERNEL = {torch.float32: _C.masked_matmul, torch.bfloat16: _C.masked_matmul_bf16}


def masked_matmul_impl(x: torch.Tensor, tile_ptr: torch.Tensor, tile_idx: torch.Tensor, values: torch.Tensor,
                       mask_bits: torch.Tensor, bias: torch.Tensor | None, transpose_out: bool = False,
                       tile_map: torch.Tensor | None = None) -> torch.Tensor:
    """x (P, K) @ W.T + bias with W (N, K) in the masked tile layout (MaskedWeight: tile_ptr,
    tile_idx, values; mask_bits (N, ceil(K/8)) names the kept positions for the gradient and
    gives N); x may have any strides. On the CPU x, values and bias are all float32 or all
    bfloat16 (bfloat16: float32 products and sums, one rounding of each output).

    Returns y (P, N), or with transpose_out=True its transpose Y = W @ x.T + bias[:, None] as a
    contiguous (N, P) tensor (the layout of a conv output image). CUDA tensors of float32,
    float16 or bfloat16 run the CUDA kernel (tensor cores for float16/bfloat16, exact float32
    SIMT for float32; float32 accumulation; compute capability >= 8.0) on the current stream. It
    reads the stored tiles in place through `tile_map` (int32 (ceil(N/16), ceil(K/16)), the
    stored tile at each tile position or -1: MaskedWeight.kernel_tile_map; built per call when
    None), skipping tiles that are not stored. Dtypes the compiled kernels do not serve (float64,
    for gradcheck) run the torch path on the dense weight (masked_matmul_torch*).
    """
    if x.dtype not in _NATIVE.get(x.device.type, ()):
        return torch_matmul(MASKED_PATTERN, x, (tile_ptr, tile_idx, values, mask_bits), bias, transpose_out)
    p, n = x.shape[0], mask_bits.shape[0]
    y = torch.empty((n, p) if transpose_out else (p, n), dtype=x.dtype, device=x.device)
    masked_matmul_into(y.t() if transpose_out else y, x, tile_ptr, tile_idx, values, mask_bits, bias, tile_map)
    return y


def masked_matmul_into(y: torch.Tensor, x: torch.Tensor, tile_ptr: torch.Tensor, tile_idx: torch.Tensor,
                       values: torch.Tensor, mask_bits: torch.Tensor, bias: torch.Tensor | None,
                       tile_map: torch.Tensor | None = None) -> None:
    """Writes x @ W.T + bias into y (P, N) of any strides (not overlapping x): masked_matmul_impl
    without the output allocation, for pyhwp.linear(..., out=)."""
    if x.dtype not in _NATIVE.get(x.device.type, ()):
        y.copy_(torch_matmul(MASKED_PATTERN, x, (tile_ptr, tile_idx, values, mask_bits), bias, False))
        return
    p, k = x.shape
    n = mask_bits.shape[0]
    values = values.contiguous()
    if x.device.type == "cuda":
        _masked_matmul_cuda(x, tile_ptr, tile_idx, values, n, bias, y, tile_map)
        return
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"pyhwp::masked_matmul: the CPU kernels take x, values and bias of one dtype "
                        f"(float32 or bfloat16), got x {x.dtype}, values {values.dtype}"
                        + ("" if bias is None else f", bias {bias.dtype}"))
    masked_matmul_cpu(y, x, tile_ptr, tile_idx, values, n, bias)


def masked_cpu_args(tile_ptr: torch.Tensor, tile_idx: torch.Tensor, values: torch.Tensor, n: int,
                    k: int) -> tuple[dict, tuple, tuple]:
    """(kernels by dtype, head, tail) for cpu_kernel_call on contiguous CPU masked arrays of an
    n x k weight. The arrays must outlive the call."""
    return _KERNEL, (n, k, tile_idx.shape[0], tile_ptr.data_ptr(), tile_idx.data_ptr(), values.data_ptr()), ()


def masked_matmul_cpu(y: torch.Tensor, x: torch.Tensor, tile_ptr: torch.Tensor, tile_idx: torch.Tensor,
                      values: torch.Tensor, n: int, bias: torch.Tensor | None) -> None:
    """The CPU kernel call of masked_matmul_into for inputs already checked: x (P, K) and y (P, n)
    CPU tensors of any strides, x, values and a contiguous bias all float32 or all bfloat16,
    contiguous weight arrays (the eager path of pyhwp.linear on a validated MaskedWeight)."""
    kernels, head, tail = masked_cpu_args(tile_ptr, tile_idx, values, n, x.shape[1])
    cpu_kernel_call(kernels[x.dtype], head, tail, y, x, bias)


def masked_conv2d_impl(x: torch.Tensor, tile_ptr: torch.Tensor, tile_idx: torch.Tensor, values: torch.Tensor,
                       out: int, geometry: tuple[int, ...], bias: torch.Tensor | None,
                       values_bf16: torch.Tensor | None = None) -> torch.Tensor | None:
    """conv2d of x (N, C, H, W) float32 CPU with a masked weight (out, C*kh*kw) as one implicit
    GEMM (csrc/masked/masked_conv2d_cpu.cpp): the AVX-512 or AVX2 tile kernel reads each stored
    tile's x rows from a padded copy of x (of its stride phases), no im2col; zero tiles are
    skipped. geometry = (images, C, H, W, pad_top, pad_left, kh, kw, dil_h, dil_w, H_out, W_out[,
    stride_h, stride_w]) (csrc/common/conv_geometry.h). Returns y (N, out, H_out, W_out)
    contiguous, or None when x holds a NaN/Inf (the caller must take a path with dense-exact
    0 * Inf propagation) or neither the AVX-512 nor the AVX2 kernels are in use here. Inference
    only; contiguous weight arrays and bias. `values_bf16`: the values as bfloat16 when x, values
    and bias are float32 copies of a bfloat16 conv's, for the AVX512-BF16 kernel (VDPBF16PS)."""
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out, geometry[10], geometry[11])
    status = _C.masked_conv2d(out, geometry[1] * geometry[6] * geometry[7], tile_idx.shape[0], tile_ptr.data_ptr(),
                              tile_idx.data_ptr(), values.data_ptr(), geometry, x.data_ptr(),
                              0 if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads(),
                              0 if values_bf16 is None else values_bf16.data_ptr())
    return y if status == 0 else None


def _masked_matmul_cuda(x, tile_ptr, tile_idx, values, n, bias, y, tile_map):
    p, k = x.shape
    code = cuda_dtype_code(x.dtype, "masked_matmul")
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"pyhwp::masked_matmul: values {values.dtype}, bias and x {x.dtype} must share a dtype")
    for name, t in (("tile_ptr", tile_ptr), ("tile_idx", tile_idx), ("values", values), ("bias", bias),
                    ("tile_map", tile_map), ("y", y)):
        if t is not None and t.device != x.device:
            raise ValueError(f"pyhwp::masked_matmul: {name} is on {t.device}, x on {x.device}")
    tn, tk = tile_shape()
    want = (-(-n // tn), -(-k // tk))
    if tile_map is None:  # weights rebuilt without one (SparseWeight._unchecked, compiled graphs)
        tile_map = build_tile_map(tile_ptr, tile_idx, n, k)
    elif tile_map.dtype != torch.int32 or tuple(tile_map.shape) != want:
        raise ValueError(f"pyhwp::masked_matmul: tile_map must be int32 of shape {want}, "
                         f"got {tile_map.dtype} {tuple(tile_map.shape)}")
    tile_map = tile_map.contiguous()
    if values.data_ptr() % 16:  # a view into a bigger tensor; the kernel reads 16-byte chunks
        values = values.clone()
    if bias is not None:
        bias = bias.contiguous()
    with torch.cuda.device(x.device):
        nbytes = _C.masked_matmul_cuda_workspace(n, k, values.data_ptr(), 0, code, x.data_ptr(), p, x.stride(1),
                                                 x.stride(0), y.data_ptr(), y.stride(1), y.stride(0),
                                                 tile_map=tile_map.data_ptr())
        ws = cuda_workspace(nbytes, x.device)
        _C.masked_matmul_cuda(
            n, k, values.data_ptr(), 0, 0, code, x.data_ptr(), p, x.stride(1), x.stride(0),
            0 if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(1), y.stride(0),
            ws.data_ptr(), ws.numel(), torch.cuda.current_stream(x.device).cuda_stream,
            tile_map=tile_map.data_ptr(),
        )


masked_matmul = torch.library.custom_op("pyhwp::masked_matmul", mutates_args=())(masked_matmul_impl)


@masked_matmul.register_fake
def _(x, tile_ptr, tile_idx, values, mask_bits, bias, transpose_out=False, tile_map=None):
    n = mask_bits.shape[0]
    return x.new_empty((n, x.shape[0]) if transpose_out else (x.shape[0], n))


register_matmul_autograd(masked_matmul, MASKED_PATTERN)
register_matmul_decomposition(masked_matmul, MASKED_PATTERN)
