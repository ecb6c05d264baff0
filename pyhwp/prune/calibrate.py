"""Calibration statistics for pruning, gathered over a few batches: accumulated Taylor scores, and
(via forward hooks) norms and Gram matrices of each layer's GEMM-form input columns."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pyhwp.prune.criteria import taylor_scores_of
from pyhwp.prune.layers import prunable_layers

_CHUNK_ELEMENTS = 1 << 22  # rows of unfolded patches are processed in chunks of about this size


def _split_batch(batch) -> tuple[torch.Tensor, object]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError("loader must yield input tensors or (input, target, ...) tuples, got "
                    f"{type(batch).__name__}")


def _batches(loader: Iterable, batches: int | None) -> Iterator:
    if batches is not None and (not isinstance(batches, int) or batches < 1):
        raise ValueError(f"batches must be a positive int or None, got {batches!r}")
    return iter(loader) if batches is None else itertools.islice(loader, batches)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    # Calibration must not move BatchNorm running statistics or sample dropout.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def gemm_columns(module: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The layer's input in GEMM form, in chunks of rows: tensors (groups, rows, K) whose columns
    are those of the weight's GEMM form (in for Linear; in/groups * kh * kw patch positions of each
    group for Conv2d, as F.unfold orders them after the module's own padding)."""
    if isinstance(module, nn.Linear):
        x2 = x.detach().reshape(-1, x.shape[-1])
        step = max(1, _CHUNK_ELEMENTS // max(1, x2.shape[1]))
        for i in range(0, x2.shape[0], step):
            yield x2[i:i + step].unsqueeze(0)
        return
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"gemm_columns supports Linear and Conv2d, got {type(module).__name__}")
    x = x.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    g = module.groups
    kg = module.in_channels // g * module.kernel_size[0] * module.kernel_size[1]
    per_image = kg * g * max(1, (x.shape[-2] * x.shape[-1]) // (module.stride[0] * module.stride[1]))
    step = max(1, _CHUNK_ELEMENTS // per_image)
    for i in range(0, x.shape[0], step):
        cols = F.unfold(x[i:i + step], module.kernel_size, dilation=module.dilation, stride=module.stride)
        b, _, positions = cols.shape
        yield cols.reshape(b, g, kg, positions).permute(1, 0, 3, 2).reshape(g, b * positions, kg)


def collect_inputs(model: nn.Module, loader: Iterable, layers: dict[str, nn.Module],
                   fn: Callable[[str, nn.Module, torch.Tensor], None], batches: int | None = None) -> None:
    """Run `model` in eval mode without gradients over `batches` of `loader`, calling
    fn(name, module, columns) for every chunk of GEMM-form input columns of every layer."""
    device = _device(model)
    handles = []
    for name, module in layers.items():
        def hook(mod, args, _name=name):
            for cols in gemm_columns(mod, args[0]):
                fn(_name, mod, cols)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with _eval_mode(model), torch.no_grad():
            for batch in _batches(loader, batches):
                x, _ = _split_batch(batch)
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()


def activation_norms(model: nn.Module, loader: Iterable, *, layers: Iterable[str] | None = None,
                     batches: int | None = None) -> dict[str, torch.Tensor]:
    """L2 norm of every GEMM-form input column of each layer over the calibration data (Wanda's
    ||x_j||), float64 on the weight's device: shape weight.shape[1:] (in for Linear,
    (in/groups, kh, kw) for Conv2d), or the weight's full shape for grouped convs, where each
    output channel sees its own group's inputs."""
    mods = prunable_layers(model, layers)
    sums: dict[str, torch.Tensor] = {}

    def add(name, mod, cols):
        s = cols.double().square().sum(dim=1)  # (groups, K)
        sums[name] = s if name not in sums else sums[name] + s

    collect_inputs(model, loader, mods, add, batches)
    out = {}
    for name, mod in mods.items():
        if name not in sums:
            raise RuntimeError(f"layer {name!r} never ran on the calibration data")
        w = mod.weight
        norms = sums[name].sqrt()
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:
            per_out = norms.repeat_interleave(w.shape[0] // mod.groups, dim=0)
            out[name] = per_out.reshape(w.shape).to(w.device)
        else:
            out[name] = norms.reshape(w.shape[1:]).to(w.device)
    return out


def input_grams(model: nn.Module, loader: Iterable, *, layers: Iterable[str] | None = None,
                batches: int | None = None) -> dict[str, torch.Tensor]:
    """Per layer, the Gram matrix [X 1]^T [X 1] of its GEMM-form input columns X with a column of
    ones appended (for the bias), float64 on the CPU, shape (groups, K + 1, K + 1)."""
    mods = prunable_layers(model, layers)
    grams: dict[str, torch.Tensor] = {}

    def add(name, mod, cols):
        c = cols.double().cpu()
        c = torch.cat([c, torch.ones(*c.shape[:2], 1, dtype=c.dtype)], dim=2)
        g = c.transpose(1, 2) @ c
        grams[name] = g if name not in grams else grams[name] + g

    collect_inputs(model, loader, mods, add, batches)
    missing = [n for n in mods if n not in grams]
    if missing:
        raise RuntimeError(f"layers {missing} never ran on the calibration data")
    return grams


def taylor_scores(model: nn.Module, loader: Iterable, loss_fn: Callable, *, layers: Iterable[str] | None = None,
                  batches: int | None = None) -> dict[str, torch.Tensor]:
    """First-order Taylor importance: |w * dL/dw| of every weight, summed over calibration batches
    (one backward pass each, model in eval mode), float64, weight's shape and device.

    The loader yields (input, target) pairs; loss_fn(model(input), target) is the loss. Parameter
    gradients are left as None afterwards.
    """
    mods = prunable_layers(model, layers)
    device = _device(model)
    acc = {name: torch.zeros_like(m.weight, dtype=torch.float64) for name, m in mods.items()}
    seen = 0
    with _eval_mode(model):
        for batch in _batches(loader, batches):
            x, y = _split_batch(batch)
            if y is None:
                raise TypeError("taylor_scores needs (input, target) batches for the loss")
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(x.to(device)), y.to(device) if isinstance(y, torch.Tensor) else y)
            loss.backward()
            for name, m in mods.items():
                if m.weight.grad is not None:
                    acc[name] += taylor_scores_of(m.weight, m.weight.grad)
            seen += 1
    model.zero_grad(set_to_none=True)
    if not seen:
        raise ValueError("loader yielded no batches")
    return acc
