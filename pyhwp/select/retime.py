"""Independent re-timing of every candidate of a layer: real weights, real conv parameters, one interleaved run."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import pyhwp
from pyhwp.bench.timing import interleaved_medians
from pyhwp.hardware.device import on_device
from pyhwp.select.layers import LayerInfo
from pyhwp.select.solver import Candidate
from pyhwp.select.torch_layers import TORCH_LAYERS

TOLERANCE = 1.10  # a pick passes when its re-timed latency is within 10% of the fastest admissible candidate


def label(c: Candidate) -> str:
    return "dense" if c.pattern == "dense" else f"{c.pattern}@{c.sparsity:g}"


def _dense_fn(info: LayerInfo, w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor):
    if info.op == "linear":
        return lambda: F.linear(x, w, b)
    return lambda: F.conv2d(x, w, b, info.stride, info.padding, info.dilation, info.groups)


def _input(info: LayerInfo, device, dtype, gen) -> torch.Tensor:
    return torch.randn(info.input_shape, generator=gen).to(dtype).to(device)


def _sparse_fn(info, c: Candidate, w, b, mask, x):
    if c.kernel in TORCH_LAYERS:
        mod = TORCH_LAYERS[c.kernel](w, b, mask)
        return lambda: mod(x)
    sw = pyhwp.to_sparse(w * mask, c.pattern, mask=mask)
    if info.op == "linear":
        return lambda: pyhwp.linear(x, sw, b)
    return lambda: pyhwp.conv2d(x, sw, b, info.stride, info.padding, info.dilation, info.groups)


def _consumer_weight(module: nn.Module, keep: torch.Tensor, factor: int) -> torch.Tensor:
    cols = keep.repeat_interleave(factor) if factor > 1 else keep
    return module.weight.detach()[:, cols]


@torch.no_grad()
def retime_layer(module: nn.Module, info: LayerInfo, cands: Sequence[Candidate], masks: dict,
                 consumers: Sequence[tuple[nn.Module, LayerInfo, int]] = (), *, budget_s: float = 1.0,
                 seed: int = 0) -> dict[str, float]:
    """Median seconds of every candidate of one layer, all timed in one interleaved run on the layer's
    own weights pruned by each candidate's mask (masks: (pattern, sparsity) -> bool tensor), at its
    real shape, batch and conv parameters, with the candidate's kernel; random normal inputs.

    A channel candidate's time is its shrunk layer plus, per consumer (module, info, features per
    channel), the consumer at the reduced input minus at the full input, timed in the same run.
    Returns candidate label ("dense", "csr@0.9", ...) -> seconds.
    """
    w = module.weight.detach()
    b = None if module.bias is None else module.bias.detach()
    device, dtype = w.device, w.dtype
    gen = torch.Generator().manual_seed(seed)
    x = _input(info, device, dtype, gen)
    fns, channel_parts = {}, {}
    for c in cands:
        name = label(c)
        if c.pattern == "dense":
            fns[name] = _dense_fn(info, w, b, x)
            continue
        mask = masks[(c.pattern, c.sparsity)].to(device)
        if c.pattern != "channel":
            fns[name] = _sparse_fn(info, c, w, b, mask, x)
            continue
        keep = mask.reshape(mask.shape[0], -1).any(dim=1)
        fns[name + "|own"] = _dense_fn(info, w[keep], None if b is None else b[keep], x)
        parts = []
        for cm, ci, factor in consumers:
            cw, cb = cm.weight.detach(), None if cm.bias is None else cm.bias.detach()
            kept_in = int(keep.sum()) * factor
            red = ci.with_in(kept_in)
            fns[f"{name}|{ci.name}|full"] = _dense_fn(ci, cw, cb, _input(ci, device, dtype, gen))
            fns[f"{name}|{ci.name}|reduced"] = _dense_fn(red, _consumer_weight(cm, keep, factor), cb,
                                                         _input(red, device, dtype, gen))
            parts.append(ci.name)
        channel_parts[name] = parts
    with on_device(device):
        med = interleaved_medians(fns, budget_s=budget_s, device=str(device))
    out = {k: v for k, v in med.items() if "|" not in k}
    for name, parts in channel_parts.items():
        t = med[name + "|own"] + sum(med[f"{name}|{p}|reduced"] - med[f"{name}|{p}|full"] for p in parts)
        out[name] = max(t, 0.0)
    return out


def check_pick(pick: Candidate, cands: Sequence[Candidate], retimed: dict[str, float],
               tolerance: float = TOLERANCE) -> dict:
    """Is the pick within `tolerance` of the fastest re-timed candidate that costs no more accuracy
    (admissible: cost <= the pick's)? Returns the numbers and the verdict."""
    admissible = [c for c in cands if c.cost <= pick.cost + 1e-15 and label(c) in retimed]
    fastest = min(admissible, key=lambda c: retimed[label(c)])
    overall = min(cands, key=lambda c: retimed.get(label(c), float("inf")))
    ratio = retimed[label(pick)] / retimed[label(fastest)] if retimed[label(fastest)] > 0 else 1.0
    return {"pick": label(pick), "pick_s": retimed[label(pick)], "fastest_admissible": label(fastest),
            "fastest_admissible_s": retimed[label(fastest)], "ratio": ratio, "passes": ratio <= tolerance,
            "fastest_any": label(overall), "fastest_any_s": retimed[label(overall)], "tolerance": tolerance}
