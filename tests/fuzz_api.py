"""Property-based fuzzing of the public API with malformed inputs (run in a subprocess by
tests/test_fuzz.py, so that a crash of the compiled core is a test failure, not a dead run).

Every call must either succeed with the reference result or raise TypeError/ValueError.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyhwp
from pyhwp.formats import patterns

ALLOWED = (TypeError, ValueError)

settings.register_profile("fuzz", deadline=None, database=None, suppress_health_check=list(HealthCheck))
settings.load_profile("fuzz")


def _weight_for(pattern: str, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < 0.6] = 0
    if pattern == "2:4" and k % 4 == 0:  # keep the 2 largest of every group of 4
        groups = w.reshape(n, k // 4, 4)
        drop = groups.abs().argsort(-1)[..., :2]
        groups.scatter_(-1, drop, 0.0)
    return w


def _mutate(t: torch.Tensor, how: int, pos: int, val: int) -> torch.Tensor:
    t = t.clone()
    if how == 0 and t.numel():  # overwrite one element with an arbitrary value
        flat = t.reshape(-1)
        if t.dtype == torch.bool:
            val = bool(val)
        elif not t.is_floating_point():
            info = torch.iinfo(t.dtype)
            val = min(max(val, info.min), info.max)
        flat[pos % flat.numel()] = val
        return flat.reshape(t.shape)
    if how == 1:  # drop the last element
        return t.reshape(-1)[:-1] if t.numel() else t
    if how == 2:  # one element too many
        return torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
    if how == 3:  # wrong dtype
        return t.to(torch.float64 if not t.is_floating_point() else torch.int64)
    if how == 4:  # wrong rank
        return t.reshape(1, -1)
    return t.flip(0) if t.dim() else t  # reordered


@given(
    pattern=st.sampled_from(patterns()),
    n=st.integers(1, 40), k=st.integers(1, 40), seed=st.integers(0, 2**16),
    field=st.integers(0, 10), how=st.integers(0, 5), pos=st.integers(0, 10**6),
    val=st.sampled_from([-(2**31), -1, 0, 1, 2, 3, 7, 15, 255, 2**31 - 1, 2**40]),
    batch=st.integers(0, 5),
)
def fuzz_raw_arrays(pattern, n, k, seed, field, how, pos, val, batch):
    """Build a SparseWeight from valid arrays with one array corrupted, then use it."""
    try:
        sw = pyhwp.to_sparse(_weight_for(pattern, n, k, seed), pattern)
    except ALLOWED:
        return
    arrays = {f.name: getattr(sw, f.name) for f in dataclasses.fields(sw)
              if isinstance(getattr(sw, f.name), torch.Tensor)}
    name = sorted(arrays)[field % len(arrays)]
    arrays[name] = _mutate(arrays[name], how, pos, val)
    try:
        bad = type(sw)(sw.shape, **arrays)
    except ALLOWED:
        return
    x = torch.randn(batch, k)
    y = pyhwp.linear(x, bad)
    ref = torch.nn.functional.linear(x.double(), bad.to_dense().double())
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4), (pattern, name, how)


@given(
    pattern=st.sampled_from(patterns()),
    wshape=st.lists(st.integers(0, 9), min_size=0, max_size=5),
    xshape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    wdtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int32, torch.bool]),
    xdtype=st.sampled_from([torch.float32, torch.float64, torch.int64]),
    bias_len=st.one_of(st.none(), st.integers(0, 10)),
    with_mask=st.booleans(),
    out_layout=st.sampled_from([None, "contiguous", "transposed"]),
)
def fuzz_public_calls(pattern, wshape, xshape, wdtype, xdtype, bias_len, with_mask, out_layout):
    """to_sparse and linear (also into out= of either layout) on arbitrary shapes and dtypes: a
    result or a clear error."""
    w = torch.randn(wshape).to(wdtype) if wdtype != torch.bool else torch.randn(wshape) > 0
    mask = (torch.rand(wshape) > 0.5) if with_mask else None
    try:
        sw = pyhwp.to_sparse(w, pattern, mask=mask)
    except ALLOWED:
        return
    x = torch.randn(xshape).to(xdtype)
    bias = None if bias_len is None else torch.randn(bias_len)
    out = None
    if out_layout is not None and x.dim() >= 1 and len(sw.shape) == 2:
        shape = (*x.shape[:-1], sw.shape[0])
        if out_layout == "transposed" and len(shape) >= 2:
            out = torch.empty(*shape[:-2], shape[-1], shape[-2], dtype=x.dtype).transpose(-1, -2)
        else:
            out = torch.empty(shape, dtype=x.dtype)
    try:
        y = pyhwp.linear(x, sw, bias, out=out)
    except ALLOWED:
        return
    assert out is None or y is out
    ref = torch.nn.functional.linear(x.double(), sw.to_dense().double(),
                                     None if bias is None else bias.double())
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4)


@given(
    pattern=st.sampled_from(patterns()),
    dims=st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40)),  # batch, in, out channels
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    channels_last=st.booleans(),
    with_bias=st.booleans(),
    grouping=st.sampled_from(["none", "two", "depthwise"]),
    nonfinite=st.sampled_from([None, float("nan"), float("inf")]),
    seed=st.integers(0, 2**16),
)
def fuzz_conv2d(pattern, dims, kernel, size, stride, dilation, padding, dtype, channels_last, with_bias, grouping,
                nonfinite, seed):
    """conv2d over random geometries (every path: implicit GEMMs, AMX, per-tap, im2col, 1x1, per
    group, depthwise), with a NaN or Inf in x or not: the dense result within the summation bound of
    one rounding, NaN/Inf where dense has them, or a clear error."""
    n, c, out = dims
    groups = {"none": 1, "two": 2, "depthwise": c}[grouping]
    c, out = -(-c // groups) * groups, -(-out // groups) * groups
    g = torch.Generator().manual_seed(seed)
    w2 = _weight_for(pattern, out, c // groups * kernel[0] * kernel[1], seed)
    w = w2.reshape(out, c // groups, *kernel).to(dtype)
    try:
        sw = pyhwp.to_sparse(w, pattern)
    except ALLOWED:
        return
    x = torch.randn(n, c, *size, generator=g)
    if nonfinite is not None:
        x[seed % n, seed % c, seed % size[0], seed % size[1]] = nonfinite
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(out, generator=g).to(dtype) if with_bias else None
    try:
        y = pyhwp.conv2d(x, sw, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    except ALLOWED:
        with pytest_raises_like():  # the dense conv must refuse the same geometry
            torch.nn.functional.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
        return
    xd, wd = x.double(), w.double()
    bd = None if bias is None else bias.double()
    ref = torch.nn.functional.conv2d(xd, wd, bd, stride, padding, dilation, groups)
    mag = torch.nn.functional.conv2d(xd.abs(), wd.abs(), None if bd is None else bd.abs(), stride, padding, dilation,
                                     groups)
    u = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    tol = u * ref.abs() + (1 + u) * (w[0].numel() + 2) * 2.0**-24 * mag + 1e-30
    case = (pattern, dims, groups, kernel, size, stride, dilation, padding, dtype, channels_last, nonfinite)
    assert y.shape == ref.shape and y.dtype == dtype, case
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref)), case
    finite = torch.isfinite(ref)
    assert bool(((y.double() - ref).abs() <= tol)[finite].all()), case


@given(
    pattern=st.sampled_from(patterns()),
    n=st.integers(1, 70),
    k=st.integers(1, 140),
    batch=st.integers(1, 40),
    with_bias=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def fuzz_linear_bf16(pattern, n, k, batch, with_bias, transposed, seed):
    """bfloat16 linear over random sizes (the vector and AMX kernels, their tile and pair edges):
    the dense result computed in float32 and rounded once, within its bound."""
    g = torch.Generator().manual_seed(seed)
    w = _weight_for(pattern, n, k, seed).bfloat16()
    try:
        sw = pyhwp.to_sparse(w, pattern)
    except ALLOWED:
        return
    x = torch.randn(batch, k, generator=g).bfloat16()
    if transposed:  # k-strided rows (the packing's other layout)
        x = x.t().contiguous().t()
    bias = torch.randn(n, generator=g).bfloat16() if with_bias else None
    y = pyhwp.linear(x, sw, bias)
    xd, wd = x.double(), w.double()
    bd = None if bias is None else bias.double()
    ref = torch.nn.functional.linear(xd, wd, bd)
    mag = torch.nn.functional.linear(xd.abs(), wd.abs(), None if bd is None else bd.abs())
    u = 2.0**-8
    tol = u * ref.abs() + (1 + u) * (k + 2) * 2.0**-24 * mag + 1e-30
    assert y.dtype == torch.bfloat16 and bool(((y.double() - ref).abs() <= tol).all()), (pattern, n, k, batch)


class pytest_raises_like:
    """Asserts that the block raises (RuntimeError from torch counts): pyhwp refused a geometry."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        assert kind is not None, "pyhwp.conv2d refused a geometry torch's conv2d accepts"
        return True


def run(examples: int) -> None:
    # Settings applied to each fuzzer itself: @given binds the profile loaded at import (100
    # examples), so loading another profile here did not raise the count.
    for fuzz in (fuzz_raw_arrays, fuzz_public_calls, fuzz_conv2d, fuzz_linear_bf16):
        settings(settings.get_profile("fuzz"), max_examples=examples)(fuzz)()


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
    print("fuzz: ok")
