"""pyhwp.sparsify: replace named Linear/Conv2d modules of a model by their sparse twins, in place."""

from __future__ import annotations

import torch
from torch import nn

from pyhwp.nn.conv import SparseConv2d
from pyhwp.nn.linear import SparseLinear

# Dense module type -> its drop-in sparse layer. Subclasses count (isinstance) unless listed below.
SPARSE_TWINS: dict[type[nn.Module], type] = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


def sparsify(model: nn.Module, plan: dict[str, str | tuple[str, torch.Tensor | None]]) -> nn.Module:
    """Replace modules of `model` in place and return `model`.

    Args:
        model: any nn.Module.
        plan: dotted module name as `model.named_modules()` gives it (any depth) -> pattern, or
            (pattern, mask) with mask a bool tensor of the module weight's shape (True keeps).
    Raises:
        KeyError: a name that is not a module of `model`.
        TypeError: a module that is neither nn.Linear nor nn.Conv2d, or one whose parent reads its
            weight directly (the out_proj of nn.MultiheadAttention).
    Every entry is checked before anything is replaced, so a bad plan leaves the model unchanged.
    """
    modules = dict(model.named_modules())
    replacements = []
    for name, spec in plan.items():
        if not isinstance(name, str) or not name or name not in modules:
            raise KeyError(f"sparsify: {name!r} is not a module of the model")
        if isinstance(spec, str):
            spec = (spec, None)
        if not isinstance(spec, (tuple, list)) or len(spec) != 2:
            raise TypeError(f"sparsify: plan[{name!r}] must be a pattern or (pattern, mask), got {spec!r}")
        pattern, mask = spec
        module = modules[name]
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        twin = next((s for d, s in SPARSE_TWINS.items() if isinstance(module, d)), None)
        if twin is None:
            raise TypeError(f"sparsify: {name!r} is a {type(module).__name__}; only "
                            f"{', '.join(d.__name__ for d in SPARSE_TWINS)} can be made sparse")
        if isinstance(parent, nn.MultiheadAttention):
            raise TypeError(f"sparsify: {name!r} belongs to nn.MultiheadAttention, which reads its weight "
                            f"directly; it cannot be replaced")
        replacements.append((parent, child, twin, module, pattern, mask))
    built = [(parent, child, twin.from_dense(module, pattern, mask))
             for parent, child, twin, module, pattern, mask in replacements]
    for parent, child, sparse in built:
        setattr(parent, child, sparse)
    return model
