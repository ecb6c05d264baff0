"""Roofline plot (matplotlib PNG): measured kernels against the measured compute and bandwidth ceilings."""

from __future__ import annotations

from pathlib import Path

from pyhwp.hardware.latency import LatencyResult

_MARKERS = "os^Dv<>pPX*h"


def plot_roofline(prof, results: list[LatencyResult], path: str | Path, dtype: str = "float32",
                  bandwidth: str = "copy") -> Path:
    """Write a log-log roofline of `results` (kernels of `dtype`) on `prof`'s ceilings to `path` (PNG).

    x: arithmetic intensity, flops per byte of weight storage plus input and output (each byte
    counted once: a lower bound on traffic); y: achieved GFLOP/s (dense kernels: the dense
    product; sparse kernels: the stored weights' work). Ceilings: min(peak, bandwidth x intensity)
    with the measured peak of `dtype` and `bandwidth` GB/s; other measured peaks dashed. Kernels
    whose weight fits in the last-level cache can sit above the memory roof, which is measured on
    arrays larger than every cache.
    Raises ImportError naming matplotlib when it is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the roofline plot needs matplotlib: pip install matplotlib") from exc
    import numpy as np

    peak, bw = prof.peak_gflops.get(dtype), prof.bandwidth_gbps.get(bandwidth)
    if not peak or not bw:
        raise ValueError(f"the profile has no measured {dtype} peak or {bandwidth} bandwidth to draw")
    ridge = peak / bw
    points: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r.dtype != dtype:
            continue
        for t in r.timings.values():
            if t.intensity:
                points.setdefault(t.kernel, []).append((t.intensity, t.gflops))
    xs = [x for pts in points.values() for x, _ in pts] + [ridge]
    lo, hi = min(xs) / 4, max(xs) * 4
    grid = np.logspace(np.log10(lo), np.log10(hi), 256)

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(grid, np.minimum(peak, bw * grid), color="black", lw=2,
            label=f"ceiling: {dtype} {peak:.0f} GFLOP/s, {bandwidth} {bw:.1f} GB/s")
    others = [(k, v) for k, v in sorted(prof.peak_gflops.items()) if k != dtype]
    for (other, value), style in zip(others, ("--", "-.", ":")):
        ax.axhline(value, color="gray", ls=style, lw=1, label=f"{other} peak {value:.0f} GFLOP/s")
    ax.axvline(ridge, color="gray", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.1f} flop/B", (ridge, peak), textcoords="offset points", xytext=(5, -15), fontsize=8)
    for i, (kernel, pts) in enumerate(sorted(points.items())):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=_MARKERS[i % len(_MARKERS)], s=30,
                   alpha=0.8, label=kernel)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flop / byte, weight + input + output once)")
    ax.set_ylabel("GFLOP/s (measured)")
    ax.set_title(f"{prof.name} ({prof.device}): measured kernels vs measured ceilings", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
