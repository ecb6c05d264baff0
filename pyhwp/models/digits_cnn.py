"""DigitsCNN: a small conv net for scikit-learn's digits, and its training recipe."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pyhwp.prune.finetune import finetune


class DigitsCNN(nn.Sequential):
    """Four 3x3 conv blocks (Conv2d without bias, BatchNorm2d, ReLU; 2x2 max-pool after blocks 1, 2
    and 4) and two Linear layers, for (n, 1, size, size) inputs, size a multiple of 8; logits (n, 10).

    An nn.Sequential, so pyhwp.prune's structural removal and BatchNorm folding understand it.
    Default widths at size 32 give convs 1->16 at 32x32, 16->32 at 16x16, 32->64 and 64->64 at 8x8,
    then Linear 1024->128 and 128->10.
    """

    def __init__(self, size: int = 32, widths: tuple[int, int, int, int] = (16, 32, 64, 64), hidden: int = 128,
                 classes: int = 10):
        if size % 8:
            raise ValueError(f"size must be a multiple of 8, got {size}")
        c1, c2, c3, c4 = widths

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        super().__init__(*block(1, c1, True), *block(c1, c2, True), *block(c2, c3, False), *block(c3, c4, True),
                         nn.Flatten(), nn.Linear(c4 * (size // 8) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def train_digits_cnn(model: nn.Module, train_loader: Iterable, epochs: int = 6, lr: float = 3e-3, *,
                     seed: int = 0, progress: bool = True) -> list[float]:
    """Train `model` in place: AdamW (weight decay 1e-4), one-cycle learning rate peaking at `lr`,
    cross-entropy; returns the mean loss per epoch. Seeded, so a run on the same machine repeats."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * len(train_loader)))
    return finetune(model, {}, train_loader, nn.functional.cross_entropy, opt, epochs, scheduler=sched,
                    progress=progress, desc="train digits-cnn")
