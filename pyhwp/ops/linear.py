"""pyhwp.linear: validation and dispatch of y = x @ W.T + b to the kernel of W's pattern."""

from __future__ import annotations

import math
import weakref

import torch

from pyhwp._ext import _C
from pyhwp.formats import SparseWeight
from pyhwp.kernels import find_kernel
from pyhwp.ops.csr import csr_cpu_args, csr_matmul_impl, csr_matmul_into
from pyhwp.ops.eager import call_matmul, cpu_kernel_call, entry_ref, intercepted, needs_op
from pyhwp.ops.masked import masked_cpu_args, masked_matmul_impl, masked_matmul_into
from pyhwp.ops.sparse24 import sparse24_cpu_args, sparse24_matmul_impl, sparse24_matmul_into

_csr_op = torch.ops.pyhwp.csr_matmul.default
_sparse24_op = torch.ops.pyhwp.sparse24_matmul.default
_masked_op = torch.ops.pyhwp.masked_matmul.default
_num_threads = torch.get_num_threads  # bound once: see pyhwp.ops.eager
_grad_enabled = torch.is_grad_enabled
_UNSET = object()


_SELL_MAX_BATCH = _C.csr_sell_max_batch  # rows of x up to which the CPU kernels read the copy


def _sell(x2, w):
    # The weight's sliced-ELL copy where the kernel reads it (x with up to _SELL_MAX_BATCH rows),
    # else None. While autograd records the values' gradient, a stale copy is not remade:
    # training changes the values every step, and remaking costs about 0.4-2 ms per layer against a
    # 10-40 us product (1536x384-3072x768, 90%, batch 1; NOTES.md stop 29); a model run without
    # no_grad for inference keeps the copy it made on its first call.
    if x2.shape[0] > _SELL_MAX_BATCH:
        return None
    return w.kernel_sell(remake=not (_grad_enabled() and w.values.requires_grad))


def _csr(x2, w, bias, transpose_out=False):
    # kernel_col_indices is a cached_property, whose lock torch.compile cannot trace: compiled
    # graphs pass the int32 indices, which the kernels take too, and no sliced-ELL copy.
    compiling = torch.compiler.is_compiling()
    ci = w.col_indices if compiling else w.kernel_col_indices
    return call_matmul(_csr_op, csr_matmul_impl, x2, (w.row_offsets, ci, w.values), w.values, bias,
                       transpose_out, w.row_order, None if compiling else _sell(x2, w))


def _sparse24(x2, w, bias, transpose_out=False):
    return call_matmul(_sparse24_op, sparse24_matmul_impl, x2, (w.values, w.meta), w.values, bias, transpose_out)


def _masked_tile_map(w):
    # kernel_tile_map is a cached_property (see _csr): compiled graphs let the op build the map.
    return None if torch.compiler.is_compiling() else w.kernel_tile_map


def _masked(x2, w, bias, transpose_out=False):
    return call_matmul(_masked_op, masked_matmul_impl, x2, (w.tile_ptr, w.tile_idx, w.values, w.mask_bits),
                       w.values, bias, transpose_out, _masked_tile_map(w))


def _csr_args(w):
    arrays = (w.row_offsets.contiguous(), w.kernel_col_indices.contiguous(), w.values.contiguous())
    sell = w.kernel_sell()
    return (*csr_cpu_args(*arrays, math.prod(w.shape[1:]), sell, w.kernel_resident()),
            arrays if sell is None else (*arrays, sell))


def _sparse24_args(w):
    arrays = (w.values.contiguous(), w.meta.contiguous())
    return (*sparse24_cpu_args(*arrays, math.prod(w.shape[1:])), arrays)


def _masked_args(w):
    arrays = (w.tile_ptr.contiguous(), w.tile_idx.contiguous(), w.values.contiguous())
    return (*masked_cpu_args(*arrays, w.shape[0], math.prod(w.shape[1:])), arrays)


# Per kernel name: weight -> (kernels by dtype, head, tail, the arrays head and tail point into),
# the arguments of the kernel's direct call (see cpu_kernel_call) that depend on the weight alone
# (its GEMM form (out, prod(shape[1:])), so conv weights too).
_CPU_ARGS = {"csr_matmul": _csr_args, "sparse24_matmul": _sparse24_args, "masked_matmul": _masked_args}


def _direct_call(args):
    def call(y, x2, w, bias):
        kernels, head, tail, _ = args(w)
        cpu_kernel_call(kernels[x2.dtype], head, tail, y, x2, bias)
    return call


# The compiled CPU kernels' direct calls cpu(y, x2, weight, bias) on checked inputs (the eager
# matmuls and pyhwp.conv2d's fast path), by kernel name.
CPU_CALLS = {name: _direct_call(args) for name, args in _CPU_ARGS.items()}


def _eager_cpu(call_op, cpu):
    """The MATMULS entry of a compiled CPU kernel: in plain eager inference (needs_op false) it runs
    `cpu(y, x2, weight, bias)` on the weight's arrays directly, skipping the op's generic checks
    and copies that pyhwp.linear / conv2d have already made (about 6 us of a ~30 us batch-1 call);
    otherwise `call_op`, the op path."""
    def matmul(x2, w, bias, transpose_out=False):
        if needs_op(x2, w.values, bias):
            return call_op(x2, w, bias, transpose_out)
        n, p = w.shape[0], x2.shape[0]
        y = x2.new_empty(n, p) if transpose_out else x2.new_empty(p, n)
        cpu(y.t() if transpose_out else y, x2, w, bias)
        return y
    return matmul


def _csr_into(y, x2, w, bias):
    csr_matmul_into(y, x2, w.row_offsets, w.kernel_col_indices, w.values, bias, w.row_order, _sell(x2, w))


def _sparse24_into(y, x2, w, bias):
    sparse24_matmul_into(y, x2, w.values, w.meta, bias)


def _masked_into(y, x2, w, bias):
    masked_matmul_into(y, x2, w.tile_ptr, w.tile_idx, w.values, w.mask_bits, bias, w.kernel_tile_map)


# Every pyhwp kernel in pyhwp.kernels.KERNELS, by pattern, with how to call it on a 2-D input:
#   MATMULS[name](x2, weight, bias, transpose_out): y (P, N) = x2 (P, K) @ W.T + bias for x2 of any
#     strides, or its transpose (N, P) contiguous when transpose_out; conv2d runs its GEMMs
#     through the same table;
#   MATMULS_INTO[name](y, x2, weight, bias): the same into a given y (pyhwp.linear's out=).
# The compiled CPU kernels (x on the CPU in one of their dtypes, which find_kernel guarantees)
# take the eager shortcut.
_KERNELS_BY_PATTERN = (
    (("csr_matmul",), _eager_cpu(_csr, CPU_CALLS["csr_matmul"]), _csr_into),
    (("csr_matmul_cuda", "csr_matmul_torch", "csr_matmul_torch_cuda"), _csr, _csr_into),
    (("sparse24_matmul",), _eager_cpu(_sparse24, CPU_CALLS["sparse24_matmul"]), _sparse24_into),
    (("sparse24_matmul_cuda", "sparse24_matmul_torch", "sparse24_matmul_torch_cuda"), _sparse24, _sparse24_into),
    (("masked_matmul",), _eager_cpu(_masked, CPU_CALLS["masked_matmul"]), _masked_into),
    (("masked_matmul_cuda", "masked_matmul_torch", "masked_matmul_torch_cuda"), _masked, _masked_into),
)
MATMULS = {name: fn for names, fn, _ in _KERNELS_BY_PATTERN for name in names}
MATMULS_INTO = {name: into for names, _, into in _KERNELS_BY_PATTERN for name in names}


_KERNEL_NAMES: dict[tuple[str, torch.dtype], str | None] = {}

# pyhwp.linear's fast path: id(weight) -> (weakref to it, {x dtype: plan or None}); an entry leaves
# with its weight. A plan is (kernel, head, tail, out_features, in_features, values, address of
# values, version of values, arrays): everything a call on that weight needs besides x, bias and
# the thread count. It is rebuilt when the values move or change in place (the CSR plan holds a
# copy of them, CSRWeight.kernel_sell).
_PLANS: dict[int, tuple[weakref.ref, dict]] = {}


def _cpu_plan(weight, dtype: torch.dtype):
    """The fast path's plan for `weight` and x of `dtype` (see _PLANS), or None where the general
    path must run: another kernel than a compiled CPU one, a conv weight, values of another dtype,
    no inputs, inference-tensor values (no version counter to tell a stale plan). Built on a
    weight's first call, again if its values tensor has moved or changed."""
    if not isinstance(weight, SparseWeight):
        return None
    key = (weight.pattern, dtype)
    if key not in _KERNEL_NAMES:
        try:
            _KERNEL_NAMES[key] = find_kernel("linear", weight.pattern, torch.device("cpu"), dtype).name
        except (TypeError, ValueError):
            _KERNEL_NAMES[key] = None
    build = _CPU_ARGS.get(_KERNEL_NAMES[key])
    plan = None
    if (build is not None and len(weight.shape) == 2 and weight.shape[1] > 0 and weight.values.is_cpu
            and weight.values.dtype == dtype and not weight.values.is_inference()):
        kernels, head, tail, arrays = build(weight)
        # Aliases of the arrays keep the memory the addresses point into alive, even if a tensor
        # of the weight is later given other storage (`.data =`, set_): the plan then still reads
        # what it was built over, except for moved or changed values, which rebuild it.
        plan = (kernels[dtype], head, tail, weight.shape[0], weight.shape[1], weight.values,
                weight.values.data_ptr(), weight.values._version, tuple(a.detach() for a in arrays))
    entry = _PLANS.get(id(weight))
    if entry is None or entry[0]() is not weight:
        entry = _PLANS[id(weight)] = (entry_ref(_PLANS, weight), {})
    entry[1][dtype] = plan
    return plan


def check_bias(bias: torch.Tensor | None, weight: SparseWeight, like: torch.Tensor, op: str) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"pyhwp.{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (weight.out_features,):
        raise ValueError(f"pyhwp.{op}: bias has shape {tuple(bias.shape)}, expected ({weight.out_features},)")
    if bias.dtype != like.dtype:
        raise TypeError(f"pyhwp.{op}: bias has dtype {bias.dtype}, input has {like.dtype}")
    if bias.device != like.device:
        raise ValueError(f"pyhwp.{op}: bias is on {bias.device}, input on {like.device}")


def linear(x: torch.Tensor, weight: SparseWeight, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias with a pruned weight, equal to F.linear on weight.to_dense().

    Args:
        x: (..., in_features) tensor, any leading dims and strides; float32 or bfloat16 on the CPU,
            float32, float16 or bfloat16 on CUDA, float64 anywhere through the ops' torch
            path (for gradcheck); pyhwp.kernels.KERNELS says which.
        weight: a 2-D SparseWeight from pyhwp.to_sparse (shape (out_features, in_features)).
        bias: optional (out_features,) tensor, same dtype and device as x.
        out: optional (..., out_features) tensor (dtype and device of x, any strides, not
            overlapping x) the result is written into, so a caller that reuses it allocates
            nothing per call (unless its leading dims cannot be flattened into a view, as in a
            transposed 3-D out: that one is filled from a temporary). Inference only: not with
            tensors that require grad, nor under torch.compile / export tracing.
    Returns:
        (..., out_features) tensor, contiguous, dtype and device of x (or `out`). NaN/Inf in x
        propagate exactly as in the dense product.
    """
    # Plain eager CPU inference on a 2-D input, or a contiguous one with more leading dims (the
    # batch-1 serving case), runs the kernel after the fewest checks that decide it, with the
    # weight's arguments from its plan: in a model each layer's weights evict the previous one's
    # Python state from the caches, and every attribute read then costs about a microsecond.
    # Anything else takes the general path, which also raises the errors.
    if out is None and type(x) is torch.Tensor and not intercepted():
        entry = _PLANS.get(id(weight))
        plan = entry[1].get(x.dtype, _UNSET) if entry is not None and entry[0]() is weight else _UNSET
        if plan is _UNSET or (plan is not None and (plan[5].data_ptr() != plan[6] or plan[5]._version != plan[7])):
            # Not while autograd records (training changes the values every step, and those calls
            # take the op anyway): a plan can hold copies derived from the values.
            trains = _grad_enabled() and getattr(getattr(weight, "values", None), "requires_grad", False)
            plan = None if trains else _cpu_plan(weight, x.dtype)
        if plan is not None:
            kernel, head, tail, n, k, values = plan[:6]
            shape = x.shape
            rank = len(shape)
            if (rank >= 2 and shape[-1] == k and x.is_cpu and (rank == 2 or x.is_contiguous())
                    and (bias is None or (type(bias) is torch.Tensor and bias.dtype == x.dtype and bias.is_cpu
                                          and bias.shape == (n,) and bias.stride(0) == 1))
                    and not (_grad_enabled() and (x.requires_grad or values.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
                if rank == 2:
                    p = shape[0]
                    y = x.new_empty(p, n)
                    sp, sk = x.stride()
                else:
                    p = math.prod(shape[:-1])
                    y = x.new_empty(*shape[:-1], n)
                    sp, sk = k, 1
                kernel(*head, x.data_ptr(), p, sk, sp, 0 if bias is None else bias.data_ptr(), y.data_ptr(), 1, n,
                       _num_threads(), *tail)
                return y
    if not isinstance(weight, SparseWeight):
        raise TypeError(f"pyhwp.linear: weight must be a pyhwp.SparseWeight (from pyhwp.to_sparse), "
                        f"got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pyhwp.linear: x must be a torch.Tensor, got {type(x).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"pyhwp.linear: weight has conv shape {weight.shape}; use pyhwp.conv2d")
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise ValueError(f"pyhwp.linear: x has shape {tuple(x.shape)}, expected (..., {weight.in_features})")
    if x.dtype != weight.dtype:
        raise TypeError(f"pyhwp.linear: x has dtype {x.dtype} but weight has {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"pyhwp.linear: x is on {x.device} but weight on {weight.device}")
    check_bias(bias, weight, x, "linear")
    kernel = find_kernel("linear", weight.pattern, x.device, x.dtype)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if out is not None:
        return _linear_into(out, x, weight, bias, kernel.name)
    if x.dim() == 2:  # skip two reshapes (~5 us of the ~10 us Python overhead at batch 1)
        return MATMULS[kernel.name](x, weight, bias)
    x2 = x.reshape(math.prod(x.shape[:-1]), weight.in_features)  # -1 is ambiguous when in_features == 0
    y = MATMULS[kernel.name](x2, weight, bias)
    return y.reshape(*x.shape[:-1], weight.out_features)


def _linear_into(out: torch.Tensor, x: torch.Tensor, weight: SparseWeight, bias: torch.Tensor | None,
                 kernel: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"pyhwp.linear: out must be a torch.Tensor or None, got {type(out).__name__}")
    expected = (*x.shape[:-1], weight.out_features)
    if tuple(out.shape) != expected:
        raise ValueError(f"pyhwp.linear: out has shape {tuple(out.shape)}, expected {expected}")
    if out.dtype != x.dtype or out.device != x.device:
        raise TypeError(f"pyhwp.linear: out is {out.dtype} on {out.device}, expected {x.dtype} on {x.device}")
    if needs_op(x, weight.values, bias, out) or out.requires_grad:
        raise ValueError("pyhwp.linear: out= is for inference: not with tensors that require grad, "
                         "nor under torch.compile / export tracing")
    x2 = x.reshape(math.prod(x.shape[:-1]), weight.in_features)
    if out.numel() and x2.numel() and out.untyped_storage().data_ptr() == x2.untyped_storage().data_ptr():
        raise ValueError("pyhwp.linear: out shares memory with x")
    try:
        y2 = out.view(x2.shape[0], weight.out_features) if out.dim() != 2 else out
    except RuntimeError:
        # Leading dims no view can flatten (e.g. a transposed 3-D out): computed, then copied in.
        y2 = out.new_empty(x2.shape[0], weight.out_features)
    MATMULS_INTO[kernel](y2, x2, weight, bias)
    if y2.data_ptr() != out.data_ptr():
        out.copy_(y2.view(out.shape))
    return out
