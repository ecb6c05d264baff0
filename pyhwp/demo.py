"""`pyhwp demo` and `pyhwp prune`: the digits CNN trained once and cached, optimized for this machine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from pyhwp import cli_types
from pyhwp.hardware import cache

# The demo's network: wide enough that its middle convs and its hidden Linear dominate the time,
# so the kernel chosen per layer matters (the default DigitsCNN is too small for that).
DEMO_MODEL = {"size": 32, "widths": (32, 64, 128, 128), "hidden": 1024}
DEMO_EPOCHS = 6
MODELS = ("digits-cnn",)


def digits_split(size: int = 32, seed: int = 0):
    """(fit, val, test) TensorDatasets: the digits test split (20%) and the training split cut again into
    fit (70%) and validation (30%), deterministically. Validation steers the search; test is reported."""
    from pyhwp.data import load_digits

    d = load_digits(size, seed=seed)
    order = torch.randperm(len(d.y_train), generator=torch.Generator().manual_seed(seed + 1))
    n_val = round(0.3 * len(order))
    val, fit = order[:n_val], order[n_val:]
    return (TensorDataset(d.x_train[fit], d.y_train[fit]), TensorDataset(d.x_train[val], d.y_train[val]),
            TensorDataset(d.x_test, d.y_test))


def trained_digits_cnn(fit, *, cache_dir=None, refresh: bool = False, progress: bool = True):
    """The demo DigitsCNN trained on `fit`, from the cache when a run on this machine already trained it.
    Returns (model in eval mode, seconds spent training or 0.0 when cached)."""
    from pyhwp.models import DigitsCNN, train_digits_cnn

    cfg = DEMO_MODEL
    key = f"digits-cnn-fit70-s{cfg['size']}-w{'-'.join(map(str, cfg['widths']))}-h{cfg['hidden']}-e{DEMO_EPOCHS}"
    path = cache.cache_dir(cache_dir) / "models" / f"{key}-torch{torch.__version__.split('+')[0]}.pt"
    model = DigitsCNN(cfg["size"], cfg["widths"], cfg["hidden"])
    if path.exists() and not refresh:
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval(), 0.0
        except (RuntimeError, OSError, ValueError):
            pass  # a damaged or foreign file: train again
    t0 = time.perf_counter()
    train_digits_cnn(model, DataLoader(fit, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
                     epochs=DEMO_EPOCHS, progress=progress)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval(), seconds


def run(*, target: str = "cpu", max_accuracy_drop: float | None = 1.0, latency_budget: float | None = None,
        batch_size: int = 64, out: str | Path = "pyhwp-report", cache_dir=None, progress: bool = True,
        budget_s: float = 0.3, finetune_epochs: int = 4, retrain: bool = False):
    """Train (or load) the demo CNN, run pyhwp.optimize on it and write the report to `out`.
    Returns (optimized model, report, {file kind: path})."""
    from pyhwp.metrics import accuracy
    from pyhwp.optimize import optimize

    fit, val, test = digits_split(DEMO_MODEL["size"])
    model, train_s = trained_digits_cnn(fit, cache_dir=cache_dir, refresh=retrain, progress=progress)
    train = DataLoader(fit, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    calib = DataLoader(fit, batch_size=128)
    val_loader, test_loader = DataLoader(val, batch_size=256), DataLoader(test, batch_size=256)
    optimized, report = optimize(
        model, test.tensors[0][:batch_size], target=target, batch_size=batch_size,
        eval_fn=lambda m: accuracy(m, val_loader), test_fn=lambda m: accuracy(m, test_loader),
        calib_loader=calib, train_loader=train, finetune_epochs=finetune_epochs,
        max_accuracy_drop=max_accuracy_drop, latency_budget=latency_budget, cache_dir=cache_dir,
        budget_s=budget_s, progress=progress)
    report.data["demo"] = {"model": "digits-cnn", **{k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in DEMO_MODEL.items()},
                           "train_seconds": train_s, "trained_now": train_s > 0,
                           "data": "scikit-learn digits, 8x8 upsampled to 32x32; fit/val/test "
                                   f"{len(fit)}/{len(val)}/{len(test)}"}
    files = report.save(out)
    return optimized, report, files


def add_arguments(p: argparse.ArgumentParser, prune: bool = False) -> None:
    if prune:
        p.add_argument("--model", choices=MODELS, required=True, help="the built-in model to prune")
    p.add_argument("--target", default="cpu", type=cli_types.device,
                   help="device the model will run on: cpu, cuda, cuda:N (default cpu)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-accuracy-drop", type=cli_types.nonnegative_float, default=None,
                   help="fastest model losing at most this many accuracy points (default 1.0)")
    g.add_argument("--latency-budget-ms", type=cli_types.positive_float, default=None,
                   help="most accurate model within this end-to-end latency (ms)")
    p.add_argument("--batch-size", type=cli_types.positive_int, default=64,
                   help="batch the model serves; every timing uses it (64)")
    p.add_argument("--out", default="pyhwp-report", help="report folder (default ./pyhwp-report)")
    p.add_argument("--cache-dir", default=None, help="cache for the trained model and latency tables "
                   "(default $XDG_CACHE_HOME/pyhwp)")
    p.add_argument("--retrain", action="store_true", help="train the model again instead of using the cached one")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    drop = args.max_accuracy_drop
    budget = None if args.latency_budget_ms is None else args.latency_budget_ms / 1e3
    if drop is None and budget is None:
        drop = 1.0
    _, report, files = run(target=args.target, max_accuracy_drop=drop, latency_budget=budget,
                           batch_size=args.batch_size, out=args.out, cache_dir=args.cache_dir,
                           progress=not args.quiet, retrain=args.retrain)
    print(report.summary())
    print("report: " + ", ".join(str(p) for p in files.values()))
    return 0
