"""Pruning schedules: one-shot, and gradual with the cubic ramp s0 -> s over k steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from pyhwp.prune.layers import apply_masks


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def cubic_sparsity(step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Sparsity at `step` of `steps` on the cubic ramp of Zhu & Gupta (2017):
    s_t = s + (s0 - s) * (1 - t / k)^3, so s_0 = initial and s_k = final exactly; pruning is fast
    early, while the network has redundancy, and slow near the end."""
    _check_fraction("final", final)
    _check_fraction("initial", initial)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
        raise ValueError(f"step must be an int in [0, {steps}], got {step!r}")
    if step == steps:
        return float(final)
    return final + (initial - final) * (1.0 - step / steps) ** 3


def gradual_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Sparsities of the `steps` pruning steps 1..k on the cubic ramp (the last is `final`)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return [cubic_sparsity(t, steps, final, initial) for t in range(1, steps + 1)]


def one_shot_schedule(final: float) -> list[float]:
    """The one-step schedule: prune to `final` at once."""
    _check_fraction("final", final)
    return [float(final)]


def prune_gradually(model: nn.Module, sparsities: list[float],
                    make_masks: Callable[[nn.Module, float], Mapping[str, torch.Tensor]],
                    recover: Callable[[nn.Module, Mapping[str, torch.Tensor]], object] | None = None,
                    ) -> dict[str, torch.Tensor]:
    """Prune `model` in place through `sparsities` (gradual_schedule or one_shot_schedule).

    At each step make_masks(model, sparsity) computes masks from the current weights (already
    pruned weights score zero under every criterion, so they stay pruned), the masks are applied,
    and recover(model, masks) (for example a partial pyhwp.prune.finetune) runs before the next
    step. Returns the final masks.
    """
    if not sparsities:
        raise ValueError("sparsities must list at least one step")
    masks: Mapping[str, torch.Tensor] = {}
    for s in sparsities:
        _check_fraction("each sparsity", s)
        masks = dict(make_masks(model, s))
        apply_masks(model, masks)
        if recover is not None:
            recover(model, masks)
    return dict(masks)
