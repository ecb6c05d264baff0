"""Independent re-timing of every candidate of a layer: real weights, real conv parameters, one interleaved run."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import pyhwp
from pyhwp.bench.timing import interleaved_medians
from pyhwp.hardware.device import on_device
from pyhwp.select.cost import candidate_mask
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


def _consumer_fn(module: nn.Module, info: LayerInfo, factor: int, pick: Candidate | None, keep: torch.Tensor | None,
                 device, dtype, gen):
    """The consumer layer as the plan runs it (its own pick), reading all its input channels or only
    those `keep` leaves (features per channel `factor`)."""
    w, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
    if keep is not None:
        cols = keep.repeat_interleave(factor) if factor > 1 else keep
        w = w[:, cols]
        info = info.with_in(int(cols.sum()))
    x = _input(info, device, dtype, gen)
    if pick is None or pick.pattern == "dense":
        return _dense_fn(info, w, b, x)
    mask = candidate_mask(w, pick.pattern, pick.sparsity, criterion="magnitude")
    if pick.pattern == "channel":
        rows = mask.reshape(mask.shape[0], -1).any(dim=1)
        return _dense_fn(info.with_out(int(rows.sum())), w[rows], None if b is None else b[rows], x)
    return _sparse_fn(info, pick, w, b, mask, x)


@torch.no_grad()
def retime_layer(module: nn.Module, info: LayerInfo, cands: Sequence[Candidate], masks: dict,
                 consumers: Sequence[tuple[nn.Module, LayerInfo, int, Candidate | None]] = (), *,
                 budget_s: float = 1.0, seed: int = 0, attributable: bool = False) -> dict[str, float]:
    """Median seconds of every candidate of one layer, all timed in one interleaved run on the layer's
    own weights pruned by each candidate's mask (masks: (pattern, sparsity) -> bool tensor), at its
    real shape, batch and conv parameters, with the candidate's kernel; random normal inputs.

    When the layer's channels can be removed, its consumers (module, info, features per channel,
    their own pick) count too: each candidate's time is the layer plus its consumers as picked,
    reading the input width the candidate leaves them (all of it, except for channel removal).
    Returns candidate label ("dense", "csr@0.9", ...) -> seconds. With `attributable`, the consumers'
    time at full input is subtracted from every candidate: the layer's own time, and for channel
    removal the layer shrunk plus the change in its consumers (the additive form the solver uses).
    """
    w = module.weight.detach()
    b = None if module.bias is None else module.bias.detach()
    device, dtype = w.device, w.dtype
    gen = torch.Generator().manual_seed(seed)
    x = _input(info, device, dtype, gen)
    fns, parts = {}, {}
    for cm, ci, factor, pick in consumers:
        fns[f"|{ci.name}|full"] = _consumer_fn(cm, ci, factor, pick, None, device, dtype, gen)
    for c in cands:
        name = label(c)
        mask = None if c.pattern == "dense" else masks[(c.pattern, c.sparsity)].to(device)
        if c.pattern == "dense":
            fns[name] = _dense_fn(info, w, b, x)
        elif c.pattern != "channel":
            fns[name] = _sparse_fn(info, c, w, b, mask, x)
        else:
            keep = mask.reshape(mask.shape[0], -1).any(dim=1)
            fns[name] = _dense_fn(info.with_out(int(keep.sum())), w[keep], None if b is None else b[keep], x)
            for cm, ci, factor, pick in consumers:
                fns[f"{name}|{ci.name}|reduced"] = _consumer_fn(cm, ci, factor, pick, keep, device, dtype, gen)
        parts[name] = [f"{name}|{ci.name}|reduced" if c.pattern == "channel" else f"|{ci.name}|full"
                       for _, ci, _, _ in consumers]
    with on_device(device):
        med = interleaved_medians(fns, budget_s=budget_s, device=str(device))
    base = sum(med[f"|{ci.name}|full"] for _, ci, _, _ in consumers) if attributable else 0.0
    return {name: med[name] + sum(med[p] for p in ps) - base for name, ps in parts.items()}


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
