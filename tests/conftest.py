"""Shared fixtures: ISA parametrisation and skipping of CUDA tests where no GPU is present."""

from __future__ import annotations

import pytest
import torch

from helpers import BF16_ISAS, ISAS
from pyhwp._ext import _C

HAS_CUDA = torch.cuda.is_available() and _C.build_info()["cuda"]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and pyhwp built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _capped(name):
    previous = _C.active_isa()
    _C.set_isa_cap(name)
    yield name
    _C.set_isa_cap(previous)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per CPU kernel variant this machine supports (AMX aside)."""
    yield from _capped(request.param)


@pytest.fixture(params=BF16_ISAS)
def bf16_isa(request):
    """`isa` plus AVX512-BF16 and AMX where this build and machine have them (the bfloat16 masked
    and 2:4 kernels)."""
    yield from _capped(request.param)
