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
)
def fuzz_public_calls(pattern, wshape, xshape, wdtype, xdtype, bias_len, with_mask):
    """to_sparse and linear on arbitrary shapes and dtypes: a result or a clear error."""
    w = torch.randn(wshape).to(wdtype) if wdtype != torch.bool else torch.randn(wshape) > 0
    mask = (torch.rand(wshape) > 0.5) if with_mask else None
    try:
        sw = pyhwp.to_sparse(w, pattern, mask=mask)
    except ALLOWED:
        return
    x = torch.randn(xshape).to(xdtype)
    bias = None if bias_len is None else torch.randn(bias_len)
    try:
        y = pyhwp.linear(x, sw, bias)
    except ALLOWED:
        return
    ref = torch.nn.functional.linear(x.double(), sw.to_dense().double(),
                                     None if bias is None else bias.double())
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4)


def run(examples: int) -> None:
    settings.register_profile("fuzz_n", parent=settings.get_profile("fuzz"), max_examples=examples)
    settings.load_profile("fuzz_n")
    for fuzz in (fuzz_raw_arrays, fuzz_public_calls):
        fuzz()


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
    print("fuzz: ok")
