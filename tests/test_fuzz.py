"""Runs the hypothesis fuzzers of tests/fuzz_api.py in a subprocess: a crash fails the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = 1500  # per fuzzer, per run (about 14 s for the four on 2 cores)


@pytest.mark.slow
def test_public_api_survives_malformed_inputs():
    here = Path(__file__).parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(here), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(here / "fuzz_api.py"), str(EXAMPLES)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode < 0:
        pytest.fail(f"fuzzer crashed with {signal.Signals(-proc.returncode).name}:\n{proc.stderr[-4000:]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "fuzz: ok" in proc.stdout
