"""`pyhwp info`: what this build and machine offer (build facts, CPU ISA, threads, kernels)."""

from __future__ import annotations

import platform

import torch

import pyhwp
from pyhwp._ext import _C
from pyhwp.kernels import KERNELS


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_info() -> dict:
    """Everything `pyhwp info` prints, as a dict (also recorded in benchmark JSON)."""
    b = _C.build_info()
    feats = _C.cpu_features()
    return {
        "pyhwp": pyhwp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compiler": b["compiler"],
        "cpu": cpu_model(),
        "isa": {"avx2": feats["avx2"], "avx512": feats["avx512"], "avx512_bf16": feats["avx512_bf16"],
                "amx_bf16": feats["amx_bf16"], "active": _C.active_isa(), "compiled": list(b["cpu_kernels"])},
        "openmp": {"version": b.get("openmp"), "max_threads": b["omp_max_threads"],
                   "torch_threads": torch.get_num_threads()},
        "cuda": {"compiled": b["cuda"], "archs": b["cuda_archs"], "toolkit": b["cuda_version"],
                 "torch_cuda": torch.version.cuda, "device_available": torch.cuda.is_available()},
        "sanitize": b["sanitize"],
    }


def kernel_table() -> list[dict]:
    """One row per kernel: name, pattern, ops, device, dtypes, provider, available or why not."""
    rows = []
    for k in KERNELS:
        reasons = k.build_reasons()
        rows.append({
            "kernel": k.name, "pattern": k.pattern, "ops": ",".join(k.ops), "device": k.device,
            "dtypes": ",".join(str(d).removeprefix("torch.") for d in k.dtypes),
            "provider": k.provider, "available": "yes" if not reasons else "no: " + "; ".join(reasons),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of dict rows (same keys), columns padded to width."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys), "  ".join("-" * widths[k] for k in keys)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def main() -> int:
    info = build_info()
    isa = info["isa"]
    cuda = info["cuda"]
    print(f"pyhwp {info['pyhwp']}  (torch {info['torch']}, python {info['python']})")
    print(f"compiler      {info['compiler']}")
    print(f"cpu           {info['cpu']}")
    print("isa           " + " ".join(f"{k}={'yes' if isa[k] else 'no'}" for k in ("avx2", "avx512", "avx512_bf16", "amx_bf16"))
          + f"  (kernels use {isa['active']}; compiled: {', '.join(isa['compiled'])})")
    print(f"threads       openmp max {info['openmp']['max_threads']}, torch {info['openmp']['torch_threads']}")
    if cuda["compiled"]:
        print(f"cuda kernels  compiled for sm {cuda['archs']} with CUDA {cuda['toolkit']}; "
              f"device {'available' if cuda['device_available'] else 'not available'}")
    else:
        print("cuda kernels  not compiled (no nvcc at build time, or PYHWP_CUDA=OFF)")
    if info["sanitize"]:
        print("sanitizers    ASan + UBSan build")
    print()
    print(format_table(kernel_table()))
    return 0
