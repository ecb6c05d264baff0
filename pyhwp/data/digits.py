"""scikit-learn's handwritten digits (1797 8x8 images, shipped with scikit-learn) as tensors and loaders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class DigitsData:
    """Images (n, 1, size, size) float32, standardised with the training set's mean and std;
    labels (n,) int64 in 0..9."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """The digits split deterministically (a permutation seeded by `seed`) into train and test.

    size: side of the images; 8 keeps the originals, larger sizes upsample bilinearly so conv
    layers get realistic spatial sizes (32: the kernels' choices matter).
    Needs scikit-learn (optional dependency: pip install scikit-learn).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    raw = _sk_load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw.target, dtype=torch.int64)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return DigitsData(x[train].contiguous(), y[train], x[test].contiguous(), y[test])


def digits_loaders(batch_size: int = 64, size: int = 32, test_fraction: float = 0.2,
                   seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """(train, test) DataLoaders over load_digits(size, test_fraction, seed); the training loader
    shuffles with a generator seeded by `seed`, so runs repeat exactly."""
    d = load_digits(size, test_fraction, seed)
    train = DataLoader(TensorDataset(d.x_train, d.y_train), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    test = DataLoader(TensorDataset(d.x_test, d.y_test), batch_size=256)
    return train, test
