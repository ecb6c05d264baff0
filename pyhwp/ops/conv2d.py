"""pyhwp.conv2d: sparse 2-D convolution as GEMMs over the MATMULS kernels (implicit GEMM for CSR)."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from pyhwp._ext import _C
from pyhwp.formats import CSRWeight, SparseWeight
from pyhwp.kernels import find_kernel
from pyhwp.ops.amx_conv import amx_available, amx_conv2d_impl, amx_conv_tiles
from pyhwp.ops.csr import csr_conv2d_cuda_impl, csr_conv2d_cuda_plan, csr_conv2d_impl, csr_conv2d_plan
from pyhwp.ops.eager import needs_op
from pyhwp.ops.linear import CPU_CALLS, MATMULS, check_bias
from pyhwp.ops.masked import masked_conv2d_impl
from pyhwp.ops.sparse24 import sparse24_conv2d_impl


def _pair(value, name: str) -> tuple[int, int]:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(value):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"pyhwp.conv2d: {name} must be an int or a pair of ints, got {value!r}")


def _resolve_padding(padding, kernel: tuple[int, int], stride: tuple[int, int],
                     dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding, with torch's rules for "same" and "valid"."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"pyhwp.conv2d: padding='same' is not supported for strided convolutions "
                                 f"(stride={stride}), as in torch")
            # torch puts the odd element of an odd total on the bottom/right.
            th, tw = (d * (k - 1) for d, k in zip(dilation, kernel))
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        raise ValueError(f"pyhwp.conv2d: padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"pyhwp.conv2d: padding must be non-negative, got {padding!r}")
    return ph, ph, pw, pw


def conv2d(x: torch.Tensor, weight: SparseWeight, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """2-D convolution with a pruned weight, equal to F.conv2d on weight.to_dense().

    Args:
        x: (N, C, H, W) or unbatched (C, H, W) input, float32, any strides; channels_last inputs
            are served natively by the 1x1 path and converted elsewhere.
        weight: a 4-D SparseWeight (out, C/groups, kh, kw) from pyhwp.to_sparse(conv.weight, pattern).
        bias: optional (out,) tensor, dtype and device of x.
        stride, dilation: int or (h, w) pair, >= 1.
        padding: int, (h, w) pair (>= 0), "valid" or "same" (stride 1 only, as in torch).
        groups: positive int dividing C and out; C/groups == 1 (depthwise) included.
    Returns:
        (N, out, H_out, W_out) (or (out, H_out, W_out) for an unbatched x), dtype and device of x,
        contiguous, or channels_last when x is channels_last (torch's convention). NaN/Inf in x
        propagate as in the dense convolution.

    Each image and group is one GEMM Y_g (out/groups, L) = W_g (out/groups, C/groups*kh*kw)
    X_g (C/groups*kh*kw, L), L = H_out*W_out, run by the kernel of W's pattern with
    transpose_out=True so Y_g is already the NCHW output plane. X_g is x itself for 1x1 convs
    (subsampled for stride > 1) and the im2col patch matrix otherwise (_im2col: a copy of a strided
    view of the padded image in CPU inference, F.unfold elsewhere); W_g = weight.row_slice.
    CSR float32 CPU inference with groups == 1 runs the whole batch as one implicit GEMM
    (csr_conv2d_impl): the CSR tile kernel reads shifted rows of a padded copy of x (of its stride
    phases for stride > 1, over which every tap is a stride-1 window), so no im2col matrix is
    built (stride-1 convs with kw = 2 or 3 on AVX-512, where rounding the padded rows up to whole
    lines adds at most 15% of pixels, through an aligned plan of tap rows: each line of x loaded
    once for all the weights of a (channel, kernel row), each kernel column's sums shifted into
    place once per tile; 2:4 k x k convs there run it on their kept values). Other 2:4 k x k convs
    in float32 CPU inference do the same with the 2:4 tile kernel
    (sparse24_conv2d_impl; its groups run across taps and channels, which it reads through a
    table of offsets), masked ones with the masked tile kernels (masked_conv2d_impl, AVX-512 or
    AVX2; zero tiles skipped). bfloat16 convs of every pattern in CPU inference on a CPU with
    AMX run on the tile unit, also without im2col, strided ones too (amx_conv2d_impl: the weight's
    dense values as tiles, all-zero tiles skipped); bfloat16 k x k ones elsewhere the float32
    implicit GEMMs on float32 copies. With autograd or NaN/Inf in x, stride-1 CSR convs run one
    GEMM per kernel tap on a shifted view of the padded input instead (see _shifted_conv), 2:4,
    masked and strided ones im2col.
    On CUDA, CSR inference with groups == 1 and stride 1 (or 1x1) runs the same implicit GEMM
    (csr_conv2d_cuda_impl: the CSR tile kernel over padded planes, the whole batch in one launch,
    float32/float16/bfloat16, NaN/Inf handled on the device without a host sync); with autograd,
    stride-1 CSR convs take the per-tap path. Other 2:4 and masked k x k convs (and every strided
    or grouped one) take im2col with one GEMM per image and group.
    Depthwise convs (C/groups == 1) run torch's direct depthwise convolution on the dense weight
    (on the CPU on NCHW input, bfloat16 in float32 rounded once: see _depthwise): their per-group
    GEMMs have at most kh*kw columns, where im2col would move kh*kw times the input for a weight
    of a few hundred values.
    In CPU inference, a call with the same arguments as the previous one on an unchanged weight
    (the steady state of a model's forward) goes straight to the kernel that call ran.
    """
    # A call like the last one on this weight that ran a CPU kernel directly goes straight to it
    # (see _FAST); anything else, and every error, takes the general path below.
    if type(x) is torch.Tensor and isinstance(weight, SparseWeight):
        fast = _FAST.get(weight)
        if (fast is not None and fast.key == (x.shape, stride, padding, dilation, groups) and x.is_cpu
                and x.dtype == fast.dtype and x.is_contiguous()
                and (bias is None or (type(bias) is torch.Tensor and bias.dtype == x.dtype and bias.is_cpu
                                      and bias.shape == (weight.shape[0],) and bias.stride(0) == 1))
                and fast.versions == [t._version for t in fast.tensors] and not needs_op(x, weight.values, bias)):
            y = fast.run(x, weight, bias)
            if y is not None:
                return y
    if not isinstance(weight, SparseWeight):
        raise TypeError(f"pyhwp.conv2d: weight must be a pyhwp.SparseWeight (from pyhwp.to_sparse), "
                        f"got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pyhwp.conv2d: x must be a torch.Tensor, got {type(x).__name__}")
    if len(weight.shape) != 4:
        raise ValueError(f"pyhwp.conv2d: weight has shape {weight.shape}, expected a 4-D conv weight "
                         f"(out, in/groups, kh, kw); use pyhwp.linear for 2-D weights")
    if x.dim() not in (3, 4):
        raise ValueError(f"pyhwp.conv2d: x has shape {tuple(x.shape)}, expected (N, C, H, W) or (C, H, W)")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"pyhwp.conv2d: groups must be a positive int, got {groups!r}")
    out_c, in_g, kh, kw = weight.shape
    c = x.shape[-3]
    if c % groups or out_c % groups:
        raise ValueError(f"pyhwp.conv2d: groups={groups} must divide x's {c} channels and the weight's "
                         f"{out_c} output channels")
    if c != in_g * groups:
        raise ValueError(f"pyhwp.conv2d: x has {c} channels, expected weight.shape[1] * groups = "
                         f"{in_g} * {groups} = {in_g * groups}")
    if x.dtype != weight.dtype:
        raise TypeError(f"pyhwp.conv2d: x has dtype {x.dtype} but weight has {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"pyhwp.conv2d: x is on {x.device} but weight on {weight.device}")
    check_bias(bias, weight, x, "conv2d")
    st, dl = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(st) < 1 or min(dl) < 1:
        raise ValueError(f"pyhwp.conv2d: stride and dilation must be >= 1, got stride={stride!r}, "
                         f"dilation={dilation!r}")
    pt, pb, pl, pr = _resolve_padding(padding, (kh, kw), st, dl)
    kernel = find_kernel("conv2d", weight.pattern, x.device, x.dtype)

    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    n, _, h, w = x.shape
    eh, ew = dl[0] * (kh - 1) + 1, dl[1] * (kw - 1) + 1
    hp, wp = h + pt + pb, w + pl + pr
    if hp < eh or wp < ew:
        raise ValueError(f"pyhwp.conv2d: x's padded size ({hp}, {wp}) is smaller than the dilated kernel "
                         f"({eh}, {ew})")
    ho, wo = (hp - eh) // st[0] + 1, (wp - ew) // st[1] + 1
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()

    if groups > 1 and in_g == 1:
        dense = weight.to_dense()
        if weight.pattern == "masked" and dense.requires_grad:
            # the zeros a stored tile holds stay pruned, as in the masked op's backward
            dense = dense * weight.mask()
        y = _depthwise(x, dense, bias, st, padding if isinstance(padding, str) else (pt, pl), dl, groups)
    elif n == 0 or out_c == 0:
        y = x.new_empty(n, out_c, ho, wo)
    else:
        # Remembered arguments must not change under us: no lists (the caller may mutate them).
        immutable = not any(isinstance(v, list) for v in (stride, padding, dilation))
        # (strided 1x1 convs run on a subsample of x, which the fast path does not take)
        remember = not unbatched and immutable and (st == (1, 1) or kh * kw > 1)
        fast_key = (x.shape, stride, padding, dilation, groups) if remember else None
        y = _gemm_conv(MATMULS[kernel.name], x, weight, bias, st, (pt, pb, pl, pr), dl, groups, (ho, wo),
                       channels_last, fast_key, CPU_CALLS.get(kernel.name))
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y.squeeze(0) if unbatched else y


def _depthwise(x, w, bias, stride, padding, dilation, groups):
    """torch's direct convolution for depthwise convs. On the CPU it gets NCHW input, and bfloat16
    runs on float32 copies rounded once (bfloat16 products are exact in float32: the contract of
    pyhwp's other bfloat16 paths). torch 2.13's CPU conv2d returns wrong values for some strided
    small bfloat16 inputs and reads out of bounds for others (18 of 1200 random strided cases), and
    reads out of bounds on channels_last float32 input with a bias (1 of 1200); NCHW float32: none
    of 2400 (bench/NOTES.md, stop 25)."""
    if x.device.type != "cpu":
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    x = x.contiguous()
    if x.dtype == torch.bfloat16:
        b = None if bias is None else bias.float()
        return F.conv2d(x.float(), w.float(), b, stride, padding, dilation, groups).to(torch.bfloat16)
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


# weight -> (versions of its tensors, {key: value}): what is derived from a weight (its kernel
# taps, a sort of its nnz; implicit-GEMM conv plans, O(nnz) each) is built once per weight and
# rebuilt only after an in-place change.
_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cacheable(tensors) -> bool:
    """Whether what is derived from a weight with these tensors may be kept: not when one has no
    version counter to detect changes (inference tensors), nor while autograd records (taps in a
    recorded graph are freed by its backward)."""
    if any(torch.is_inference(t) for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _derived(weight: SparseWeight, key, build):
    tensors = weight._tensors().values()
    if not _cacheable(tensors):
        return build()
    version = tuple(t._version for t in tensors)
    hit = _DERIVED.get(weight)
    if hit is None or hit[0] != version:
        hit = (version, {})
        _DERIVED[weight] = hit
    if key not in hit[1]:
        hit[1][key] = build()
    return hit[1][key]


def _kernel_taps(weight: SparseWeight):
    return _derived(weight, "taps", weight.kernel_taps)


def _widened(weight: SparseWeight) -> SparseWeight:
    """The same weight with float32 values (differentiable, like the values' own .float())."""
    return type(weight)._unchecked(weight.shape, **{**weight._tensors(), "values": weight.values.float()})


def _shifted_conv(matmul, taps, x, bias, pads, dilation, kernel, out_hw):
    """Stride-1 conv as the sum over kernel taps (r, s) of W_rs (out, C) X_rs, X_rs a view.

    In padded image i flattened to (C, Hp*Wp), tap (r, s) of output pixel (a, b) reads the
    element at r*d*Wp + s*d + (a*Wp + b): X_rs is the (C, H_out*Wp) window from that offset, one
    strided view, no copy. Outputs come out Wp wide; the Wp - W_out columns past each row's end
    (which wrap into the next row) are computed and dropped. One extra zero row per channel
    keeps the last window inside its channel.
    """
    n, c, _, _ = x.shape
    pt, pb, pl, pr = pads
    kw, (ho, wo) = kernel[1], out_hw
    xp = F.pad(x, (pl, pr, pt, pb + 1)).contiguous()
    hp1, wp = xp.shape[2], xp.shape[3]
    plane, wide = hp1 * wp, ho * wp
    ys = []
    for i in range(n):
        y = None
        for t, wt in enumerate(taps):
            r, s = divmod(t, kw)
            offset = xp.storage_offset() + i * c * plane + r * dilation[0] * wp + s * dilation[1]
            x2 = xp.as_strided((wide, c), (1, plane), offset)
            part = matmul(x2, wt, bias if t == 0 else None, True)
            y = part if y is None else y.add_(part)
        ys.append(y.view(-1, ho, wp)[:, :, :wo])
    return torch.stack(ys)


_IMPLICIT_CSR_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def _implicit_kind(x, weight, bias, kernel, stride) -> str | None:
    """Which implicit-GEMM kernel serves a groups-1 call with this input, bias, weight and stride
    (every stride on the CPU, stride 1 on CUDA): "amx" (amx_conv2d_impl: bfloat16 on a CPU whose AMX is in use,
    any pattern and kernel size, but masked 1x1 convs keep the masked AMX matmul; the weight's
    dense values on the tile unit), "csr" (csr_conv2d_impl, float32 on the CPU; the CUDA tile
    kernel, float32, float16 and bfloat16), "2:4" (a kxk kernel, float32 on the CPU: the CSR
    tap-row kernel where _sparse24_taps has a plan, else sparse24_conv2d_impl; 1x1 2:4 convs keep
    the matmul kernel on x's planes, which packs them aligned),
    "masked" (masked_conv2d_impl: the same for masked kxk weights; 1x1 ones keep the matmul
    kernel), or None. On the CPU without AMX, bfloat16 kxk convs of the three run the float32
    kernels on float32 copies (_cpu_implicit). Never with autograd."""
    if needs_op(x, weight.values, bias):
        return None
    cpu_kxk = kernel != (1, 1) and x.device.type == "cpu"
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and amx_available() and (
            kernel != (1, 1) or weight.pattern != "masked"):
        # 1x1 convs too, but for masked weights: the masked AMX matmul skips each zero 16x16 tile,
        # the conv only 16x32 ones (NOTES.md, stop 22)
        return "amx"
    if x.device.type != "cpu" and stride != (1, 1):
        return None
    if weight.pattern == "csr" and x.dtype in _IMPLICIT_CSR_DTYPES.get(x.device.type, ()):
        return "csr"
    if cpu_kxk and x.dtype in (torch.float32, torch.bfloat16) and weight.pattern in ("csr", "2:4", "masked"):
        # (1x1 convs keep the matmul kernels on x's planes; the masked one is AVX-512's and AVX2's)
        return None if weight.pattern == "masked" and _C.active_isa() == "scalar" else weight.pattern
    return None


def _amx_tiles(weight: SparseWeight):
    """The AMX conv tiles of a weight (amx_conv_tiles of its dense values), derived once."""
    return _derived(weight, "amx_tiles", lambda: amx_conv_tiles(weight.to_dense()))


def _implicit_csr_conv(x, weight, bias, geometry):
    """Stride-1 CSR conv in one kernel call over the batch (see csr_conv2d_impl), or None when x
    holds a NaN/Inf on the CPU (the per-tap path then gives dense-exact propagation; the CUDA
    path propagates them itself)."""
    if x.device.type == "cuda":  # NaN/Inf handled on the device: never None
        offsets = _derived(weight, ("cuda_plan", geometry[1:]),
                           lambda: csr_conv2d_cuda_plan(weight.col_indices, geometry))
        return csr_conv2d_cuda_impl(x, weight.row_offsets, weight.values, weight.row_order, offsets, geometry,
                                    bias)

    return _cpu_implicit("csr", x, weight, geometry, bias, _cpu_plan(weight, geometry))


def _sparse24_taps(weight: SparseWeight, geometry):
    """A 2:4 conv weight's kept values as the CSR conv's aligned plan for `geometry` (row offsets,
    plan), derived once: where csr_conv2d_aligned holds, 2:4 kxk convs run the CSR tap-row kernel,
    which loads each line of x once for every kept weight of a row of taps (NOTES.md, stop 32:
    1.25-1.33x the 2:4 implicit GEMM, which loads one per weight). Costs about 7 bytes per kept
    weight besides the 2:4 arrays' 4.25. None (the 2:4 implicit GEMM then runs) where the plan
    does not apply, or where it could not be kept (_cacheable: it would be rebuilt on every
    call). Like every plan derived from the values, it follows in-place changes through their
    version counter, not changes made through .data."""
    if not _C.csr_conv2d_aligned(geometry) or not _cacheable(weight._tensors().values()):
        return None

    def build():
        csr = CSRWeight.from_dense(weight.to_dense().detach().float())
        return csr.row_offsets, csr_conv2d_plan(csr.row_offsets, csr.col_indices, None, csr.values, geometry, True)
    return _derived(weight, ("taps_plan", geometry[1:]), build)


def _cpu_implicit(kind, x, weight, geometry, bias, plan=None):
    """The float32 CPU implicit GEMM of `kind` ("csr" with its `plan`, "2:4" with its tap-row
    plan where it has one (_sparse24_taps), "masked"), or None (x holds a NaN/Inf, or the masked
    kernel is not served here). bfloat16 runs it on float32 copies of x, the values (derived
    once) and the bias, rounded once at the end: bfloat16 products are exact in float32, so this
    is the contract of the bfloat16 matmuls (float32 products and sums, one rounding per output).
    CSR 64->64 3x3 @56, 90%, 2 threads: 2213 us on the per-tap path before (NOTES.md, stop 22)."""
    dtype = x.dtype
    if dtype != torch.float32:
        x, bias = x.float(), None if bias is None else bias.float()
    if kind == "2:4" and plan is None:
        plan = _sparse24_taps(weight, geometry) or False  # False: none, the 2:4 implicit GEMM
    if kind == "2:4" and plan:
        row_offsets, taps = plan
        return _restore(csr_conv2d_impl(x, row_offsets, None, taps, geometry, bias), dtype)
    if kind == "csr" and plan.aligned:  # the plan holds the values
        return _restore(csr_conv2d_impl(x, weight.row_offsets, None, plan, geometry, bias), dtype)
    values = weight.values if dtype == torch.float32 else _derived(weight, "values_f32", lambda: weight.values.float())
    if kind == "csr":
        y = csr_conv2d_impl(x, weight.row_offsets, values, plan, geometry, bias)
    elif kind == "2:4":
        y = sparse24_conv2d_impl(x, values, weight.meta, geometry, bias)
    else:
        # bfloat16: the originals too, which the kernel's VDPBF16PS variant multiplies
        values_bf16 = weight.values.contiguous() if dtype == torch.bfloat16 else None
        y = masked_conv2d_impl(x, weight.tile_ptr.contiguous(), weight.tile_idx.contiguous(), values.contiguous(),
                               weight.shape[0], geometry, bias, values_bf16)
    return _restore(y, dtype)


def _restore(y, dtype):
    """An implicit GEMM's float32 result in the call's dtype (None stays None)."""
    return y if y is None or dtype == torch.float32 else y.to(dtype)


def _geometry(x, pads, kernel, dilation, out_hw, stride=(1, 1)) -> tuple[int, ...]:
    """The implicit-GEMM kernels' geometry tuple (csrc/common/conv_geometry.h)."""
    n, c, h, w = x.shape
    return (n, c, h, w, pads[0], pads[2], *kernel, *dilation, *out_hw, *stride)


def _cpu_plan(csr, geometry):
    """The CPU implicit-GEMM plan of a CSR weight for `geometry`, derived once (see _derived)."""
    def plan():
        ci = csr.kernel_col_indices
        return csr_conv2d_plan(csr.row_offsets, csr.col_indices, ci if ci.dtype == torch.int16 else None,
                               csr.values, geometry, aligned)
    aligned = _C.csr_conv2d_aligned(geometry)  # (an ISA cap set since may change it)
    return _derived(csr, ("plan", geometry[1:], aligned), plan)


class _FastConv:
    """conv2d's fast path for one weight: the arguments of the last call that ran a CPU kernel
    directly (`key`), its dtype, the versions of the weight's tensors then, and what that call
    ran: an implicit-GEMM kernel (`kind`, as _implicit_kind names them) for `geometry` (the CSR
    one with its plan, the AMX one with its tiles) or, for a 1x1 conv (kind None), one direct
    kernel call per image (cpu, out_shape). A weight changed in place (another version) or a
    call with other arguments takes the general path, which derives again what depends on the
    weight and remembers anew. Holds no reference to the weight (_FAST's key must be able to
    die)."""

    __slots__ = ("key", "dtype", "tensors", "versions", "kind", "derived", "geometry", "cpu", "out_shape")

    def __init__(self, key, x, weight, *, kind=None, geometry=None, cpu=None, out_shape=None):
        self.key, self.dtype = key, x.dtype
        self.tensors = list(weight._tensors().values())
        self.versions = [t._version for t in self.tensors]
        self.kind, self.geometry = kind, geometry
        self.derived = (_amx_tiles(weight) if kind == "amx" else _cpu_plan(weight, geometry) if kind == "csr"
                        else _sparse24_taps(weight, geometry) or False if kind == "2:4" else None)
        self.cpu, self.out_shape = cpu, out_shape

    def run(self, x, weight, bias):
        """The remembered computation on contiguous CPU x of the remembered shape and dtype, or
        None (x holds a NaN/Inf and the implicit-GEMM kernel declines)."""
        kind = self.kind
        if kind == "amx":
            return amx_conv2d_impl(x, *self.derived, weight.shape[0], self.geometry, bias)
        if kind is not None:
            return _cpu_implicit(kind, x, weight, self.geometry, bias, self.derived)
        # 1x1: image i's (C, H*W) plane is the GEMM's X, its (out, H*W) output plane the Y.
        n, c, h, w = x.shape
        y = x.new_empty(*self.out_shape)
        for i in range(n):
            self.cpu(y[i].view(-1, h * w).t(), x[i].view(c, h * w).t(), weight, bias)
        return y


# weight -> its _FastConv, for weights whose derived data may be kept (_cacheable).
_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _remember_fast(key, x, weight, **run) -> None:
    if _cacheable(weight._tensors().values()):
        _FAST[weight] = _FastConv(key, x, weight, **run)


def _im2col(x: torch.Tensor, kernel, dilation, padding, stride, out_hw) -> torch.Tensor:
    """F.unfold of one (C, H, W) image: the (C*kh*kw, H_out*W_out) patch matrix, rows in weight
    order (c, r, s). In CPU inference outside compiled graphs it is one copy of a strided view of
    the padded image, which measured 2.3-6.4x faster than F.unfold on the 3x3 ResNet-50 shapes
    (64->64 @56x56: 1361 -> 420 us float32, 1416 -> 220 us bfloat16); F.unfold everywhere else
    (its backward is a fold, where as_strided's would scatter through an index)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw), (ho, wo) = kernel, dilation, padding, stride, out_hw
    if (x.device.type != "cpu" or torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad)
            or torch._C._functorch.is_functorch_wrapped_tensor(x)):
        return F.unfold(x[None], kernel, dilation=dilation, padding=padding, stride=stride)[0]
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    c = xp.shape[0]
    s_c, s_h, s_w = xp.stride()
    view = xp.as_strided((c, kh, kw, ho, wo), (s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w))
    return view.reshape(c * kh * kw, ho * wo)


def _gemm_conv(matmul, x, weight, bias, stride, pads, dilation, groups, out_hw, channels_last, fast_key=None,
               cpu=None):
    """(N, out, H_out, W_out): one `matmul` (a MATMULS entry) per image and group. Unless
    `fast_key` (the call's arguments as passed) is None, a call that runs the CPU implicit-GEMM
    kernel, or a 1x1 conv whose matmul is the direct CPU kernel call `cpu`, is remembered for
    conv2d's fast path."""
    n, c, _, _ = x.shape
    out_c, in_g, kh, kw = weight.shape
    ho, wo = out_hw
    pt, pb, pl, pr = pads
    pointwise = kh == kw == 1 and pads == (0, 0, 0, 0)
    if pointwise and stride != (1, 1):
        x = x[:, :, ::stride[0], ::stride[1]]  # a 1x1 conv with stride s reads every s-th pixel
        stride = (1, 1)
    if groups == 1:
        kind = _implicit_kind(x, weight, bias, (kh, kw), stride)
        if pointwise and channels_last and kind != "amx":
            kind = None  # the NHWC rows below are the matmul's x as they are
        geometry = None if kind is None else _geometry(x, pads, (kh, kw), dilation, out_hw, stride)
        if kind == "amx":
            y = amx_conv2d_impl(x, *_amx_tiles(weight), out_c, geometry, bias)
        elif kind == "csr":
            y = _implicit_csr_conv(x, weight, bias, geometry)
        else:
            y = None if kind is None else _cpu_implicit(kind, x, weight, geometry, bias)
        if y is not None:
            if fast_key is not None and x.device.type == "cpu" and x.is_contiguous():
                _remember_fast(fast_key, x, weight, kind=kind, geometry=geometry)
            return y
    if not pointwise and stride == (1, 1) and groups == 1 and kh * kw > 1:
        # Splitting into taps reads nnz counts on the host: not traceable, so compiled/exported
        # graphs take im2col.
        taps = None if torch.compiler.is_compiling() else _kernel_taps(weight)
        if taps is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # bfloat16 partial sums would round once per tap: in float32, rounded once at the end
            # like every other bfloat16 CPU path (the taps' values widened once per weight)
            wide = _derived(weight, "taps_f32", lambda: tuple(_widened(t) for t in taps))
            y = _shifted_conv(matmul, wide, x.float(), None if bias is None else bias.float(), pads, dilation,
                              (kh, kw), out_hw)
            return y.to(torch.bfloat16)
        if taps is not None:
            return _shifted_conv(matmul, taps, x, bias, pads, dilation, (kh, kw), out_hw)

    if pointwise and channels_last and groups == 1:
        # NHWC memory is already the (N*H*W, C) row-major matrix of a linear layer; y comes back
        # as (N*H_out*W_out, out), i.e. channels_last, with no transposes.
        y2 = matmul(x.permute(0, 2, 3, 1).reshape(-1, c), weight, bias, False)
        return y2.view(n, ho, wo, out_c).permute(0, 3, 1, 2)

    out_g, k_g = out_c // groups, in_g * kh * kw
    if groups == 1:
        parts = [(weight, bias)]
    else:
        parts = [(weight.row_slice(g * out_g, (g + 1) * out_g),
                  None if bias is None else bias[g * out_g:(g + 1) * out_g]) for g in range(groups)]
    if not pointwise and (pt, pl) != (pb, pr):
        x = F.pad(x, (pl, pr, pt, pb))  # asymmetric "same": F.unfold only pads symmetrically
        pt = pl = 0

    ys = []
    for i in range(n):
        if pointwise:
            cols = x[i].reshape(c, ho * wo)  # a view for stride 1 (no copy); the subsample otherwise
        else:
            cols = _im2col(x[i], (kh, kw), dilation, (pt, pl), stride, out_hw)
        for g, (wg, bg) in enumerate(parts):
            # The contract takes x2 (P, K); X_g.t() has P = L contiguous, so Y_g = W_g X_g runs
            # on the kernel's p-contiguous path with no packing.
            ys.append(matmul(cols[g * k_g:(g + 1) * k_g].t(), wg, bg, True))
    y = ys[0] if len(ys) == 1 else torch.cat(ys)
    if (pointwise and groups == 1 and fast_key is not None and cpu is not None and x.device.type == "cpu"
            and x.is_contiguous() and not needs_op(x, weight.values, bias)):
        _remember_fast(fast_key, x, weight, cpu=cpu, out_shape=(n, out_c, ho, wo))
    return y.view(n, out_c, ho, wo)
