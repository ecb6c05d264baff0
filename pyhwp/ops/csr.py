"""torch.library custom op over the CSR kernels (csrc/csr): CPU and CUDA behind one op, with its
autograd, its float64 torch path and its export decomposition."""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyhwp._ext import _C
from pyhwp.formats.csr import row_order_by_length
from pyhwp.kernels import kernel_named
from pyhwp.ops.autograd import MatmulPattern, register_matmul_autograd, torch_matmul
from pyhwp.ops.decompositions import register_matmul_decomposition
from pyhwp.ops.eager import cpu_kernel_call

# pyhwp::DType codes of the CUDA kernels (csrc/common/dtype.h).
CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# device type -> dtypes the compiled kernels serve; the op runs everything else on the torch path.
_NATIVE = {k.device: k.dtypes for k in map(kernel_named, ("csr_matmul", "csr_matmul_cuda"))}


def cuda_dtype_code(dtype: torch.dtype, op: str) -> int:
    """The csrc DType code of `dtype`, or a TypeError naming the CUDA dtypes."""
    if dtype not in CUDA_DTYPE_CODES:
        raise TypeError(f"pyhwp::{op}: CUDA kernels take float32, float16 or bfloat16, not {dtype}")
    return CUDA_DTYPE_CODES[dtype]


def cuda_workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """Scratch bytes from torch's caching allocator (blocks are 512-byte aligned), stream-ordered
    on the current stream like the op's output."""
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


def csr_positions(row_offsets: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor):
    """(rows, cols) int64 of every stored value, in values order; col_indices int32, or int16
    holding uint16 bits (CSRWeight.kernel_col_indices)."""
    # rows[j] = how many rows end at or before position j. A scatter-add of the row ends and a
    # cumsum: O(nnz), no host sync, and both map to ONNX ops (ScatterElements, CumSum), unlike
    # repeat_interleave, which the ONNX exporter expands to an (out x nnz) comparison.
    ends = row_offsets[1:]
    marks = row_offsets.new_zeros(values.shape[0] + 1).scatter_add(0, ends, torch.ones_like(ends))
    cols = col_indices.long()
    return marks.cumsum(0)[:-1], cols % 2**16 if col_indices.dtype == torch.int16 else cols


CSR_PATTERN = MatmulPattern(n_arrays=3, values_index=2, positions=csr_positions,
                            out_features=lambda row_offsets, col_indices, values: row_offsets.shape[0] - 1)


def _csr_matmul_cuda(x, row_offsets, col_indices, values, bias, row_order, y, y_stride_n, y_stride_p):
    p, k = x.shape
    n = row_offsets.shape[0] - 1
    code = cuda_dtype_code(x.dtype, "csr_matmul")
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"pyhwp::csr_matmul: values {values.dtype}, bias and x {x.dtype} must share a dtype")
    if row_order is None:  # weights rebuilt without one (SparseWeight._unchecked) still run
        row_order = row_order_by_length(row_offsets)
    with torch.cuda.device(x.device):
        nbytes = _C.csr_matmul_cuda_workspace(n, k, values.numel(), code, x.data_ptr(), p, x.stride(1),
                                              x.stride(0), y.data_ptr(), y_stride_n, y_stride_p)
        ws = cuda_workspace(nbytes, x.device)
        _C.csr_matmul_cuda(
            n, k, values.numel(), row_offsets.data_ptr(), col_indices.data_ptr(), values.data_ptr(),
            row_order.data_ptr(), code, x.data_ptr(), p, x.stride(1), x.stride(0),
            0 if bias is None else bias.data_ptr(), y.data_ptr(), y_stride_n, y_stride_p,
            ws.data_ptr(), ws.numel(), torch.cuda.current_stream(x.device).cuda_stream,
        )


_KERNEL = {torch.float32: _C.csr_matmul, torch.bfloat16: _C.csr_matmul_bf16}


def csr_matmul_impl(x: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
                    values: torch.Tensor, bias: torch.Tensor | None, transpose_out: bool = False,
                    row_order: torch.Tensor | None = None, sell: torch.Tensor | None = None) -> torch.Tensor:
    """x (P, K) @ W.T + bias with W (N, K) in CSR; x may have any strides.

    col_indices is int32, or int16 holding the indices as uint16 bits (K <= 65536; the kernels
    then move 6 instead of 8 bytes per stored weight; see CSRWeight.kernel_col_indices).
    x, values and bias are all float32 or all bfloat16 (float32 accumulation).
    Returns y (P, N), or with transpose_out=True its transpose Y = W @ x.T + bias[:, None] as a
    contiguous (N, P) tensor (the layout of a conv output image). On CUDA tensors it runs the
    CUDA kernels (float32, float16, bfloat16; float32 accumulation) on the current stream, rows in
    `row_order` (int32 permutation, longest rows first; computed when None); the CPU kernels
    take float32 or bfloat16 and ignore row_order. `sell` is the weight's sliced-ELL copy
    (CSRWeight.kernel_sell), which the CPU kernels read instead at batches up to 8 on AVX-512
    CPUs: the same sums in another order. Other dtypes (float64, for gradcheck) run the
    torch path on the dense weight (KERNELS entries csr_matmul_torch*).
    """
    if x.dtype not in _NATIVE.get(x.device.type, ()):
        return torch_matmul(CSR_PATTERN, x, (row_offsets, col_indices, values), bias, transpose_out)
    p, n = x.shape[0], row_offsets.shape[0] - 1
    y = torch.empty((n, p) if transpose_out else (p, n), dtype=x.dtype, device=x.device)
    csr_matmul_into(y.t() if transpose_out else y, x, row_offsets, col_indices, values, bias, row_order, sell)
    return y


def csr_matmul_into(y: torch.Tensor, x: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
                    values: torch.Tensor, bias: torch.Tensor | None, row_order: torch.Tensor | None = None,
                    sell: torch.Tensor | None = None) -> None:
    """Writes x @ W.T + bias into y (P, N) of any strides (not overlapping x): csr_matmul_impl
    without the output allocation, for pyhwp.linear(..., out=)."""
    if x.dtype not in _NATIVE.get(x.device.type, ()):
        y.copy_(torch_matmul(CSR_PATTERN, x, (row_offsets, col_indices, values), bias, False))
        return
    y_stride_n, y_stride_p = y.stride(1), y.stride(0)
    row_offsets, col_indices, values = row_offsets.contiguous(), col_indices.contiguous(), values.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if x.device.type == "cuda":
        _csr_matmul_cuda(x, row_offsets, col_indices, values, bias,
                         None if row_order is None else row_order.contiguous(), y, y_stride_n, y_stride_p)
        return
    if x.dtype not in _KERNEL or values.dtype != x.dtype:
        raise TypeError(f"pyhwp::csr_matmul: the CPU kernels take float32 or bfloat16 x and values of the "
                        f"same dtype, got x {x.dtype}, values {values.dtype}")
    if sell is not None and (sell.dtype != torch.uint8 or not sell.is_cpu or not sell.is_contiguous()
                             or sell.numel() < 64):
        raise TypeError("pyhwp::csr_matmul: sell must be the weight's CSRWeight.kernel_sell() blob "
                        f"(contiguous CPU uint8), got {sell.dtype} {tuple(sell.shape)} on {sell.device}")
    csr_matmul_cpu(y, x, row_offsets, col_indices, values, bias, sell)


def csr_cpu_args(row_offsets: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                 k: int, sell: torch.Tensor | None = None, resident: bool = False) -> tuple[dict, tuple, tuple]:
    """(kernels by dtype, head, tail) for cpu_kernel_call on contiguous CPU CSR arrays (int16
    col_indices: the uint16 kernel copy) with k inputs, the weight's sliced-ELL copy if any
    (CSRWeight.kernel_sell, made for the values' dtype), and whether its arrays are expected in
    cache (CSRWeight.kernel_resident: the kernels then do not prefetch them). The arrays must
    outlive the call."""
    narrow = col_indices.dtype == torch.int16
    head = (row_offsets.shape[0] - 1, k, values.shape[0], row_offsets.data_ptr(),
            0 if narrow else col_indices.data_ptr(), values.data_ptr())
    return _KERNEL, head, (col_indices.data_ptr() if narrow else 0, 0 if sell is None else sell.data_ptr(), resident)


def csr_matmul_cpu(y: torch.Tensor, x: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
                   values: torch.Tensor, bias: torch.Tensor | None, sell: torch.Tensor | None = None) -> None:
    """The CPU kernel call of csr_matmul_into for inputs already checked: x (P, K) and y (P, N) CPU
    tensors of any strides, x, values and a contiguous bias all float32 or all bfloat16,
    contiguous weight arrays (the eager path of pyhwp.linear on a validated CSRWeight)."""
    kernels, head, tail = csr_cpu_args(row_offsets, col_indices, values, x.shape[1], sell)
    cpu_kernel_call(kernels[x.dtype], head, tail, y, x, bias)


class CsrConvPlan(NamedTuple):
    """csr_conv2d_plan's arrays (offsets: int32, for an aligned plan the stream of its entries,
    weights included; starts: int64), whether it is aligned, and the weight's stored count."""

    offsets: torch.Tensor
    starts: torch.Tensor
    aligned: bool
    nnz: int


def csr_conv2d_plan(row_offsets: torch.Tensor, col_indices: torch.Tensor, col_indices16: torch.Tensor | None,
                    values: torch.Tensor, geometry: tuple[int, ...], aligned: bool) -> CsrConvPlan:
    """The plan the implicit-GEMM conv reads a CSR conv weight through, for one input geometry
    (csrc/csr/csr_matmul.h): offsets int32 (nnz,) and block starts int64, or for the aligned plan
    (`aligned`, where csr_conv2d_aligned(geometry) holds: stride-1 convs with kw = 2 or 3 and
    (kw - 1) * dil_w <= 8 on AVX-512 whose padded rows round up to whole lines cheaply) a stream
    of int32 words, per row of taps that holds a weight its offset and its weights' float32 bits
    (`values`, read only for it). O(nnz); build it once per weight and input size (and again
    after the weight's values change: the aligned plan holds a copy of them). geometry =
    (images, C, H, W, pad_top, pad_left, kh, kw, dil_h, dil_w, H_out, W_out[, stride_h,
    stride_w]), stride 1 without the last two (csrc/common/conv_geometry.h); the plan does not
    depend on images."""
    rows, nnz = row_offsets.shape[0] - 1, col_indices.shape[0]
    offsets = torch.empty(2 * nnz if aligned else nnz, dtype=torch.int32)
    starts = torch.empty(_C.csr_conv2d_starts(geometry, aligned) * rows, dtype=torch.int64)
    values = values.detach().float().contiguous() if aligned else None
    narrow = col_indices16 is not None
    words = _C.csr_conv2d_plan(rows, geometry[1] * geometry[6] * geometry[7], nnz, row_offsets.data_ptr(),
                               0 if narrow else col_indices.data_ptr(), col_indices16.data_ptr() if narrow else 0,
                               0 if values is None else values.data_ptr(), geometry, aligned, offsets.data_ptr(),
                               starts.data_ptr())
    if aligned:  # at most 2 * nnz words: keep only what was written
        offsets = offsets[:words].clone()
    return CsrConvPlan(offsets, starts, aligned, nnz)


def csr_conv2d_impl(x: torch.Tensor, row_offsets: torch.Tensor, values: torch.Tensor | None,
                    plan: CsrConvPlan, geometry: tuple[int, ...],
                    bias: torch.Tensor | None) -> torch.Tensor | None:
    """conv2d of x (N, C, H, W) float32 CPU with a CSR weight (out, C*kh*kw) as one implicit GEMM
    (csrc/csr/csr_conv2d_cpu.cpp) through its csr_conv2d_plan for `geometry` (an aligned plan reads
    its own values: `values` may then be None).
    Returns y (N, out, H_out, W_out) contiguous, or None when x holds a NaN/Inf, where the caller
    must take a path with dense-exact 0 * Inf propagation. Inference only (no autograd).
    """
    x = x.contiguous()
    rows = row_offsets.shape[0] - 1
    y = x.new_empty(x.shape[0], rows, geometry[10], geometry[11])  # varargs: ~3x cheaper cold than a tuple
    aligned = plan.aligned
    bad = _C.csr_conv2d(rows, geometry[1] * geometry[6] * geometry[7], plan.nnz, row_offsets.data_ptr(),
                        0 if aligned else values.data_ptr(), geometry, aligned, plan.offsets.data_ptr(),
                        plan.starts.data_ptr(), x.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                        torch.get_num_threads())
    return None if bad else y


def csr_conv2d_cuda_plan(col_indices: torch.Tensor, geometry: tuple[int, ...]) -> torch.Tensor:
    """The per-nnz int32 offsets the CUDA implicit-GEMM conv reads a CSR conv weight through, for
    one stride-1 input geometry (see csr_conv2d_plan): stored weight j of column (c*kh + r)*kw + s reads the
    padded image at c*plane + r*dh*wp + s*dw (csrc/csr/csr_cuda.h ConvPlanes). On the weight's
    device, no host sync; build it once per weight and input size."""
    _, wp, plane = _C.csr_conv2d_cuda_planes(geometry)
    kh, kw, dh, dw = geometry[6:10]
    cols = col_indices.long()
    c, rs = cols // (kh * kw), cols % (kh * kw)
    offsets = c * plane + (rs // kw) * (dh * wp) + (rs % kw) * dw
    return offsets.to(torch.int32).contiguous()


def csr_conv2d_cuda_impl(x: torch.Tensor, row_offsets: torch.Tensor, values: torch.Tensor,
                         row_order: torch.Tensor, offsets: torch.Tensor, geometry: tuple[int, ...],
                         bias: torch.Tensor | None) -> torch.Tensor:
    """Stride-1 conv2d of x (N, C, H, W) on CUDA (float32, float16 or bfloat16, values and bias of
    the same dtype) with a CSR weight (out, C*kh*kw) as one implicit GEMM over the batch
    (csrc/csr/csr_matmul_cuda.cu csr_conv2d_cuda) through its csr_conv2d_cuda_plan offsets.
    Returns y (N, out, H_out, W_out) contiguous. NaN/Inf in x propagate as in the dense conv, on
    the device (no host sync). Inference only (no autograd)."""
    x = x.contiguous()
    rows = row_offsets.shape[0] - 1
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"pyhwp.conv2d: CSR values {values.dtype}, bias and x {x.dtype} must share a dtype")
    code = cuda_dtype_code(x.dtype, "csr_conv2d")
    y = torch.empty((x.shape[0], rows, geometry[10], geometry[11]), dtype=x.dtype, device=x.device)
    cols = geometry[1] * geometry[6] * geometry[7]
    with torch.cuda.device(x.device):
        ws = cuda_workspace(_C.csr_conv2d_cuda_workspace(rows, cols, values.shape[0], code, geometry), x.device)
        _C.csr_conv2d_cuda(rows, cols, values.shape[0], row_offsets.data_ptr(), offsets.data_ptr(),
                           values.data_ptr(), row_order.data_ptr(), code, geometry, x.data_ptr(),
                           0 if bias is None else bias.data_ptr(), y.data_ptr(), ws.data_ptr(), ws.numel(),
                           torch.cuda.current_stream(x.device).cuda_stream)
    return y


csr_matmul = torch.library.custom_op("pyhwp::csr_matmul", mutates_args=())(csr_matmul_impl)


@csr_matmul.register_fake
def _(x, row_offsets, col_indices, values, bias, transpose_out=False, row_order=None, sell=None):
    n = row_offsets.shape[0] - 1
    return x.new_empty((n, x.shape[0]) if transpose_out else (x.shape[0], n))


register_matmul_autograd(csr_matmul, CSR_PATTERN)
register_matmul_decomposition(csr_matmul, CSR_PATTERN)
