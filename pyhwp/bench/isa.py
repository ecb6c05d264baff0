"""`pyhwp bench --isa`: pyhwp's kernels and torch's baselines capped at one instruction set.

On an AVX-512 machine `--isa avx2` measures what a CPU with AVX2 only would (and on an AMX machine
`--isa avx512_bf16` what one with AVX512-BF16 but no tiles would): pyhwp's kernels are
capped with `_C.set_isa_cap`, and torch's (MKL, oneDNN and ATen's own vectorised kernels) by the
environment variables each library reads once, when it first runs. Those must be set before torch
does any work, so the bench re-runs itself with them set, unless they already are. The caps are
recorded in the run's metadata; the measured ceilings (dense GEMM GFLOP/s) show the effect.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import pyhwp
from pyhwp._ext import _C

# What torch reads for each ISA: MKL's dispatch (MKL_ENABLE_INSTRUCTIONS), oneDNN's (convs and
# bfloat16 GEMMs) and ATen's vectorised kernels (ATEN_CPU_CAPABILITY).
TORCH_CAPS = {
    "avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512": {"MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "ATEN_CPU_CAPABILITY": "avx512"},
    # AVX-512 with AVX512-BF16 and no AMX (an AMD Zen 4, or an Intel CPU without tiles): oneDNN's
    # bfloat16 GEMMs and convs on VDPBF16PS.
    "avx512_bf16": {"MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
                    "ATEN_CPU_CAPABILITY": "avx512"},
}


def needs_restart(isa: str) -> bool:
    """True when this process's environment lacks torch's caps for `isa`."""
    return any(os.environ.get(k) != v for k, v in TORCH_CAPS[isa].items())


def restart(isa: str, argv: list[str]) -> None:
    """Re-runs the command line `pyhwp *argv` with torch's caps for `isa` set, with this same
    pyhwp package (`python -m` would put the working directory first on the path, where a source
    checkout without a built extension may shadow the installed package); does not return."""
    env = dict(os.environ, **TORCH_CAPS[isa])
    caps = " ".join(f"{k}={v}" for k, v in TORCH_CAPS[isa].items())
    print(f"pyhwp bench: restarting with torch capped at {isa} ({caps})", file=sys.stderr, flush=True)
    sys.stdout.flush()
    root = str(Path(pyhwp.__file__).resolve().parents[1])
    code = f"import sys; sys.path[:1] = [{root!r}]; from pyhwp.cli import main; sys.exit(main(sys.argv[1:]))"
    os.execve(sys.executable, [sys.executable, "-c", code, *argv], env)


def apply(isa: str) -> dict:
    """Caps pyhwp's kernels at `isa` in this process (whose torch is already capped) and returns
    what the metadata records. Raises RuntimeError if torch did not take its cap."""
    got = torch.backends.cpu.get_cpu_capability()  # "AVX2" under ATEN_CPU_CAPABILITY=avx2
    if got != TORCH_CAPS[isa]["ATEN_CPU_CAPABILITY"].upper() and _C.cpu_features()[isa]:
        raise RuntimeError(f"torch runs its {got} kernels although ATEN_CPU_CAPABILITY="
                           f"{TORCH_CAPS[isa]['ATEN_CPU_CAPABILITY']} is set")
    _C.set_isa_cap(isa)
    return {"requested": isa, "pyhwp": _C.active_isa(), "torch_capability": got, "env": TORCH_CAPS[isa]}
