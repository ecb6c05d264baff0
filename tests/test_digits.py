"""The digits data set loader and DigitsCNN (scikit-learn ships the data; nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from pyhwp.models import DigitsCNN
from pyhwp.prune import channel_graph, channel_masks, fold_batchnorm, remove_channels
from tiny_models import randomize_norms, single_thread  # noqa: F401 (autouse fixture)

pytest.importorskip("sklearn")

from pyhwp.data import digits_loaders, load_digits  # noqa: E402


def test_load_digits_split_is_deterministic():
    a, b = load_digits(8), load_digits(8)
    assert a.x_train.shape == (1438, 1, 8, 8) and a.x_test.shape == (359, 1, 8, 8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.y_train.dtype == torch.int64 and set(a.y_train.tolist()) == set(range(10))
    assert abs(a.x_train.mean().item()) < 1e-5 and abs(a.x_train.std().item() - 1) < 1e-4
    c = load_digits(8, seed=1)
    assert not torch.equal(a.y_test, c.y_test)


def test_upsampled_loaders():
    train, test = digits_loaders(batch_size=100, size=32)
    x, y = next(iter(train))
    assert x.shape == (100, 1, 32, 32) and y.shape == (100,)
    x2, _ = next(iter(digits_loaders(batch_size=100, size=32)[0]))
    assert torch.equal(x, x2), "shuffling is seeded"
    assert sum(len(b[1]) for b in test) == 359
    with pytest.raises(ValueError, match="size must be"):
        load_digits(4)


def test_digits_cnn_is_prunable_structurally():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    randomize_norms(model)
    x = torch.randn(3, 1, 32, 32)
    assert model(x).shape == (3, 10)
    groups = channel_graph(model)
    assert len(groups) == 6 and groups[3].consumers == [("16", 16)]
    shrunk = remove_channels(model, channel_masks(model, 0.5), example_input=x)
    assert shrunk[16].in_features == 32 * 16
    torch.testing.assert_close(fold_batchnorm(model)(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 8"):
        DigitsCNN(size=30)
