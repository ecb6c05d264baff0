"""Per-layer candidates (dense, CSR, 2:4, masked, channel removal) timed from the measured kernel tables."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pyhwp.formats.base import patterns as registered_patterns
from pyhwp.hardware.latency import kernel_latency, nm_sparsity, parse_dtype
from pyhwp.hardware.device import resolve_device
from pyhwp.kernels import KERNELS, find_kernel
from pyhwp.select.channel_latency import channel_latency
from pyhwp.select.layers import LayerInfo
from pyhwp.select.solver import Candidate
from pyhwp.select.torch_layers import TORCH_LAYERS

PATTERNS = ("dense", "csr", "2:4", "masked", "channel")
# Sparsities tried per pattern: CSR pays for its indices, so it starts at 50%; channel removal
# cuts the layer and its consumers, so a quarter already helps.
SPARSITIES: dict[str, tuple[float, ...]] = {
    "csr": (0.5, 0.7, 0.8, 0.9, 0.95), "2:4": (0.5,), "masked": (0.5, 0.75), "channel": (0.25, 0.5, 0.75),
}


@dataclass(frozen=True)
class Consumer:
    """A layer reading the channels of the layer whose channels may be removed: `factor` input
    features per channel (> 1 for a Linear after Flatten)."""

    info: LayerInfo
    factor: int = 1


def kept_channels(out: int, sparsity: float) -> int:
    """Channels left after removing round-half-up(sparsity * out), as pyhwp.prune.make_mask does; >= 1."""
    return max(1, out - math.floor(sparsity * out + 0.5))


def deployable_kernels(op: str, pattern: str, device, dtype) -> set[str]:
    """Kernels a converted layer of `pattern` really runs: the pyhwp kernel pyhwp.linear / conv2d
    dispatches to, and torch kernels that have a module in TORCH_LAYERS (linear only)."""
    device, dtype = resolve_device(device), parse_dtype(dtype)
    names = set()
    try:
        names.add(find_kernel(op, pattern, device, dtype).name)
    except (TypeError, ValueError):
        pass
    for k in KERNELS:
        if k.provider != "pyhwp" and k.pattern == pattern and k.name in TORCH_LAYERS and op == "linear" \
                and not k.unsupported_reasons(op, device, dtype):
            names.add(k.name)
    return names


def _provider(kernel: str) -> str:
    return next((k.provider for k in KERNELS if k.name == kernel), "torch")


def layer_candidates(info: LayerInfo, *, device="cpu", dtype="float32", patterns: Sequence[str] | None = None,
                     sparsities: dict[str, Sequence[float]] | None = None, consumers: Sequence[Consumer] | None = None,
                     cache_dir=None, budget_s: float = 0.3) -> tuple[list[Candidate], dict[str, str]]:
    """Every candidate of one layer with its latency at the layer's real shape and batch on `device`.

    Latencies come from pyhwp.hardware.kernel_latency (measured once per machine, cached). Each
    sparse case is timed interleaved with dense, so a candidate's latency is the layer's dense
    latency times the ratio measured in its own run; the fastest deployable kernel of the pattern
    backs it (ours or torch's, `kernel` and extra["provider"] say which). "channel" removes output
    channels: its latency is the dense layer at the kept width plus, for each consumer, the change
    of the consumer's dense latency at the reduced input (None `consumers`: channel removal is not
    offered, e.g. for the model's output layer or coupled residual channels).
    Returns (candidates with cost 0, {candidate label: why it was not offered}).
    """
    patterns = PATTERNS if patterns is None else tuple(patterns)
    unknown = set(patterns) - set(PATTERNS)
    if unknown:
        raise ValueError(f"patterns must be among {PATTERNS}, got unknown {sorted(unknown)}")
    table = dict(SPARSITIES, **(sparsities or {}))
    op, shape, batch, note = info.latency_case

    def measure(pattern, s):
        return kernel_latency(op, shape, batch, pattern, s, dtype, device=device, cache_dir=cache_dir,
                              budget_s=budget_s)

    runs = [("dense", 0.0, measure("dense", 0.0))]
    skipped: dict[str, str] = {}
    channel_levels = []
    why_not = info.sparse_ok
    for pattern in patterns:
        if pattern == "dense":
            continue
        for s in table.get(pattern, ()):
            label = f"{pattern}@{s:g}"
            if why_not:
                skipped[label] = why_not
            elif pattern == "channel":
                channel_levels.append(s)
            elif pattern not in registered_patterns():
                skipped[label] = f"the {pattern!r} pattern is not part of this pyhwp build"
            elif nm_sparsity(pattern) is not None and abs(nm_sparsity(pattern) - s) > 1e-9:
                skipped[label] = f"{pattern} fixes the sparsity at {nm_sparsity(pattern):g}"
            elif not deployable_kernels(op, pattern, device, dtype):
                skipped[label] = f"no kernel runs {op} on a {pattern!r} weight on {device}"
            else:
                try:
                    runs.append((pattern, s, measure(pattern, s)))
                except ValueError as exc:  # e.g. 2:4 on an input dimension that is not a multiple of 4
                    skipped[label] = str(exc)
    # Every case timed dense in its own run: their median is the layer's dense latency, and each
    # pattern's latency is that times the ratio measured in its run (ratios hold on a busy machine).
    dense_runs = [r.fastest("dense") for _, _, r in runs if r.fastest("dense") is not None]
    if not dense_runs:
        raise RuntimeError(f"{info.name}: no dense kernel ran {op} {shape} on {device}: {runs[0][2].skipped}")
    dense_s = statistics.median(t.median_s for t in dense_runs)
    dense_kernel = runs[0][2].fastest("dense").kernel if runs[0][2].fastest("dense") else dense_runs[0].kernel
    out = [Candidate(info.name, "dense", 0.0, dense_kernel, dense_s, 0.0,
                     extra={"provider": _provider(dense_kernel), "timed_as": note,
                            "dense_runs_s": [t.median_s for t in dense_runs]})]
    for pattern, s, r in runs[1:]:
        deploy = deployable_kernels(op, pattern, device, dtype)
        timed = [t for t in r.timings.values() if t.pattern == pattern and t.kernel in deploy]
        ref = r.fastest("dense")
        if not timed or ref is None:
            skipped[f"{pattern}@{s:g}"] = "; ".join(f"{k}: {v}" for k, v in r.skipped.items()) or "no kernel ran"
            continue
        best = min(timed, key=lambda t: t.median_s)
        out.append(Candidate(info.name, pattern, float(s), best.kernel, dense_s * best.median_s / ref.median_s,
                             extra={"provider": best.provider, "timed_as": note,
                                    "speedup_same_run": ref.median_s / best.median_s,
                                    "kernels_s": {t.kernel: t.median_s for t in r.timings.values()},
                                    "energy_j": best.energy_j}))
    for s in channel_levels:
        c = _channel_candidate(info, s, consumers, dense_s, device, dtype, cache_dir, budget_s, skipped)
        if c is not None:
            out.append(c)
    return out, skipped


def _channel_candidate(info, s, consumers, dense_s, device, dtype, cache_dir, budget_s, skipped):
    label = f"channel@{s:g}"
    if consumers is None:
        skipped[label] = "its output channels cannot be removed alone (model output or coupled channels)"
        return None
    out = info.weight_shape[0]
    kept = kept_channels(out, s)
    if kept == out:
        skipped[label] = f"{out} channels: removing {s:g} of them removes none"
        return None
    t = channel_latency(info, kept, consumers, device=device, dtype=dtype, cache_dir=cache_dir, budget_s=budget_s)
    # The run's own full-width layer is the reference, as for the other patterns.
    latency = dense_s * (t["own_reduced_s"] + sum(c["reduced_s"] - c["full_s"] for c in t["consumers"].values())) \
        / t["own_full_s"]
    return Candidate(info.name, "channel", float(s), "torch_dense" if resolve_device(device).type == "cpu"
                     else "torch_dense_cuda", max(0.0, latency),
                     extra={"provider": "torch", "timed_as": info.latency_case[3], "kept_channels": kept,
                            "channel_run_s": t})


def model_candidates(infos: dict[str, LayerInfo], consumers: dict[str, list[Consumer] | None], *, device="cpu",
                     dtype="float32", patterns=None, sparsities=None, cache_dir=None, budget_s: float = 0.3,
                     progress: bool = False) -> tuple[dict[str, list[Candidate]], dict[str, dict[str, str]]]:
    """layer_candidates for every layer, with a tqdm bar unless progress=False."""
    from tqdm.auto import tqdm

    cands, skipped = {}, {}
    for name, info in tqdm(infos.items(), desc="time candidates", disable=not progress, leave=False):
        cands[name], skipped[name] = layer_candidates(
            info, device=device, dtype=dtype, patterns=patterns, sparsities=sparsities,
            consumers=consumers.get(name), cache_dir=cache_dir, budget_s=budget_s)
    return cands, skipped


def channel_consumers(model: torch.nn.Module, infos: dict[str, LayerInfo]) -> dict[str, list[Consumer] | None]:
    """Per layer, the consumers of its output channels when it alone produces them (chains and the
    inner convs of ResNet blocks, from pyhwp.prune.channel_graph); None where channels cannot be
    removed alone or the graph is not one structural pruning understands."""
    from pyhwp.prune.graph import UnsupportedGraphError, channel_graph

    out: dict[str, list[Consumer] | None] = {n: None for n in infos}
    try:
        groups = channel_graph(model)
    except UnsupportedGraphError:
        return out
    for g in groups:
        if g.is_output or len(g.producers) != 1:
            continue
        name = g.producers[0][0]
        if name in infos and all(c in infos for c, _ in g.consumers):
            out[name] = [Consumer(infos[c], f) for c, f in g.consumers]
    return out
