"""Weight redistribution: per layer, re-fit the kept weights (and bias) to calibration inputs by
least squares, so they take over what the pruned weights did."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from pyhwp.metrics import omega
from pyhwp.prune.calibrate import input_grams
from pyhwp.prune.layers import apply_masks, check_masks


def redistribute_weight(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor,
                        bias: torch.Tensor | None = None, *, groups: int = 1,
                        ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kept weights W' (zero outside `mask`) and bias b' minimising ||X W.T + b - (X W'.T + b')||.

    Args:
        weight: (out, in) or (out, in/groups, kh, kw) dense weight W; the target is its output.
        mask: bool, weight's shape, True = keep.
        gram: (groups, K + 1, K + 1) float, [X 1]^T [X 1] of the layer's GEMM-form inputs X
            (K = in/groups * kh * kw) with a ones column last (pyhwp.prune.input_grams).
        bias: (out,) or None. Given, it is re-fitted too (it is always "kept").
        ridge: each row solves (X_S^T X_S + lam I) w' = X_S^T X w + lam w_S, lam = ridge times the
            mean diagonal of X^T X: a small pull towards the original kept weights that keeps
            ill-conditioned systems stable and leaves fully kept rows unchanged.
    Rows are solved one distinct kept-column set at a time (cost about out * |S|^3 in float64).
    Returns (weight', bias') in weight's dtype and device; bias' is None when bias is.
    """
    if weight.dim() not in (2, 4) or mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError("weight must be 2-D or 4-D and mask a bool tensor of its shape")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups must be a positive int dividing out={weight.shape[0]}, got {groups!r}")
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise ValueError(f"ridge must be a non-negative number, got {ridge!r}")
    n, k = weight.shape[0], weight[0].numel()
    if gram.shape != (groups, k + 1, k + 1):
        raise ValueError(f"gram has shape {tuple(gram.shape)}, expected ({groups}, {k + 1}, {k + 1})")
    w = weight.detach().double().cpu().reshape(n, k)
    b = None if bias is None else bias.detach().double().cpu()
    keep = mask.cpu().reshape(n, k)
    out_w = torch.zeros_like(w)
    out_b = None if b is None else b.clone()
    rows_per_group = n // groups
    for g in range(groups):
        G = gram[g].double().cpu()
        lam = ridge * float(G.diagonal()[:k].mean()) if k else 0.0
        rows = slice(g * rows_per_group, (g + 1) * rows_per_group)
        wg, kg = w[rows], keep[rows]
        target = wg @ G[:k, :]  # (rows, K+1): row i is G[:, :K] @ w_i (G is symmetric)
        if b is not None:
            target = target + b[rows, None] * G[k, :][None, :]
        patterns, which = torch.unique(kg, dim=0, return_inverse=True)
        for p_idx in range(patterns.shape[0]):
            r = (which == p_idx).nonzero().flatten()
            cols = patterns[p_idx].nonzero().flatten()
            if b is not None:
                cols = torch.cat([cols, torch.tensor([k])])
            if cols.numel() == 0:
                continue
            A = G[cols][:, cols].clone()
            nw = cols.numel() - (1 if b is not None else 0)
            A.diagonal()[:nw] += lam
            rhs = target[r][:, cols].clone()  # (rows, |S|)
            rhs[:, :nw] += lam * wg[r][:, cols[:nw]]
            sol = torch.linalg.lstsq(A, rhs.T).solution.T
            out_w[r[:, None] + g * rows_per_group, cols[:nw][None, :]] = sol[:, :nw]
            if b is not None:
                out_b[r + g * rows_per_group] = sol[:, nw]
    new_w = out_w.reshape(weight.shape).to(weight.dtype).to(weight.device)
    new_b = None if out_b is None else out_b.to(bias.dtype).to(bias.device)
    return new_w, new_b


@torch.no_grad()
def redistribute(model: nn.Module, masks: Mapping[str, torch.Tensor], loader: Iterable, *,
                 batches: int | None = None, ridge: float = 1e-4, sequential: bool = True
                 ) -> dict[str, dict[str, float]]:
    """Prune `model` in place to `masks` with weight redistribution (redistribute_weight per layer).

    Call it on the dense (unpruned) model: each layer's target is its dense output. With
    sequential=True (default) layers are fitted in module order, each on the inputs produced by the
    already pruned and re-fitted layers before it (one calibration pass per layer), so later layers
    also correct errors of earlier ones; with False all inputs come from one pass of the dense model.
    Returns per layer the Omega of the magnitude-masked weight ("omega_masked") and of the
    re-fitted weight ("omega_redistributed").
    """
    layers = check_masks(model, masks)
    report: dict[str, dict[str, float]] = {}
    grams = None if sequential else input_grams(model, loader, layers=list(layers), batches=batches)
    for name, layer in layers.items():
        gram = (input_grams(model, loader, layers=[name], batches=batches)[name] if sequential
                else grams[name])
        mask = masks[name].to(layer.weight.device)
        before = omega(layer.weight * mask)
        groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        new_w, new_b = redistribute_weight(layer.weight, mask, gram, layer.bias, groups=groups, ridge=ridge)
        layer.weight.copy_(new_w)
        if new_b is not None:
            layer.bias.copy_(new_b)
        apply_masks(model, {name: masks[name]})
        report[name] = {"omega_masked": before, "omega_redistributed": omega(layer.weight)}
    return report
