"""The prunable layers of a model (Linear, Conv2d) by name, and writing masks into their weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

PRUNABLE = (nn.Linear, nn.Conv2d)


def prunable_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Linear and Conv2d modules of `model` by qualified name (as model.named_modules() gives them),
    in module order; with `names`, exactly those, each checked to exist and be prunable."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    if names is None:
        return {name: mod for name, mod in modules.items() if isinstance(mod, PRUNABLE)}
    out = {}
    for name in names:
        if name not in modules:
            raise KeyError(f"model has no module named {name!r}")
        if not isinstance(modules[name], PRUNABLE):
            raise TypeError(f"module {name!r} is a {type(modules[name]).__name__}; only Linear and Conv2d "
                            "weights are pruned")
        out[name] = modules[name]
    return out


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The layers `masks` names, after checking each mask is a bool tensor of its weight's shape."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must map layer names to bool tensors, got {type(masks).__name__}")
    layers = prunable_layers(model, masks.keys())
    for name, mask in masks.items():
        w = layers[name].weight
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool tensor")
        if mask.shape != w.shape:
            raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)}, weight has {tuple(w.shape)}")
    return layers


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero every pruned weight in place (exact +0.0, never -0.0); returns model."""
    for name, layer in check_masks(model, masks).items():
        layer.weight.masked_fill_(~masks[name].to(layer.weight.device), 0.0)
    return model


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of pruned weights over all masks together."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0
