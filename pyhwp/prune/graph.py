"""Channel dependency graphs of the model families structural pruning supports: which layers write
each set of channels, which read them, and which BatchNorms normalise them.

Supported (anything else raises UnsupportedGraphError naming what was not understood):

1. Chains: an nn.Sequential (nested Sequentials are flattened) of Conv2d (groups=1), Linear,
   BatchNorm1d/2d, activations with f(0) = 0 (ReLU, ReLU6, LeakyReLU, ELU, SELU, CELU, GELU,
   SiLU, Mish, Tanh, Hardtanh, Hardswish, Softsign, Tanhshrink), Identity, Dropout/Dropout1d/2d,
   MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d and Flatten (start_dim=1,
   end_dim=-1). Each Conv2d/Linear's output channels are read by the next Conv2d/Linear; across a
   Flatten the next Linear reads in_features / channels features per channel.
2. torchvision-style ResNets: children conv1, bn1, [relu], [maxpool], layer1..layerN (each an
   nn.Sequential of BasicBlock or Bottleneck blocks), avgpool, fc; a block has conv1, bn1, conv2,
   bn2 [, conv3, bn3], relu and downsample (None or Sequential(Conv2d, BatchNorm2d)), each
   BatchNorm2d possibly replaced by Identity (after fold_batchnorm), and the
   forward of torchvision's blocks (out = relu(bn_last(conv_last(...)) + identity)). Residual
   streams couple channels: the stem and every block output of a stage (plus the downsample that
   opens it) write the same channels, so they are kept or removed together.

Not supported: grouped/depthwise convs, concatenation (DenseNet, Inception), attention, any
custom forward other than the ResNet blocks above, activations with f(0) != 0 (Sigmoid, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


class UnsupportedGraphError(ValueError):
    """The model's channel dependencies are not of a kind structural pruning understands."""


_ZERO_PRESERVING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_BN_OR_FOLDED = (nn.BatchNorm2d, nn.Identity)  # ResNet norms, or their place after fold_batchnorm


@dataclass
class ChannelGroup:
    """A set of channels that is kept or removed as a whole.

    producers: (layer name, name of the BatchNorm directly after it or None): Conv2d/Linear whose
        output channels these are (several for a residual stream).
    norms: every BatchNorm over these channels (the directly-following ones and any later in a chain).
    consumers: (layer name, features per channel): Conv2d/Linear reading these channels as input
        (features per channel > 1 for a Linear after Flatten).
    is_output: the channels are the model's output and cannot be removed.
    """

    channels: int
    producers: list[tuple[str, str | None]] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    is_output: bool = False


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _in_channels(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def _check_conv(name: str, m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise UnsupportedGraphError(f"{name}: grouped/depthwise Conv2d (groups={m.groups}) is not supported")


def _flatten(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for child_name, child in seq.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, nn.Sequential):
            out.extend(_flatten(child, name + "."))
        else:
            out.append((name, child))
    return out


def _chain_graph(model: nn.Sequential) -> list[ChannelGroup]:
    groups: list[ChannelGroup] = []
    current: ChannelGroup | None = None
    last_producer_adjacent = False  # the previous module was the current group's producer
    flattened = False
    for name, m in _flatten(model, ""):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _check_conv(name, m)
            if current is not None:
                if flattened:
                    if not isinstance(m, nn.Linear) or m.in_features % current.channels:
                        raise UnsupportedGraphError(
                            f"{name}: after Flatten expected a Linear whose in_features is a multiple of "
                            f"{current.channels} channels, got {type(m).__name__}")
                    factor = m.in_features // current.channels
                else:
                    factor = 1
                    if _in_channels(m) != current.channels:
                        raise UnsupportedGraphError(f"{name}: reads {_in_channels(m)} channels but the "
                                                    f"previous layer writes {current.channels}")
                current.consumers.append((name, factor))
            current = ChannelGroup(channels=_out_channels(m), producers=[(name, None)])
            groups.append(current)
            last_producer_adjacent, flattened = True, False
            continue
        if isinstance(m, _NORMS):
            if current is not None:
                if flattened or m.num_features != current.channels:
                    raise UnsupportedGraphError(f"{name}: BatchNorm over {m.num_features} features does not "
                                                f"match the {current.channels} channels before it")
                current.norms.append(name)
                if last_producer_adjacent:
                    current.producers[-1] = (current.producers[-1][0], name)
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise UnsupportedGraphError(f"{name}: only Flatten(start_dim=1, end_dim=-1) is supported")
            flattened = True
        elif not isinstance(m, _ZERO_PRESERVING):
            raise UnsupportedGraphError(
                f"{name}: {type(m).__name__} is not supported in a chain (it may mix channels, "
                "or map zero to nonzero); see pyhwp.prune.graph for the supported modules")
        last_producer_adjacent = False
    if current is None:
        raise UnsupportedGraphError("the model has no Conv2d or Linear layer")
    current.is_output = True
    return groups


def _resnet_layers(model: nn.Module) -> list[str] | None:
    names = [n for n, _ in model.named_children()]
    layers = []
    while f"layer{len(layers) + 1}" in names:
        layers.append(f"layer{len(layers) + 1}")
    expected = {"conv1", "bn1", "avgpool", "fc", *layers}
    optional = {"relu", "maxpool"}
    if not layers or not expected <= set(names) or not set(names) <= expected | optional:
        return None
    return layers


def is_resnet(model: nn.Module) -> bool:
    """True for a module laid out like torchvision's ResNet (see the module docstring)."""
    return not isinstance(model, nn.Sequential) and _resnet_layers(model) is not None


def _block_convs(path: str, block: nn.Module) -> list[str]:
    children = dict(block.named_children())
    convs = ["conv1", "conv2", "conv3"] if "conv3" in children else ["conv1", "conv2"]
    wanted = {*convs, *(f"bn{c[-1]}" for c in convs), "relu", "downsample"}
    if not set(children) <= wanted or not all(c in children for c in convs):
        raise UnsupportedGraphError(f"{path}: {type(block).__name__} is not a torchvision BasicBlock/"
                                    f"Bottleneck (children {sorted(children)})")
    for c in convs:
        if not isinstance(children[c], nn.Conv2d) or not isinstance(children.get(f"bn{c[-1]}"), _BN_OR_FOLDED):
            raise UnsupportedGraphError(f"{path}: expected {c} a Conv2d followed by bn{c[-1]} a BatchNorm2d "
                                        "(or Identity once folded)")
        _check_conv(f"{path}.{c}", children[c])
    ds = children.get("downsample")
    if ds is not None and not (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)
                               and isinstance(ds[1], _BN_OR_FOLDED)):
        raise UnsupportedGraphError(f"{path}.downsample: expected None or Sequential(Conv2d, BatchNorm2d)")
    if ds is not None:
        _check_conv(f"{path}.downsample.0", ds[0])
    return convs


def _norm(model: nn.Module, name: str) -> list[str]:
    return [name] if isinstance(model.get_submodule(name), nn.BatchNorm2d) else []


def _resnet_graph(model: nn.Module, layers: list[str]) -> list[ChannelGroup]:
    if not (isinstance(model.conv1, nn.Conv2d) and isinstance(model.bn1, _BN_OR_FOLDED)
            and isinstance(model.fc, nn.Linear)):
        raise UnsupportedGraphError("ResNet stem must be conv1: Conv2d, bn1: BatchNorm2d (or Identity) and fc: Linear")
    _check_conv("conv1", model.conv1)

    def producer(conv: str, bn: str) -> tuple[str, str | None]:
        return conv, (_norm(model, bn) or [None])[0]

    stream = ChannelGroup(channels=model.conv1.out_channels, producers=[producer("conv1", "bn1")],
                          norms=_norm(model, "bn1"))
    groups = [stream]
    for layer_name in layers:
        layer = getattr(model, layer_name)
        if not isinstance(layer, nn.Sequential):
            raise UnsupportedGraphError(f"{layer_name}: expected an nn.Sequential of residual blocks")
        for idx, block in layer.named_children():
            p = f"{layer_name}.{idx}"
            convs = _block_convs(p, block)
            stream.consumers.append((f"{p}.conv1", 1))
            for a, b in zip(convs[:-1], convs[1:]):
                conv = getattr(block, a)
                groups.append(ChannelGroup(channels=conv.out_channels,
                                           producers=[producer(f"{p}.{a}", f"{p}.bn{a[-1]}")],
                                           norms=_norm(model, f"{p}.bn{a[-1]}"), consumers=[(f"{p}.{b}", 1)]))
            if block.downsample is not None:
                stream.consumers.append((f"{p}.downsample.0", 1))
                stream = ChannelGroup(channels=block.downsample[0].out_channels,
                                      producers=[producer(f"{p}.downsample.0", f"{p}.downsample.1")],
                                      norms=_norm(model, f"{p}.downsample.1"))
                groups.append(stream)
            last = convs[-1]
            stream.producers.append(producer(f"{p}.{last}", f"{p}.bn{last[-1]}"))
            stream.norms += _norm(model, f"{p}.bn{last[-1]}")
    stream.consumers.append(("fc", 1))
    groups.append(ChannelGroup(channels=model.fc.out_features, producers=[("fc", None)], is_output=True))
    return groups


def _check_consistent(model: nn.Module, groups: list[ChannelGroup]) -> None:
    modules = dict(model.named_modules())
    for g in groups:
        for name, _ in g.producers:
            if _out_channels(modules[name]) != g.channels:
                raise UnsupportedGraphError(f"{name} writes {_out_channels(modules[name])} channels where "
                                            f"{g.channels} are expected (residual widths must match)")
        for name in g.norms:
            if modules[name].num_features != g.channels:
                raise UnsupportedGraphError(f"{name} normalises {modules[name].num_features} channels, "
                                            f"expected {g.channels}")
        for name, factor in g.consumers:
            if _in_channels(modules[name]) != g.channels * factor:
                raise UnsupportedGraphError(f"{name} reads {_in_channels(modules[name])} features, expected "
                                            f"{g.channels} channels x {factor}")


def channel_graph(model: nn.Module) -> list[ChannelGroup]:
    """The channel groups of a supported model (see the module docstring), in module order.
    Raises UnsupportedGraphError for any other model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Sequential):
        groups = _chain_graph(model)
    elif is_resnet(model):
        groups = _resnet_graph(model, _resnet_layers(model))
    else:
        raise UnsupportedGraphError(
            f"{type(model).__name__}: structural pruning supports nn.Sequential chains and torchvision-style "
            "ResNets (see pyhwp.prune.graph); wrap other models' layers or prune them with masks only")
    _check_consistent(model, groups)
    return groups
