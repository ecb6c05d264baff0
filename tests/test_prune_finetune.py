"""Masks held through fine-tuning with every common optimizer, and the pruning schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyhwp.prune import (apply_masks, cubic_sparsity, finetune, gradual_schedule, hold_masks, make_mask,
                         mask_sparsity, one_shot_schedule, prunable_layers, prune_gradually)
from tiny_models import single_thread, tiny_chain  # noqa: F401 (autouse fixture)

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-wd-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop-momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, weight_decay=1e-3),
}


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))


def _masks(model, sparsity=0.6):
    pats = ["unstructured", "n:m", "channel", "unstructured", "block"]
    return {name: make_mask(layer.weight, None if pat == "n:m" else sparsity, pat, block=(4, 4))
            for (name, layer), pat in zip(prunable_layers(model).items(), pats)}


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_masks_hold_through_finetune(opt):
    model = tiny_chain().train()
    masks = _masks(model)
    before = {n: l.weight.detach().clone() for n, l in prunable_layers(model).items()}
    optimizer = OPTIMIZERS[opt](model.parameters())
    losses = finetune(model, masks, _data(), nn.functional.cross_entropy, optimizer, epochs=3, progress=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for name, layer in prunable_layers(model).items():
        w = layer.weight.detach()
        pruned = ~masks[name]
        # exactly +0.0 (bit pattern), not merely small or -0.0
        assert torch.equal(w[pruned].view(torch.int32), torch.zeros_like(w[pruned]).view(torch.int32))
        assert not torch.equal(w[masks[name]], before[name][masks[name]]), "kept weights trained"
        for key, state in optimizer.state[layer.weight].items():
            if isinstance(state, torch.Tensor) and state.shape == w.shape:
                assert bool((state[pruned] == 0).all()), f"optimizer state {key} is masked"
    assert model.training


def test_hold_masks_in_own_loop_and_remove():
    model = tiny_chain().train()
    masks = _masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hold = hold_masks(model, masks, opt)
    x, y = next(iter(_data()))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    first = prunable_layers(model)["0"]
    assert bool((first.weight[~masks["0"]] == 0).all())
    hold.remove()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert bool((first.weight[~masks["0"]] != 0).any()), "after remove() the masks are no longer held"


def test_finetune_dense_max_steps_scheduler_progress_and_eval_mode_restored():
    model = tiny_chain().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    losses = finetune(model, {}, _data(), nn.functional.cross_entropy, opt, epochs=5, max_steps=4, scheduler=sched,
                      progress=True)
    assert len(losses) == 2 and not model.training  # 3 batches per epoch: 3 + 1 steps
    assert sched.last_epoch == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.01 / 16)


def test_finetune_bad_arguments():
    model = tiny_chain()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="epochs must be"):
        finetune(model, {}, _data(), loss, opt, epochs=-1)
    with pytest.raises(KeyError, match="no module named 'nope'"):
        finetune(model, {"nope": torch.ones(1, dtype=torch.bool)}, _data(), loss, opt)
    with pytest.raises(TypeError, match="only Linear and Conv2d"):
        finetune(model, {"1": torch.ones(8, dtype=torch.bool)}, _data(), loss, opt)
    with pytest.raises(ValueError, match="has shape"):
        finetune(model, {"0": torch.ones(8, dtype=torch.bool)}, _data(), loss, opt)
    with pytest.raises(TypeError, match="bool tensor"):
        finetune(model, {"0": torch.ones(8, 3, 3, 3)}, _data(), loss, opt)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        finetune(model, {}, _data(), loss, "sgd")


def test_cubic_schedule():
    assert cubic_sparsity(0, 4, 0.9, 0.1) == pytest.approx(0.1)
    assert cubic_sparsity(4, 4, 0.9, 0.1) == 0.9
    assert cubic_sparsity(2, 4, 0.8) == pytest.approx(0.8 - 0.8 * 0.5**3)
    s = gradual_schedule(0.9, 10)
    assert len(s) == 10 and s[-1] == 0.9 and all(a < b for a, b in zip(s, s[1:]))
    steps = [b - a for a, b in zip([0.0, *s], s)]
    assert all(a > b for a, b in zip(steps, steps[1:])), "prunes fast first, slowly at the end"
    assert one_shot_schedule(0.5) == [0.5]
    with pytest.raises(ValueError, match="steps must be"):
        gradual_schedule(0.5, 0)
    with pytest.raises(ValueError, match="step must be"):
        cubic_sparsity(5, 4, 0.5)
    with pytest.raises(ValueError, match="final must be"):
        one_shot_schedule(1.5)


def test_prune_gradually_is_monotone_and_exact():
    model = tiny_chain().train()
    layers = list(prunable_layers(model))
    seen = []

    def make(m, s):
        return {n: make_mask(m.get_submodule(n).weight, s) for n in layers}

    def recover(m, masks):
        seen.append(mask_sparsity(masks))
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        finetune(m, masks, _data(), nn.functional.cross_entropy, opt, epochs=1, progress=False)

    final = prune_gradually(model, gradual_schedule(0.8, 4), make, recover)
    assert seen == sorted(seen) and abs(seen[-1] - 0.8) < 0.01
    for n in layers:
        w = model.get_submodule(n).weight
        assert bool((w[~final[n]] == 0).all())
        assert abs((~final[n]).float().mean().item() - 0.8) < 1.0 / w.numel() + 1e-9


def test_apply_masks_writes_positive_zero():
    w = nn.Linear(4, 4)
    with torch.no_grad():
        w.weight.fill_(-1.0)
    apply_masks(w, {"": torch.eye(4, dtype=torch.bool)})
    assert torch.equal(torch.signbit(w.weight), torch.eye(4, dtype=torch.bool))
