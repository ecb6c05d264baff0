"""Reliability: one SparseWeight shared by 8 threads, flat memory over 10,000 calls."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import pyhwp
from pyhwp._ext import _C
from pyhwp.formats import patterns
from helpers import assert_linear_close, random_sparse


def _weight(pattern, n, k, seed):
    w = random_sparse((n, k), 0.5, torch.Generator().manual_seed(seed))
    if pattern == "2:4":  # keep the 2 largest of each group of 4 along the input dimension
        groups = w.reshape(n, k // 4, 4)
        groups.scatter_(-1, groups.abs().argsort(-1)[..., :2], 0.0)
    return w


def _from_threads(call, inputs, repeats):
    """call(x) from one thread per input, all started together, `repeats` times each; the last
    result of each thread. Any exception a thread raised fails the test."""
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(inputs))

    def work(i):
        try:
            barrier.wait()
            for _ in range(repeats):
                results[i] = call(inputs[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return [results[i] for i in range(len(inputs))]


@pytest.mark.parametrize("pattern", patterns())
def test_shared_weight_from_eight_threads(pattern):
    w = _weight(pattern, 256, 192, 0)
    sw = pyhwp.to_sparse(w, pattern)
    inputs = [torch.randn(b, 192, generator=torch.Generator().manual_seed(b)) for b in range(1, 9)]
    for x, y in zip(inputs, _from_threads(lambda x: pyhwp.linear(x, sw), inputs, 20)):
        assert_linear_close(y, x, w)


@pytest.mark.parametrize("pattern", patterns())
@pytest.mark.parametrize("stride", [1, 2])
def test_shared_conv_weight_from_six_threads(pattern, stride):
    """conv2d's implicit GEMMs (per-thread scratch, the per-weight plans and fast-path entry) from
    six Python threads at once on one weight, each with its own input."""
    g = torch.Generator().manual_seed(stride)
    w = _weight(pattern, 24, 16 * 9, 1).reshape(24, 16, 3, 3)
    sw = pyhwp.to_sparse(w, pattern)
    inputs = [torch.randn(2, 16, 14, 14, generator=g) for _ in range(6)]
    for x, y in zip(inputs, _from_threads(lambda x: pyhwp.conv2d(x, sw, None, stride, 1), inputs, 10)):
        torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, None, stride, 1), rtol=1e-4, atol=1e-4)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.skipif(_C.build_info()["sanitize"], reason="ASan's quarantine holds freed memory")
@pytest.mark.parametrize("pattern", patterns())
def test_rss_flat_over_10000_calls(pattern):
    sw = pyhwp.to_sparse(_weight(pattern, 64, 96, 1), pattern)
    x = torch.randn(4, 96)
    b = torch.randn(64)
    for _ in range(1000):  # warm caches, allocator pools and scratch buffers
        pyhwp.linear(x, sw, b)
    before = _rss_bytes()
    for _ in range(10_000):
        pyhwp.linear(x, sw, b)
    grown = _rss_bytes() - before
    # A leak of even one 64x4 float output per call would be 10 MB; allow 2 MB of noise.
    assert grown < 2 * 2**20, f"RSS grew by {grown / 2**20:.2f} MiB over 10,000 calls"


def _sparse_model(pattern):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.copy_(_weight(pattern, 32, 64, 2))
    return pyhwp.sparsify(model, {"0": pattern})


@pytest.mark.parametrize("pattern", patterns())
def test_truncated_or_corrupted_saved_model_fails_clearly(pattern, tmp_path):
    model = _sparse_model(pattern)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    # torch's reader refuses a cut archive (RuntimeError or OSError, by where the cut falls).
    with pytest.raises((RuntimeError, OSError)):
        torch.load(tmp_path / "truncated.pt", weights_only=True)

    # A file that loads but whose index arrays were tampered with is refused by
    # load_state_dict, naming the broken invariant, before any kernel sees it.
    state = torch.load(path, weights_only=True)
    index_keys = [k for k, v in state.items() if k.startswith("0.") and not v.is_floating_point()]
    assert index_keys
    for key in index_keys:
        bad = {k: v.clone() for k, v in state.items()}
        flat = bad[key].view(-1)
        if flat.numel() == 0:
            continue
        flat[-1] = torch.iinfo(flat.dtype).max if flat.dtype != torch.uint8 else 255
        fresh = _sparse_model(pattern)
        try:
            fresh.load_state_dict(bad)
        except (ValueError, RuntimeError) as exc:
            assert str(exc)
            continue
        # Accepted: then the tampered value was still a valid weight; it must compute
        # what its dense form says.
        x = torch.randn(3, 64)
        ref = torch.nn.functional.linear(x, fresh[0].weight.to_dense(), fresh[0].bias)
        torch.testing.assert_close(fresh[0](x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", patterns())
def test_out_argument_writes_in_place(pattern):
    w = _weight(pattern, 40, 64, 3)
    sw = pyhwp.to_sparse(w, pattern)
    b = torch.randn(40)
    for shape in ((1, 64), (5, 64), (2, 3, 64)):
        x = torch.randn(shape)
        out = torch.full((*shape[:-1], 40), float("nan"))  # poisoned: every element must be written
        y = pyhwp.linear(x, sw, b, out=out)
        assert y is out
        assert_linear_close(out, x, w, b)
    # Any strides: a column-strided view of a larger buffer.
    big = torch.full((7, 80), float("nan"))
    x = torch.randn(7, 64)
    pyhwp.linear(x, sw, out=big[:, ::2])
    assert_linear_close(big[:, ::2], x, w)
    assert torch.isnan(big[:, 1::2]).all()
    # Leading dims that no view flattens: a 3-D out with its last two dims transposed.
    x = torch.randn(2, 5, 64)
    out = torch.full((2, 40, 5), float("nan")).transpose(1, 2)
    assert pyhwp.linear(x, sw, b, out=out) is out
    assert_linear_close(out, x, w, b)


def test_out_argument_rejects_bad_use():
    sw = pyhwp.to_sparse(_weight("csr", 8, 16, 4), "csr")
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="out has shape"):
        pyhwp.linear(x, sw, out=torch.empty(3, 9))
    with pytest.raises(TypeError, match="out is"):
        pyhwp.linear(x, sw, out=torch.empty(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="inference"):
        pyhwp.linear(x.requires_grad_(), sw, out=torch.empty(3, 8))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.skipif(_C.build_info()["sanitize"], reason="ASan's quarantine holds freed memory")
def test_out_argument_allocates_nothing_per_call():
    sw = pyhwp.to_sparse(_weight("csr", 512, 256, 5), "csr")
    x, out = torch.randn(64, 256), torch.empty(64, 512)
    for _ in range(200):
        pyhwp.linear(x, sw, out=out)
    before = _rss_bytes()
    for _ in range(2000):
        pyhwp.linear(x, sw, out=out)
    assert _rss_bytes() - before < 2 * 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.skipif(_C.build_info()["sanitize"], reason="ASan's quarantine holds freed memory")
@pytest.mark.parametrize("pattern", patterns())
def test_conv2d_rss_flat_over_10000_calls(pattern):
    w = _weight(pattern, 8, 36, 6).reshape(8, 4, 3, 3)  # 36 = 4 * 3 * 3: whole groups of 4
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(1, 4, 6, 6)
    for _ in range(1000):
        pyhwp.conv2d(x, sw, padding=1)
    before = _rss_bytes()
    for _ in range(10_000):
        pyhwp.conv2d(x, sw, padding=1)
    grown = _rss_bytes() - before
    assert grown < 2 * 2**20, f"RSS grew by {grown / 2**20:.2f} MiB over 10,000 conv2d calls"
