"""Python overhead of pyhwp.linear per call: 1x384 input, 1536x384 CSR weight at 90% sparsity.

Times, interleaved in one run, the bare kernel call (pyhwp._C.csr_matmul on preallocated
output), the op implementation called directly, the torch.library op (dispatcher), the public
pyhwp.linear (eager fast path), a frozen pyhwp.nn.SparseLinear and dense F.linear; overhead =
time minus the bare kernel call.
One thread, so that the figure is Python work and not OpenMP wake-ups.
Run: PYTHONPATH=$PWD python bench/linear_overhead.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pyhwp
from pyhwp._ext import _C
from pyhwp.bench.timing import interleaved_medians
from pyhwp.ops.csr import csr_matmul_impl

CALLS = 50  # calls per timed sample: the overhead is a few microseconds


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    w = torch.randn(1536, 384)
    w[torch.rand_like(w) < 0.9] = 0
    sw = pyhwp.to_sparse(w, "csr")
    x, y = torch.randn(1, 384), torch.empty(1, 1536)
    ro, ci, v = sw.row_offsets, sw.kernel_col_indices, sw.values  # the 16-bit indices pyhwp.linear passes
    op = torch.ops.pyhwp.csr_matmul.default

    def bare():
        _C.csr_matmul(1536, 384, v.shape[0], ro.data_ptr(), 0, v.data_ptr(), x.data_ptr(), 1, 1, 384,
                      0, y.data_ptr(), 1, 1536, 1, ci.data_ptr())

    layer = pyhwp.nn.SparseLinear(sw, requires_grad=False)

    fns = {"bare kernel call": bare,
           "op implementation": lambda: csr_matmul_impl(x, ro, ci, v, None, False),
           "torch.ops.pyhwp.csr_matmul": lambda: op(x, ro, ci, v, None, False),
           "pyhwp.linear": lambda: pyhwp.linear(x, sw),
           "SparseLinear module": lambda: layer(x),
           "F.linear (dense)": lambda: F.linear(x, w)}

    def repeat(f):
        def run():
            for _ in range(CALLS):
                f()
        return run

    med = interleaved_medians({k: repeat(f) for k, f in fns.items()}, budget_s=3.0, max_reps=2000)
    base = med["bare kernel call"] / CALLS
    for name, t in med.items():
        t /= CALLS
        print(f"{name:28s} {t * 1e6:8.2f} us/call   overhead {(t - base) * 1e6:7.2f} us")


if __name__ == "__main__":
    main()
