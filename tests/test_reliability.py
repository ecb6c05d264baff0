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


@pytest.mark.parametrize("pattern", patterns())
def test_shared_weight_from_eight_threads(pattern):
    w = _weight(pattern, 256, 192, 0)
    sw = pyhwp.to_sparse(w, pattern)
    inputs = [torch.randn(b, 192, generator=torch.Generator().manual_seed(b)) for b in range(1, 9)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            for _ in range(20):
                results[i] = pyhwp.linear(inputs[i], sw)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, x in enumerate(inputs):
        assert_linear_close(results[i], x, w)


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
