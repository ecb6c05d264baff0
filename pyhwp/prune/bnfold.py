"""BatchNorm folding: merge each BatchNorm2d into the Conv2d right before it (inference form)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pyhwp.prune.graph import channel_graph, is_resnet


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one conv equal to bn(conv(x)) in eval mode:
    W' = W * s, b' = (b - running_mean) * s + beta with s = gamma / sqrt(running_var + eps) per
    output channel; computed in float64, returned in the conv weight's dtype and device."""
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise TypeError("fold_conv_bn needs a Conv2d and a BatchNorm2d")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the conv writes {conv.out_channels} channels")
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = torch.zeros_like(scale)
    if bn.affine:
        scale = scale * bn.weight.detach().double()
        shift = bn.bias.detach().double()
    new_w = w * scale.reshape(-1, 1, 1, 1)
    new_b = (b - bn.running_mean.double()) * scale + shift
    dt, dev = conv.weight.dtype, conv.weight.device
    return new_w.to(dev, dt), new_b.to(dev, dt)


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            items = list(mod.named_children())
            for (a_name, a), (b_name, b) in zip(items, items[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    base = f"{prefix}." if prefix else ""
                    pairs.append((base + a_name, base + b_name))
    return pairs


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BatchNorm2d name) pairs where the BatchNorm reads exactly the conv's output:
    adjacent in an nn.Sequential (anywhere in the model), or conv_i/bn_i of a torchvision-style
    ResNet's stem and blocks (see pyhwp.prune.graph)."""
    pairs = _sequential_pairs(model)
    if is_resnet(model):
        modules = dict(model.named_modules())
        for g in channel_graph(model):
            for p, bn in g.producers:
                if bn is not None and isinstance(modules[p], nn.Conv2d):
                    pairs.append((p, bn))
    return list(dict.fromkeys(pairs))


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """`model` (or a copy) with every BatchNorm2d of conv_bn_pairs merged into its conv (which gains
    a bias if it had none) and replaced by nn.Identity. Outputs equal the original's in eval mode
    to float tolerance; fold after training (the folded model has no batch statistics)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = model if inplace else copy.deepcopy(model)
    for conv_name, bn_name in conv_bn_pairs(out):
        conv, bn = out.get_submodule(conv_name), out.get_submodule(bn_name)
        w, b = fold_conv_bn(conv, bn)
        conv.weight.copy_(w)
        if conv.bias is None:
            conv.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(b)
        _set(out, bn_name, nn.Identity())
    return out
