"""pytest-benchmark: the conv2d cases of the quick suite (ResNet-50 shapes, float32 and bfloat16),
every contender."""

from __future__ import annotations

import pytest
import torch

from conftest import case_params
from pyhwp.bench.cases import suite_cases

CASES = [c for c in suite_cases("quick", "cpu", torch.get_num_threads()) if c.op == "conv2d"]


@pytest.mark.parametrize("case, contender", case_params(CASES))
def test_conv2d(run_contender, case, contender):
    run_contender(case, contender)
