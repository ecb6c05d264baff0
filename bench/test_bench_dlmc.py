"""pytest-benchmark: csr_matmul on every DLMC matrix (../shared/data/dlmc, or $PYHWP_DLMC), every
contender; skipped when the directory is absent."""

from __future__ import annotations

import os

import pytest

from conftest import case_params
from pyhwp.bench import dlmc

ROOT = os.environ.get("PYHWP_DLMC") or dlmc.default_path()
CASES = dlmc.dlmc_cases(ROOT)


@pytest.mark.skipif(not CASES, reason=f"no DLMC matrices under {ROOT} (set PYHWP_DLMC)")
@pytest.mark.parametrize("case, contender", case_params(CASES) or [pytest.param(None, None, id="absent")])
def test_dlmc(run_contender, case, contender):
    run_contender(case, contender)
