"""Pruning masks: make_mask for one weight and make_masks_global ranking across several layers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pyhwp.prune.criteria import element_scores

PATTERNS = ("unstructured", "n:m", "block", "channel")


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even; a mask count should not depend on parity.
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class _Layout:
    """How a pattern groups the GEMM-form weight (N, K) into pruning units.

    reduce() turns element scores (N, K) into unit scores (R, U): selection happens within each of
    the R rows (n:m: one row per group of m; otherwise one row holding every unit).
    """

    pattern: str
    n_rows: int  # N
    k_cols: int  # K
    block: tuple[int, int]
    m: int

    def reduce(self, s: torch.Tensor) -> torch.Tensor:
        N, K = self.n_rows, self.k_cols
        if self.pattern == "unstructured":
            return s.reshape(1, -1)
        if self.pattern == "n:m":
            return s.reshape(N * K // self.m, self.m)
        if self.pattern == "channel":
            return s.mean(dim=1).reshape(1, N)
        bh, bw = self.block
        rb, cb = -(-N // bh), -(-K // bw)
        padded = s.new_zeros(rb * bh, cb * bw)
        padded[:N, :K] = s
        counts = s.new_zeros(rb * bh, cb * bw)
        counts[:N, :K] = 1
        # Edge blocks are smaller: rank blocks by their mean so size does not bias the choice.
        sums = padded.reshape(rb, bh, cb, bw).sum(dim=(1, 3))
        return (sums / counts.reshape(rb, bh, cb, bw).sum(dim=(1, 3))).reshape(1, -1)

    def expand(self, keep: torch.Tensor) -> torch.Tensor:
        N, K = self.n_rows, self.k_cols
        if self.pattern in ("unstructured", "n:m"):
            return keep.reshape(N, K)
        if self.pattern == "channel":
            return keep.reshape(N, 1).expand(N, K).clone()
        bh, bw = self.block
        rb, cb = -(-N // bh), -(-K // bw)
        full = keep.reshape(rb, cb).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        return full[:N, :K].contiguous()

    @property
    def units(self) -> int:
        if self.pattern == "unstructured":
            return self.n_rows * self.k_cols
        if self.pattern == "n:m":
            return self.m
        if self.pattern == "channel":
            return self.n_rows
        return -(-self.n_rows // self.block[0]) * -(-self.k_cols // self.block[1])


def _ranks(s: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row, ascending; ties go to the lower index (stable sort)."""
    order = torch.argsort(s, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return ranks


def _order_keys(fine: torch.Tensor, coarse: torch.Tensor | None, k: int | None, threshold: float | None,
                coarse_fraction: float) -> torch.Tensor:
    """Integer keys (R, U), unique per row, in pruning order: the k lowest keys of a row are pruned.

    Without `coarse`, keys are the ranks of `fine`. With it (hybrid), units pruned by the coarse
    pass (|w| below `threshold`, at most k of them; or the round(coarse_fraction * k) smallest)
    come first in coarse order, then the rest in `fine` order.
    """
    fine_rank = _ranks(fine)
    if coarse is None:
        return fine_rank
    coarse_rank = _ranks(coarse)
    if threshold is not None:
        first = (coarse < threshold) & (coarse_rank < k)
    else:
        first = coarse_rank < _round_half_up(coarse_fraction * k)
    return torch.where(first, coarse_rank, fine.shape[1] + fine_rank)


def _prune_lowest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (R, U): True for the k lowest keys of each row."""
    return _ranks(keys) < k


def _check_common(pattern, criterion, sparsity, threshold, block, n, m, coarse):
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern == "n:m":
        if not (isinstance(n, int) and isinstance(m, int) and not isinstance(n, bool) and 0 <= n <= m and m >= 1):
            raise ValueError(f"n:m needs integers 0 <= n <= m, m >= 1; got n={n!r}, m={m!r}")
        implied = 1.0 - n / m
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise ValueError(f"pattern 'n:m' with n={n}, m={m} has sparsity {implied}; got sparsity={sparsity!r} "
                             "(pass None or the implied value)")
        if threshold is not None and criterion != "hybrid":
            raise ValueError("threshold= does not apply to pattern 'n:m' (its sparsity is fixed by n and m)")
    else:
        if criterion == "hybrid":
            if sparsity is None:
                raise ValueError("criterion 'hybrid' needs sparsity= (the final sparsity); threshold= "
                                 "sets its coarse pass")
        elif (sparsity is None) == (threshold is None):
            raise ValueError("pass exactly one of sparsity= (fraction of units to prune) or threshold= "
                             "(prune every unit scoring below it)")
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if pattern == "block":
        if (not isinstance(block, (tuple, list)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
            raise ValueError(f"block must be a pair of positive ints (rows, cols), got {block!r}")
    if criterion == "hybrid" and not (isinstance(coarse, (int, float)) and 0.0 <= coarse <= 1.0):
        raise ValueError(f"coarse must be a fraction in [0, 1], got {coarse!r}")


def _check_weight(weight, name="weight"):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (2, 4):
        raise ValueError(f"{name} must be 2-D (out, in) or 4-D (out, in/groups, kh, kw), got shape "
                         f"{tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _layout(weight, pattern, block, m, name="weight") -> _Layout:
    N, K = weight.shape[0], math.prod(weight.shape[1:])
    if pattern == "n:m" and K % m:
        raise ValueError(f"{name}: pattern 'n:m' groups the flattened input dimension "
                         f"(in/groups * kh * kw = {K}) in groups of m={m}, which does not divide it")
    return _Layout(pattern, N, K, tuple(block), m)


def _unit_scores(weight, layout, criterion, scores, activations):
    fine, coarse = element_scores(weight, criterion, scores, activations)
    shape2 = (layout.n_rows, layout.k_cols)
    fine = layout.reduce(fine.reshape(shape2))
    return fine, None if coarse is None else layout.reduce(coarse.reshape(shape2))


def make_mask(weight: torch.Tensor, sparsity: float | None = None, pattern: str = "unstructured",
              criterion: str = "magnitude", *, scores: torch.Tensor | None = None,
              activations: torch.Tensor | None = None, block: tuple[int, int] = (16, 16), n: int = 2,
              m: int = 4, threshold: float | None = None, coarse: float = 0.5) -> torch.Tensor:
    """The mask of one weight: a bool tensor of weight's shape, True = keep.

    Args:
        weight: (out, in) linear or (out, in/groups, kh, kw) conv weight, floating point, finite.
            Patterns see it in GEMM form (out, K), K = in/groups * kh * kw.
        sparsity: fraction of units to prune, in [0, 1]. Exactly round(sparsity * units) units are
            pruned (half rounds up): elements ("unstructured"), blocks ("block": (rows, cols) tiles
            of the GEMM form from the origin; edge tiles may be smaller and are ranked by their mean
            score, so element sparsity can differ slightly from the block fraction) or output
            channels ("channel": whole rows / filters). For "n:m" the sparsity is 1 - n/m; pass
            None or that value.
        pattern: "unstructured", "n:m" (n kept in every m consecutive weights along K; 2:4 by
            default, K must be a multiple of m), "block" or "channel".
        criterion: the scores units are ranked by (blocks and channels by their mean):
            "magnitude" |w|; "taylor" `scores` (|w * grad| summed over calibration batches,
            pyhwp.prune.taylor_scores); "wanda" |w| * `activations` (input column norms,
            pyhwp.prune.activation_norms); "hybrid": a coarse pass on |w| (the units below
            `threshold`, or the `coarse` fraction of the units to prune) then the importance
            pass (`scores`, else Wanda from `activations`) to the final sparsity.
        threshold: instead of sparsity, prune every unit whose score is below it (with
            "magnitude" and "unstructured": zero every |w| < threshold). With "hybrid" it is the
            coarse pass's |w| threshold.
        coarse: with "hybrid" and no threshold, the fraction of pruned units chosen by |w|.
    Ties are broken deterministically: among equal scores the lower flat index is pruned first.
    """
    _check_weight(weight)
    _check_common(pattern, criterion, sparsity, threshold, block, n, m, coarse)
    layout = _layout(weight, pattern, block, m)
    fine, coarse_s = _unit_scores(weight, layout, criterion, scores, activations)
    if threshold is not None and coarse_s is None:
        prune = fine < threshold
    else:
        k = (m - n) if pattern == "n:m" else _round_half_up(sparsity * layout.units)
        prune = _prune_lowest(_order_keys(fine, coarse_s, k, threshold, coarse), k)
    return layout.expand(~prune).reshape(weight.shape).to(weight.device)


def _get(mapping, name, what):
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping from layer names to tensors, got {type(mapping).__name__}")
    return mapping.get(name)


def make_masks_global(weights: Mapping[str, torch.Tensor], sparsity: float | None = None,
                      pattern: str = "unstructured", criterion: str = "magnitude", *,
                      scores: Mapping[str, torch.Tensor] | None = None,
                      activations: Mapping[str, torch.Tensor] | None = None, block: tuple[int, int] = (16, 16),
                      n: int = 2, m: int = 4, threshold: float | None = None,
                      coarse: float = 0.5) -> dict[str, torch.Tensor]:
    """Masks of several layers ranked together: round(sparsity * total units) units are pruned
    wherever they score lowest, so layers end at different sparsities.

    Arguments are those of make_mask, with `weights`, `scores` and `activations` mapping layer
    names to tensors. Every layer keeps at least its best unit (a layer pruned away entirely would
    cut the network); a sparsity that leaves fewer units than layers raises. Ties across layers go
    to the earlier layer in `weights`' order, then the lower index. "n:m" and threshold rules are
    local by nature and give the per-layer masks.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping from layer names to weight tensors")
    _check_common(pattern, criterion, sparsity, threshold, block, n, m, coarse)
    local = pattern == "n:m" or (threshold is not None and criterion != "hybrid")
    if local:
        return {name: make_mask(w, sparsity, pattern, criterion, scores=_get(scores, name, "scores"),
                                activations=_get(activations, name, "activations"), block=block, n=n, m=m,
                                threshold=threshold, coarse=coarse)
                for name, w in weights.items()}
    layouts, fines, coarses = {}, [], []
    for name, w in weights.items():
        _check_weight(w, f"weights[{name!r}]")
        layouts[name] = _layout(w, pattern, block, m, f"weights[{name!r}]")
        f, c = _unit_scores(w, layouts[name], criterion, _get(scores, name, "scores"),
                            _get(activations, name, "activations"))
        fines.append(f.reshape(-1).cpu())
        coarses.append(None if c is None else c.reshape(-1).cpu())
    sizes = [f.numel() for f in fines]
    total = sum(sizes)
    k = _round_half_up(sparsity * total)
    if k > total - len(sizes):
        raise ValueError(f"sparsity {sparsity} prunes {k} of {total} units, but each of the {len(sizes)} "
                         "layers must keep at least one")
    fine = torch.cat(fines).reshape(1, -1)
    coarse_s = None if coarses[0] is None else torch.cat(coarses).reshape(1, -1)
    keys = _order_keys(fine, coarse_s, k, threshold, coarse).reshape(-1)
    # Each layer's last unit in pruning order is protected: moved behind every other unit.
    start = 0
    for size in sizes:
        last = start + int(torch.argmax(keys[start:start + size]))
        keys[last] = 3 * total + last
        start += size
    prune = _prune_lowest(keys.reshape(1, -1), k).reshape(-1)
    masks, start = {}, 0
    for (name, w), size in zip(weights.items(), sizes):
        keep = ~prune[start:start + size]
        masks[name] = layouts[name].expand(keep.reshape(1, -1)).reshape(w.shape).to(w.device)
        start += size
    return masks
