"""pytest-benchmark: the linear cases of the quick suite (fp32 and bfloat16), every contender."""

from __future__ import annotations

import pytest
import torch

from conftest import case_params
from pyhwp.bench.cases import suite_cases

CASES = [c for c in suite_cases("quick", "cpu", torch.get_num_threads())
         if c.op == "linear" and c.section in ("linear", "bf16")]


@pytest.mark.parametrize("case, contender", case_params(CASES))
def test_linear(run_contender, case, contender):
    run_contender(case, contender)
