"""Kernel capabilities as data: which kernel serves which op, pattern, device and dtype.

Each entry declares what it supports; `unsupported_reasons` turns a request into the list of
reasons a kernel cannot serve it. The same strings feed the errors of pyhwp.linear and the
table of `pyhwp info`, and the selector reads the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class Kernel:
    name: str  # one name per concept: csrc function, op, tests and bench all use it
    pattern: str  # storage pattern it consumes ("dense" for baselines on the dense weight)
    ops: tuple[str, ...]
    device: str  # "cpu" or "cuda"
    dtypes: tuple[torch.dtype, ...]
    provider: str = "pyhwp"  # "pyhwp" for ours, "torch" for baselines we can also pick
    needs_cuda_build: bool = False
    min_cuda_arch: tuple[int, int] | None = None
    note: str = ""

    def unsupported_reasons(self, op: str, device: torch.device | str, dtype: torch.dtype) -> list[str]:
        """Why this kernel cannot run `op` on `device` in `dtype` (empty when it can)."""
        device = torch.device(device)
        reasons = []
        if op not in self.ops:
            reasons.append(f"{self.name} does not implement {op}")
        if device.type != self.device:
            reasons.append(f"{self.name} runs on {self.device}, not {device.type}")
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"{self.name} supports dtypes {names}, not {str(dtype).removeprefix('torch.')}")
        if not reasons:
            reasons.extend(self.build_reasons(device))
        return reasons

    def build_reasons(self, device: torch.device | None = None) -> list[str]:
        """Reasons this build or machine cannot run the kernel at all."""
        if self.needs_cuda_build and not _cuda_built():
            return [f"{self.name}: pyhwp was built without CUDA kernels (nvcc not found at build time)"]
        if self.device == "cuda":
            if not torch.cuda.is_available():
                return [f"{self.name}: torch sees no CUDA device"]
            if self.min_cuda_arch is not None:
                cap = torch.cuda.get_device_capability(device if device and device.index is not None else None)
                if cap < self.min_cuda_arch:
                    return [f"{self.name}: needs compute capability >= {self.min_cuda_arch}, device has {cap}"]
        return []


@cache
def _cuda_built() -> bool:
    from pyhwp._ext import _C

    return bool(_C.build_info()["cuda"])


KERNELS: tuple[Kernel, ...] = (
    Kernel("csr_matmul", "csr", ("linear", "conv2d"), "cpu", (torch.float32, torch.bfloat16),
           note="row-parallel SpMM; AVX-512/AVX2/scalar by run-time dispatch; bfloat16 accumulates in float32"),
    Kernel("sparse24_matmul", "2:4", ("linear", "conv2d"), "cpu", (torch.float32, torch.bfloat16),
           note="2:4 compressed GEMM (x selected in registers, no gather); AVX-512/AVX2/scalar; "
                "bfloat16 accumulates in float32 (on AMX from 8 rows: expanded dense tiles)"),
    Kernel("masked_matmul", "masked", ("linear", "conv2d"), "cpu", (torch.float32, torch.bfloat16),
           note="register-blocked dense micro-kernel over stored 16x16 tiles; AVX-512/AVX2/scalar; "
                "bfloat16 accumulates in float32 (on AMX from 8 rows: one tile multiply per stored tile)"),
    Kernel("torch_dense", "dense", ("linear", "conv2d"), "cpu", (torch.float32, torch.float64, torch.bfloat16),
           provider="torch", note="torch.nn.functional.linear / conv2d on the dense weight (MKL/oneDNN)"),
    Kernel("torch_csr", "csr", ("linear",), "cpu", (torch.float32, torch.float64),
           provider="torch", note="torch.sparse.mm on a torch CSR tensor"),
    Kernel("torch_dense_cuda", "dense", ("linear", "conv2d"), "cuda", (torch.float32, torch.float16, torch.bfloat16),
           provider="torch", note="cuBLAS / cuDNN through torch"),
    Kernel("torch_csr_cuda", "csr", ("linear",), "cuda", (torch.float32, torch.float16, torch.bfloat16),
           provider="torch", note="torch.sparse.mm on a CUDA CSR tensor (cuSPARSE)"),
    Kernel("torch_sparse24_cuda", "2:4", ("linear",), "cuda", (torch.float16, torch.bfloat16),
           provider="torch", min_cuda_arch=(8, 0),
           note="torch.sparse.to_sparse_semi_structured (cuSPARSELt / CUTLASS)"),
    Kernel("csr_matmul_cuda", "csr", ("linear", "conv2d"), "cuda", (torch.float32, torch.float16, torch.bfloat16),
           needs_cuda_build=True, min_cuda_arch=(8, 0),
           note="Sputnik-style SpMM: rows by length, 16-byte vector loads, subwarps; float32 accumulation"),
    Kernel("sparse24_matmul_cuda", "2:4", ("linear", "conv2d"), "cuda", (torch.float16, torch.bfloat16),
           needs_cuda_build=True, min_cuda_arch=(8, 0),
           note="sparse tensor cores (mma.sp m16n8k32), the CPU 2:4 layout read in place; batches 1-16 "
                "on n8 tiles without padding; float32 accumulation"),
    Kernel("masked_matmul_cuda", "masked", ("linear", "conv2d"), "cuda", (torch.float32, torch.float16, torch.bfloat16),
           needs_cuda_build=True, min_cuda_arch=(8, 0),
           note="stored 16x16 tiles read in place through a tile map; tensor cores (mma.sync, ldmatrix, "
                "cp.async) for float16/bfloat16, exact float32 SIMT; tiles not stored are skipped"),
    # float64 paths of the pyhwp ops (torch ops on the dense weight, inside the same op): what
    # torch.autograd.gradcheck runs. Correctness paths, not fast ones.
    Kernel("csr_matmul_torch", "csr", ("linear", "conv2d"), "cpu", (torch.float64,),
           note="float64 path of the csr_matmul op: torch ops on the dense weight (gradcheck)"),
    Kernel("csr_matmul_torch_cuda", "csr", ("linear", "conv2d"), "cuda", (torch.float64,),
           note="float64 path of the csr_matmul op: torch ops on the dense weight (gradcheck)"),
    Kernel("sparse24_matmul_torch", "2:4", ("linear", "conv2d"), "cpu", (torch.float64,),
           note="float64 path of the sparse24_matmul op: torch ops on the dense weight (gradcheck)"),
    Kernel("sparse24_matmul_torch_cuda", "2:4", ("linear", "conv2d"), "cuda", (torch.float64,),
           note="float64 path of the sparse24_matmul op: torch ops on the dense weight (gradcheck)"),
    Kernel("masked_matmul_torch", "masked", ("linear", "conv2d"), "cpu", (torch.float64,),
           note="float64 path of the masked_matmul op: torch ops on the dense weight (gradcheck)"),
    Kernel("masked_matmul_torch_cuda", "masked", ("linear", "conv2d"), "cuda", (torch.float64,),
           note="float64 path of the masked_matmul op: torch ops on the dense weight (gradcheck)"),
)


_BY_NAME = {k.name: k for k in KERNELS}


def kernel_named(name: str) -> Kernel:
    """The KERNELS entry called `name` (KeyError if none)."""
    return _BY_NAME[name]


_FOUND: dict[tuple, Kernel] = {}


def find_kernel(op: str, pattern: str, device: torch.device, dtype: torch.dtype) -> Kernel:
    """The pyhwp kernel that runs `op` on a `pattern` weight; TypeError/ValueError with every reason.

    Answers are remembered per (op, pattern, device, dtype): what a build and machine can run does
    not change while the process lives, and this sits on every call of pyhwp.linear.
    """
    key = (op, pattern, device, dtype)
    found = _FOUND.get(key)
    if found is None:
        found = _FOUND[key] = _find_kernel(op, pattern, device, dtype)
    return found


def _find_kernel(op: str, pattern: str, device: torch.device, dtype: torch.dtype) -> Kernel:
    candidates = [k for k in KERNELS if k.provider == "pyhwp" and k.pattern == pattern]
    reasons: list[str] = []
    for k in candidates:
        r = k.unsupported_reasons(op, device, dtype)
        if not r:
            return k
        reasons.extend(r)
    if not candidates:
        reasons.append(f"no pyhwp kernel implements the {pattern!r} pattern yet")
    # A dtype problem is a TypeError when every kernel for this device rejects only the dtype.
    on_device = [k for k in candidates if k.device == torch.device(device).type]
    dtype_only = bool(on_device) and all(
        all("supports dtypes" in r for r in k.unsupported_reasons(op, device, dtype)) for k in on_device)
    msg = f"pyhwp.{op}: no kernel for a {pattern!r} weight on {device} in {dtype}: " + "; ".join(reasons)
    raise (TypeError if dtype_only else ValueError)(msg)
