"""Shared fixtures: ISA parametrisation and skipping of CUDA tests where no GPU is present."""

from __future__ import annotations

import pytest
import torch

from pyhwp._ext import _C

ISAS = [isa for isa, ok in (("scalar", True), ("avx2", _C.cpu_features()["avx2"]),
                            ("avx512", _C.cpu_features()["avx512"])) if ok]
# The AVX512-BF16 level differs from avx512 only in bfloat16 kernels: tests of those add it.
BF16_ISAS = ISAS + (["avx512_bf16"] if _C.cpu_features()["avx512_bf16"] else [])
HAS_CUDA = torch.cuda.is_available() and _C.build_info()["cuda"]



def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and pyhwp built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _capped(cap):
    previous = _C.active_isa()
    _C.set_isa_cap(cap)
    try:
        yield cap
    finally:
        _C.set_isa_cap(previous)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per CPU kernel variant this machine supports."""
    yield from _capped(request.param)


@pytest.fixture(params=BF16_ISAS)
def bf16_isa(request):
    """`isa` plus the AVX512-BF16 level (vdpbf16ps kernels) where the CPU has it."""
    yield from _capped(request.param)
