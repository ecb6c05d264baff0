"""Fine-tuning with masks held: pruned weights stay exactly zero under any torch optimizer."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm import tqdm

from pyhwp.prune.calibrate import _split_batch
from pyhwp.prune.layers import apply_masks, check_masks


class MaskHold:
    """Optimizer hooks that keep masked weights exactly zero; remove() detaches them.

    Before every optimizer.step() the gradients of pruned weights are zeroed (so gradient norms,
    clipping and adaptive statistics see only kept weights); after it the pruned weights and every
    per-parameter optimizer state of the weight's shape (SGD momentum_buffer, Adam/AdamW exp_avg,
    exp_avg_sq, max_exp_avg_sq, ...) are zeroed again. Momentum can then not revive a pruned
    weight, and weight decay of a zero is zero.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        layers = check_masks(model, masks)
        self._pairs = [(layers[name].weight, ~masks[name].to(layers[name].weight.device)) for name in masks]
        self._optimizer = optimizer
        apply_masks(model, masks)
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        for p, pruned in self._pairs:
            if p.grad is not None:
                p.grad.masked_fill_(pruned, 0.0)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for p, pruned in self._pairs:
            p.masked_fill_(pruned, 0.0)
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.masked_fill_(pruned, 0.0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def hold_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> MaskHold:
    """Apply `masks` (layer name -> bool tensor of the weight's shape, True = keep) to `model` and
    keep them through every later optimizer.step() of `optimizer`, for a training loop of your own.
    Returns the MaskHold; call .remove() to stop."""
    return MaskHold(model, masks, optimizer)


def finetune(model: nn.Module, masks: Mapping[str, torch.Tensor], loader: Iterable, loss_fn: Callable,
             optimizer: torch.optim.Optimizer, epochs: int = 1, *, max_steps: int | None = None,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, progress: bool = True,
             desc: str = "fine-tune") -> list[float]:
    """Train `model` on `loader` with `masks` held (see MaskHold); an empty `masks` trains densely.

    loader yields (input, target) batches, moved to the model's device; loss_fn(output, target)
    is minimised with `optimizer` for `epochs` passes (or `max_steps` steps, if fewer), with a tqdm
    progress bar unless progress=False; `scheduler`, if given, steps after every optimizer step.
    The model is in train mode during the loop and returns to its previous mode afterwards.
    Returns the mean loss of each epoch run.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be a non-negative int or None, got {max_steps!r}")
    hold = MaskHold(model, masks, optimizer)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    try:
        total = epochs * len(loader)
    except TypeError:
        total = None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    was_training = model.training
    model.train()
    losses: list[float] = []
    steps = 0
    try:
        with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
            for _ in range(epochs):
                if max_steps is not None and steps >= max_steps:
                    break
                run, count = 0.0, 0
                for batch in itertools.islice(loader, None if max_steps is None else max_steps - steps):
                    x, y = _split_batch(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x.to(device)), y.to(device) if isinstance(y, torch.Tensor) else y)
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    run += float(loss.detach())
                    count += 1
                    steps += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{run / count:.4f}", refresh=False)
                if count:
                    losses.append(run / count)
    finally:
        hold.remove()
        model.train(was_training)
    return losses
