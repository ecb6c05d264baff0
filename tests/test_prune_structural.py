"""Structural channel removal (chains and torchvision-style ResNets) and BatchNorm folding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pyhwp.metrics import count_params
from pyhwp.prune import (UnsupportedGraphError, channel_graph, channel_masks, conv_bn_pairs, fold_batchnorm,
                         make_mask, mask_channels, remove_channels)
from pyhwp.prune.bnfold import fold_conv_bn
from tiny_models import BasicBlock, ResNet, randomize_norms, single_thread, tiny_chain, tiny_resnet  # noqa: F401

MODELS = {
    "chain": (tiny_chain, (4, 3, 8, 8)),
    "resnet-basic": (lambda: tiny_resnet("basic"), (2, 3, 32, 32)),
    "resnet-bottleneck": (lambda: tiny_resnet("bottleneck"), (2, 3, 32, 32)),
}


def _masked(model, masks):
    m = copy.deepcopy(model)
    mask_channels(m, masks)
    return m.eval()


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_remove_channels_equals_masked_model(name, sparsity):
    build, shape = MODELS[name]
    model = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    masks = channel_masks(model, sparsity)
    shrunk = remove_channels(model, masks, example_input=x)
    torch.testing.assert_close(_out(shrunk, x), _out(_masked(model, masks), x))
    # every prunable group lost its channels, in the producers, norms and consumers alike
    modules = dict(shrunk.named_modules())
    for g in channel_graph(model):
        if g.is_output:
            continue
        kept = int(masks[g.producers[0][0]].sum())
        assert kept == g.channels - min(int(sparsity * g.channels + 0.5), g.channels - 1)
        for p, _ in g.producers:
            assert modules[p].weight.shape[0] == kept
        for bn in g.norms:
            assert modules[bn].num_features == kept and modules[bn].running_mean.shape == (kept,)
        for c, factor in g.consumers:
            assert modules[c].weight.shape[1] == kept * factor
    assert count_params(shrunk)["total"] < count_params(model)["total"]
    # the input model is untouched
    torch.testing.assert_close(_out(model, x), _out(build(), x))


@pytest.mark.parametrize("name", MODELS)
def test_uncoupled_masks_keep_partially_pruned_channels(name):
    # Per-layer channel masks disagree inside residual streams: only channels every writer drops
    # go, the rest stay as zero rows, and outputs still equal the masked model's.
    build, shape = MODELS[name]
    model = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    producers = [p for g in channel_graph(model) if not g.is_output for p, _ in g.producers]
    masks = {p: make_mask(model.get_submodule(p).weight, 0.5, "channel") for p in producers}
    shrunk = remove_channels(model, masks)
    torch.testing.assert_close(_out(shrunk, x), _out(_masked(model, masks), x))


def test_masked_channels_are_exact_zeros_downstream():
    model = tiny_chain()
    masks = channel_masks(model, 0.5)
    masked = _masked(model, masks)
    seen = {}
    masked[2].register_forward_hook(lambda m, a, o: seen.__setitem__("relu", o))
    _out(masked, torch.randn(2, 3, 8, 8))
    dropped = ~masks["0"]
    assert torch.equal(seen["relu"][:, dropped], torch.zeros_like(seen["relu"][:, dropped]))


def test_weight_shaped_and_vector_masks_agree():
    model = tiny_chain()
    w = model[0].weight
    full = make_mask(w, 0.5, "channel")
    a = remove_channels(model, {"0": full})
    b = remove_channels(model, {"0": full.reshape(w.shape[0], -1)[:, 0]})
    x = torch.randn(2, 3, 8, 8)
    assert a[0].weight.shape[0] == 4
    torch.testing.assert_close(_out(a, x), _out(b, x))


def test_chain_graph_of_tiny_chain():
    groups = channel_graph(tiny_chain())
    assert [g.producers for g in groups] == [[("0", "1")], [("3.0", None)], [("5", "6")], [("10", "11")],
                                             [("13", None)]]
    assert groups[1].norms == ["3.2"] and groups[2].consumers == [("10", 16)] and groups[-1].is_output


def test_resnet_graph_couples_residual_streams():
    groups = channel_graph(tiny_resnet("basic"))
    stem = groups[0]
    assert [p for p, _ in stem.producers] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert [c for c, _ in stem.consumers] == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
                                              "layer2.0.downsample.0"]
    ds = next(g for g in groups if g.producers[0][0] == "layer2.0.downsample.0")
    assert [p for p, _ in ds.producers] == ["layer2.0.downsample.0", "layer2.0.conv2"]
    assert groups[-1].producers == [("fc", None)] and groups[-1].is_output


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class _NotQuiteResNet(ResNet):
    def forward(self, x):  # adds a constant to the residual stream: channels are no longer zero
        x = self.maxpool(self.relu(self.bn1(self.conv1(x)))) + 1.0
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("model,match", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 4, 3)), "Sigmoid is not supported"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3)), "grouped/depthwise"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), _Concat()), "_Concat is not supported"),
    (_Concat(), "supports nn.Sequential chains and torchvision-style ResNets"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(0), nn.Linear(4, 2)), "only Flatten"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(10, 2)), "multiple of 4"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(5, 4, 3)), "reads 5 channels"),
    (nn.Sequential(nn.ReLU()), "no Conv2d or Linear"),
])
def test_unsupported_graphs_are_refused(model, match):
    with pytest.raises(UnsupportedGraphError, match=match):
        channel_graph(model)


def test_foreign_block_refused():
    model = tiny_resnet("basic")
    model.layer2[0].extra = nn.ReLU()
    with pytest.raises(UnsupportedGraphError, match="not a torchvision BasicBlock/Bottleneck"):
        channel_graph(model)


@pytest.mark.parametrize("name", ["chain", "resnet-basic", "mlp"])
def test_remove_channels_in_bfloat16(name):
    """The equality check allows for the model's precision (a bfloat16 model's reordered sums
    differ by a few ulps), and still catches a wrong forward (below)."""
    if name == "mlp":  # pyhwp.optimize on this model in bfloat16 raised here before
        torch.manual_seed(0)
        build, shape = lambda: nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)), (128, 256)
    else:
        build, shape = MODELS[name]
    model = build().bfloat16()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).bfloat16()
    masks = channel_masks(model, 0.5)
    shrunk = remove_channels(model, masks, example_input=x)
    ref = _out(_masked(model, masks), x)
    torch.testing.assert_close(_out(shrunk, x), ref, rtol=0.07, atol=0.07 * float(ref.abs().max()))


def test_example_input_catches_a_different_forward():
    torch.manual_seed(0)
    model = _NotQuiteResNet(BasicBlock, [2, 1, 2])
    randomize_norms(model)
    masks = channel_masks(model.eval(), 0.5)
    with pytest.raises(RuntimeError, match="differs from the masked model"):
        remove_channels(model, masks, example_input=torch.randn(2, 3, 32, 32))


def test_bad_masks_refused():
    model = tiny_chain()
    with pytest.raises(ValueError, match="output channels of 13"):
        remove_channels(model, {"13": torch.tensor([True, False, True, True, True])})
    with pytest.raises(ValueError, match="every channel"):
        remove_channels(model, {"0": torch.zeros(8, dtype=torch.bool)})
    with pytest.raises(KeyError, match="not Conv2d/Linear layers"):
        remove_channels(model, {"1": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="expected \\(8,\\)"):
        remove_channels(model, {"0": torch.ones(7, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool tensor"):
        remove_channels(model, {"0": torch.ones(8)})
    with pytest.raises(ValueError, match="sparsity"):
        channel_masks(model, 1.0)


@pytest.mark.parametrize("name", MODELS)
def test_fold_batchnorm_exact(name):
    build, shape = MODELS[name]
    model = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    folded = fold_batchnorm(model)
    torch.testing.assert_close(_out(folded, x), _out(model, x), rtol=1e-5, atol=1e-5)
    n_bn = lambda m: sum(isinstance(k, nn.BatchNorm2d) for k in m.modules())  # noqa: E731
    if name == "chain":
        # conv->BN pairs fold; the BN behind a ReLU and the BatchNorm1d stay
        assert conv_bn_pairs(model) == [("0", "1"), ("5", "6")]
        assert n_bn(folded) == 1 and isinstance(folded[11], nn.BatchNorm1d)
    else:
        assert n_bn(folded) == 0
    assert n_bn(model) > n_bn(folded) or name == "chain"


def test_fold_conv_bn_float64_reference():
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    bn = nn.BatchNorm2d(5).double()
    randomize_norms(bn)
    bn.eval()
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    w, b = fold_conv_bn(conv, bn)
    torch.testing.assert_close(nn.functional.conv2d(x, w, b, padding=1), bn(conv(x)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_bn(conv, nn.BatchNorm2d(5, track_running_stats=False))
    with pytest.raises(ValueError, match="features"):
        fold_conv_bn(conv, nn.BatchNorm2d(4))


def test_fold_then_remove_channels():
    # Folding first leaves plain conv chains (bias instead of BN); removal still matches masking.
    model = fold_batchnorm(tiny_resnet("bottleneck"))
    x = torch.randn(2, 3, 32, 32)
    masks = channel_masks(model, 0.5)
    torch.testing.assert_close(_out(remove_channels(model, masks), x), _out(_masked(model, masks), x))
