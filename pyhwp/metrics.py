"""Model metrics for pruning reports: performance change, compression, parameter/FLOP counts, Omega."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from pyhwp.formats import SparseWeight

_LAYERS = (nn.Linear, nn.Conv2d)


def performance_change(before: float, after: float) -> float:
    """(P' - P) / P * 100: the relative change of a metric P (accuracy, ...) in percent."""
    if not math.isfinite(before) or not math.isfinite(after):
        raise ValueError(f"before and after must be finite, got {before!r}, {after!r}")
    if before == 0:
        raise ValueError("before must be nonzero for a relative change")
    return (after - before) / before * 100.0


def compression_ratio(weights: SparseWeight | Iterable[SparseWeight]) -> float:
    """Dense bytes / stored bytes (SparseWeight.nbytes: values plus indices and metadata) of one
    weight or all of them together; dense bytes are numel * element size of the weight's dtype."""
    ws = [weights] if isinstance(weights, SparseWeight) else list(weights)
    if not ws or not all(isinstance(w, SparseWeight) for w in ws):
        raise TypeError("weights must be a SparseWeight or a non-empty iterable of them")
    dense = sum(w.numel * torch.empty((), dtype=w.dtype).element_size() for w in ws)
    stored = sum(w.nbytes for w in ws)
    return dense / stored if stored else math.inf


def omega(weight: torch.Tensor) -> float:
    """The uniformity metric Omega = sum_i sum_j |w_ij| / max_k |w_ik| over the rows i of the
    GEMM-form weight (out, K): per row, the number of weights at the row's largest magnitude that
    would carry the same L1 mass. All-zero rows count 0."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 1 or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point tensor")
    a = weight.detach().double().abs().reshape(weight.shape[0], -1)
    peak = a.amax(dim=1)
    live = peak > 0
    return float((a[live].sum(dim=1) / peak[live]).sum())


def _weight_count(module: nn.Module, mask: torch.Tensor | None) -> tuple[int, int]:
    w = module.weight
    kept = int(mask.sum()) if mask is not None else int((w != 0).sum())
    return w.numel(), kept


def count_params(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Parameters of the Linear and Conv2d layers: "total" (weights and biases) and "nonzero"
    (kept weights by `masks` where given, else nonzero weights, plus biases)."""
    total = nonzero = 0
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS):
            numel, kept = _weight_count(m, None if masks is None else masks.get(name))
            b = m.bias.numel() if m.bias is not None else 0
            total += numel + b
            nonzero += kept + b
    return {"total": total, "nonzero": nonzero}


def count_flops(model: nn.Module, example_input: torch.Tensor,
                masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """FLOPs of one forward pass on `example_input` in the Linear and Conv2d layers, 2 per
    multiply-add (bias adds not counted): "dense" with every weight, "sparse" with only the kept
    weights (by `masks` where given, else the nonzeros)."""
    counts = {"dense": 0, "sparse": 0}
    handles = []
    names = {m: n for n, m in model.named_modules() if isinstance(m, _LAYERS)}

    def hook(mod, args, out):
        numel, kept = _weight_count(mod, None if masks is None else masks.get(names[mod]))
        if isinstance(mod, nn.Linear):
            positions = out.numel() // mod.out_features
        else:
            positions = out.numel() // mod.out_channels
        counts["dense"] += 2 * numel * positions
        counts["sparse"] += 2 * kept * positions

    for m in names:
        handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counts


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy in percent of `model` (eval mode) over (input, label) batches of `loader`."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            pred = model(x.to(device)).argmax(dim=1)
            correct += int((pred == y.to(device)).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    if not total:
        raise ValueError("loader yielded no samples")
    return 100.0 * correct / total
