"""pyhwp.select_pattern: the per-layer latency decision alone, with every candidate's measured latency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pyhwp.select.candidates import PATTERNS, layer_candidates
from pyhwp.select.layers import LayerInfo
from pyhwp.select.solver import Candidate


@dataclass
class Selection:
    """The fastest candidate (`pick`), every candidate timed (`candidates`, fastest first) and the
    patterns not offered with why (`skipped`)."""

    pick: Candidate
    candidates: list[Candidate]
    skipped: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """One line per candidate: pattern, sparsity, kernel (provider), latency, speedup over dense."""
        dense = next(c.latency_s for c in self.candidates if c.pattern == "dense")
        rows = [f"{'pattern':<8} {'sparsity':>8} {'kernel':<18} {'latency':>11} {'vs dense':>8}"]
        for c in self.candidates:
            mark = "  <- pick" if c is self.pick else ""
            kernel = f"{c.kernel} ({c.extra.get('provider', '?')})"
            speedup = dense / c.latency_s if c.latency_s else float("inf")
            rows.append(f"{c.pattern:<8} {c.sparsity:>8.2f} {kernel:<18} {c.latency_s * 1e6:>9.1f}us "
                        f"{speedup:>7.2f}x{mark}")
        return "\n".join(rows)


def _layer_info(weight, example_input: torch.Tensor, stride, padding) -> LayerInfo:
    if isinstance(weight, nn.Conv2d):
        stride, padding, weight = weight.stride, weight.padding, weight.weight
    elif isinstance(weight, nn.Linear):
        weight = weight.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"weight must be a 2-D (out, in) or 4-D (out, in, kh, kw) tensor, or an nn.Linear / "
                        f"nn.Conv2d, got {got}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    shape = tuple(weight.shape)
    if weight.dim() == 2:
        if example_input.dim() < 1 or example_input.shape[-1] != shape[1]:
            raise ValueError(f"example_input must be (..., {shape[1]}) for a weight of shape {shape}, "
                             f"got {tuple(example_input.shape)}")
        return LayerInfo("layer", "linear", shape, (max(1, example_input.numel() // shape[1]), shape[1]))
    x = example_input if example_input.dim() == 4 else example_input.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != shape[1]:
        raise ValueError(f"example_input must be (N, {shape[1]}, H, W) for a conv weight of shape {shape}, "
                         f"got {tuple(example_input.shape)}")
    st = (stride, stride) if isinstance(stride, int) else tuple(stride)
    kh, kw = shape[2:]
    if padding is None:
        padding = (kh // 2, kw // 2)
    pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
    h, w = x.shape[2:]
    out_hw = ((h + 2 * pad[0] - kh) // st[0] + 1, (w + 2 * pad[1] - kw) // st[1] + 1)
    return LayerInfo("layer", "conv2d", shape, tuple(x.shape), out_hw, st, pad)


def select_pattern(weight, example_input: torch.Tensor, device=None, patterns: Sequence[str] | None = None,
                   sparsity: float | Sequence[float] = 0.5, *, dtype=None, stride=1, padding=None,
                   cache_dir=None, budget_s: float = 0.3) -> Selection:
    """Which pattern runs this layer fastest on `device` at `sparsity`, measured.

    Args:
        weight: (out, in) linear or (out, in, kh, kw) conv weight, or the nn.Linear / nn.Conv2d.
        example_input: the layer's input at the batch it will serve: (..., in) for linear (rows =
            all leading dims), (N, C, H, W) for conv.
        device: "cpu", "cuda", "cuda:N" (default: the weight's device).
        patterns: among "dense", "csr", "2:4", "masked", "channel" (default all); dense is always timed.
        sparsity: the fraction to prune, or several; 2:4 is offered where 0.5 is among them.
        stride, padding: of a conv given as a tensor (default 1 and kh // 2).
    Returns a Selection: `pick` (the fastest candidate, dense when no sparse kernel beats it),
    `candidates` with each one's latency (seconds, from the cached kernel latency tables) and
    kernel, ours or torch's, and `skipped` with the reason each unavailable candidate was left out.
    Accuracy does not enter: at one sparsity every pattern prunes as much; pyhwp.optimize weighs both.
    """
    info = _layer_info(weight, example_input, stride, padding)
    w = weight.weight if isinstance(weight, (nn.Linear, nn.Conv2d)) else weight
    device = w.device if device is None else device
    dtype = w.dtype if dtype is None else dtype
    levels = (sparsity,) if isinstance(sparsity, (int, float)) else tuple(sparsity)
    if not levels or not all(isinstance(s, (int, float)) and 0.0 < s < 1.0 for s in levels):
        raise ValueError(f"sparsity must be a fraction in (0, 1) or a sequence of them, got {sparsity!r}")
    pats = PATTERNS if patterns is None else tuple(patterns)
    table = {p: (tuple(s for s in levels if abs(s - 0.5) < 1e-9) if ":" in p else levels) for p in pats}
    cands, skipped = layer_candidates(info, device=device, dtype=dtype, patterns=pats, sparsities=table,
                                      consumers=[], cache_dir=cache_dir, budget_s=budget_s)
    cands.sort(key=lambda c: c.latency_s)
    return Selection(cands[0], cands, skipped)
