"""The benchmark machinery (pyhwp.bench): pruning rules, DLMC loading, targets, a tiny suite run.

Correctness only: these tests never assert anything about timings.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyhwp
from pyhwp._ext import _C
from pyhwp.bench import cases, dlmc, isa, targets
from pyhwp.bench.cases import ConvShape, prune, suite_cases
from pyhwp.bench.runner import run_case, unavailable
from pyhwp.cli import main as cli_main
from helpers import BF16_ISAS


def test_prune_unstructured_keeps_largest():
    w = torch.randn(40, 50, generator=torch.Generator().manual_seed(0))
    pw, mask = prune(w, "csr", 0.9)
    assert int(mask.sum()) == 200
    assert w.abs()[mask].min() > w.abs()[~mask].max()
    assert torch.equal(pw, w * mask)


def test_prune_24_keeps_two_largest_per_group():
    w = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(1))  # conv: groups along in*kh*kw
    pw, mask = prune(w, "2:4", 0.5)
    groups = mask.reshape(8, 3, 4)
    assert torch.equal(groups.sum(-1), torch.full((8, 3), 2))
    mag = w.abs().reshape(8, 3, 4)
    assert bool((mag.masked_fill(~groups, float("inf")).amin(-1) >= mag.masked_fill(groups, -1).amax(-1)).all())
    with pytest.raises(ValueError, match="sparsity 0.5"):
        prune(w, "2:4", 0.7)
    with pytest.raises(ValueError, match="divisible by 4"):
        prune(torch.randn(4, 6), "2:4", 0.5)


@pytest.mark.parametrize("shape", [(32, 48), (33, 50)])
def test_prune_tiles_zeroes_whole_tiles(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    _, mask = prune(w, "masked", 0.5)
    tn, tk = -(-shape[0] // 16), -(-shape[1] // 16)
    padded = torch.zeros(tn * 16, tk * 16, dtype=torch.bool)
    padded[: shape[0], : shape[1]] = mask
    per_tile = padded.reshape(tn, 16, tk, 16).sum(dim=(1, 3))
    full = torch.zeros_like(padded, dtype=torch.int64)
    full[: shape[0], : shape[1]] = 1
    tile_size = full.reshape(tn, 16, tk, 16).sum(dim=(1, 3))
    assert bool(((per_tile == 0) | (per_tile == tile_size)).all())  # tiles are all-kept or all-zero
    assert int((per_tile == 0).sum()) == round(0.5 * tn * tk)
    assert bool(prune(w, "masked", 0.0)[1].all())


def test_prune_unknown_pattern():
    with pytest.raises(ValueError, match="no pruning rule"):
        prune(torch.randn(4, 4), "bogus", 0.5)


def test_suites_cover_the_protocol():
    quick = suite_cases("quick", "cpu", 2)
    full = suite_cases("full", "cpu", 2)
    assert len(set(quick)) == len(quick) and len(set(full)) == len(full)
    # every linear shape at 90% CSR, batch 1, 16 and 128 (the target table)
    assert {(c.shape, c.batch) for c in quick if c.section == "linear" and c.pattern == "csr"
            and c.sparsity == 0.9} == {(s, b) for s in cases.LINEAR_SHAPES for b in cases.LINEAR_BATCHES}
    assert {c.threads for c in quick if c.section == "scaling"} == {1, 2}
    for pattern, sps in cases.SPARSITIES.items():
        for sp in sps:
            assert {c.shape for c in full if c.op == "linear" and c.pattern == pattern and c.sparsity == sp
                    and c.dtype == "float32"} == set(cases.LINEAR_SHAPES)
            assert {(c.conv, c.batch) for c in full if c.op == "conv2d" and c.pattern == pattern
                    and c.sparsity == sp} == {(cv, b) for cv in cases.CONV_SHAPES for b in cases.CONV_BATCHES}
    assert not suite_cases("quick", "cpu", 1) or all(c.section != "scaling" for c in suite_cases("quick", "cpu", 1))
    with pytest.raises(ValueError, match="suite must be"):
        suite_cases("huge", "cpu", 2)


def test_case_columns_and_names():
    c = cases.conv_case(ConvShape(8, 4, 3, 6), 2, "csr", 0.8)
    assert c.columns == 2 * 36 and c.in_features == 36 and c.out_features == 8
    assert c.name == "conv2d 4->8 3x3 @6x6 b2 csr 80%"


def _write_smtx(path, rows, cols, offsets, indices):
    with gzip.open(path, "wt") as f:
        f.write(f"{rows}, {cols}, {len(indices)}\n{' '.join(map(str, offsets))}\n{' '.join(map(str, indices))}\n")


def test_dlmc_loader_and_cases(tmp_path):
    d = tmp_path / "rn50" / "magnitude_pruning" / "0.9"
    d.mkdir(parents=True)
    _write_smtx(d / "bottleneck_2_block_group2_1_1.smtx.gz", 3, 5, [0, 2, 2, 3], [1, 4, 0])
    t = tmp_path / "transformer" / "magnitude_pruning" / "0.9"
    t.mkdir(parents=True)
    _write_smtx(t / "ffn.smtx.gz", 2, 4, [0, 1, 2], [3, 0])
    shape, ro, ci = dlmc.load_smtx(d / "bottleneck_2_block_group2_1_1.smtx.gz")
    assert shape == (3, 5) and ro.tolist() == [0, 2, 2, 3] and ci.tolist() == [1, 4, 0]
    w = dlmc.dense_from_pattern(shape, ro, ci, torch.Generator().manual_seed(0))
    assert torch.equal(w != 0, torch.tensor(
        [[0, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool))
    found = dlmc.dlmc_cases(tmp_path)
    assert [(c.shape, c.batch, c.section, c.op) for c in found] == [
        ((3, 5), 28 * 28, "dlmc", "matmul"), ((2, 4), 256, "dlmc", "matmul")]
    assert dlmc.dlmc_cases(tmp_path / "absent") == []
    _write_smtx(tmp_path / "bad.smtx.gz", 2, 4, [0, 1, 3], [3, 0])
    with pytest.raises(ValueError, match="header says 2x4 with 2 nonzeros"):
        dlmc.load_smtx(tmp_path / "bad.smtx.gz")
    with pytest.raises(ValueError, match="cannot tell the DLMC N"):
        dlmc.columns_for(tmp_path / "bad.smtx.gz")


def test_dlmc_case_runs(tmp_path):
    t = tmp_path / "transformer" / "0.9"
    t.mkdir(parents=True)
    _write_smtx(t / "q.smtx.gz", 4, 6, [0, 1, 3, 3, 4], [5, 0, 2, 1])
    (case,) = dlmc.dlmc_cases(tmp_path)
    row = run_case(case, "cpu", budget_s=0.0)
    assert row["nnz"] == 4 and set(row["ratio"]) == {"torch_dense", "torch_csr"}


def test_unavailable_names_the_reason():
    assert unavailable(cases.linear_case((8, 8), 1, "csr", 0.5), "cpu") is None
    assert "not registered" in unavailable(cases.linear_case((8, 8), 1, "nope", 0.5), "cpu")


def test_interleaved_rounds_rotate_the_order():
    from pyhwp.bench.timing import interleaved_medians

    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    medians = interleaved_medians(fns, warmup=1, min_reps=4, max_reps=4, budget_s=0.0)
    assert set(medians) == set("abc")
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab" + "abc"  # warm-up, then rotated rounds
    with pytest.raises(ValueError, match="at least one"):
        interleaved_medians({})


def test_targets_evaluate():
    rows = [
        {"name": "a", "section": "linear", "pattern": "csr", "sparsity": 0.9, "batch": 1, "dtype": "float32",
         "device": "cpu", "ratio": {"torch_dense": 5.0, "torch_csr": 1.5}},
        {"name": "b", "section": "linear", "pattern": "csr", "sparsity": 0.9, "batch": 1, "dtype": "float32",
         "device": "cpu", "ratio": {"torch_dense": 4.5, "torch_csr": 3.0}},
        {"name": "c", "section": "linear", "pattern": "csr", "sparsity": 0.9, "batch": 16, "dtype": "float32",
         "device": "cpu", "ratio": {"torch_dense": 9.0, "torch_csr": 2.5}},
        {"name": "d", "section": "dlmc", "pattern": "csr", "sparsity": 0.8, "batch": 256, "dtype": "float32",
         "device": "cpu", "ratio": {"torch_dense": 2.0, "torch_csr": 8.0}},
        {"name": "e", "section": "dlmc", "pattern": "csr", "sparsity": 0.9, "batch": 256, "dtype": "float32",
         "device": "cpu", "ratio": {"torch_dense": 8.0, "torch_csr": 0.5}},
        {"name": "f", "section": "linear", "pattern": "2:4", "skipped": "not merged"},
    ]
    res = {(t["case"], t["baseline"]): t for t in targets.evaluate(rows)}
    b1 = res[("90%, every linear shape, batch 1", "torch_dense")]
    assert (b1["value"], b1["rows"], b1["status"]) == (4.5, 2, "met")
    b1c = res[("90%, every linear shape, batch 1", "torch_csr")]
    assert (b1c["value"], b1c["worst"], b1c["status"]) == (1.5, "a", "missed")
    assert res[("90%, batch 16 and 128", "best_torch")]["value"] == 2.5
    assert res[("DLMC subset (geomean)", "torch_dense")]["value"] == pytest.approx(4.0)
    assert res[("DLMC subset (geomean)", "torch_csr")]["value"] == pytest.approx(2.0)
    assert res[("every linear shape, batch 1", "torch_dense")]["status"] == "not measured"


def test_tiny_suite_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--suite", "tiny", "--json", str(out), "--no-progress", "--threads", "2"]) == 0
    text = capsys.readouterr().out
    assert "== linear" in text and "== targets" in text
    doc = json.loads(out.read_text())
    meta = doc["meta"]
    assert {"date", "device", "cpu", "isa", "threads", "torch", "pyhwp", "git_commit", "suite"} <= set(meta)
    assert meta["threads"] == 2 and meta["device"] == "cpu" and meta["suite"] == "tiny"
    assert doc["machine"]["peak_gflops"]["float32"] > 0 and doc["machine"]["copy_gbs"] > 0
    measured = [r for r in doc["rows"] if "skipped" not in r]
    assert measured and len(doc["rows"]) == len(suite_cases("tiny", "cpu", 2))
    for r in measured:
        assert {"time_s", "useful_gflops", "dense_equiv_gflops", "ratio", "pct_peak", "nnz", "threads"} <= set(r)
        assert set(r["time_s"]) >= {"pyhwp", "torch_dense"} and r["time_s"]["pyhwp"] > 0
        assert r["useful_gflops"] <= r["dense_equiv_gflops"]
        if r["batch"] == 1 and r["op"] == "linear":
            assert r["pct_bw"] is not None
    assert all(r["skipped"] for r in doc["rows"] if "skipped" in r)
    assert {s["threads"] for s in doc["scaling"]} == {2}
    assert doc["overhead"]["median_us"]["kernel"] > 0
    assert len(doc["targets"]) == len(targets.CPU_TARGETS)


@pytest.mark.parametrize("cap", ["avx2", "avx512_bf16"])
def test_isa_cap_restarts_with_torch_capped(tmp_path, cap):
    """`--isa` re-runs the bench with torch's caps set and records both sides' ISA."""
    if cap not in BF16_ISAS:
        pytest.skip(f"needs a CPU with {cap} and pyhwp's kernels for it")
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in isa.TORCH_CAPS[cap]}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(pyhwp.__file__).parents[1]), env.get("PYTHONPATH")]))
    # Run from tmp_path: in the working directory of a source checkout, `python -m pyhwp` would
    # import the checkout's package rather than the one under test.
    proc = subprocess.run([sys.executable, "-m", "pyhwp", "bench", "--suite", "tiny", "--isa", cap, "--filter",
                           "linear", "--dlmc", "none", "--no-progress", "--json", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"restarting with torch capped at {cap}" in proc.stderr
    meta = json.loads(out.read_text())["meta"]
    torch_cap = isa.TORCH_CAPS[cap]["ATEN_CPU_CAPABILITY"].upper()
    assert meta["isa_cap"]["pyhwp"] == cap and meta["isa_cap"]["torch_capability"] == torch_cap
    assert meta["isa_cap"]["env"] == isa.TORCH_CAPS[cap]
    assert f"torch capped at {torch_cap}" in proc.stdout


def test_isa_cap_needs_cpu(capsys):
    assert cli_main(["bench", "--suite", "tiny", "--device", "cuda", "--isa", "avx2", "--no-progress"]) == 2
    assert "--isa caps the CPU kernels" in capsys.readouterr().err


def test_before_runs_ahead_of_every_timed_call():
    """interleaved_medians' `before` (the cold-cache eviction) precedes each timed call, not the
    warm-up ones."""
    from pyhwp.bench.timing import interleaved_medians

    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "ab"}
    interleaved_medians(fns, warmup=1, min_reps=2, max_reps=2, budget_s=0.0, before=lambda: calls.append("-"))
    assert "".join(calls) == "ab" + "-a-b" + "-b-a"


def test_cache_evictor_reads_and_writes_its_buffer():
    from pyhwp.bench.cold import CacheEvictor, eviction_bytes

    assert eviction_bytes() >= 2 * (1 << 20)
    evict = CacheEvictor(1 << 16)
    assert evict.nbytes == 1 << 16
    evict()
    evict()
    assert torch.equal(evict._buffer, torch.full(((1 << 16) // 4,), 2.0))
    for bad in (0, 63, -1, 1.5e6):
        with pytest.raises(ValueError, match="64-byte line"):
            CacheEvictor(bad)


def test_cold_cli_records_the_eviction(tmp_path, capsys, monkeypatch):
    """`--cold` evicts before every timed call of the cases and says so in the report and JSON."""
    from pyhwp.bench import cold, suite

    made = []

    class SmallEvictor(cold.CacheEvictor):
        def __init__(self):
            super().__init__(1 << 20)
            self.calls = 0
            made.append(self)

        def __call__(self):
            self.calls += 1
            super().__call__()

    monkeypatch.setattr(suite, "CacheEvictor", SmallEvictor)
    out = tmp_path / "cold.json"
    args = ["bench", "--suite", "tiny", "--filter", "linear", "--cold", "--json", str(out), "--no-progress"]
    assert cli_main(args) == 0
    assert "cold caches: 1 MiB read and written before every timed call" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["meta"]["cold_evict_bytes"] == 1 << 20
    measured = [r for r in doc["rows"] if "skipped" not in r]
    timed_calls = sum(len(r["time_s"]) for r in measured)
    assert len(made) == 1 and made[0].calls >= 5 * timed_calls  # at least min_reps rounds each
    assert cli_main(["bench", "--suite", "tiny", "--device", "cuda", "--cold", "--no-progress"]) == 2
    assert "--cold evicts the CPU caches" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs device 'cpu'"):
        suite.run_suite([], "cuda", cold=True)
