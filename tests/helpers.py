"""Test helpers: float64 references with tolerances from the summation error bound."""

from __future__ import annotations

import torch

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
