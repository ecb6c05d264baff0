"""The one autograd formula (and torch fallback forward) every sparse matmul op shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Arrays = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class MatmulPattern:
    """The pattern-specific pieces of an op
    `pyhwp::<kernel>(x, *arrays, bias, transpose_out=False, *extra)`.

    `arrays` are the n_arrays tensor arguments between x and bias, in schema order; the one at
    `values_index` holds the stored weights (the only array that gets a gradient). `extra` are
    optional trailing arguments that do not change the result (CSR's row_order schedule).

    positions(*arrays) -> (rows, cols): int64 tensors, each of values.numel() entries: the
        (out, in) position of every stored value, in values.reshape(-1) order. Columns may reach
        padded_in_features (padding slots, which hold zeros and always get a zero gradient).
    out_features(*arrays) -> N, the rows of the (N, K) GEMM-form weight.
    padded_in_features(k, *arrays) -> Kp >= K, the columns `positions` addresses. Optional:
        K by default (2:4 pads K to a multiple of 32).
    dense_weight(k, *arrays) -> the (N, K) dense weight, zeros where pruned. Optional: by
        default the values are scattered at `positions` (override when the storage is already
        dense, as for a masked pattern).
    grad_values(gy, x, *arrays) -> the gradient of the values, shaped like them, from gy (P, N)
        and x (P, K). Optional: by default grad_W = gy.T @ x read at `positions` (override when
        values are not one per position, e.g. dense values whose pruned entries must get zero).
    """

    n_arrays: int
    values_index: int
    positions: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    out_features: Callable[..., int]
    padded_in_features: Callable[..., int] | None = None
    dense_weight: Callable[..., torch.Tensor] | None = None
    grad_values: Callable[..., torch.Tensor] | None = None

    def kp(self, k: int, arrays: Arrays) -> int:
        return k if self.padded_in_features is None else self.padded_in_features(k, *arrays)

    def dense(self, k: int, arrays: Arrays) -> torch.Tensor:
        if self.dense_weight is not None:
            return self.dense_weight(k, *arrays)
        values = arrays[self.values_index]
        rows, cols = self.positions(*arrays)
        kp = self.kp(k, arrays)
        w = values.new_zeros((self.out_features(*arrays), kp)).index_put((rows, cols), values.reshape(-1))
        return w if kp == k else w[:, :k]


def torch_matmul(pattern: MatmulPattern, x: torch.Tensor, arrays: Arrays, bias: torch.Tensor | None,
                 transpose_out: bool) -> torch.Tensor:
    """The op's contract computed with torch ops on the dense weight: the path for dtypes and
    devices no native kernel serves (float64 for gradcheck), declared in pyhwp.kernels.KERNELS."""
    w = pattern.dense(x.shape[1], arrays)
    y = x @ w.t() if bias is None else torch.addmm(bias, x, w.t())
    return y.t().contiguous() if transpose_out else y


def _small(p: int, nnz: int, n: int, k: int) -> bool:
    """Whether the gather form's temporaries (at most three of P x nnz) fit in one dense (N, K)."""
    return 3 * p * nnz <= n * k


def _grad_input(pattern: MatmulPattern, gy: torch.Tensor, arrays: Arrays, k: int) -> torch.Tensor:
    """grad_x = gy (P, N) @ W (N, K)."""
    values = arrays[pattern.values_index].reshape(-1)
    n = pattern.out_features(*arrays)
    if _small(gy.shape[0], values.numel(), n, k):
        rows, cols = pattern.positions(*arrays)
        contrib = gy[:, rows] * values  # (P, nnz): each stored weight's share of grad_x
        gx = gy.new_zeros((gy.shape[0], pattern.kp(k, arrays))).index_add(1, cols, contrib)
        return gx[:, :k]  # padding columns hold only the zero slots' shares
    return gy @ pattern.dense(k, arrays)


def _grad_values(pattern: MatmulPattern, gy: torch.Tensor, x: torch.Tensor, arrays: Arrays) -> torch.Tensor:
    """grad_W = gy.T @ x (N, K), read only at the stored positions, shaped like values."""
    if pattern.grad_values is not None:
        return pattern.grad_values(gy, x, *arrays)
    values = arrays[pattern.values_index]
    rows, cols = pattern.positions(*arrays)
    n, k = pattern.out_features(*arrays), x.shape[1]
    pad = pattern.kp(k, arrays) - k  # padding slots read zero columns: their gradient is 0
    if _small(gy.shape[0], values.numel(), n, k):
        g = (gy[:, rows] * F.pad(x, (0, pad))[:, cols]).sum(0)  # sampled dense-dense product
    else:
        g = F.pad(gy.t() @ x, (0, pad))[rows, cols]
    return g.reshape(values.shape)


def register_matmul_autograd(op, pattern: MatmulPattern) -> None:
    """Register the backward of a sparse matmul custom op.

    Gradients go to x, bias and the stored values only; index/metadata arrays get None, so
    pruned positions never receive a gradient and stay exactly zero under any optimizer.

    Memory of the backward, with P rows of x, an (N, K) weight and nnz stored values: saved for
    backward are x (only when the values need a gradient; the same as dense linear saves) and
    references to the weight's own arrays (no copies). Temporaries: when 3 * P * nnz <= N * K the
    gradients are formed by gathers and an index_add over (P, nnz) products (at most three such
    tensors live at once); otherwise one dense (N, K) tensor at a time (the dense weight for
    grad_x, then grad_W = grad_y.T @ x for the values). Either way the peak temporary is at most
    N * K elements, the size of the weight gradient dense autograd keeps, and O(P * nnz) at small
    batch. Outputs: grad_x (P, K), grad of the values (shaped like them), grad_bias (N,).
    For NaN/Inf-free inputs every gradient equals dense autograd's restricted to the kept
    positions up to rounding; with non-finite grad_y the gather form skips the pruned zeros that
    dense would multiply (0 * Inf = NaN there).
    """
    n_arrays = pattern.n_arrays

    def setup_context(ctx, inputs, output):
        x = inputs[0]
        ctx.transpose_out = inputs[2 + n_arrays]
        ctx.n_inputs = len(inputs)
        ctx.k = x.shape[1]
        values_need_grad = ctx.needs_input_grad[1 + pattern.values_index]
        ctx.save_for_backward(x if values_need_grad else None, *inputs[1:1 + n_arrays])

    def backward(ctx, grad):
        x, *arrays = ctx.saved_tensors
        arrays = tuple(arrays)
        gy = grad.t() if ctx.transpose_out else grad  # (P, N), any strides
        grads: list[torch.Tensor | None] = [None] * ctx.n_inputs
        if ctx.needs_input_grad[0]:
            grads[0] = _grad_input(pattern, gy, arrays, ctx.k)
        if ctx.needs_input_grad[1 + pattern.values_index]:
            grads[1 + pattern.values_index] = _grad_values(pattern, gy, x, arrays)
        if ctx.needs_input_grad[1 + n_arrays]:
            grads[1 + n_arrays] = gy.sum(0)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
