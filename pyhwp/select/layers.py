"""The prunable layers of a model as the selector sees them: GEMM shape, input size at the user's batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyhwp.prune.layers import prunable_layers


@dataclass(frozen=True)
class LayerInfo:
    """One Linear or Conv2d layer at the batch the model will serve.

    op: "linear" or "conv2d"; weight_shape: (out, in) or (out, in/groups, kh, kw);
    input_shape: linear (rows, in), rows = every leading dim of its input flattened;
    conv (N, C, H, W); output_hw: conv (H_out, W_out), None for linear.
    stride, padding, dilation, groups: the conv's own (padding as (ph, pw) ints; None for "same"/"valid"
    strings it resolved from), trivial values for linear.
    """

    name: str
    op: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_hw: tuple[int, int] | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def batch(self) -> int:
        """Rows of x (linear) or images (conv2d)."""
        return self.input_shape[0]

    @property
    def gemm_shape(self) -> tuple[int, int]:
        """(out, K) of the GEMM form, K = in/groups * kh * kw."""
        out = self.weight_shape[0]
        k = 1
        for s in self.weight_shape[1:]:
            k *= s
        return out, k

    @property
    def latency_case(self) -> tuple[str, tuple[int, ...], int, str | None]:
        """(op, shape, batch, note) for pyhwp.hardware.kernel_latency, whose conv2d cases have padding
        k // 2, no dilation and any stride. A conv of another padding or dilation is timed as the
        stride-1 case at its output size (the same GEMM: out x in*kh*kw x H_out*W_out); note says
        so, None when the case is exact."""
        if self.op == "linear":
            return "linear", self.weight_shape, self.batch, None
        out, cin, kh, kw = self.weight_shape
        exact = self.dilation == (1, 1) and self.padding == (kh // 2, kw // 2) and kh % 2 == 1 and kw % 2 == 1
        if exact:
            stride = () if self.stride == (1, 1) else self.stride
            return "conv2d", (out, cin, kh, kw, *self.input_shape[2:], *stride), self.batch, None
        h, w = self.output_hw
        note = (f"timed as a stride-1 'same' conv at the output size {h}x{w} (same GEMM; the layer has "
                f"stride {self.stride}, padding {self.padding}, dilation {self.dilation})")
        return "conv2d", (out, cin, kh, kw, h, w), self.batch, note

    @property
    def sparse_ok(self) -> str | None:
        """Why sparse patterns are not offered for this layer (None when they are)."""
        if self.op == "conv2d" and self.groups != 1:
            return "grouped conv: only dense is timed"
        return None

    def with_out(self, out: int) -> LayerInfo:
        return _replace_shape(self, (out,) + self.weight_shape[1:], self.input_shape)

    def with_in(self, cin: int) -> LayerInfo:
        """The layer reading `cin` input features (linear) or channels (conv)."""
        w = (self.weight_shape[0], cin) + self.weight_shape[2:]
        x = (self.input_shape[0], cin) + self.input_shape[2:]
        return _replace_shape(self, w, x)


def _replace_shape(info: LayerInfo, weight_shape, input_shape) -> LayerInfo:
    from dataclasses import replace

    return replace(info, weight_shape=tuple(weight_shape), input_shape=tuple(input_shape))


def as_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    """example_inputs as the positional arguments of model(*args): a tensor or a tuple/list of them."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and \
            all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a tuple of tensors (the model's positional inputs), "
                    f"got {type(example_inputs).__name__}")


def at_batch(example_inputs, batch_size: int | None) -> tuple[torch.Tensor, ...]:
    """The inputs with `batch_size` rows along dim 0 (example rows repeated cyclically), or as given."""
    args = as_inputs(example_inputs)
    if batch_size is None:
        return args
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    out = []
    for t in args:
        if t.dim() == 0 or t.shape[0] == 0:
            raise ValueError("example_inputs must have a non-empty batch dimension 0 to resize to batch_size")
        reps = -(-batch_size // t.shape[0])
        out.append(t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size].contiguous())
    return tuple(out)


@torch.no_grad()
def describe_layers(model: nn.Module, example_inputs, batch_size: int | None = None) -> dict[str, LayerInfo]:
    """Every Linear/Conv2d of `model` that runs on `example_inputs` (resized to `batch_size`), by name,
    in module order. Layers that never run are left out."""
    args = at_batch(example_inputs, batch_size)
    layers = prunable_layers(model)
    seen: dict[str, LayerInfo] = {}
    handles = []

    def hook(mod, inputs, output, name):
        if name in seen:
            return  # a module called twice keeps its first call's shapes
        x = inputs[0]
        if isinstance(mod, nn.Linear):
            seen[name] = LayerInfo(name, "linear", tuple(mod.weight.shape), (x.numel() // mod.in_features,
                                                                              mod.in_features))
        else:
            xs = tuple(x.shape) if x.dim() == 4 else (1,) + tuple(x.shape)
            if mod.padding == "valid":
                pad = (0, 0)
            elif mod.padding == "same":  # stride 1 by torch's rule; the larger half goes after
                pad = tuple(mod.dilation[d] * (mod.kernel_size[d] - 1) // 2 for d in range(2))
            else:
                pad = tuple(mod.padding)
            seen[name] = LayerInfo(name, "conv2d", tuple(mod.weight.shape), xs, tuple(output.shape[-2:]),
                                   tuple(mod.stride), tuple(pad), tuple(mod.dilation), mod.groups)

    for name, mod in layers.items():
        handles.append(mod.register_forward_hook(lambda m, i, o, n=name: hook(m, i, o, n)))
    was = model.training
    model.eval()
    try:
        model(*args)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {n: seen[n] for n in layers if n in seen}
