"""The subcommands refuse bad values at parse time (exit 2 with a usage message), before any
model is trained or kernel timed; the bench refuses a filter that matches nothing."""

from __future__ import annotations

import pytest

from pyhwp.cli import main


@pytest.mark.parametrize("argv, message", [
    (["bench", "--device", "tpu"], "expected cpu, cuda or cuda:N, got 'tpu'"),
    (["bench", "--threads", "0"], "--threads: expected a positive integer, got '0'"),
    (["bench", "--threads", "two"], "--threads: expected a positive integer, got 'two'"),
    (["bench", "--budget", "-1"], "--budget: expected a positive number, got '-1'"),
    (["bench", "--budget", "nan"], "--budget: expected a positive number, got 'nan'"),
    (["bench", "--json", "{missing}/out.json"], "does not exist"),
    (["bench", "--json", "{tmp}"], "is a folder, expected a file"),
    (["profile", "--device", "cuda:x"], "expected cpu, cuda or cuda:N, got 'cuda:x'"),
    (["profile", "--plot", "{missing}/roofline.png"], "does not exist"),
    (["prune", "--model", "digits-cnn", "--target", "gpu"], "expected cpu, cuda or cuda:N, got 'gpu'"),
    (["prune", "--model", "digits-cnn", "--max-accuracy-drop", "-1"], "expected a number >= 0, got '-1'"),
    (["prune", "--model", "digits-cnn", "--latency-budget-ms", "0"], "expected a positive number, got '0'"),
    (["demo", "--batch-size", "0"], "--batch-size: expected a positive integer, got '0'"),
])
def test_bad_values_fail_at_parse_time(argv, message, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "no-such-folder", tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"], ids=["host", "gpu", "gpu1"])
def test_device_forms_parse(device):
    from pyhwp.cli import _parser

    assert _parser().parse_args(["bench", "--device", device]).device == device


def test_bench_filter_matching_nothing(capsys):
    assert main(["bench", "--suite", "tiny", "--filter", "no such case", "--no-progress"]) == 2
    assert "no case of the tiny suite on cpu has 'no such case' in its name" in capsys.readouterr().err
