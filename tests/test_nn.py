"""pyhwp.nn: SparseLinear / SparseConv2d, sparsify, training that keeps pruned weights at zero,
and state_dict / deepcopy / pickle / torch.save round trips."""

from __future__ import annotations

import copy
import gc
import importlib
import io
import pickle
import weakref

import pytest
import torch
from torch import nn

import pyhwp
from pyhwp.nn import SparseConv2d, SparseLinear
from sparse_models import DEVICES, PATTERNS, SPARSE_NAMES, TinyNet, sparse_tiny_net, supported_dtype


def _close(a, b, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_layers_match_dense_and_round_trip(pattern, device):
    dtype = supported_dtype(pattern, device)
    sparse, dense, _ = sparse_tiny_net(pattern, dtype=dtype, device=device)
    x = dense.input(3, torch.Generator().manual_seed(1), dtype, device)
    _close(sparse(x), dense(x), dtype)
    for name in SPARSE_NAMES:
        layer, ref = sparse.get_submodule(name), dense.get_submodule(name)
        assert isinstance(layer, (SparseLinear, SparseConv2d)) and layer.pattern == pattern
        back = layer.to_dense()
        assert type(back) is type(ref) and back.weight.dtype == dtype and back.weight.device == ref.weight.device
        assert torch.equal(back.weight, ref.weight)
        assert (back.bias is None) == (ref.bias is None) and (back.bias is None or torch.equal(back.bias, ref.bias))
        assert [n for n, _ in layer.named_parameters()] == ["values"] + (["bias"] if ref.bias is not None else [])
        assert {n for n, _ in layer.named_buffers()} == set(layer.weight._tensors()) - {"values"}
    conv = sparse.conv.to_dense()
    assert (conv.stride, conv.padding, conv.kernel_size) == (dense.conv.stride, dense.conv.padding, (3, 3))


def test_from_dense_with_mask_keeps_exactly_the_mask():
    lin = nn.Linear(10, 6)
    mask = torch.rand(6, 10) < 0.3
    mask[0, 0] = True
    with torch.no_grad():
        lin.weight[0, 0] = 0.0  # a kept zero stays stored
    layer = SparseLinear.from_dense(lin, "csr", mask=mask)
    assert layer.weight.nnz == int(mask.sum())
    assert torch.equal(layer.weight.to_dense() != 0, mask & (lin.weight != 0))
    assert torch.equal(layer.to_dense().weight, lin.weight.detach() * mask)


def test_sparsify_nested_names_masks_and_return_value():
    model = TinyNet()
    mask = torch.rand(16, 200) < 0.2
    out = pyhwp.sparsify(model, {"head.2.0": "csr", "head.0": ("csr", mask), "conv": ("csr", None)})
    assert out is model
    assert isinstance(model.head[2][0], SparseLinear) and isinstance(model.conv, SparseConv2d)
    assert model.head[0].weight.nnz == int(mask.sum())
    assert isinstance(model.head[1], nn.ReLU)


@pytest.mark.parametrize("plan, exc, match", [
    ({"head.9": "csr"}, KeyError, "'head.9' is not a module"),
    ({"": "csr"}, KeyError, "is not a module"),
    ({"head.1": "csr"}, TypeError, "'head.1' is a ReLU; only Linear, Conv2d"),
    ({"head": "csr"}, TypeError, "is a Sequential"),
    ({"head.0": "bogus"}, ValueError, "pattern must be one of"),
    ({"head.0": ("csr",)}, TypeError, r"plan\['head.0'\] must be a pattern or \(pattern, mask\)"),
    ({"head.0": ("csr", torch.ones(3, 3, dtype=torch.bool))}, ValueError, "mask has shape"),
])
def test_sparsify_bad_plans_raise_and_change_nothing(plan, exc, match):
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        pyhwp.sparsify(model, {"conv": "csr", **plan})
    assert isinstance(model.conv, nn.Conv2d)  # the valid entry was not applied either
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_modules_raise():
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        pyhwp.sparsify(nn.Sequential(mha), {"0.out_proj": "csr"})
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(2, 2, 1), "csr")
    with pytest.raises(TypeError, match="torch.nn.Conv2d"):
        SparseConv2d.from_dense(nn.Conv1d(2, 2, 1), "csr")
    with pytest.raises(TypeError, match="Conv1d"):
        pyhwp.sparsify(nn.Sequential(nn.Conv1d(2, 2, 1)), {"0": "csr"})
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_dense(nn.Conv2d(2, 2, 3, padding_mode="reflect"), "csr")
    with pytest.raises(TypeError, match="2-D pyhwp.SparseWeight"):
        SparseLinear(torch.randn(3, 3))


_OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("optimizer", sorted(_OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero_under_training(pattern, device, optimizer):
    dtype = supported_dtype(pattern, device)
    sparse, _, masks = sparse_tiny_net(pattern, dtype=dtype, device=device)
    start = {n: sparse.get_submodule(n).weight.to_dense().clone() for n in SPARSE_NAMES}
    opt = _OPTIMIZERS[optimizer](sparse.parameters())
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(40):
        x = sparse.input(4, g, dtype, device)
        loss = (sparse(x) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name in SPARSE_NAMES:
        w = sparse.get_submodule(name).weight.to_dense()
        mask = masks[name].to(device)
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask])), name
        assert not torch.equal(w, start[name]), name  # the kept weights did train
        assert torch.equal(sparse.get_submodule(name).to_dense().weight != 0, w != 0)


def _outputs(model, dtype, device):
    x = TinyNet().input(3, torch.Generator().manual_seed(3), dtype, device)
    with torch.no_grad():
        return model(x)


def _assert_same_model(a, b, dtype, device):
    for name in SPARSE_NAMES:
        la, lb = a.get_submodule(name), b.get_submodule(name)
        assert type(la) is type(lb) and la.pattern == lb.pattern and la.weight_shape == lb.weight_shape
        assert torch.equal(la.weight.to_dense(), lb.weight.to_dense())
    assert torch.equal(_outputs(a, dtype, device), _outputs(b, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_state_dict_round_trip_across_masks(pattern, device):
    """A state_dict loads into the same architecture sparsified with another mask (other nnz)."""
    dtype = supported_dtype(pattern, device)
    model, _, _ = sparse_tiny_net(pattern, seed=0, dtype=dtype, device=device)
    other, _, _ = sparse_tiny_net(pattern, seed=1, dtype=dtype, device=device)
    values = other.head[0].values
    assert not torch.equal(other.head[0].weight.to_dense() != 0, model.head[0].weight.to_dense() != 0)
    if pattern == "csr":
        assert other.head[0].values.shape != model.head[0].values.shape  # storage sizes change too
    other.load_state_dict(model.state_dict())
    assert other.head[0].values is values  # same Parameter object: optimizers keep theirs
    _assert_same_model(model, other, dtype, device)


def test_state_dict_with_broken_indices_is_rejected():
    model, _, _ = sparse_tiny_net("csr")
    state = model.state_dict()
    state["head.0.col_indices"] = state["head.0.col_indices"].clone()
    state["head.0.col_indices"][0] = 10_000
    with pytest.raises(ValueError, match="head.0.*invalid 'csr' weight.*outside"):
        sparse_tiny_net("csr")[0].load_state_dict(state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_deepcopy_pickle_and_torch_save_round_trip(pattern, device, tmp_path):
    dtype = supported_dtype(pattern, device)
    model, _, _ = sparse_tiny_net(pattern, dtype=dtype, device=device)
    _assert_same_model(model, copy.deepcopy(model), dtype, device)
    _assert_same_model(model, pickle.loads(pickle.dumps(model)), dtype, device)
    torch.save(model, tmp_path / "model.pt")
    _assert_same_model(model, torch.load(tmp_path / "model.pt", weights_only=False), dtype, device)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh, _, _ = sparse_tiny_net(pattern, seed=5, dtype=dtype, device=device)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    _assert_same_model(model, fresh, dtype, device)


def test_double_moves_the_values_and_runs_the_float64_path():
    model, dense, _ = sparse_tiny_net("csr")
    model, dense = model.double(), dense.double()
    assert model.head[0].values.dtype == torch.float64 and model.head[0].col_indices.dtype == torch.int32
    x = TinyNet().input(2, torch.Generator().manual_seed(4), torch.float64)
    _close(model(x), dense(x), torch.float64)


def test_weight_is_reused_only_while_frozen_and_unchanged():
    model, dense, _ = sparse_tiny_net("csr")
    layer = model.head[0]
    x = TinyNet().input(2, torch.Generator().manual_seed(6), torch.float32, "cpu")
    with torch.no_grad():
        assert layer.weight is layer.weight  # derived data (kernel indices, conv taps) is kept
        before = model(x)
        layer.values.mul_(2)  # an in-place change is seen
        assert not torch.equal(model(x), before)
        layer.values.div_(2)
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
        # Each way of changing an array gives a new weight: values moved by `.data =` (which
        # keeps the version), a buffer replaced, a buffer changed in place.
        seen = [layer.weight]
        layer.values.data = layer.values.detach().clone()
        seen.append(layer.weight)
        layer.col_indices = layer.col_indices.clone()
        seen.append(layer.weight)
        layer.col_indices.add_(0)
        seen.append(layer.weight)
        assert len({id(w) for w in seen}) == len(seen) and seen[-1] is layer.weight
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    assert layer.weight is not layer.weight  # under autograd every forward builds its own
    module_ref = weakref.ref(layer)
    del model, layer
    gc.collect()
    assert module_ref() is None  # the cache keeps no module alive, and its entry leaves with it
    assert all(entry[0]() is not None for entry in importlib.import_module("pyhwp.nn.module")._WEIGHTS.values())


def test_repeated_forward_backward_in_eager():
    model, _, _ = sparse_tiny_net("csr")
    g = torch.Generator().manual_seed(7)
    for _ in range(3):  # graph-owned data must not be cached across iterations
        model(TinyNet().input(2, g, torch.float32, "cpu")).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
