"""Pruning evidence on DigitsCNN (scikit-learn digits at 32x32): test accuracy after 50%, 2:4, 80% and
90% pruning with each criterion, without fine-tuning, with least-squares weight redistribution, and
with fine-tuning (masks held); plus structural channel removal and BatchNorm folding.

    PYTHONPATH=. python bench/prune_digits.py [--threads 1] [--out bench/results/prune_digits.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pyhwp
from pyhwp.data import load_digits
from pyhwp.metrics import accuracy, compression_ratio, count_flops, count_params, performance_change
from pyhwp.models import DigitsCNN, train_digits_cnn
from pyhwp.prune import (activation_norms, apply_masks, channel_masks, finetune, fold_batchnorm, make_mask,
                         mask_channels, mask_sparsity, prunable_layers, redistribute, remove_channels, taylor_scores)

SETTINGS = [("50%", "unstructured", 0.5), ("2:4", "n:m", None), ("80%", "unstructured", 0.8),
            ("90%", "unstructured", 0.9)]
CRITERIA = ["magnitude", "taylor", "wanda", "hybrid"]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6, help="dense training epochs")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument("--calib-batches", type=int, default=4, help="training batches of 64 for calibration")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/prune_digits.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load0 = os.getloadavg()[0]

    data = load_digits(32, seed=args.seed)

    def train_loader() -> DataLoader:  # a fresh, seeded order for every run: rows do not depend on order
        return DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(args.seed))

    test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=512)
    calib = [(data.x_train[i * 64:(i + 1) * 64], data.y_train[i * 64:(i + 1) * 64])
             for i in range(args.calib_batches)]

    torch.manual_seed(args.seed)
    dense = DigitsCNN()
    t0 = time.perf_counter()
    train_digits_cnn(dense, train_loader(), epochs=args.epochs, seed=args.seed, progress=False)
    train_s = time.perf_counter() - t0
    dense.eval()
    p_dense = accuracy(dense, test)
    print(f"dense: {p_dense:.2f}% after {train_s:.1f}s of training", file=sys.stderr)

    # Every Conv2d/Linear except the first conv (1 input channel: K = 9 is not a multiple of 4).
    names = [n for n in prunable_layers(dense) if n != "0"]
    scores = taylor_scores(dense, calib, nn.functional.cross_entropy, layers=names)
    acts = activation_norms(dense, calib, layers=names)

    def masks_for(pattern, sparsity, criterion):
        out = {}
        for n in names:
            kw = {"magnitude": {}, "taylor": {"scores": scores[n]}, "wanda": {"activations": acts[n]},
                  "hybrid": {"scores": scores[n]}}[criterion]
            out[n] = make_mask(dense.get_submodule(n).weight, sparsity, pattern, criterion, **kw)
        return out

    def tune(model, masks):
        torch.manual_seed(args.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=args.finetune_lr, weight_decay=1e-4)
        finetune(model, masks, train_loader(), nn.functional.cross_entropy, opt, args.finetune_epochs,
                 progress=False)
        return model.eval()

    rows = []
    omegas = []
    for label, pattern, sparsity in SETTINGS:
        for criterion in CRITERIA:
            masks = masks_for(pattern, sparsity, criterion)
            pruned = apply_masks(copy.deepcopy(dense), masks).eval()
            acc = accuracy(pruned, test)
            refit = copy.deepcopy(dense)
            report = redistribute(refit, masks, calib)
            acc_ls = accuracy(refit.eval(), test)
            acc_ft = accuracy(tune(pruned, masks), test)
            held = all(bool((pruned.get_submodule(n).weight[~masks[n]] == 0).all()) for n in names)
            rows.append((label, criterion, mask_sparsity(masks), acc, acc_ls, acc_ft, held))
            if criterion == "magnitude":
                omegas.append((label, sum(r["omega_masked"] for r in report.values()),
                               sum(r["omega_redistributed"] for r in report.values())))
            print(f"{label:>4} {criterion:>9}: {acc:6.2f} | LS {acc_ls:6.2f} | FT {acc_ft:6.2f}", file=sys.stderr)

    # CSR compression of the unstructured magnitude masks (values + int32 columns + int64 row offsets).
    csr = []
    for label, pattern, sparsity in SETTINGS:
        if pattern != "unstructured":
            continue
        masks = masks_for(pattern, sparsity, "magnitude")
        sws = [pyhwp.to_sparse(dense.get_submodule(n).weight.detach(), "csr", mask=masks[n]) for n in names]
        csr.append((label, compression_ratio(sws)))

    # Structural: coupled 50% channel masks by magnitude, channels removed, then fine-tuned.
    x1 = data.x_test[:1]
    cmasks = channel_masks(dense, 0.5)
    masked_c = mask_channels(copy.deepcopy(dense), cmasks).eval()
    shrunk = remove_channels(dense, cmasks, example_input=data.x_test[:64]).eval()
    with torch.no_grad():
        struct_err = (shrunk(data.x_test) - masked_c(data.x_test)).abs().max().item()
    acc_struct = accuracy(shrunk, test)
    acc_struct_ft = accuracy(tune(shrunk, {}), test)
    before_p, after_p = count_params(dense)["total"], count_params(shrunk)["total"]
    before_f, after_f = count_flops(dense, x1)["dense"], count_flops(shrunk, x1)["dense"]
    folded = fold_batchnorm(dense)
    with torch.no_grad():
        fold_err = (folded(data.x_test) - dense(data.x_test)).abs().max().item()

    total_s = time.perf_counter() - start
    load1 = os.getloadavg()[0]
    layer_shapes = ", ".join(f"{n} {tuple(dense.get_submodule(n).weight.shape)}" for n in names)
    lines = [
        "# Pruning DigitsCNN on scikit-learn digits (32x32)",
        "",
        f"Produced by `bench/prune_digits.py` (commit {_commit()}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), load average "
        f"{load0:.1f} at start and {load1:.1f} at end; shared machine). Whole run: {total_s:.0f} s.",
        "",
        f"Dense model: {args.epochs} epochs, {train_s:.0f} s of training, test accuracy **{p_dense:.2f}%** "
        f"({len(data.y_test)} test images, split seed {args.seed}).",
        "",
        f"Pruned layers (weights in GEMM form): {layer_shapes}; the first conv (1 input channel, K = 9) stays dense. "
        "Each layer is pruned to the same sparsity (per-layer ranking). Taylor scores (|w * grad| summed) and "
        f"Wanda activation norms come from {args.calib_batches} training batches of 64; hybrid = a coarse |w| pass "
        "for half of the pruned weights, then Taylor importance for the rest. LS: kept weights and biases "
        "re-fitted by least squares to the dense layer outputs on the same calibration batches "
        "(`pyhwp.prune.redistribute`, sequential), no training. FT: "
        f"{args.finetune_epochs} epoch(s) of AdamW (lr {args.finetune_lr}) with masks held, from the plain "
        "pruned model.",
        "",
        "| pruning | criterion | sparsity | acc, no FT | ΔP | acc, LS | acc, FT | ΔP (FT) | masks held |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, crit, sp, acc, acc_ls, acc_ft, held in rows:
        lines.append(f"| {label} | {crit} | {sp:.3f} | {acc:.2f}% | {performance_change(p_dense, acc):+.1f}% | "
                     f"{acc_ls:.2f}% | {acc_ft:.2f}% | {performance_change(p_dense, acc_ft):+.1f}% | "
                     f"{'yes' if held else 'NO'} |")
    lines += [
        "",
        "ΔP = (P' - P) / P * 100% against the dense accuracy P.",
        "",
        "Omega (sum over pruned layers of sum_i sum_j |w_ij| / max_k |w_ik|), magnitude masks:",
        "",
        "| pruning | Omega, magnitude-pruned | Omega, after LS redistribution |",
        "| --- | --- | --- |",
        *[f"| {label} | {a:.1f} | {b:.1f} |" for label, a, b in omegas],
        "",
        "CSR compression of the pruned layers (dense fp32 bytes / `SparseWeight.nbytes`): "
        + ", ".join(f"{label}: {r:.2f}x" for label, r in csr) + ".",
        "",
        "## Structural channel removal (50% of channels, magnitude, coupled masks)",
        "",
        f"- parameters (Conv2d + Linear) {before_p} -> {after_p} ({after_p / before_p:.2f}x); "
        f"FLOPs per image {before_f / 1e6:.2f} M -> {after_f / 1e6:.2f} M ({after_f / before_f:.2f}x)",
        f"- shrunk vs masked model, max |output difference| on the test set: {struct_err:.2e}",
        f"- accuracy: shrunk {acc_struct:.2f}% ({performance_change(p_dense, acc_struct):+.1f}%), after "
        f"{args.finetune_epochs} fine-tune epoch(s) {acc_struct_ft:.2f}% "
        f"({performance_change(p_dense, acc_struct_ft):+.1f}%)",
        f"- BatchNorm folding: max |output difference| vs the unfolded model on the test set: {fold_err:.2e}",
        "",
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
