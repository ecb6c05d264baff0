"""`pyhwp profile`: measure the machine, sweep sparsities per pattern, print ceilings and crossovers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyhwp import cli_types

_SHAPES_HELP = ('JSON list of cases, e.g. [{"op": "linear", "shape": [4096, 4096], "batch": 1}, '
                '{"op": "conv2d", "shape": [64, 64, 3, 3, 56, 56], "batch": 1, "sparsities": [0.8, 0.9]}]')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", type=cli_types.device, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--json", metavar="FILE", type=cli_types.output_file,
                   help="write the profile, latency tables and crossovers as JSON")
    p.add_argument("--shapes", metavar="FILE", help=_SHAPES_HELP)
    p.add_argument("--plot", metavar="FILE.png", type=cli_types.output_file,
                   help="write a roofline plot (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="smaller GEMMs, shapes and sweep (about 20 s)")
    p.add_argument("--dtype", default="float32", help="dtype of the kernel sweep (default float32)")
    p.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    p.add_argument("--cache-dir", metavar="DIR", help="cache directory (default $XDG_CACHE_HOME/pyhwp)")


def read_shapes(path: str) -> list[tuple]:
    """Cases of a --shapes file as (op, shape, batch, sparsities or None); ValueError naming the bad entry."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--shapes {path}: cannot read a JSON list ({exc})") from exc
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"--shapes {path}: expected a non-empty JSON list of cases; {_SHAPES_HELP}")
    out = []
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict) or "shape" not in entry or "batch" not in entry:
            raise ValueError(f"--shapes {path}: entry {i} must be an object with shape and batch, got {entry!r}")
        unknown = set(entry) - {"op", "shape", "batch", "sparsities"}
        if unknown:
            raise ValueError(f"--shapes {path}: entry {i} has unknown keys {sorted(unknown)}")
        shape = entry["shape"]
        out.append((entry.get("op", "linear"), tuple(shape) if isinstance(shape, list) else shape, entry["batch"],
                    entry.get("sparsities")))
    return out


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % (scale // 4) == 0:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def summary(prof, crossovers, sweep_dtype: str, cached: bool) -> str:
    """The readable report: device, ceilings, ridge point, power, crossover table."""
    cc = prof.compute_capability
    lines = [f"pyhwp profile: {prof.device}, {prof.name}" + ("" if cc is None else f" (compute capability {cc[0]}.{cc[1]})")]
    if prof.device == "cpu":
        isa = prof.isa
        flags = [k for k in ("avx2", "avx512", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16") if isa.get(k)]
        lines.append(f"  {prof.cores} cores, {prof.threads} threads (torch uses {prof.torch_threads}); "
                     f"ISA {' '.join(flags) or 'baseline'} (pyhwp kernels use {isa.get('active')})")
    else:
        lines.append(f"  {prof.cores} SMs")
    if prof.caches:
        lines.append("  caches " + ", ".join(f"{k} {_size(v['size_bytes'])}" for k, v in prof.caches.items()))
    how = f"cached, measured {prof.measured_at}" if cached else f"measured now{', quick' if prof.quick else ''}"
    lines += ["", f"ceilings ({how})"]
    dtypes = sorted(prof.peak_gflops, key=lambda k: (k != "float32", k))
    peaks = "   ".join(f"{k} {prof.peak_gflops[k]:,.1f}" for k in dtypes)
    lines.append(f"  dense GEMM    {peaks} GFLOP/s")
    for key, why in prof.missing.items():
        if key.startswith("peak_gflops."):
            lines.append(f"                {key.split('.', 1)[1]}: not measured, {why}")
    bw = prof.bandwidth_gbps
    lines.append(f"  bandwidth     read {bw['read']:.1f}   write {bw['write']:.1f}   copy {bw['copy']:.1f} GB/s   "
                 f"(arrays of {_size(prof.method['bandwidth_array_bytes'])}: {prof.method['bandwidth_array_reason']})")
    ridges = "   ".join(f"{k} {prof.ridge_point(k):.1f}" for k in dtypes)
    lines.append(f"  ridge point   {ridges} flop/byte (peak / copy bandwidth)")
    if prof.power:
        lines.append(f"  power         {prof.power['source']}: idle {prof.power['idle_w']:.1f} W, "
                     f"load {prof.power['load_w']:.1f} W ({prof.power['load']})")
    else:
        lines.append(f"  power         not measured: {prof.missing.get('power')}")
    if not crossovers:
        return "\n".join(lines)
    sparsities = sorted({s for c in crossovers for k in (c.speedup, *c.per_kernel.values()) for s in k})
    lines += ["", f"sparse vs dense ({sweep_dtype}): speedup over the fastest dense kernel, measured interleaved; "
                  "'best' = the fastest kernel of the pattern"]
    header = ["shape", "batch", "pattern", "kernel", *[f"{s:.0%}" for s in sparsities], "beats dense from"]
    rows = []
    for c in crossovers:
        shape = "x".join(map(str, c.shape))
        rows.append([shape, str(c.batch), c.pattern, "best", *[_ratio(c.speedup.get(s)) for s in sparsities],
                     c.verdict])
        for k, v in c.per_kernel.items():
            rows.append(["", "", "", k, *[_ratio(v.get(s)) for s in sparsities], c.kernel_verdicts[k]])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        lines.append("  " + "  ".join(cell.rjust(w) if 3 < i < len(header) - 1 else cell.ljust(w)
                                      for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def energy_lines(results) -> list[str]:
    """Energy per inference (measured power x median time) of every kernel that has it."""
    lines = []
    for r in results:
        for t in r.timings.values():
            if t.energy_j is not None:
                lines.append(f"  {r.op} {'x'.join(map(str, r.shape))} b{r.batch} {r.pattern}@{r.sparsity:.0%} "
                             f"{t.kernel}: {t.energy_j * 1e3:.3f} mJ ({t.power_w:.1f} W x {t.median_s * 1e3:.3f} ms)")
    return lines


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pyhwp.hardware.device import resolve_device
    from pyhwp.hardware.profile import PROFILE_STEPS, profile
    from pyhwp.hardware.sweep import (DEFAULT_CASES, DEFAULT_SPARSITIES, QUICK_CASES, QUICK_SPARSITIES, plan,
                                      run_sweep)

    try:
        resolve_device(args.device)
        cases = read_shapes(args.shapes) if args.shapes else list(QUICK_CASES if args.quick else DEFAULT_CASES)
        sparsities = QUICK_SPARSITIES if args.quick else DEFAULT_SPARSITIES
        todo = plan(cases, sparsities, resolve_device(args.device), args.dtype)
        if args.plot:
            import matplotlib  # noqa: F401 - fail before measuring, not after
    except ImportError:
        print("pyhwp profile: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:
        print(f"pyhwp profile: {exc}", file=sys.stderr)
        return 2

    budget = 0.2 if args.quick else 0.5
    # The bar names the step running now: labels[i] runs after i updates.
    labels = [*PROFILE_STEPS, *(f"{op} {'x'.join(map(str, shape))} b{batch} {pattern} {s:.0%}"
                                for op, shape, batch, pattern, s in todo)]
    bar = tqdm(total=len(labels), desc="profile", unit="step", file=sys.stderr, postfix=labels[0])
    steps = []

    def advance(n: int = 1) -> None:
        bar.update(n)
        if bar.n < len(labels):
            bar.set_postfix_str(labels[bar.n])

    def on_step(name: str) -> None:
        steps.append(name)
        advance()

    prof = profile(args.device, quick=args.quick, cache_dir=args.cache_dir, refresh=args.refresh, progress=on_step)
    if len(steps) < len(PROFILE_STEPS):  # read from the cache
        advance(len(PROFILE_STEPS) - len(steps))
    results, crossovers = run_sweep(prof, cases, sparsities, args.dtype, budget_s=budget, refresh=args.refresh,
                                    on_case=lambda case: advance())
    bar.close()

    print(summary(prof, crossovers, args.dtype, cached=not steps))
    energy = energy_lines(results)
    if energy:
        print("\nenergy per inference (measured power x median time)")
        print("\n".join(energy))
    elif results:
        print(f"\nenergy per inference: absent ({results[0].energy_note})")
    if args.json:
        doc = {"profile": prof.to_dict(), "latency": [r.to_dict() for r in results],
               "crossovers": [c.to_dict() for c in crossovers]}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        from pyhwp.hardware.roofline import plot_roofline

        plot_roofline(prof, results, args.plot, dtype=args.dtype if args.dtype in prof.peak_gflops else "float32")
        print(f"wrote {args.plot}")
    return 0
