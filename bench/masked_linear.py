"""Benchmark: pyhwp.linear on masked (tile-skipping) weights against dense F.linear, interleaved.

Weights are random normal with a given fraction of their 16x16 tiles set to zero (block sparsity,
the pattern the masked kernel skips); x is random normal. Every case times dense torch and the
masked kernel round-robin in the same run and reports the ratio. Run from the repository root:

    PYTHONPATH=$PWD python bench/masked_linear.py                      # shapes of BENCHMARKS.md
    PYTHONPATH=$PWD python bench/masked_linear.py --shapes 4096x4096 --batches 16 --zero-tiles 0.75
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import pyhwp
from pyhwp.bench.timing import interleaved_medians
from pyhwp.info import build_info

SHAPES = ["4096x4096", "11008x4096", "3072x768", "768x3072", "1536x384"]  # (out, in)


def block_sparse(n: int, k: int, zero_tiles: float, tile: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Normal (n, k) weight with round(zero_tiles * tiles) of its tile x tile blocks all zero."""
    tn, tk = tile
    w = torch.randn(n, k, generator=g)
    np_, kt = math.ceil(n / tn), math.ceil(k / tk)
    drop = torch.randperm(np_ * kt, generator=g)[: round(zero_tiles * np_ * kt)]
    keep = torch.ones(np_ * kt, dtype=torch.bool)
    keep[drop] = False
    keep = keep.view(np_, kt).repeat_interleave(tn, 0).repeat_interleave(tk, 1)[:n, :k]
    return w * keep


def measured_peak(budget_s: float) -> float:
    """GFLOP/s of torch's dense fp32 GEMM at 4096^3 on this machine now (the ceiling we quote)."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    t = interleaved_medians({"gemm": lambda: a @ b}, warmup=1, min_reps=3, max_reps=10, budget_s=budget_s)
    return 2 * 4096**3 / t["gemm"] / 1e9


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_case(n: int, k: int, batch: int, zero_tiles: float, budget_s: float, g: torch.Generator) -> dict:
    sw_probe = pyhwp.to_sparse(torch.ones(1, 1), "masked")
    w = block_sparse(n, k, zero_tiles, sw_probe.tile, g)
    sw = pyhwp.to_sparse(w, "masked")
    x = torch.randn(batch, k, generator=g)
    y = pyhwp.linear(x, sw)
    ref = F.linear(x.double(), w.double())
    err = ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    t = interleaved_medians({"dense": lambda: F.linear(x, w), "masked": lambda: pyhwp.linear(x, sw)},
                            budget_s=budget_s)
    dense_flop = 2 * batch * n * k
    return {
        "shape": [n, k], "batch": batch, "zero_tiles": zero_tiles, "pattern": "masked", "dtype": "float32",
        "tile_density": sw.tile_density, "density": sw.density,
        "time_dense_s": t["dense"], "time_masked_s": t["masked"],
        "useful_gflops": dense_flop * sw.density / t["masked"] / 1e9,
        "dense_equiv_gflops": dense_flop / t["masked"] / 1e9,
        "torch_dense_gflops": dense_flop / t["dense"] / 1e9,
        "ratio_vs_dense": t["dense"] / t["masked"],
        "max_rel_err": err,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="OUTxIN weight shapes")
    p.add_argument("--batches", nargs="+", type=int, default=[16, 128])
    p.add_argument("--zero-tiles", nargs="+", type=float, default=[0.0, 0.75], help="fractions of zero tiles")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case")
    p.add_argument("--isa", choices=["scalar", "avx2", "avx512"], help="cap the kernels' ISA")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for both contenders")
    p.add_argument("--no-peak", action="store_true", help="skip measuring the 4096^3 GEMM ceiling")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    if args.isa:
        pyhwp._C.set_isa_cap(args.isa)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    peak = None if args.no_peak else measured_peak(max(args.budget, 2.0))
    print(f"isa {pyhwp._C.active_isa()}, threads {torch.get_num_threads()}, "
          f"peak (torch 4096^3) {'-' if peak is None else f'{peak:.0f} GFLOP/s'}")
    print(f"{'shape':>11} {'batch':>5} {'zero':>5} {'dense ms':>9} {'masked ms':>9} {'ratio':>6} "
          f"{'useful GF/s':>11} {'dense-eq GF/s':>13} {'% peak':>6}")
    results = []
    with torch.inference_mode():
        for shape in args.shapes:
            n, k = (int(s) for s in shape.split("x"))
            for batch in args.batches:
                for z in args.zero_tiles:
                    r = run_case(n, k, batch, z, args.budget, g)
                    r["pct_peak"] = None if peak is None else 100 * r["useful_gflops"] / peak
                    results.append(r)
                    pct = "-" if peak is None else f"{r['pct_peak']:.0f}"
                    print(f"{shape:>11} {batch:>5} {z:>5.2f} {r['time_dense_s'] * 1e3:>9.3f} "
                          f"{r['time_masked_s'] * 1e3:>9.3f} {r['ratio_vs_dense']:>6.2f} "
                          f"{r['useful_gflops']:>11.1f} {r['dense_equiv_gflops']:>13.1f} {pct:>6}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "masked_linear", "commit": commit(), "peak_gflops": peak,
                                         "machine": build_info(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
