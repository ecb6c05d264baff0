"""Test helpers: float64 references with tolerances from the summation error bound."""

from __future__ import annotations

import torch

from pyhwp._ext import _C


def _runs_here(isa: str) -> bool:
    """Whether capping at `isa` activates it: this build compiled it and this CPU runs it."""
    previous = _C.active_isa()
    try:
        return _C.set_isa_cap(isa) == isa
    finally:
        _C.set_isa_cap(previous)


# The kernel variants this build compiled that this CPU runs. "avx512_bf16" and "amx" add bfloat16
# kernels to "avx512" (the masked and 2:4 matmuls, and AMX's convs), so ISAS (the conftest `isa`
# fixture) leaves them out and BF16_ISAS (`bf16_isa`) keeps them.
BF16_ISAS = [isa for isa in _C.build_info()["cpu_kernels"] if _runs_here(isa)]
ISAS = [isa for isa in BF16_ISAS if isa not in ("avx512_bf16", "amx")]

# Unit roundoff per dtype: the tolerance table. A dot product of n terms summed in any order is
# within n * u * sum|terms| of the exact value (Higham, Accuracy and Stability, 3.1).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8,
                 torch.float64: 2.0**-53}


def assert_linear_close(y, x, dense_w, bias=None, terms=None):
    """y must equal F.linear(x, dense_w, bias) within the summation bound of its dtype.

    `terms` is the most products any output sums (stored weights per row); default in_features.
    """
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], dense_w.shape[0])
    xd, wd = x.detach().double().cpu(), dense_w.detach().double().cpu()
    ref = torch.nn.functional.linear(xd, wd, None if bias is None else bias.double().cpu())
    mag = torch.nn.functional.linear(xd.abs(), wd.abs(), None if bias is None else bias.double().abs().cpu())
    n = (terms if terms is not None else dense_w.shape[1]) + 2
    tol = n * UNIT_ROUNDOFF[y.dtype] * mag + 1e-30
    err = (y.double().cpu() - ref).abs()
    worst = (err - tol).max().item() if err.numel() else 0.0
    assert worst <= 0, f"max error {err.max().item():.3e} exceeds bound by {worst:.3e}"


def random_sparse(shape, sparsity, generator=None, dtype=torch.float32):
    """Normal weights with round(sparsity * numel) exact zeros at random positions."""
    w = torch.randn(shape, generator=generator, dtype=dtype)
    numel = w.numel()
    k = round(sparsity * numel)
    if k:
        idx = torch.randperm(numel, generator=generator)[:k]
        w.view(-1)[idx] = 0
    return w


def assert_conv_close(y, x, dense_w, bias=None, stride=1, padding=0, dilation=1, groups=1, terms=None):
    """y must equal F.conv2d(x, dense_w, bias, ...) within the summation bound of its dtype.

    `terms` is the most products any output sums; default in/groups * kh * kw.
    """
    import warnings

    xd, wd = x.detach().double().cpu(), dense_w.detach().double().cpu()
    bd = None if bias is None else bias.detach().double().cpu()
    with warnings.catch_warnings():  # torch warns that even kernels with padding="same" copy x
        warnings.simplefilter("ignore", UserWarning)
        ref = torch.nn.functional.conv2d(xd, wd, bd, stride, padding, dilation, groups)
        mag = torch.nn.functional.conv2d(xd.abs(), wd.abs(), None if bd is None else bd.abs(),
                                         stride, padding, dilation, groups)
    assert y.dtype == x.dtype and y.shape == ref.shape, f"shape {tuple(y.shape)} != {tuple(ref.shape)}"
    n = (terms if terms is not None else dense_w[0].numel()) + 2
    tol = n * UNIT_ROUNDOFF[y.dtype] * mag + 1e-30
    err = (y.double().cpu() - ref).abs()
    worst = (err - tol).max().item() if err.numel() else 0.0
    assert worst <= 0, f"max error {err.max().item():.3e} exceeds bound by {worst:.3e}"


def pattern_weight(shape, pattern, sparsity=0.6, generator=None, dtype=torch.float32):
    """A random weight that `pattern` can store: for "N:M" patterns, the N largest of every M
    consecutive weights along the flattened input dimension kept (a partial last group too);
    otherwise round(sparsity * numel) zeros at random positions (random_sparse)."""
    import re

    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if match is None:
        return random_sparse(shape, sparsity, generator, dtype)
    keep, group = int(match[1]), int(match[2])
    w = torch.randn(shape, generator=generator, dtype=dtype)
    w2 = w.reshape(shape[0], -1)
    k = w2.shape[1]
    padded = torch.nn.functional.pad(w2, (0, -k % group)).reshape(shape[0], -1, group)
    top = padded.abs().topk(min(keep, group), dim=-1).indices
    mask = torch.zeros_like(padded, dtype=torch.bool).scatter_(-1, top, True)
    return (padded * mask).reshape(shape[0], -1)[:, :k].reshape(shape).contiguous()


def assert_linear_close_accum(y, x, dense_w, bias=None, terms=None, accum=torch.float32, slack=4.0):
    """Like assert_linear_close, for kernels that sum in `accum` and round once to y's dtype.

    Bound: slack * (terms + 2) * u(accum) * sum|terms| (the summation, with `slack` for tensor
    cores, whose float32 accumulation may truncate) + 2 * u(y.dtype) * |exact| (the final
    rounding). For float16/bfloat16 outputs this is far tighter than assert_linear_close, so a
    single dropped or doubled product shows.
    """
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], dense_w.shape[0])
    xd, wd = x.detach().double().cpu(), dense_w.detach().double().cpu()
    bd = None if bias is None else bias.detach().double().cpu()
    ref = torch.nn.functional.linear(xd, wd, bd)
    mag = torch.nn.functional.linear(xd.abs(), wd.abs(), None if bd is None else bd.abs())
    n = (terms if terms is not None else dense_w.shape[1]) + 2
    tol = slack * n * UNIT_ROUNDOFF[accum] * mag + 2 * UNIT_ROUNDOFF[y.dtype] * ref.abs() + 1e-30
    err = (y.double().cpu() - ref).abs()
    worst = (err - tol).max().item() if err.numel() else 0.0
    assert worst <= 0, f"max error {err.max().item():.3e} exceeds bound by {worst:.3e}"


def assert_linear_close_bf16(y, x, dense_w, bias=None, terms=None):
    """y (bfloat16) must be F.linear(x, dense_w, bias) computed in float32 and rounded once.

    x, dense_w and bias are the bfloat16 operands themselves (exact in float32 and float64), so the
    reference is exact in float64. A float32 sum s of n products and the bias is within
    gamma_n * sum|terms| of the exact value z (gamma_n = n u32 / (1 - n u32) <= (n + 1) u32 here);
    rounding s to bfloat16 (nearest even) adds at most u_bf16 |s| <= u_bf16 (|z| + |s - z|), half an
    ulp of bfloat16. So |y - z| <= u_bf16 |z| + (1 + u_bf16)(n + 2) u32 sum|terms|. `terms` is the
    most non-zero products any output sums (zero products add exactly); default in_features.
    """
    assert y.dtype == torch.bfloat16 and x.dtype == torch.bfloat16
    assert y.shape == (*x.shape[:-1], dense_w.shape[0])
    xd, wd = x.detach().double().cpu(), dense_w.detach().double().cpu()
    bd = None if bias is None else bias.detach().double().cpu()
    ref = torch.nn.functional.linear(xd, wd, bd)
    mag = torch.nn.functional.linear(xd.abs(), wd.abs(), None if bd is None else bd.abs())
    n = (terms if terms is not None else dense_w.shape[1]) + 2
    u16, u32 = UNIT_ROUNDOFF[torch.bfloat16], UNIT_ROUNDOFF[torch.float32]
    tol = u16 * ref.abs() + (1 + u16) * n * u32 * mag + 1e-30
    err = (y.double().cpu() - ref).abs()
    worst = (err - tol).max().item() if err.numel() else 0.0
    assert worst <= 0, f"max error {err.max().item():.3e} exceeds bound by {worst:.3e}"


def assert_conv_close_bf16(y, x, dense_w, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y (bfloat16) must be F.conv2d(x, dense_w, bias, ...) computed in float32 and rounded once:
    the bound of assert_linear_close_bf16 with in/groups * kh * kw terms, on every output whose
    exact value is finite; the others must be NaN / Inf where the exact result is."""
    assert y.dtype == torch.bfloat16 and x.dtype == torch.bfloat16
    xd, wd = x.detach().double().cpu(), dense_w.detach().double().cpu()
    bd = None if bias is None else bias.detach().double().cpu()
    ref = torch.nn.functional.conv2d(xd, wd, bd, stride, padding, dilation, groups)
    mag = torch.nn.functional.conv2d(xd.abs(), wd.abs(), None if bd is None else bd.abs(), stride, padding, dilation,
                                     groups)
    assert y.shape == ref.shape, f"shape {tuple(y.shape)} != {tuple(ref.shape)}"
    yd = y.double().cpu()
    assert torch.equal(torch.isnan(yd), torch.isnan(ref)) and torch.equal(torch.isinf(yd), torch.isinf(ref))
    n = dense_w[0].numel() + 2
    u16, u32 = UNIT_ROUNDOFF[torch.bfloat16], UNIT_ROUNDOFF[torch.float32]
    finite = torch.isfinite(ref)
    tol = u16 * ref.abs() + (1 + u16) * n * u32 * mag + 1e-30
    err = (yd - ref).abs()
    worst = (err - tol)[finite].max().item() if bool(finite.any()) else 0.0
    assert worst <= 0, f"max error {err[finite].max().item():.3e} exceeds bound by {worst:.3e}"
