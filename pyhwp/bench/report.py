"""Benchmark results: run metadata, the printed tables and the JSON file."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

import torch

from pyhwp.bench.targets import evaluate, geomean
from pyhwp.info import build_info, format_table

SECTIONS = ("linear", "conv", "bf16", "fp16", "dlmc", "scaling")


def git_commit() -> str | None:
    """The commit of the checkout pyhwp runs from (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty else "")


def metadata(device: str, suite: str, threads: int) -> dict:
    """Device, CPU model/ISA, threads, versions, commit and date of a run."""
    info = build_info()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "suite": suite,
        "device": device,
        "cpu": info["cpu"],
        "isa": info["isa"],
        "threads": threads,
        "torch": info["torch"],
        "pyhwp": info["pyhwp"],
        "python": info["python"],
        "compiler": info["compiler"],
        "git_commit": git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return meta


def _fmt(v, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def table_rows(rows: list[dict]) -> list[dict]:
    """The printed form of measured rows (one line per case)."""
    out = []
    for r in rows:
        if "skipped" in r:
            continue
        ratio = r["ratio"]
        line = {
            "case": r["name"],
            "time_us": _fmt(r["time_s"]["pyhwp"] * 1e6, ".1f"),
            "useful GF/s": _fmt(r["useful_gflops"], ".1f"),
            "dense-eq GF/s": _fmt(r["dense_equiv_gflops"], ".1f"),
            "vs dense": _fmt(ratio.get("torch_dense"), ".2f", "x"),
            "vs torch CSR": _fmt(ratio.get("torch_csr"), ".2f", "x"),
        }
        if r.get("device", "cpu").startswith("cuda"):
            line["vs torch 2:4"] = _fmt(ratio.get("torch_24"), ".2f", "x")
        line["% peak"] = _fmt(r.get("pct_peak"), ".1f")
        line["% bw"] = _fmt(r.get("pct_bw"), ".0f")
        out.append(line)
    return out


def dlmc_summary(rows: list[dict]) -> dict:
    """Geometric means of pyhwp's speedup over each baseline on the DLMC rows, overall and per model."""
    measured = [r for r in rows if r.get("section") == "dlmc" and "skipped" not in r]
    groups = {"all": measured}
    for r in measured:
        groups.setdefault(r["name"].split()[1].split("/")[0], []).append(r)
    out = {}
    for g, rs in groups.items():
        out[g] = {"matrices": len(rs)}
        for b in ("torch_dense", "torch_csr"):
            vals = [r["ratio"][b] for r in rs if b in r["ratio"]]
            out[g][b] = geomean(vals) if vals else None
    return out


def scaling_summary(rows: list[dict]) -> list[dict]:
    """Per scaling case: time at 1 thread over time at n threads, for pyhwp and each baseline."""
    measured = [r for r in rows if r.get("section") == "scaling" and "skipped" not in r]
    by_case: dict[str, dict[int, dict]] = {}
    for r in measured:
        by_case.setdefault(r["name"].rsplit(" t", 1)[0], {})[r["threads"]] = r
    out = []
    for name, runs in by_case.items():
        if 1 not in runs or len(runs) < 2:
            continue
        n = max(runs)
        one, many = runs[1]["time_s"], runs[n]["time_s"]
        out.append({"case": name, "threads": n,
                    **{f"{k} speedup": one[k] / many[k] for k in one if k in many}})
    return out


def render(result: dict) -> str:
    """The full text report of a run: metadata, one table per section, DLMC geomeans, scaling,
    overhead, targets, and the skipped cases grouped by reason."""
    meta, rows = result["meta"], result["rows"]
    m = result.get("machine", {})
    cap = meta.get("isa_cap")
    kernels = meta["isa"]["active"] if cap is None else \
        f"{cap['pyhwp']}; torch capped at {cap['torch_capability']}"
    lines = [f"pyhwp bench --suite {meta['suite']} on {meta['device']}: {meta['cpu']} "
             f"(kernels: {kernels}), {meta['threads']} threads, torch {meta['torch']}, "
             f"pyhwp {meta['pyhwp']}, commit {meta['git_commit']}, {meta['date']}"]
    if m:
        peaks = ", ".join(f"{d} {v:.0f} GFLOP/s" for d, v in m.get("peak_gflops", {}).items())
        lines.append(f"measured ceilings: dense GEMM {peaks}; copy {m.get('copy_gbs', float('nan')):.1f} GB/s")
    if meta.get("cold_evict_bytes"):
        lines.append(f"cold caches: {meta['cold_evict_bytes'] / 2**20:.0f} MiB read and written before every timed "
                     "call (--cold)")
    lines.append("ratios: pyhwp speedup over each baseline, medians of interleaved runs; "
                 "% peak: useful GFLOP/s over the measured GEMM rate; % bw: batch-1 bytes over copy bandwidth")
    for section in SECTIONS:
        sec = [r for r in rows if r.get("section") == section]
        printed = table_rows(sec)
        if printed:
            lines += ["", f"== {section}", format_table(printed)]
    if any(r.get("section") == "dlmc" and "skipped" not in r for r in rows):
        lines += ["", "== DLMC geometric means (pyhwp speedup)"]
        lines.append(format_table([{"model": k, "matrices": v["matrices"],
                                    "vs dense": _fmt(v["torch_dense"], ".2f", "x"),
                                    "vs torch CSR": _fmt(v["torch_csr"], ".2f", "x")}
                                   for k, v in result["dlmc"].items()]))
    if result.get("scaling"):
        lines += ["", "== thread scaling (time at 1 thread / time at n threads)"]
        lines.append(format_table([{k: (_fmt(v, ".2f", "x") if isinstance(v, float) else v) for k, v in s.items()}
                                   for s in result["scaling"]]))
    if result.get("overhead"):
        o = result["overhead"]
        med = o["median_us"]
        lines += ["", f"== Python overhead ({o['case']}): pyhwp.linear {med['pyhwp.linear']:.1f} us, custom op "
                      f"{med['custom_op']:.1f} us, kernel {med['kernel']:.1f} us, dense F.linear "
                      f"{med['torch_dense']:.1f} us -> overhead {o['overhead_us']:.1f} us "
                      f"(op dispatch {o['op_dispatch_us']:.1f}, linear wrapper {o['linear_wrapper_us']:.1f})"]
    if result.get("targets"):
        lines += ["", "== targets (CPU, fp32; BENCHMARKS.md)"]
        lines.append(format_table([{
            "kernel": t["kernel"], "case": t["case"], "vs": t["baseline"], "need": f">= {t['minimum']}x",
            "measured": _fmt(t["value"], ".2f", "x") + (" (geomean)" if t["how"] == "geomean" else ""),
            "rows": t["rows"], "status": t["status"]} for t in result["targets"]]))
    skipped: dict[str, list[str]] = {}
    for r in rows:
        if "skipped" in r:
            skipped.setdefault(r["skipped"], []).append(r["name"])
    if skipped:
        lines += ["", "== skipped"]
        for reason, names in skipped.items():
            lines.append(f"{len(names)} case(s): {reason}  (e.g. {names[0]})")
    dropped = {(b, why) for r in rows for b, why in r.get("baseline_skipped", {}).items()}
    for b, why in sorted(dropped):
        lines.append(f"baseline {b} not run in some cases: {why}")
    return "\n".join(lines)


def finish(meta: dict, machine: dict, rows: list[dict], overhead: dict | None) -> dict:
    """The result document: metadata, machine ceilings, rows and the derived summaries."""
    return {"meta": meta, "machine": machine, "rows": rows, "dlmc": dlmc_summary(rows),
            "scaling": scaling_summary(rows), "overhead": overhead,
            "targets": evaluate(rows) if meta["device"] == "cpu" else []}


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1, default=str) + "\n")
