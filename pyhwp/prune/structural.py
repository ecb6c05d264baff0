"""Structural channel pruning: coupled channel masks, the masked model, and the physically shrunk
model whose outputs equal the masked model's (graphs supported: see pyhwp.prune.graph)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from pyhwp.prune.criteria import element_scores
from pyhwp.prune.graph import ChannelGroup, channel_graph
from pyhwp.prune.masks import _round_half_up


def _keep_vector(name: str, layer: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    out = layer.weight.shape[0]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"masks[{name!r}] must be a bool tensor")
    if mask.shape == (out,):
        return mask.cpu()
    if mask.shape == layer.weight.shape:
        # A channel survives if any of its weights is kept: only whole pruned rows are removed.
        return mask.reshape(out, -1).any(dim=1).cpu()
    raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)}; expected ({out},) output-channel keeps "
                     f"or the weight's shape {tuple(layer.weight.shape)}")


def _group_keeps(model: nn.Module, groups: list[ChannelGroup], masks: Mapping[str, torch.Tensor]
                 ) -> list[torch.Tensor]:
    """Per group, the channels kept: those any producer keeps (a producer without a mask keeps all)."""
    modules = dict(model.named_modules())
    producers = {p for g in groups for p, _ in g.producers}
    unknown = [n for n in masks if n not in producers]
    if unknown:
        raise KeyError(f"masks name {unknown}, which are not Conv2d/Linear layers of the channel graph")
    keeps = []
    for g in groups:
        keep = torch.zeros(g.channels, dtype=torch.bool)
        for p, _ in g.producers:
            keep |= _keep_vector(p, modules[p], masks[p]) if p in masks else True
        if g.is_output and not bool(keep.all()):
            raise ValueError(f"cannot remove output channels of {g.producers[0][0]}: they are the model's output")
        if not bool(keep.any()):
            raise ValueError(f"masks remove every channel written by {[p for p, _ in g.producers]}")
        keeps.append(keep)
    return keeps


@torch.no_grad()
def mask_channels(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Make the masked model in place: for each producer layer in `masks` (name -> bool (out,)
    channel keeps, or a weight-shaped mask whose all-False rows are pruned channels) zero the
    pruned output channels' weights and bias, and the weight, bias and running mean of its
    BatchNorm over them, so those channels are exactly zero downstream. Returns model."""
    groups = channel_graph(model)
    keeps = _group_keeps(model, groups, masks)
    modules = dict(model.named_modules())
    for g, keep in zip(groups, keeps):
        paired = set()
        for p, bn in g.producers:
            if p not in masks:
                continue
            drop = ~_keep_vector(p, modules[p], masks[p])
            layer = modules[p]
            layer.weight[drop.to(layer.weight.device)] = 0.0
            if layer.bias is not None:
                layer.bias[drop.to(layer.bias.device)] = 0.0
            if bn is not None:
                _zero_norm(modules[bn], drop)
                paired.add(bn)
        # BatchNorms further down a chain see the channels only the group as a whole drops.
        for bn in g.norms:
            if bn not in paired:
                _zero_norm(modules[bn], ~keep)
    return model


def _zero_norm(bn: nn.Module, drop: torch.Tensor) -> None:
    # Zero input (the producer's channel) minus zero running mean, times zero weight, plus zero bias:
    # exactly zero in eval and train mode.
    if bn.affine:
        bn.weight[drop.to(bn.weight.device)] = 0.0
        bn.bias[drop.to(bn.bias.device)] = 0.0
    if bn.running_mean is not None:
        bn.running_mean[drop.to(bn.running_mean.device)] = 0.0


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=like.requires_grad)


@torch.no_grad()
def _slice_out(layer: nn.Module, keep: torch.Tensor) -> None:
    idx = keep.nonzero().flatten().to(layer.weight.device)
    layer.weight = _param(layer.weight.index_select(0, idx), layer.weight)
    if layer.bias is not None:
        layer.bias = _param(layer.bias.index_select(0, idx), layer.bias)
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = idx.numel()
    else:
        layer.out_features = idx.numel()


@torch.no_grad()
def _slice_in(layer: nn.Module, keep: torch.Tensor, factor: int) -> None:
    cols = keep.repeat_interleave(factor).nonzero().flatten().to(layer.weight.device)
    layer.weight = _param(layer.weight.index_select(1, cols), layer.weight)
    if isinstance(layer, nn.Conv2d):
        layer.in_channels = cols.numel()
    else:
        layer.in_features = cols.numel()


@torch.no_grad()
def _slice_norm(bn: nn.Module, keep: torch.Tensor) -> None:
    idx = keep.nonzero().flatten()
    if bn.affine:
        bn.weight = _param(bn.weight.index_select(0, idx.to(bn.weight.device)), bn.weight)
        bn.bias = _param(bn.bias.index_select(0, idx.to(bn.bias.device)), bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean.index_select(0, idx.to(bn.running_mean.device))
        bn.running_var = bn.running_var.index_select(0, idx.to(bn.running_var.device))
    bn.num_features = idx.numel()


def remove_channels(model: nn.Module, masks: Mapping[str, torch.Tensor], *,
                    example_input: torch.Tensor | None = None, rtol: float = 1e-4,
                    atol: float = 1e-5) -> nn.Module:
    """A copy of `model` with pruned output channels physically removed.

    masks: producer layer name -> bool (out,) channel keeps, or a weight-shaped mask (e.g. from
        make_mask(pattern="channel") or channel_masks); channels with no kept weight are pruned.
        In a residual stream a channel goes only when every producer writing it drops it.
    The copy first becomes the masked model (mask_channels), then each removed channel leaves its
    producers' weight rows and biases, its BatchNorms and the matching input columns of the
    consumers (Linear after Flatten: all of the channel's features). In eval mode its outputs equal
    the masked model's up to float summation order. With `example_input` that is checked on it
    (eval mode, rtol/atol, raised to 8 units in the last place of the model's dtype relative to
    the output's magnitude: a bfloat16 model's reordered sums differ by a few of its ulps) and a
    RuntimeError raised if not. `model` itself is not changed.
    """
    shrunk = copy.deepcopy(model)
    groups = channel_graph(shrunk)
    keeps = _group_keeps(shrunk, groups, masks)
    mask_channels(shrunk, masks)
    masked = copy.deepcopy(shrunk) if example_input is not None else None
    modules = dict(shrunk.named_modules())
    for g, keep in zip(groups, keeps):
        if bool(keep.all()):
            continue
        for p, _ in g.producers:
            _slice_out(modules[p], keep)
        for bn_name in g.norms:
            _slice_norm(modules[bn_name], keep)
        for c, factor in g.consumers:
            _slice_in(modules[c], keep, factor)
    if masked is not None:
        _check_equal(masked, shrunk, example_input, rtol, atol)
    return shrunk


def _check_equal(masked: nn.Module, shrunk: nn.Module, x: torch.Tensor, rtol: float, atol: float) -> None:
    with torch.no_grad():
        masked.eval()
        ref = masked(x)
        was = shrunk.training
        shrunk.eval()
        out = shrunk(x)
        shrunk.train(was)
    if ref.is_floating_point() and ref.numel():
        eps = 8 * torch.finfo(ref.dtype).eps
        rtol, atol = max(rtol, eps), max(atol, eps * float(ref.abs().max()))
    if ref.shape != out.shape or not torch.allclose(out, ref, rtol=rtol, atol=atol):
        err = (out - ref).abs().max().item() if ref.shape == out.shape else float("nan")
        raise RuntimeError(f"the shrunk model's output differs from the masked model's (max error {err:.3e}): "
                           "its forward is not the supported graph (see pyhwp.prune.graph)")


def channel_masks(model: nn.Module, sparsity: float, criterion: str = "magnitude", *,
                  scores: Mapping[str, torch.Tensor] | None = None,
                  activations: Mapping[str, torch.Tensor] | None = None,
                  skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Coupled channel masks: in every channel group (except the model output and groups with a
    producer in `skip`) prune round(sparsity * channels) channels, ranked by the sum over the
    group's producers of each channel's mean score under `criterion` ("magnitude", "taylor" with
    scores=, "wanda" with activations=; name -> tensor as for make_mask). Every producer of a
    residual stream gets the same channels. Returns producer name -> bool (out,) keeps."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if criterion == "hybrid":
        raise ValueError("channel_masks supports 'magnitude', 'taylor' and 'wanda'")
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for g in channel_graph(model):
        if g.is_output or any(p in skip for p, _ in g.producers):
            continue
        total = torch.zeros(g.channels, dtype=torch.float64)
        for p, _ in g.producers:
            w = modules[p].weight
            s, _ = element_scores(w, criterion, None if scores is None else scores.get(p),
                                  None if activations is None else activations.get(p))
            total += s.reshape(w.shape[0], -1).mean(dim=1).cpu()
        k = min(_round_half_up(sparsity * g.channels), g.channels - 1)
        order = torch.argsort(total, stable=True)
        keep = torch.ones(g.channels, dtype=torch.bool)
        keep[order[:k]] = False
        for p, _ in g.producers:
            out[p] = keep.to(modules[p].weight.device)
    return out
