"""Shared fixtures: ISA parametrisation and skipping of CUDA tests where no GPU is present."""

from __future__ import annotations

import pytest
import torch

from pyhwp._ext import _C

# The kernel variants this build compiled that this CPU runs.
ISAS = [isa for isa in _C.build_info()["cpu_kernels"] if isa == "scalar" or _C.cpu_features()[isa]]
HAS_CUDA = torch.cuda.is_available() and _C.build_info()["cuda"]



def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and pyhwp built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per CPU kernel variant this machine supports."""
    previous = _C.active_isa()
    _C.set_isa_cap(request.param)
    yield request.param
    _C.set_isa_cap(previous)
