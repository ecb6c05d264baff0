"""Pruning criteria: the per-weight importance scores that masks rank (lowest is pruned first)."""

from __future__ import annotations

import math

import torch

CRITERIA = ("magnitude", "taylor", "wanda", "hybrid")


def _check_tensor(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, weight on {like.device}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|w|, float64, weight's shape: the magnitude (and threshold) criterion."""
    return weight.detach().abs().double()


def taylor_scores_of(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|w * dL/dw| of one batch, float64, weight's shape: first-order Taylor importance (the loss
    change from zeroing w). pyhwp.prune.taylor_scores sums it over calibration batches."""
    return (weight.detach().double() * grad.detach().double()).abs()


def _activation_columns(activations: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    shape = tuple(weight.shape)
    k = math.prod(shape[1:])
    a = tuple(activations.shape)
    if a == shape:
        return activations.double()
    if a == shape[1:] or a == (k,):
        return activations.double().reshape(1, *shape[1:])
    raise ValueError(
        f"activations has shape {a}; expected the per-input-column norms of shape {shape[1:]}"
        f"{f' or ({k},)' if len(shape) > 2 else ''}, or weight's shape {shape}"
    )


def wanda_scores(weight: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """|w_ij| * ||x_j||, float64, weight's shape (Wanda: Sun et al. 2023, activation-aware).

    activations: L2 norms of the layer's input columns over calibration data (GEMM form: input
    features of a linear layer; (in/groups, kh, kw) patch positions of a conv), shaped like
    weight.shape[1:] or flattened; or weight's full shape where columns differ per output row
    (grouped conv). pyhwp.prune.activation_norms collects them with forward hooks.
    """
    _check_tensor("activations", activations, weight)
    if bool((activations < 0).any()):
        raise ValueError("activations must be non-negative norms")
    return weight.detach().abs().double() * _activation_columns(activations, weight)


def element_scores(weight: torch.Tensor, criterion: str, scores: torch.Tensor | None,
                   activations: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(importance, coarse) scores of weight's shape for `criterion`; coarse is |w| for "hybrid"
    (its first, threshold pass) and None otherwise."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if scores is not None:
        _check_tensor("scores", scores, weight)
        if scores.shape != weight.shape:
            raise ValueError(f"scores has shape {tuple(scores.shape)}, expected weight's shape {tuple(weight.shape)}")
    if criterion == "magnitude":
        return magnitude_scores(weight), None
    if criterion == "taylor":
        if scores is None:
            raise ValueError("criterion 'taylor' needs scores= (accumulated |w * grad|, see "
                             "pyhwp.prune.taylor_scores)")
        return scores.double(), None
    if criterion == "wanda":
        if activations is None:
            raise ValueError("criterion 'wanda' needs activations= (input column norms, see "
                             "pyhwp.prune.activation_norms)")
        return wanda_scores(weight, activations), None
    # hybrid: magnitude first, then the importance given (Taylor scores, else Wanda).
    if scores is not None:
        return scores.double(), magnitude_scores(weight)
    if activations is not None:
        return wanda_scores(weight, activations), magnitude_scores(weight)
    raise ValueError("criterion 'hybrid' needs scores= (Taylor) or activations= (Wanda) for its "
                     "importance pass")
