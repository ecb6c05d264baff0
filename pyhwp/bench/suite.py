"""`pyhwp bench`: runs a suite of cases (with a progress bar), prints the report, writes JSON."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from pyhwp import cli_types
from pyhwp.bench import dlmc, isa, report
from pyhwp.bench.cold import CacheEvictor
from pyhwp.bench.cases import Case, suite_cases
from pyhwp.bench.runner import Machine, measure_overhead, run_case

# Seconds of interleaved timing per case: enough rounds for a stable median of every contender.
BUDGET_S = {"quick": 0.25, "full": 0.5, "tiny": 0.01}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", type=cli_types.device, help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--suite", default="quick", choices=("quick", "full", "tiny"),
                   help="quick: the target table (< 2 min on 2 cores); full: every shape x batch x "
                        "sparsity x pattern; tiny: a seconds-long smoke run")
    p.add_argument("--json", metavar="FILE", type=cli_types.output_file, help="also write the results as JSON")
    p.add_argument("--threads", type=cli_types.positive_int,
                   help="threads for pyhwp and torch (default torch.get_num_threads())")
    p.add_argument("--dlmc", metavar="DIR", default=None,
                   help=f"DLMC subset directory (default {dlmc.default_path()}); 'none' skips it")
    p.add_argument("--filter", metavar="TEXT", help="only cases whose name contains TEXT")
    p.add_argument("--budget", type=cli_types.positive_float, metavar="S", help="seconds of timing per case")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cold", action="store_true",
                   help="evict the CPU caches (a pass over twice the last-level cache) before every "
                        "timed call, as in a model whose weights exceed the cache (CPU only)")
    p.add_argument("--isa", choices=sorted(isa.TORCH_CAPS),
                   help="cap pyhwp's kernels and torch's baselines at this instruction set (CPU): an "
                        "AVX-512 machine then measures what an AVX2 CPU would")


def run_suite(cases: list[Case], device: str, *, suite: str = "custom", budget_s: float = 0.25,
              threads: int | None = None, progress: bool = True, overhead: bool = True,
              isa_cap: dict | None = None, cold: bool = False) -> dict:
    """Measure the machine, then every case; returns the result document (report.finish).
    `isa_cap`: what `isa.apply` returned, when the run is capped (recorded in the metadata).
    `cold`: evict the caches before every timed call of the cases (bench/cold.py; CPU only),
    recorded in the metadata as the bytes of each eviction."""
    if cold and device != "cpu":
        raise ValueError(f"cold-cache timing evicts the CPU caches; it needs device 'cpu', got {device!r}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    meta = report.metadata(device, suite, threads)
    if isa_cap is not None:
        meta["isa_cap"] = isa_cap
    evict = CacheEvictor() if cold else None
    if evict is not None:
        meta["cold_evict_bytes"] = evict.nbytes
    dtypes = sorted({c.dtype for c in cases} | {"float32"})
    machine = Machine.measure(device, dtypes, budget_s=min(0.5, max(budget_s, 0.05)), small=suite == "tiny")
    rows = []
    bar = tqdm(cases, desc="pyhwp bench", unit="case", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(case.name, refresh=False)
        rows.append(run_case(case, device, machine, budget_s, before=evict))
    over = measure_overhead(device, budget_s=min(0.5, max(budget_s, 0.05))) \
        if overhead and device == "cpu" else None
    return report.finish(meta, asdict(machine), rows, over)


def main(args: argparse.Namespace) -> int:
    device = args.device
    isa_cap = None
    if args.isa:
        if device != "cpu":
            print("pyhwp bench: --isa caps the CPU kernels; it needs --device cpu", file=sys.stderr)
            return 2
        if isa.needs_restart(args.isa):
            isa.restart(args.isa, args.argv)
        isa_cap = isa.apply(args.isa)
    if args.cold and device != "cpu":
        print("pyhwp bench: --cold evicts the CPU caches; it needs --device cpu", file=sys.stderr)
        return 2
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("pyhwp bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    cases = suite_cases(args.suite, device, threads)
    if args.suite != "tiny" and (args.dlmc or "").lower() != "none":
        root = Path(args.dlmc) if args.dlmc else dlmc.default_path()
        found = dlmc.dlmc_cases(root)
        if found:
            cases = [c for c in cases if c.section != "scaling"] + found + \
                [c for c in cases if c.section == "scaling"]
        else:
            print(f"pyhwp bench: no DLMC matrices under {root}; the DLMC section is skipped "
                  "(pass --dlmc DIR)", file=sys.stderr)
    if args.filter:
        cases = [c for c in cases if args.filter in c.name]
        if not cases:
            print(f"pyhwp bench: no case of the {args.suite} suite on {device} has {args.filter!r} in its name "
                  "(case names look like 'linear 1536x384 b1 csr 90%')", file=sys.stderr)
            return 2
    budget = args.budget if args.budget is not None else BUDGET_S[args.suite]
    result = run_suite(cases, device, suite=args.suite, budget_s=budget, threads=args.threads,
                       progress=not args.no_progress, isa_cap=isa_cap, cold=args.cold)
    print(report.render(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"\nwrote {args.json}")
    return 0
