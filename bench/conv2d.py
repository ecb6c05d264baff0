"""Benchmark: pyhwp.conv2d vs torch F.conv2d on the dense weight, ResNet-50 conv shapes, interleaved.

    PYTHONPATH=. python bench/conv2d.py [--pattern csr] [--sparsity 0.9] [--batch 1 32] [--dtype bfloat16]
        [--strided] [--json out.json]

For each shape, batch and pattern it times, in one interleaved run: torch's dense conv2d, pyhwp.conv2d,
and the two halves of pyhwp's general path on their own (im2col = conv2d's patch matrix per image; gemm = the
pattern's matmul on the ready patch matrices), so the split of the time is measured, not guessed.
For CSR (whose inference runs the implicit-GEMM kernel, no im2col) `taps` times the per-tap path
that autograd and NaN/Inf inputs take instead: one GEMM per kernel tap on shifted views.
Weights are magnitude-pruned to --sparsity ("N:M" patterns: the N largest of every M). Prints one
row per case and writes JSON with the machine, commit and versions when --json is given.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import pyhwp
from pyhwp.bench.timing import interleaved_medians
from pyhwp.formats import patterns
from pyhwp.info import build_info
from pyhwp.kernels import find_kernel
from pyhwp.ops.linear import MATMULS

# ResNet-50 (../shared/BENCHMARKS.md): (in, out, kernel, stride, padding, height = width).
SHAPES = [(64, 64, 3, 1, 1, 56), (128, 128, 3, 1, 1, 28), (256, 256, 3, 1, 1, 14),
          (256, 1024, 1, 1, 0, 14), (512, 2048, 1, 1, 0, 7)]
# ResNet-50's strided convs (torchvision v1.5: the stride on the 3x3), --strided: the stem, the first
# 3x3 of stages 2-4 and their 1x1 projections.
STRIDED_SHAPES = [(3, 64, 7, 2, 3, 224), (128, 128, 3, 2, 1, 56), (256, 256, 3, 2, 1, 28), (512, 512, 3, 2, 1, 14),
                  (256, 512, 1, 2, 0, 56), (512, 1024, 1, 2, 0, 28), (1024, 2048, 1, 2, 0, 14)]


def prune(w: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    """Magnitude pruning: "N:M" keeps the N largest of every M along the flattened input dim (of
    a partial last group too); other patterns keep the largest (1 - sparsity) of all weights."""
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    w2 = w.reshape(w.shape[0], -1)
    if m:
        keep, group = int(m[1]), int(m[2])
        g = F.pad(w2, (0, -w2.shape[1] % group)).reshape(w.shape[0], -1, group)
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(keep, -1).indices, True)
        return (g * mask).flatten(1)[:, :w2.shape[1]].reshape(w.shape)
    k = round(sparsity * w2.numel())
    if k == 0:
        return w.clone()
    cut = w2.abs().flatten().kthvalue(k).values
    return torch.where(w.abs() > cut, w, torch.zeros((), dtype=w.dtype))


def peak_gflops(dtype: torch.dtype = torch.float32) -> float:
    """The machine's GEMM rate in `dtype` in this run (torch.mm 2048^3), the ceiling for '% of peak'."""
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    t = interleaved_medians({"mm": lambda: torch.mm(a, b)}, budget_s=0.5)["mm"]
    return 2 * 2048**3 / t / 1e9


def run_case(cin, cout, k, stride, pad, hw, batch, pattern, sparsity, budget_s, peak, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = prune(torch.randn(cout, cin, k, k, generator=g), pattern, sparsity).to(dtype)
    sw = pyhwp.to_sparse(w, pattern)
    x = torch.randn(batch, cin, hw, hw, generator=g).to(dtype)
    fns = {"dense": lambda: F.conv2d(x, w, None, stride, pad),
           "pyhwp": lambda: pyhwp.conv2d(x, sw, None, stride, pad)}
    ho = (hw + 2 * pad - k) // stride + 1
    if k > 1:
        matmul = MATMULS[find_kernel("conv2d", pattern, x.device, x.dtype).name]
        im2col = sys.modules["pyhwp.ops.conv2d"]._im2col
        args = ((k, k), (1, 1), (pad, pad), (stride, stride), (ho, ho))
        cols = [im2col(x[i], *args) for i in range(batch)]
        fns["im2col"] = lambda: [im2col(x[i], *args) for i in range(batch)]
        fns["gemm"] = lambda: [matmul(c.t(), sw, None, True) for c in cols]
        taps = sw.kernel_taps() if stride == 1 else None
        if taps is not None:  # the per-tap path (autograd, NaN/Inf inputs), whole
            shifted = sys.modules["pyhwp.ops.conv2d"]._shifted_conv
            fns["taps"] = lambda: shifted(matmul, taps, x, None, (pad,) * 4, (1, 1), (k, k), (hw, hw))
    t = interleaved_medians(fns, budget_s=budget_s)
    dense_flop = 2 * cout * cin * k * k * ho * ho * batch
    useful_flop = 2 * sw.nnz * ho * ho * batch
    return {
        "shape": f"{cin}->{cout} {k}x{k}{f'/{stride}' if stride > 1 else ''} @{hw}x{hw}",
        "batch": batch, "pattern": pattern,
        "sparsity": round(sw.sparsity, 4), "dtype": str(dtype).removeprefix("torch."),
        "ms": {name: round(v * 1e3, 4) for name, v in t.items()},
        "speedup_vs_dense": round(t["dense"] / t["pyhwp"], 3),
        "useful_gflops": round(useful_flop / t["pyhwp"] / 1e9, 2),
        "dense_equiv_gflops": round(dense_flop / t["pyhwp"] / 1e9, 2),
        "pct_peak_useful": round(100 * useful_flop / t["pyhwp"] / 1e9 / peak, 1),
        "dense_gflops": round(dense_flop / t["dense"] / 1e9, 2),
    }


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pattern", nargs="+", default=list(patterns()), choices=list(patterns()))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case")
    ap.add_argument("--threads", type=int, help="torch and pyhwp threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and input (bfloat16 k x k convs run on AMX where the CPU has it)")
    ap.add_argument("--strided", action="store_true", help="ResNet-50's strided convs instead of BENCHMARKS.md's")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    peak = peak_gflops(dtype)
    print(f"{args.dtype} GEMM peak in this run: {peak:.0f} GFLOP/s; {torch.get_num_threads()} threads")
    print(f"{'shape':28} {'batch':>5} {'pattern':>7} {'dense ms':>9} {'pyhwp ms':>9} {'im2col':>8} "
          f"{'gemm':>8} {'taps':>8} {'x dense':>8} {'GFLOP/s':>8} {'%peak':>6}")
    results = []
    for batch in args.batch:
        for shape in STRIDED_SHAPES if args.strided else SHAPES:
            for pattern in args.pattern:
                r = run_case(*shape, batch, pattern, args.sparsity, args.budget, peak, dtype)
                results.append(r)
                ms = r["ms"]
                print(f"{r['shape']:28} {batch:>5} {pattern:>7} {ms['dense']:>9.3f} {ms['pyhwp']:>9.3f} "
                      f"{ms.get('im2col', float('nan')):>8.3f} {ms.get('gemm', float('nan')):>8.3f} "
                      f"{ms.get('taps', float('nan')):>8.3f} "
                      f"{r['speedup_vs_dense']:>7.2f}x {r['useful_gflops']:>8.1f} {r['pct_peak_useful']:>6.1f}",
                      flush=True)
    if args.json:
        info = build_info()
        args.json.write_text(json.dumps({"bench": "conv2d", "commit": commit(), "machine": info,
                                         "dtype": args.dtype, "peak_gflops": round(peak, 1),
                                         "sparsity": args.sparsity,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
