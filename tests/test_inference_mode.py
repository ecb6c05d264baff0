"""torch.inference_mode: weights made under it, calls under it, and weights whose arrays are
inference tensors (no version counter), for every pattern, against the dense reference."""

from __future__ import annotations

import contextlib
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

import pyhwp
from pyhwp.formats import patterns


def _weight(shape, seed):
    """Normal weights with 2 of every 4 consecutive inputs zero: valid in every pattern."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    groups = w.reshape(shape[0], -1, 4)
    groups.scatter_(-1, groups.abs().argsort(-1)[..., :2], 0.0)
    return w


def _check_calls(sw, w, swc, wc):
    """linear at batches 1, 5, 16 and conv2d with and without a NaN, each twice (the second call
    takes the cached plans), against the float64 dense products."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, w.shape[1], generator=g)
    for b in (1, 5, 16):
        ref = F.linear(x[:b].double(), w.double()).float()
        for _ in range(2):
            torch.testing.assert_close(pyhwp.linear(x[:b], sw), ref, rtol=1e-5, atol=1e-5)
    xc = torch.randn(2, wc.shape[1], 9, 9, generator=g)
    xc[1, 3, 4, 4] = float("nan")
    for xi in (xc[:1], xc):
        ref = F.conv2d(xi.double(), wc.double(), padding=1).float()
        for _ in range(2):
            y = pyhwp.conv2d(xi, swc, padding=1)
            assert torch.equal(torch.isnan(y), torch.isnan(ref))
            finite = torch.isfinite(ref)
            torch.testing.assert_close(y[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", patterns())
@pytest.mark.parametrize("made_in, called_in", [(True, False), (True, True), (False, True)],
                         ids=["made_in", "made_and_called_in", "called_in"])
def test_weights_made_or_called_under_inference_mode(pattern, made_in, called_in):
    w, wc = _weight((48, 64), 1), _weight((16, 8, 3, 3), 2)
    with torch.inference_mode() if made_in else contextlib.nullcontext():
        sw, swc = pyhwp.to_sparse(w, pattern), pyhwp.to_sparse(wc, pattern)
    # to_sparse builds outside inference mode: arrays with version counters, which the cached
    # plans and copies need.
    assert not any(t.is_inference() for s in (sw, swc) for t in s._tensors().values())
    with torch.inference_mode() if called_in else torch.no_grad():
        _check_calls(sw, w, swc, wc)


@pytest.mark.parametrize("pattern", patterns())
def test_weights_holding_inference_tensors_take_the_uncached_paths(pattern):
    w, wc = _weight((48, 64), 4), _weight((16, 8, 3, 3), 5)

    def inference_copy(sw):
        with torch.inference_mode():
            arrays = {f.name: getattr(sw, f.name) for f in fields(sw) if f.name != "shape"}
            arrays = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in arrays.items()}
        return type(sw)._unchecked(sw.shape, **arrays)

    sw, swc = inference_copy(pyhwp.to_sparse(w, pattern)), inference_copy(pyhwp.to_sparse(wc, pattern))
    assert sw.values.is_inference()
    if pattern == "csr":
        assert sw.kernel_sell() is None  # a copy nothing could tell stale
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            _check_calls(sw, w, swc, wc)
