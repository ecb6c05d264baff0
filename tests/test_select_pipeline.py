"""Kernel-aware selection and the end-to-end pipeline: select_pattern, the cost proxy, plan search,
the re-timing check and pyhwp.optimize on a tiny model (correctness only; no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyhwp.select import select_pattern
from pyhwp.select.cost import candidate_mask, layer_grams, relative_output_error
from pyhwp.select.layers import at_batch, describe_layers
from tiny_models import single_thread  # noqa: F401 (autouse fixture)


def test_select_pattern_small_linear(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    sel = select_pattern(w, torch.randn(4, 64), sparsity=(0.5, 0.9), cache_dir=tmp_path, budget_s=0.01)
    labels = {(c.pattern, c.sparsity) for c in sel.candidates}
    assert ("dense", 0.0) in labels and ("csr", 0.9) in labels and ("2:4", 0.5) in labels
    assert ("channel", 0.5) in labels
    assert sel.pick.latency_s == min(c.latency_s for c in sel.candidates)
    assert all(c.latency_s > 0 and c.kernel and c.extra["provider"] in ("pyhwp", "torch") for c in sel.candidates)
    csr = next(c for c in sel.candidates if c.pattern == "csr")
    assert csr.kernel in ("csr_matmul", "torch_csr")  # the fastest deployable kernel of the pattern
    assert "dense" in sel.table() and "<- pick" in sel.table()
    # A second call reads the cached tables: the same latencies.
    again = select_pattern(w, torch.randn(4, 64), sparsity=(0.5, 0.9), cache_dir=tmp_path, budget_s=0.01)
    assert sorted(c.latency_s for c in again.candidates) == sorted(c.latency_s for c in sel.candidates)


def test_select_pattern_conv_and_bad_inputs(tmp_path):
    conv = nn.Conv2d(8, 16, 3, padding=1)
    sel = select_pattern(conv, torch.randn(1, 8, 6, 6), patterns=("dense", "csr"), sparsity=0.8,
                         cache_dir=tmp_path, budget_s=0.01)
    assert {c.pattern for c in sel.candidates} == {"dense", "csr"}
    with pytest.raises(ValueError, match="example_input must be"):
        select_pattern(torch.randn(4, 5), torch.randn(2, 6), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="sparsity must be"):
        select_pattern(torch.randn(4, 8), torch.randn(2, 8), sparsity=1.5, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="patterns must be among"):
        select_pattern(torch.randn(4, 8), torch.randn(2, 8), patterns=("bogus",), cache_dir=tmp_path)
    with pytest.raises(TypeError, match="weight must be"):
        select_pattern(torch.randn(4), torch.randn(2, 8), cache_dir=tmp_path)


def test_relative_output_error_matches_direct_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 7))
    data = [torch.randn(4, 3, 4, 4) for _ in range(3)]
    grams = layer_grams(model, data, ["0", "3"], max_bytes=1)  # one layer per pass
    for name, mod in (("0", model[0]), ("3", model[3])):
        mask = candidate_mask(mod.weight, "csr", 0.6)
        assert abs(1 - mask.float().mean().item() - 0.6) < 0.02
        ins = []
        h = mod.register_forward_pre_hook(lambda m, a: ins.append(a[0].double()))
        with torch.no_grad():
            for x in data:
                model(x)
        h.remove()
        w = mod.weight.double()
        op = (lambda x, w: F.conv2d(x, w, padding=1)) if name == "0" else F.linear
        num = sum(op(x, w * ~mask).square().sum() for x in ins)
        den = sum(op(x, w).square().sum() for x in ins)
        assert relative_output_error(mod.weight, mask, grams[name]) == pytest.approx((num / den).item(), rel=1e-9)
    for pattern, s in (("2:4", 0.5), ("masked", 0.5), ("channel", 0.5), ("dense", 0.0)):
        m = candidate_mask(model[3].weight, pattern, s)
        assert m.shape == model[3].weight.shape and m.dtype == torch.bool
    assert not candidate_mask(model[3].weight, "channel", 0.5).reshape(7, -1).any(1).all()
    with pytest.raises(ValueError, match="pattern must be"):
        candidate_mask(model[3].weight, "bogus", 0.5)


def test_describe_layers_resizes_the_batch():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    infos = describe_layers(model, torch.randn(3, 2, 8, 8), batch_size=10)
    assert infos["0"].input_shape == (10, 2, 8, 8) and infos["0"].output_hw == (4, 4)
    op, shape, batch, note = infos["0"].latency_case  # timed at its stride: padding k // 2
    assert shape == (4, 2, 3, 3, 8, 8, 2, 2) and batch == 10 and note is None
    assert infos["2"].input_shape == (10, 64) and infos["2"].latency_case[3] is None
    # Dilated convs are offered the sparse patterns (the implicit GEMMs run any dilation), grouped
    # ones only dense.
    dilated = describe_layers(nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2), nn.Conv2d(8, 8, 3, groups=2)),
                              torch.randn(1, 4, 9, 9))
    assert dilated["0"].sparse_ok is None and "dilation (2, 2)" in dilated["0"].latency_case[3]
    assert dilated["0"].latency_case[1] == (8, 4, 3, 3, 9, 9)  # the stride-1 case at the output size
    assert dilated["1"].sparse_ok == "grouped conv: only dense is timed"
    assert at_batch(torch.arange(3.0).reshape(3, 1), 5)[0].flatten().tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="batch_size"):
        at_batch(torch.zeros(2, 1), 0)


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def test_optimize_end_to_end_on_a_tiny_model(tmp_path):
    pytest.importorskip("pyhwp.nn")
    from pyhwp.optimize import optimize

    model = _tiny()
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(96, 3, 8, 8, generator=gen)
    with torch.no_grad():
        labels = model(xs).argmax(1)  # the task: agree with the dense model
    data = [(xs[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]

    def agreement(m):
        with torch.no_grad():
            return 100.0 * float((m(xs).argmax(1) == labels).float().mean())

    optimized, report = optimize(
        model, xs[:4], batch_size=8, eval_fn=agreement, calib_loader=data, train_loader=data, finetune_epochs=1,
        max_accuracy_drop=10.0, sparsities={"csr": (0.5, 0.9), "masked": (0.5,), "channel": (0.5,)},
        cache_dir=tmp_path / "cache", budget_s=0.01, timing_s=0.2, max_finetunes=2, progress=False)
    d = report.data
    assert [ly["name"] for ly in d["layers"]] == ["0", "3", "7", "9"]
    assert d["accuracy"]["before"] == 100.0
    assert d["accuracy"]["after"] == pytest.approx(agreement(optimized))
    assert d["accuracy"]["after"] == pytest.approx(d["accuracy"]["search_metric_after"])  # conversion kept it
    assert d["accuracy"]["drop"] <= 10.0
    assert set(d["latency"]["median_s"]) >= {"dense", "optimized"}
    assert d["bytes"]["dense"] > 0 and d["bytes"]["optimized"] > 0
    for ly in d["layers"]:
        assert ly["latency_s"] <= ly["dense_latency_s"]  # never a pattern slower than dense
        assert ly["retime_check"] is not None and ly["retimed_pick_s"] > 0
        assert any(c["pattern"] == "dense" for c in ly["candidates"])
        if ly["pattern"] not in ("dense", "channel"):
            assert 0 < ly["weight_sparsity"] < 1
    assert d["layers"][-1]["candidates"] and all(c["pattern"] != "channel" for c in d["layers"][-1]["candidates"])
    # Sparse picks became sparse layers running that pattern.
    mods = dict(optimized.named_modules())
    for ly in d["layers"]:
        if ly["pattern"] in ("csr", "2:4", "masked"):
            assert getattr(mods[ly["name"]], "pattern", "csr") == ly["pattern"]
    assert optimized(xs[:2]).shape == (2, 4)
    files = report.save(tmp_path / "report")
    assert json.loads(files["json"].read_text())["batch_size"] == 8
    md = files["markdown"].read_text()
    assert "| layer |" in md and "re-time" in md.lower()


def test_optimize_latency_budget_and_bad_arguments(tmp_path):
    pytest.importorskip("pyhwp.nn")
    from pyhwp.optimize import optimize

    model = _tiny()
    x = torch.randn(4, 3, 8, 8)
    kw = dict(cache_dir=tmp_path, budget_s=0.01, timing_s=0.1, progress=False, retime=False,
              sparsities={"csr": (0.9,), "masked": (), "channel": ()})
    optimized, report = optimize(model, x, latency_budget=10.0, **kw)  # ample: the most accurate is dense
    assert all(ly["pattern"] == "dense" for ly in report.data["layers"])
    torch.testing.assert_close(optimized(x), model(x), rtol=1e-4, atol=1e-5)  # only BatchNorm folded
    with pytest.raises(ValueError, match="exactly one"):
        optimize(model, x, **kw)
    with pytest.raises(ValueError, match="needs eval_fn"):
        optimize(model, x, max_accuracy_drop=1.0, **kw)
    with pytest.raises(ValueError, match="latency_budget"):
        optimize(model, x, latency_budget=1e-9, **kw)


def test_cli_parses_demo_and_prune():
    from pyhwp.cli import _parser

    a = _parser().parse_args(["prune", "--model", "digits-cnn", "--target", "cpu", "--max-accuracy-drop", "1.0"])
    assert a.command == "prune" and a.model == "digits-cnn" and a.max_accuracy_drop == 1.0
    b = _parser().parse_args(["demo", "--out", "r", "--batch-size", "8"])
    assert b.command == "demo" and b.out == "r" and b.batch_size == 8 and b.latency_budget_ms is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["prune", "--model", "resnet"])


def test_optimize_torchvision_style_resnet(tmp_path):
    from pyhwp.optimize import optimize
    from pyhwp.select.candidates import channel_consumers
    from tiny_models import tiny_resnet

    model = tiny_resnet("basic")
    xs = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels = model(xs).argmax(1)

    def agreement(m):
        with torch.no_grad():
            return 100.0 * float((m(xs).argmax(1) == labels).float().mean())

    infos = describe_layers(model, xs[:2])
    consumers = channel_consumers(model, infos)
    inner = [n for n, c in consumers.items() if c is not None]
    assert inner and all(n.endswith("conv1") for n in inner)  # residual streams are not removed alone
    optimized, report = optimize(
        model, xs[:2], eval_fn=agreement, calib_loader=[xs], max_accuracy_drop=100.0,
        sparsities={"csr": (0.9,), "masked": (), "channel": (0.5,)}, cache_dir=tmp_path, budget_s=0.01,
        timing_s=0.1, retime=False, progress=False)
    assert report.data["accuracy"]["after"] == pytest.approx(agreement(optimized))
    assert optimized(xs[:2]).shape == model(xs[:2]).shape
