"""Eager fast path: run a matmul op's implementation directly when nothing needs the op itself."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # Parameter disables __torch_function__: a plain tensor here


# Bound once: each lookup through torch's modules costs ~1 us when the caches are cold, which is
# the case in a model, where every layer's weights evict the previous layer's Python state.
# is_dynamo_compiling is one Python frame where is_compiling is two; what it leaves out (export's
# non-strict tracing) runs on fake tensors under a dispatch mode, which the other checks see.
_is_compiling = torch.compiler.is_dynamo_compiling
_dispatch_stack = torch._C._len_torch_dispatch_stack
_function_mode = torch._C._is_torch_function_mode_enabled
_tracing_state = torch._C._get_tracing_state
_functorch_stack = torch._C._functorch.peek_interpreter_stack
_grad_enabled = torch.is_grad_enabled


def intercepted() -> bool:
    """Whether something that must see every op is active: torch.compile / torch.export tracing,
    a torch function or dispatch mode, the TorchScript tracer or a functorch transform."""
    return bool(_is_compiling() or _dispatch_stack() or _function_mode() or _tracing_state() is not None
                or _functorch_stack() is not None)


def needs_op(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on `tensors` must go through the torch.library op.

    The op (about 15 us of dispatch per call) is what autograd, torch.compile / torch.export
    tracing, fake tensors, tensor subclasses, dispatch/function modes, functorch transforms
    (vmap, grad) and the TorchScript tracer see. In plain eager inference none of them is
    involved and the implementation gives the same result.
    """
    if intercepted():
        return True
    grad = _grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return True
    return False


def call_matmul(op, impl: Callable[..., torch.Tensor], x: torch.Tensor, arrays: tuple[torch.Tensor, ...],
                values: torch.Tensor, bias: torch.Tensor | None, transpose_out: bool, *extra) -> torch.Tensor:
    """op(x, *arrays, bias, transpose_out, *extra), skipping the dispatcher when needs_op says it
    may. `values` is the array that can require grad; `extra` are trailing optional op arguments."""
    if needs_op(x, values, bias):
        return op(x, *arrays, bias, transpose_out, *extra)
    return impl(x, *arrays, bias, transpose_out, *extra)


def cpu_kernel_call(kernel, head: tuple, tail: tuple, y: torch.Tensor, x: torch.Tensor,
                    bias: torch.Tensor | None) -> None:
    """y (P, N) = x (P, K) @ W.T + bias through a compiled CPU kernel of the common signature
    kernel(*head, x, P, x strides, bias, y, y strides, threads, *tail), where head and tail carry
    W's sizes and array addresses (see the *_cpu_args functions of the pattern ops)."""
    kernel(*head, x.data_ptr(), x.shape[0], x.stride(1), x.stride(0), 0 if bias is None else bias.data_ptr(),
           y.data_ptr(), y.stride(1), y.stride(0), torch.get_num_threads(), *tail)


def entry_ref(table: dict, obj) -> weakref.ref:
    """A weak reference to `obj` for the entry table[id(obj)] of an identity-keyed cache, whose
    first element it must be: when obj dies, the entry goes (unless it was replaced meanwhile)."""
    key = id(obj)

    def forget(ref: weakref.ref) -> None:
        entry = table.get(key)
        if entry is not None and entry[0] is ref:
            del table[key]

    return weakref.ref(obj, forget)
