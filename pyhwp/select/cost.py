"""Accuracy-cost proxy of each candidate: the layer's relative output error on calibration data under its mask."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from pyhwp.prune.calibrate import input_grams
from pyhwp.prune.masks import make_mask
from pyhwp.select.solver import Candidate

GRAM_BYTES = 256 << 20  # calibration Gram matrices held at once; more layers take more passes


def layer_grams(model: nn.Module, loader: Iterable, names: list[str], *, batches: int | None = None,
                max_bytes: int = GRAM_BYTES) -> dict[str, torch.Tensor]:
    """Input Gram matrices (groups, K+1, K+1) float64 of the named layers (pyhwp.prune.input_grams),
    over as few calibration passes as keep at most `max_bytes` of them in memory at once."""
    modules = dict(model.named_modules())
    out, chunk, size = {}, [], 0
    for name in names:
        w = modules[name].weight
        k = w[0].numel() + 1
        g = modules[name].groups if isinstance(modules[name], nn.Conv2d) else 1
        need = g * k * k * 8
        if chunk and size + need > max_bytes:
            out.update(input_grams(model, loader, layers=chunk, batches=batches))
            chunk, size = [], 0
        chunk.append(name)
        size += need
    if chunk:
        out.update(input_grams(model, loader, layers=chunk, batches=batches))
    return out


def activations_from_gram(gram: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """Wanda's input-column norms ||x_j|| (weight.shape[1:]) from a groups == 1 Gram; None otherwise."""
    if gram.shape[0] != 1:
        return None
    k = gram.shape[-1] - 1
    return gram[0].diagonal()[:k].clamp_min(0).sqrt().reshape(weight.shape[1:]).to(weight.device)


def candidate_mask(weight: torch.Tensor, pattern: str, sparsity: float, *, criterion: str = "wanda",
                   activations: torch.Tensor | None = None) -> torch.Tensor:
    """The keep mask (weight's shape, bool) a candidate prunes to, by `criterion` ("wanda" needs
    `activations`; without them "magnitude" is used).

    dense: all True; csr: unstructured; 2:4 / N:M: N kept of every M along the GEMM input dim;
    masked: whole 16x16 tiles of the GEMM form (the masked kernel's tile); channel: output channels.
    """
    if criterion == "wanda" and activations is None:
        criterion = "magnitude"
    kw = {"activations": activations} if criterion == "wanda" else {}
    w = weight.detach()
    if pattern == "dense":
        return torch.ones_like(w, dtype=torch.bool)
    if pattern == "csr":
        return make_mask(w, sparsity, "unstructured", criterion, **kw)
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        return make_mask(w, None, "n:m", criterion, n=n, m=m, **kw)
    if pattern == "masked":
        return make_mask(w, sparsity, "block", criterion, block=(16, 16), **kw)
    if pattern == "channel":
        return make_mask(w, sparsity, "channel", criterion, **kw)
    raise ValueError(f"pattern must be dense, csr, N:M, masked or channel, got {pattern!r}")


def relative_output_error(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor) -> float:
    """||X (W - W*mask).T||^2 / ||X W.T||^2 over the calibration inputs X (GEMM form), from their Gram
    (groups, K+1, K+1): the fraction of the layer's output energy the pruning removes (bias excluded)."""
    g = gram.shape[0]
    k = gram.shape[-1] - 1
    w = weight.detach().double().cpu().reshape(g, -1, k)
    d = (weight.detach() * ~mask).double().cpu().reshape(g, -1, k)
    G = gram[:, :k, :k]
    num = torch.einsum("gnk,gkj,gnj->", d, G, d).item()
    den = torch.einsum("gnk,gkj,gnj->", w, G, w).item()
    return max(0.0, num) / den if den > 0 else 0.0


def pruned_saliency(weight: torch.Tensor, mask: torch.Tensor, activations: torch.Tensor | None) -> float:
    """Fraction of the layer's total saliency (|w| * ||x_j||, or |w|) that the mask prunes."""
    s = weight.detach().abs().double()
    if activations is not None:
        s = s * activations.double()
    total = s.sum().item()
    return (s * ~mask).sum().item() / total if total > 0 else 0.0


def score(cands: list[Candidate], weight: torch.Tensor, gram: torch.Tensor, *,
          criterion: str = "wanda") -> tuple[list[Candidate], dict[tuple[str, float], torch.Tensor]]:
    """The candidates of one layer with `cost` = relative output error (squared norm ratio, additive
    across layers as independent noise powers) and extra["saliency"]; and the mask of each
    (pattern, sparsity)."""
    acts = activations_from_gram(gram, weight)
    masks, out = {}, []
    for c in cands:
        key = (c.pattern, c.sparsity)
        if key not in masks:
            masks[key] = candidate_mask(weight, c.pattern, c.sparsity, criterion=criterion, activations=acts)
        m = masks[key]
        err = 0.0 if c.pattern == "dense" else relative_output_error(weight, m, gram)
        out.append(replace(c, cost=err, extra={**c.extra, "saliency": pruned_saliency(weight, m, acts),
                                               "criterion": criterion if acts is not None else "magnitude"}))
    return out, masks
