"""The build: no libtorch link, build info, ISA switch, and the `pyhwp info` command."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pyhwp._ext import _C


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ldd is Linux-only")
def test_extension_does_not_link_libtorch():
    out = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libtorch" not in out and "libc10" not in out


def test_build_info_fields():
    b = _C.build_info()
    assert {"compiler", "cuda", "cuda_archs", "omp_max_threads"} <= set(b)
    assert b["omp_max_threads"] >= 1


def test_compiled_kernels_bound_the_active_isa():
    compiled = _C.build_info()["cpu_kernels"]
    order = ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]
    assert compiled == order[:len(compiled)]
    assert _C.active_isa() in compiled
    best = _C.active_isa()
    try:  # a cap above what the build compiled (or the CPU runs) leaves the best available
        assert _C.set_isa_cap("amx") == best
    finally:
        _C.set_isa_cap(best)


def test_amx_only_where_the_cpu_and_the_os_allow_it():
    f = _C.cpu_features()
    assert not f["amx"] or (f["amx_bf16"] and f["avx512"])
    assert (_C.active_isa() == "amx") == (f["amx"] and "amx" in _C.build_info()["cpu_kernels"])


def test_avx512_bf16_where_the_cpu_has_it_and_no_amx():
    f, compiled = _C.cpu_features(), _C.build_info()["cpu_kernels"]
    dot = f["avx512_bf16"] and f["avx512_vbmi2"] and "avx512_bf16" in compiled
    assert (_C.active_isa() == "avx512_bf16") == (dot and _C.active_isa() != "amx")
    previous = _C.active_isa()
    try:  # AMX CPUs run the AVX512-BF16 kernels too, capped
        assert (_C.set_isa_cap("avx512_bf16") == "avx512_bf16") == dot
    finally:
        _C.set_isa_cap(previous)


def test_isa_cap_round_trip():
    best = _C.active_isa()
    try:
        assert _C.set_isa_cap("scalar") == "scalar"
        assert _C.active_isa() == "scalar"
    finally:
        _C.set_isa_cap(best)
    with pytest.raises(ValueError, match="unknown ISA"):
        _C.set_isa_cap("sse9")


def test_kernel_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="csr_matmul"):
        _C.csr_matmul(2, 3, 0, 0, 0, 0, 0, 1, 1, 3, 0, 0, 1, 2, 1)


@pytest.mark.parametrize("argv", [
    pytest.param(["pyhwp", "info"], marks=pytest.mark.skipif(
        shutil.which("pyhwp") is None, reason="console script not installed (source checkout)")),
    [sys.executable, "-m", "pyhwp", "info"],
], ids=["console-script", "python-m"])
def test_info_command(argv, tmp_path):
    # Run outside the checkout so `python -m` imports the installed package, not ./pyhwp.
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120,
                         cwd=tmp_path).stdout
    assert "csr_matmul" in out and "isa" in out and "cuda kernels" in out
