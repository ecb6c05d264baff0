"""SparseModule: the base of the drop-in layers; holds a SparseWeight as parameter + buffers."""

from __future__ import annotations

import operator
from dataclasses import fields

import torch
from torch import nn

from pyhwp.formats import SparseWeight
from pyhwp.ops.eager import entry_ref


_PLAIN = (torch.Tensor, nn.Parameter)
# id(module) -> (weakref to the module, ids of its arrays, their versions, the values' address,
# the arrays, the SparseWeight built over them). Kept outside the modules so that deepcopy,
# pickle and state_dict never see it; an entry leaves with its module.
_WEIGHTS: dict[int, tuple] = {}
# Bound once (see pyhwp.ops.eager): `weight` runs on every forward.
_is_compiling = torch.compiler.is_dynamo_compiling
_grad_enabled = torch.is_grad_enabled
_version_of = operator.attrgetter("_version")


class SparseModule(nn.Module):
    """A module whose weight is a SparseWeight kept as module state.

    The stored values are the nn.Parameter `values` (optimizers, DDP and state_dict see only the
    kept weights, so pruned positions cannot be revived); every other array of the pattern (index
    and metadata) is a buffer under its field name. `weight` rebuilds the SparseWeight from them
    on each access without re-validating: validation runs once when the weight is set or loaded.
    """

    def _set_bias(self, bias: torch.Tensor | None, requires_grad: bool) -> None:
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)

    def _set_weight(self, weight: SparseWeight, requires_grad: bool = True) -> None:
        self._format = type(weight)
        self.pattern = weight.pattern
        self.weight_shape = weight.shape
        self._arrays: tuple[str, ...] = ()
        self._plain: dict = {}
        for f in fields(weight):
            value = getattr(weight, f.name)
            if f.name == "shape":
                continue
            if f.name == "values":
                self.values = nn.Parameter(value, requires_grad=requires_grad)
            elif isinstance(value, torch.Tensor):
                self.register_buffer(f.name, value)
            else:
                self._plain[f.name] = value
                continue
            self._arrays += (f.name,)

    @property
    def weight(self) -> SparseWeight:
        """The SparseWeight over this module's current values and index arrays.

        In eager mode without autograd the object is reused while none of the arrays was replaced
        or changed in place, so data a pattern derives from it once (CSR's 16-bit kernel indices, conv2d's
        kernel-tap split) is not derived again on every forward of a frozen model.
        """
        params, buffers = self._parameters, self._buffers
        arrays = tuple([params[name] if name == "values" else buffers[name] for name in self._arrays])
        if _is_compiling():
            return self._build(arrays)
        grad = _grad_enabled()
        hit = _WEIGHTS.get(id(self))
        # A hit: the same tensor objects (the entry holds them, so their ids are theirs; and none
        # became an inference tensor), unchanged in place (versions) and the values not moved
        # (`.data =` keeps the version).
        if (hit is not None and hit[0]() is self and tuple(map(id, arrays)) == hit[1]
                and tuple(map(_version_of, arrays)) == hit[2] and params["values"].data_ptr() == hit[3]
                and not (grad and any([t.requires_grad for t in arrays]))):
            return hit[5]
        for t in arrays:
            if type(t) not in _PLAIN or t.is_inference() or (grad and t.requires_grad):
                # Recording autograd (data derived from the values would join the graph), or a
                # tensor without a usable version counter: build afresh.
                return self._build(arrays)
        weight = self._build(arrays)
        _WEIGHTS[id(self)] = (entry_ref(_WEIGHTS, self), tuple(map(id, arrays)), tuple(map(_version_of, arrays)),
                              params["values"].data_ptr(), arrays, weight)
        return weight

    def _build(self, arrays: tuple[torch.Tensor, ...]) -> SparseWeight:
        return self._format._unchecked(self.weight_shape, **dict(zip(self._arrays, arrays)), **self._plain)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint may hold another mask of the same pattern (another nnz): take its sizes,
        # keeping the Parameter object (optimizers hold it), then validate the loaded weight once.
        for name in self._arrays:
            incoming = state_dict.get(prefix + name)
            local = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != local.shape:
                fresh = torch.empty(incoming.shape, dtype=local.dtype, device=local.device)
                if name == "values":
                    self.values.data = fresh
                else:
                    self._buffers[name] = fresh
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        arrays = {name: getattr(self, name).detach() for name in self._arrays}
        try:
            self._format(self.weight_shape, **arrays, **self._plain)  # runs validate()
        except ValueError as exc:
            raise ValueError(f"loading {prefix or 'module'}: the state_dict holds an invalid "
                             f"{self.pattern!r} weight: {exc}") from exc

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, weight_shape={self.weight_shape}, density={self.weight.density:.4f}"
