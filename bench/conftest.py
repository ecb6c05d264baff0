"""pytest-benchmark front end of the suite (`pytest bench/ --benchmark-only`): the cases and
contenders are those of `pyhwp bench` (pyhwp.bench.cases / runner); one test per case x contender,
grouped by case so the table compares them."""

from __future__ import annotations

import pytest
import torch

from pyhwp.bench.runner import contenders, prepare, unavailable

CONTENDER_NAMES = ("pyhwp", "torch_dense", "torch_csr")


def case_params(cases) -> list:
    """pytest params (case, contender), ordered so consecutive tests share a prepared weight."""
    return [pytest.param(c, name, id=f"{c.name} | {name}") for c in cases for name in CONTENDER_NAMES]


@pytest.fixture
def run_contender(benchmark):
    """run(case, contender): benchmark one contender of one case on the CPU, or skip with the reason."""

    def run(case, name, device="cpu"):
        reason = unavailable(case, device)
        if reason:
            pytest.skip(reason)
        p = prepare(case, device)
        fns, skipped = contenders(case, p, device, only=(name,))
        if name not in fns:
            pytest.skip(skipped.get(name, f"{name} does not apply to {case.name}"))
        benchmark.group = case.name
        benchmark.extra_info.update(case=case.name, contender=name, nnz=p.kept, columns=case.columns,
                                    useful_flop=2 * p.kept * case.columns,
                                    dense_flop=2 * case.out_features * case.in_features * case.columns,
                                    threads=torch.get_num_threads())
        with torch.inference_mode():
            benchmark(fns[name])

    return run
