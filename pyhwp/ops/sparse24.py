"""torch.library custom op over the 2:4 kernels (csrc/sparse24): the CPU kernels and, for CUDA
tensors, the sparse tensor-core kernel (mma.sp), with its autograd, its float64 torch path and its
export decomposition."""

from __future__ import annotations

import torch

from pyhwp._ext import _C
from pyhwp.formats.sparse24 import KEEP, _decode_positions
from pyhwp.kernels import kernel_named
from pyhwp.ops.csr import cuda_dtype_code, cuda_workspace
from pyhwp.ops.autograd import MatmulPattern, register_matmul_autograd, torch_matmul
from pyhwp.ops.decompositions import register_matmul_decomposition
from pyhwp.ops.eager import cpu_kernel_call

# device type -> dtypes the compiled kernels serve; the op runs everything else on the torch path.
_NATIVE = {k.device: k.dtypes for k in map(kernel_named, ("sparse24_matmul", "sparse24_matmul_cuda"))}


def sparse24_positions(values: torch.Tensor, meta: torch.Tensor):
    """(rows, cols) int64 of every slot, in values.reshape(-1) order; cols < Kp (padding included)."""
    n, slots = values.shape
    rows = torch.arange(n, device=values.device).unsqueeze(1).expand(n, slots).reshape(-1)
    return rows, _decode_positions(meta).reshape(-1)


SPARSE24_PATTERN = MatmulPattern(n_arrays=2, values_index=0, positions=sparse24_positions,
                                 out_features=lambda values, meta: values.shape[0],
                                 padded_in_features=lambda k, values, meta: values.shape[1] * KEEP)


_KERNEL = {torch.float32: _C.sparse24_matmul, torch.bfloat16: _C.sparse24_matmul_bf16}


def sparse24_matmul_impl(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                         transpose_out: bool = False) -> torch.Tensor:
    """x (P, K) @ W.T + bias with W (N, K) in 2:4 storage (Sparse24Weight values (N, Kp/2) and meta
    (N, Kp/32) int32, Kp = K rounded up to 32); x may have any strides.

    On the CPU x, values and bias are all float32 or all bfloat16 (bfloat16: float32 products and
    sums, one rounding of each output).

    Returns y (P, N), or with transpose_out=True its transpose Y = W @ x.T + bias[:, None] as a
    contiguous (N, P) tensor (the layout of a conv output image). CUDA tensors of float16 or
    bfloat16 run the sparse tensor-core kernel (same values/meta layout, values of x's dtype,
    float32 accumulation; compute capability >= 8.0) on the current stream. Dtypes the compiled
    kernels do not serve (float64, for gradcheck) run the torch path on the dense weight
    (KERNELS entries sparse24_matmul_torch*).
    """
    if x.dtype not in _NATIVE.get(x.device.type, ()):
        return torch_matmul(SPARSE24_PATTERN, x, (values, meta), bias, transpose_out)
    p, n = x.shape[0], values.shape[0]
    y = torch.empty((n, p) if transpose_out else (p, n), dtype=x.dtype, device=x.device)
    sparse24_matmul_into(y.t() if transpose_out else y, x, values, meta, bias)
    return y


def sparse24_matmul_into(y: torch.Tensor, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         bias: torch.Tensor | None) -> None:
    """Writes x @ W.T + bias into y (P, N) of any strides (not overlapping x): sparse24_matmul_impl
    without the output allocation, for pyhwp.linear(..., out=)."""
    if x.dtype not in _NATIVE.get(x.device.type, ()):
        y.copy_(torch_matmul(SPARSE24_PATTERN, x, (values, meta), bias, False))
        return
    values, meta = values.contiguous(), meta.contiguous()
    if x.device.type == "cuda":
        _sparse24_matmul_cuda(x, values, meta, None if bias is None else bias.contiguous(), y)
        return
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"pyhwp::sparse24_matmul: the CPU kernels take x, values and bias of one dtype "
                        f"(float32 or bfloat16), got x {x.dtype}, values {values.dtype}"
                        + ("" if bias is None else f", bias {bias.dtype}"))
    sparse24_matmul_cpu(y, x, values, meta, bias)


def sparse24_cpu_args(values: torch.Tensor, meta: torch.Tensor, k: int) -> tuple[dict, tuple, tuple]:
    """(kernels by dtype, head, tail) for cpu_kernel_call on contiguous CPU 2:4 arrays with k
    inputs. The arrays must outlive the call."""
    return _KERNEL, (values.shape[0], k, values.data_ptr(), meta.data_ptr()), ()


def sparse24_matmul_cpu(y: torch.Tensor, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
    """The CPU kernel call of sparse24_matmul_into for inputs already checked: x (P, K) and y (P, N)
    CPU tensors of any strides, x, values and a contiguous bias all float32 or all bfloat16,
    contiguous values and meta (the eager path of pyhwp.linear on a validated Sparse24Weight)."""
    kernels, head, tail = sparse24_cpu_args(values, meta, x.shape[1])
    cpu_kernel_call(kernels[x.dtype], head, tail, y, x, bias)


def sparse24_conv2d_impl(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, geometry: tuple[int, ...],
                         bias: torch.Tensor | None) -> torch.Tensor | None:
    """conv2d of x (N, C, H, W) float32 CPU with a 2:4 weight (out, C*kh*kw) as one implicit GEMM
    (csrc/sparse24/sparse24_conv2d_cpu.cpp): the 2:4 tile kernels read the shifted windows of a
    padded copy of x (of its stride phases), no im2col. geometry = (images, C, H, W, pad_top,
    pad_left, kh, kw, dil_h, dil_w, H_out, W_out[, stride_h, stride_w]), stride 1 without the last
    two (csrc/common/conv_geometry.h). Returns y (N, out, H_out, W_out) contiguous, or None when x
    holds a NaN/Inf, where the caller must take a path with dense-exact 0 * Inf propagation.
    Inference only (no autograd); bias contiguous.
    """
    x, values, meta = x.contiguous(), values.contiguous(), meta.contiguous()
    rows = values.shape[0]
    y = x.new_empty(x.shape[0], rows, geometry[10], geometry[11])
    bad = _C.sparse24_conv2d(rows, geometry[1] * geometry[6] * geometry[7], values.data_ptr(), meta.data_ptr(),
                             geometry, x.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                             torch.get_num_threads())
    return None if bad else y


def _sparse24_matmul_cuda(x, values, meta, bias, y):
    p, k = x.shape
    n = values.shape[0]
    code = cuda_dtype_code(x.dtype, "sparse24_matmul")
    if values.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"pyhwp::sparse24_matmul: values {values.dtype}, bias and x {x.dtype} must share a dtype")
    for name, t in (("values", values), ("meta", meta), ("bias", bias), ("y", y)):
        if t is not None and t.device != x.device:
            raise ValueError(f"pyhwp::sparse24_matmul: {name} is on {t.device}, x on {x.device}")
    if values.data_ptr() % 16:  # a view into a bigger tensor; the kernel reads 16-byte chunks
        values = values.clone()
    with torch.cuda.device(x.device):
        nbytes = _C.sparse24_matmul_cuda_workspace(n, k, code, x.data_ptr(), p, x.stride(1), x.stride(0),
                                                   y.data_ptr(), y.stride(1), y.stride(0))
        ws = cuda_workspace(nbytes, x.device)
        _C.sparse24_matmul_cuda(
            n, k, values.data_ptr(), meta.data_ptr(), code, x.data_ptr(), p, x.stride(1), x.stride(0),
            0 if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(1), y.stride(0),
            ws.data_ptr(), ws.numel(), torch.cuda.current_stream(x.device).cuda_stream,
        )


sparse24_matmul = torch.library.custom_op("pyhwp::sparse24_matmul", mutates_args=())(sparse24_matmul_impl)


@sparse24_matmul.register_fake
def _(x, values, meta, bias, transpose_out=False):
    n = values.shape[0]
    return x.new_empty((n, x.shape[0]) if transpose_out else (x.shape[0], n))


register_matmul_autograd(sparse24_matmul, SPARSE24_PATTERN)
register_matmul_decomposition(sparse24_matmul, SPARSE24_PATTERN)
