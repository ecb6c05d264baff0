"""The optimization report: per-layer choices and model-level results as JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from pyhwp.metrics import performance_change


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the model's state (parameters and buffers; sparse tensors by their arrays)."""
    total = 0
    for t in model.state_dict().values():
        if t.layout == torch.sparse_csr:
            parts = (t.crow_indices(), t.col_indices(), t.values())
        elif t.is_sparse:
            parts = (t._indices(), t._values())
        else:
            parts = (t,)
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


def _label(c) -> str:
    return "dense" if c.pattern == "dense" else f"{c.pattern}@{c.sparsity:g}"


@dataclass
class OptimizeReport:
    """What pyhwp.optimize did and measured. `data` is the JSON document; see to_markdown for its reading."""

    data: dict = field(default_factory=dict)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, *, infos, cands, skipped, plan, masks, retimed, e2e, before, after, metric_name, baseline_eval,
              eval_after, search_log, hardware, device, batch_size, dense_bytes, optimized_bytes, folded, finetuned,
              max_accuracy_drop, latency_budget, seconds) -> OptimizeReport:
        import pyhwp

        layers = []
        for name, info in infos.items():
            pick = plan[name]
            dense = next(c for c in cands[name] if c.pattern == "dense")
            m = masks.get(name)
            rt = retimed.get(name, {})
            times = rt.get("times_s", {})
            layers.append({
                "name": name, "op": info.op, "weight_shape": list(info.weight_shape),
                "input_shape": list(info.input_shape), "gemm": list(info.gemm_shape),
                "pattern": pick.pattern, "sparsity": pick.sparsity,
                "weight_sparsity": None if m is None else 1.0 - float(m.float().mean()),
                "kernel": pick.kernel, "provider": pick.extra.get("provider"),
                "latency_s": pick.latency_s, "dense_latency_s": dense.latency_s,
                "table_latency_s": pick.extra.get("table_latency_s", pick.latency_s),
                "speedup": dense.latency_s / pick.latency_s if pick.latency_s else None,
                "cost": pick.cost, "saliency": pick.extra.get("saliency"), "timed_as": pick.extra.get("timed_as"),
                "retimed_pick_s": times.get(_label(pick)), "retimed_dense_s": times.get("dense"),
                "retime_check": {k: v for k, v in rt.items() if k != "times_s"} or None,
                "candidates": [{"pattern": c.pattern, "sparsity": c.sparsity, "kernel": c.kernel,
                                "provider": c.extra.get("provider"), "latency_s": c.latency_s,
                                "table_latency_s": c.extra.get("table_latency_s", c.latency_s), "cost": c.cost,
                                "saliency": c.extra.get("saliency"), "retimed_s": times.get(_label(c)),
                                "useful": any(u is c for u in _useful(cands[name]))} for c in cands[name]],
                "not_offered": skipped.get(name, {}),
            })
        opt_s = e2e["optimized"]
        latency = {"median_s": dict(e2e), "speedup": {k: v / opt_s for k, v in e2e.items() if k != "optimized"}}
        energy = None
        power_note = None
        if hardware is not None:
            per = {k: hardware.energy_per_inference(v) for k, v in e2e.items()}
            energy = per if all(v is not None for v in per.values()) else None
            power_note = None if energy else hardware.missing.get("power", "no power measurement in the profile")
        checks = [layer["retime_check"] for layer in layers if layer["retime_check"]]
        data = {
            "pyhwp_version": pyhwp.__version__, "torch_version": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device, "hardware": None if hardware is None else {
                "name": hardware.name, "cores": hardware.cores, "threads": hardware.threads,
                "torch_threads": hardware.torch_threads, "isa": hardware.isa, "peak_gflops": hardware.peak_gflops,
                "bandwidth_gbps": hardware.bandwidth_gbps},
            "machine_load": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(), "batch_size": batch_size, "seconds": seconds,
            "budget": {"max_accuracy_drop": max_accuracy_drop, "latency_budget_s": latency_budget},
            "accuracy": {"metric": metric_name, "before": before, "after": after,
                         "drop": None if before is None else before - after,
                         "change_pct": None if not before else performance_change(before, after),
                         "search_metric_before": baseline_eval, "search_metric_after": eval_after},
            "latency": latency,
            "bytes": {"dense": dense_bytes, "optimized": optimized_bytes,
                      "compression": dense_bytes / optimized_bytes if optimized_bytes else None},
            "energy_j": energy, "energy_note": power_note,
            "steps": {"batchnorm_folded": folded, "finetuned": finetuned},
            "retime_check": {"layers": len(checks), "passed": sum(1 for c in checks if c["passes"]),
                             "tolerance": checks[0]["tolerance"] if checks else None},
            "layers": layers, "search": search_log,
        }
        return cls(data)

    # -- output --------------------------------------------------------------------------------
    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.data, indent=2, default=_jsonable)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def summary(self) -> str:
        d = self.data
        lat, acc = d["latency"], d["accuracy"]
        lines = [f"end-to-end latency at batch {d['batch_size']} on {d['device']}: "
                 + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in lat["median_s"].items())]
        lines.append("speedup of the optimized model: "
                     + ", ".join(f"{v:.2f}x over {k}" for k, v in lat["speedup"].items()))
        if acc["before"] is not None:
            lines.append(f"accuracy ({acc['metric']}): {acc['before']:.2f} -> {acc['after']:.2f} "
                         f"(drop {acc['drop']:.2f}, change {acc['change_pct']:+.2f}%)")
        b = d["bytes"]
        lines.append(f"model bytes: {b['dense']:,} -> {b['optimized']:,} ({b['compression']:.2f}x smaller)")
        rc = d["retime_check"]
        if rc["layers"]:
            lines.append(f"re-timing check: {rc['passed']}/{rc['layers']} layers' picks within "
                         f"{(rc['tolerance'] - 1) * 100:.0f}% of the fastest admissible candidate")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        d = self.data
        hw = d["hardware"] or {}
        out = ["# pyhwp optimization report", "",
               f"Device `{d['device']}` ({hw.get('name', '?')}, {hw.get('cores', '?')} cores, torch threads "
               f"{hw.get('torch_threads', '?')}), batch {d['batch_size']}, pyhwp {d['pyhwp_version']}, torch "
               f"{d['torch_version']}, {d['created']}. Load average while running: {d['machine_load']}. "
               f"Pipeline time {d['seconds']:.0f} s. All latencies are medians of interleaved runs; only ratios "
               "measured in one run are comparable on a shared machine.", "",
               "## Model", "", "```", self.summary(), "```", ""]
        if d["energy_j"]:
            out += ["Energy per inference (measured load power x latency): "
                    + ", ".join(f"{k} {v * 1e3:.3f} mJ" for k, v in d["energy_j"].items()), ""]
        else:
            out += [f"Energy: not measurable here ({d['energy_note']}).", ""]
        out += [f"Steps: BatchNorm folded into convs: {d['steps']['batchnorm_folded']}; fine-tuned with masks held: "
                f"{d['steps']['finetuned']}.", "", "## Layers", "",
                "| layer | op | weight | input | pattern | sparsity | kernel | table latency | chosen on | dense | "
                "speedup | re-timed pick / dense | proxy cost | re-time check |",
                "| --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for ly in d["layers"]:
            rt = ly["retime_check"]
            rts = (f"{ly['retimed_pick_s'] * 1e6:.0f} / {ly['retimed_dense_s'] * 1e6:.0f} us"
                   if ly["retimed_pick_s"] is not None and ly["retimed_dense_s"] is not None else "-")
            check = "-" if not rt else (f"{'pass' if rt['passes'] else 'FAIL'} ({rt['ratio']:.2f}x of "
                                        f"{rt['fastest_admissible']})")
            out.append(f"| {ly['name']} | {ly['op']} | {'x'.join(map(str, ly['weight_shape']))} | "
                       f"{'x'.join(map(str, ly['input_shape']))} | {ly['pattern']} | "
                       f"{(ly['weight_sparsity'] if ly['weight_sparsity'] is not None else ly['sparsity']):.2f} | "
                       f"{ly['kernel']} ({ly['provider']}) | {ly['table_latency_s'] * 1e6:.0f} us | "
                       f"{ly['latency_s'] * 1e6:.0f} us | "
                       f"{ly['dense_latency_s'] * 1e6:.0f} us | {_x(ly['speedup'])} | {rts} | {ly['cost']:.4f} | "
                       f"{check} |")
        out += ["", "Table latency: from the cached kernel latency tables (each pattern's ratio to dense in its own "
                "run, times the layer's dense latency; channel removal: the layer at the kept width plus the change it "
                "causes in its consumers run dense, at least 0). Chosen on: the latency the solver used: the "
                "candidates within 1.5x of dense in the tables re-measured in one interleaved run on the layer's own "
                "weights and masks (consumers dense). Re-timed, afterwards and independently: every candidate of "
                "the layer timed again in one interleaved run on the layer's own weights, masks and conv "
                "parameters; where the layer's channels can be removed, each candidate's time includes its "
                "consumers as picked, reading the input width the candidate leaves them. The check passes when the "
                "pick is within the tolerance of the fastest re-timed candidate that costs no more accuracy (proxy "
                "cost <= the pick's).", "",
                "## Every candidate", ""]
        for ly in d["layers"]:
            out += [f"### {ly['name']} ({ly['op']} {'x'.join(map(str, ly['weight_shape']))})", "",
                    "| candidate | kernel | table latency | chosen on | re-timed | proxy cost | pruned saliency "
                    "| on the frontier |",
                    "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
            for c in ly["candidates"]:
                name = "dense" if c["pattern"] == "dense" else f"{c['pattern']}@{c['sparsity']:g}"
                mark = " **(pick)**" if c["pattern"] == ly["pattern"] and c["sparsity"] == ly["sparsity"] else ""
                rt = "-" if c["retimed_s"] is None else f"{c['retimed_s'] * 1e6:.0f} us"
                out.append(f"| {name}{mark} | {c['kernel']} ({c['provider']}) | {c['table_latency_s'] * 1e6:.0f} us | "
                           f"{c['latency_s'] * 1e6:.0f} us | {rt} | "
                           f"{c['cost']:.4f} | {c['saliency'] or 0:.4f} | {'yes' if c['useful'] else 'no'} |")
            if ly["not_offered"]:
                out += ["", "Not offered: " + "; ".join(f"{k}: {v}" for k, v in ly["not_offered"].items())]
            out.append("")
        if d["search"]:
            out += ["## Budget search", "", "| plan | stage | predicted layer latency | proxy cost | metric | drop |",
                    "| ---: | --- | ---: | ---: | ---: | ---: |"]
            for s in d["search"]:
                if "plan" not in s:
                    out.append(f"| - | {s['stage']} | {s.get('layers_budget_s', 0) * 1e3:.2f} ms budget | - | - | - |")
                    continue
                pl = s.get("predicted_latency_s")
                out.append(f"| {s['plan']} | {s['stage']} | {'-' if pl is None else f'{pl * 1e3:.2f} ms'} | "
                           f"{s.get('cost', float('nan')):.4f} | {s['metric']:.2f} | {s['drop']:.2f} |")
            out.append("")
        return "\n".join(out)

    def plot(self, folder: str | Path) -> list[Path]:
        """layers.png (dense vs chosen, table and re-timed, per layer; end-to-end) and candidates.png
        (each layer's candidates: latency vs proxy cost). Needs matplotlib; returns the files written."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder = Path(folder)
        d = self.data
        layers = d["layers"]
        names = [ly["name"] for ly in layers]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
        xs = range(len(layers))
        w = 0.2
        series = [("dense (chosen on)", [ly["dense_latency_s"] for ly in layers]),
                  ("pick (chosen on)", [ly["latency_s"] for ly in layers]),
                  ("dense (re-timed)", [ly["retimed_dense_s"] or 0 for ly in layers]),
                  ("pick (re-timed)", [ly["retimed_pick_s"] or 0 for ly in layers])]
        for i, (lab, vals) in enumerate(series):
            ax.bar([x + (i - 1.5) * w for x in xs], [v * 1e3 for v in vals], w, label=lab)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{n}\n{ly['pattern']}" + (f"@{ly['sparsity']:g}" if ly["pattern"] != "dense" else "")
                            for n, ly in zip(names, layers)], fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"per layer, batch {d['batch_size']} on {d['device']}")
        ax.legend(fontsize=8)
        e2e = d["latency"]["median_s"]
        ax2.bar(list(e2e), [v * 1e3 for v in e2e.values()], color=["gray"] * (len(e2e) - 1) + ["tab:green"])
        ax2.set_ylabel("ms")
        ax2.set_title("end to end (measured)")
        ax2.tick_params(axis="x", labelsize=7, rotation=15)
        fig.tight_layout()
        p1 = folder / "layers.png"
        fig.savefig(p1, dpi=110)
        plt.close(fig)

        cols = min(3, len(layers)) or 1
        rows = -(-len(layers) // cols) or 1
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, ly in zip(axes.flat, layers):
            for c in ly["candidates"]:
                lat = (c["retimed_s"] or c["latency_s"]) * 1e3
                ax.scatter(c["cost"], lat, c="tab:red" if c["pattern"] == ly["pattern"] and
                           c["sparsity"] == ly["sparsity"] else "tab:blue", s=18)
                ax.annotate("dense" if c["pattern"] == "dense" else f"{c['pattern']}@{c['sparsity']:g}",
                            (c["cost"], lat), fontsize=6)
            ax.set_title(f"{ly['name']} {'x'.join(map(str, ly['weight_shape']))}", fontsize=8)
            ax.set_xlabel("proxy cost (relative output error)", fontsize=7)
            ax.set_ylabel("ms (re-timed)", fontsize=7)
        for ax in list(axes.flat)[len(layers):]:
            ax.axis("off")
        fig.tight_layout()
        p2 = folder / "candidates.png"
        fig.savefig(p2, dpi=110)
        plt.close(fig)
        return [p1, p2]

    def save(self, folder: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write report.json, report.md and (when matplotlib is installed) the plots into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"json": folder / "report.json", "markdown": folder / "report.md"}
        self.to_json(files["json"])  # first: the measurements survive a failure below
        files["markdown"].write_text(self.to_markdown() + "\n")
        if plots:
            try:
                p1, p2 = self.plot(folder)
                files.update(layers_png=p1, candidates_png=p2)
            except ImportError:
                pass
        return files


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _useful(cands):
    from pyhwp.select.solver import useful_candidates

    return useful_candidates(list(cands))


def _jsonable(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o)
    return repr(o)
