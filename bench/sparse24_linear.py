"""Benchmark: pyhwp.linear on 2:4 weights vs dense torch F.linear, interleaved in one run."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F

import pyhwp
from pyhwp._ext import _C
from pyhwp.bench.timing import interleaved_medians

# Linear (out, in) shapes of ../shared/BENCHMARKS.md.
SHAPES = [(4096, 4096), (11008, 4096), (3072, 768), (768, 3072), (1536, 384)]
BATCHES = [1, 16, 128]


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4: keep the 2 largest |w| of every 4 consecutive inputs."""
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (g * keep).reshape(n, k)


def run(shapes, batches, budget_s: float, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, k in shapes:
        w = prune_24(torch.randn(n, k, generator=g))
        sw = pyhwp.to_sparse(w, "2:4")
        for p in batches:
            x = torch.randn(p, k, generator=g)
            t = interleaved_medians({
                "dense": lambda: F.linear(x, w),
                "2:4": lambda: pyhwp.linear(x, sw),
            }, budget_s=budget_s)
            flops = 2.0 * n * k * p
            rows.append({
                "out": n, "in": k, "batch": p, "dtype": "float32", "pattern": "2:4", "sparsity": 0.5,
                "dense_ms": t["dense"] * 1e3, "sparse24_ms": t["2:4"] * 1e3,
                "ratio_vs_dense": t["dense"] / t["2:4"],
                "useful_gflops": flops / 2 / t["2:4"] / 1e9,
                "dense_equiv_gflops": flops / t["2:4"] / 1e9,
                "dense_gflops": flops / t["dense"] / 1e9,
                "weight_gbps": sw.nbytes / t["2:4"] / 1e9,
                "dense_weight_gbps": 4.0 * n * k / t["dense"] / 1e9,
            })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default=None, help="comma list of OUTxIN, e.g. 4096x4096,1536x384")
    ap.add_argument("--batches", default=None, help="comma list of batch sizes (rows of x)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--threads", type=int, default=None, help="torch/pyhwp threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = BATCHES if not args.batches else [int(b) for b in args.batches.split(",")]
    rows = run(shapes, batches, args.budget)
    print(f"# pyhwp 2:4 vs torch dense F.linear, float32, {torch.get_num_threads()} threads, "
          f"ISA {_C.active_isa()}, torch {torch.__version__}")
    print(f"{'shape':>12} {'batch':>5} {'dense ms':>9} {'2:4 ms':>9} {'ratio':>6} "
          f"{'dense-eq GF/s':>13} {'2:4 GB/s':>9} {'dense GB/s':>10}")
    for r in rows:
        print(f"{r['out']:>6}x{r['in']:<5} {r['batch']:>5} {r['dense_ms']:>9.3f} {r['sparse24_ms']:>9.3f} "
              f"{r['ratio_vs_dense']:>5.2f}x {r['dense_equiv_gflops']:>13.1f} {r['weight_gbps']:>9.1f} "
              f"{r['dense_weight_gbps']:>10.1f}")
    if args.json:
        meta = {"device": platform.processor() or platform.machine(), "isa": _C.active_isa(),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "pyhwp": pyhwp.__version__,
                "python": sys.version.split()[0]}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
