"""Autograd of the sparse matmul ops: float64 gradcheck, dense-autograd agreement, opcheck, fast path."""

from __future__ import annotations

import gc
import importlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pyhwp
from pyhwp.ops import autograd
from pyhwp.ops.eager import needs_op
from sparse_models import DEVICES, PATTERNS, prune_for, supported_dtype


def _weight(pattern, shape, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = prune_for(pattern, torch.randn(shape, generator=g, dtype=dtype), g).to(device)
    return w, pyhwp.to_sparse(w, pattern)


def _with_values(sw, values):
    arrays = {k: v for k, v in sw._tensors().items()}
    arrays["values"] = values
    return type(sw)._unchecked(sw.shape, **arrays)


@pytest.fixture(params=["gather", "dense"])
def backward_form(request, monkeypatch):
    """Force the backward's small-batch (gather/index_add) or dense-temporary form."""
    monkeypatch.setattr(autograd, "_small", lambda *sizes: request.param == "gather")
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("batch", [1, 5])
def test_linear_gradcheck_float64(pattern, device, batch, backward_form):
    w, sw = _weight(pattern, (6, 8), seed=batch, device=device)
    g = torch.Generator().manual_seed(10 + batch)
    x = torch.randn(batch, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    v = sw.values.detach().clone().requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: pyhwp.linear(x, _with_values(sw, v), b), (x, v, b))
    assert torch.autograd.gradcheck(lambda x, v: pyhwp.linear(x, _with_values(sw, v)), (x, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_conv2d_gradcheck_float64(pattern, device, backward_form):
    """conv2d runs its GEMM with transpose_out=True: the backward's other layout."""
    w, sw = _weight(pattern, (3, 2, 2, 2), seed=3, device=device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    v = sw.values.detach().clone().requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda x, v, b: pyhwp.conv2d(x, _with_values(sw, v), b, stride=(2, 1), padding=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, v, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("batch", [1, 300])
def test_grads_equal_dense_autograd_at_kept_positions(pattern, device, batch, backward_form):
    """In the kernel dtype: grad_x, grad_bias and grad of the stored values equal dense autograd's
    (grad of the dense weight read at the kept positions)."""
    dtype = supported_dtype(pattern, device)
    w, sw = _weight(pattern, (33, 40), seed=5, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(batch, 40, generator=g, dtype=dtype).to(device)
    b = torch.randn(33, generator=g, dtype=dtype).to(device)
    gy = torch.randn(batch, 33, generator=g, dtype=dtype).to(device)
    xs, vs, bs = x.clone().requires_grad_(), sw.values.detach().clone().requires_grad_(), b.clone().requires_grad_()
    pyhwp.linear(xs, _with_values(sw, vs), bs).backward(gy)
    xd, wd, bd = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    F.linear(xd, wd, bd).backward(gy)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs.grad, xd.grad, **tol)
    torch.testing.assert_close(bs.grad, bd.grad, **tol)
    kept_grad = _with_values(sw, vs.grad).to_dense()
    torch.testing.assert_close(kept_grad, wd.grad * (w != 0), **tol)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("groups, stride", [(1, 1), (1, 2), (2, 1), (4, 2)], ids=str)
def test_conv2d_grads_equal_dense_autograd_at_kept_positions(pattern, groups, stride):
    """Every conv path on the CPU (implicit GEMM / per tap, im2col per group, depthwise through
    torch at groups == 4): the values' gradient is dense autograd's at the kept positions and zero
    at the others (a masked weight's stored tiles hold pruned zeros)."""
    dtype = supported_dtype(pattern, "cpu")
    w, sw = _weight(pattern, (8, 4 // groups, 2, 2), seed=7 + groups + stride, dtype=dtype)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=dtype)
    b = torch.randn(8, generator=g, dtype=dtype)
    xs, vs, bs = x.clone().requires_grad_(), sw.values.detach().clone().requires_grad_(), b.clone().requires_grad_()
    y = pyhwp.conv2d(xs, _with_values(sw, vs), bs, stride, 1, 1, groups)
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    y.backward(gy)
    xd, wd, bd = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    F.conv2d(xd, wd, bd, stride, 1, 1, groups).backward(gy)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs.grad, xd.grad, **tol)
    torch.testing.assert_close(bs.grad, bd.grad, **tol)
    torch.testing.assert_close(_with_values(sw, vs.grad).to_dense(), wd.grad * (w != 0), **tol)


def test_backward_form_follows_the_memory_bound():
    assert autograd._small(1, 100, 30, 10)  # 3 * 1 * 100 <= 300
    assert not autograd._small(2, 100, 30, 10)


def test_index_arrays_get_no_gradient_and_values_only_when_asked():
    w, sw = _weight("csr", (5, 7), seed=7, dtype=torch.float32)
    x = torch.randn(3, 7, requires_grad=True)
    y = pyhwp.linear(x, sw)  # values do not require grad: only x gets one
    y.sum().backward()
    assert x.grad is not None and sw.values.grad is None
    assert not sw.row_offsets.requires_grad and not sw.col_indices.requires_grad


class _RecordPyhwpOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pyhwp":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device, dtype", [
    ("cpu", None), ("cpu", torch.bfloat16), pytest.param("cuda", None, marks=pytest.mark.cuda)],
    ids=["cpu", "cpu-bfloat16", "cuda"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_opcheck_every_op(pattern, device, dtype):
    """torch.library.opcheck on every pyhwp op that linear and conv2d call, as they call it
    (both output layouts, with and without bias), with the stored values requiring grad; in the
    kernels' float32 (None) and in bfloat16, which every CPU kernel serves."""
    dtype = dtype or supported_dtype(pattern, device)
    _, sw = _weight(pattern, (9, 16), seed=8, dtype=dtype, device=device)
    _, sw4 = _weight(pattern, (5, 4, 2, 2), seed=9, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 16, generator=g, dtype=dtype).to(device)
    img = torch.randn(2, 4, 3, 3, generator=g, dtype=dtype).to(device)
    with _RecordPyhwpOps() as rec:
        pyhwp.linear(x, sw, torch.randn(9, dtype=dtype, device=device))
        pyhwp.linear(x, sw)
        pyhwp.conv2d(img, sw4, torch.randn(5, dtype=dtype, device=device))
    kinds = {}  # one call per op and argument kinds (bias or None, transpose_out): conv2d runs many
    for func, args, kwargs in rec.calls:
        kind = tuple(a if a is None or isinstance(a, bool) else "tensor" for a in args)
        kinds.setdefault((func, kind), (func, args, kwargs))
    assert len(kinds) >= 3
    for func, args, kwargs in kinds.values():
        args = tuple(a.detach().clone().requires_grad_(a.is_floating_point() and i > 0)
                     if isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
        torch.library.opcheck(func, args, kwargs)


def test_fast_path_only_when_nothing_needs_the_op():
    x, v = torch.randn(2, 3), torch.randn(4)
    assert not needs_op(x, v, None)
    assert not needs_op(x, torch.nn.Parameter(v, requires_grad=False), None)  # a frozen layer's values
    v.requires_grad_()
    assert needs_op(x, v, None)  # autograd must record the op
    with torch.no_grad():
        assert not needs_op(x, v, None)
    with torch.inference_mode():
        assert not needs_op(torch.randn(2, 3), torch.randn(4), None)
    with _RecordPyhwpOps():
        assert needs_op(x, torch.randn(4), None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(2, 3))
    assert needs_op(fake, torch.randn(4), None)
    seen, v = [], torch.randn(4)
    torch.vmap(lambda xb: seen.append(needs_op(xb, v, None)) or xb)(torch.randn(3, 2))
    assert seen == [True]  # batched tensors look like plain ones; the transform stack gives them away


def test_fast_path_and_op_give_identical_results():
    w, sw = _weight("csr", (70, 50), seed=11, dtype=torch.float32)
    x, b = torch.randn(5, 50), torch.randn(70)
    with torch.no_grad():
        fast = pyhwp.linear(x, sw, b)
    with _RecordPyhwpOps() as rec:
        via_op = pyhwp.linear(x, sw, b)
    assert len(rec.calls) == 1 and torch.equal(fast, via_op)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_fast_path_skips_the_general_checks_only_where_it_applies(pattern, dtype, monkeypatch):
    linear_mod = importlib.import_module("pyhwp.ops.linear")  # pyhwp.ops.linear is also the function

    w, sw = _weight(pattern, (40, 64), seed=12, dtype=dtype)
    x, b = torch.randn(3, 64, dtype=dtype), torch.randn(40, dtype=dtype)
    strided = torch.randn(64, 3, dtype=dtype).t()  # (3, 64), x.stride() == (1, 3)
    x3 = torch.randn(2, 3, 64, dtype=dtype)  # (batch, tokens, features), contiguous
    expected = [pyhwp.linear(t, sw, bias) for t in (x, strided, x3) for bias in (None, b)]

    def general_path(*args, **kwargs):
        raise AssertionError("took the general path")

    monkeypatch.setattr(linear_mod, "check_bias", general_path)
    got = [pyhwp.linear(t, sw, bias) for t in (x, strided, x3) for bias in (None, b)]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    ref = (x.double() @ w.double().T + b.double()).to(dtype)
    torch.testing.assert_close(got[1], ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
    assert got[5].shape == (2, 3, 40)
    # Everything else takes the general path: a 1-D or non-contiguous 3-D x, a strided bias, out=,
    # autograd, a Parameter input; a dtype mismatch gets its error.
    for call in (lambda: pyhwp.linear(x[0], sw), lambda: pyhwp.linear(x3.transpose(0, 1), sw),
                 lambda: pyhwp.linear(x, sw, torch.randn(80, dtype=dtype)[::2]),
                 lambda: pyhwp.linear(x, sw, out=torch.empty(3, 40, dtype=dtype)),
                 lambda: pyhwp.linear(x.clone().requires_grad_(), sw),
                 lambda: pyhwp.linear(torch.nn.Parameter(x), sw)):
        with pytest.raises(AssertionError, match="general path"):
            call()
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        pyhwp.linear(x.double(), sw)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_linear_fast_path_plan_follows_its_weight(pattern):
    linear_mod = importlib.import_module("pyhwp.ops.linear")
    w, sw = _weight(pattern, (40, 64), seed=13, dtype=torch.float32)
    x = torch.randn(2, 64)
    torch.testing.assert_close(pyhwp.linear(x, sw), x @ w.T, rtol=1e-5, atol=1e-5)
    assert id(sw) in linear_mod._PLANS
    # The values moved to other memory (set_, or .data= on a module's Parameter): the plan's
    # addresses are stale, so it is rebuilt, and the kernel reads the new values.
    sw.values.set_(sw.values.clone() * 2)
    torch.testing.assert_close(pyhwp.linear(x, sw), 2 * (x @ w.T), rtol=1e-5, atol=1e-5)
    # A dtype the weight is not stored in gets the general path's error every time, not a plan.
    for _ in range(2):
        with pytest.raises(TypeError, match="x has dtype torch.bfloat16"):
            pyhwp.linear(x.bfloat16(), sw)
    alive = weakref.ref(sw)
    del sw
    gc.collect()
    assert alive() is None  # the plan does not keep the weight alive, and leaves with it
    assert all(entry[0]() is not None for entry in linear_mod._PLANS.values())
