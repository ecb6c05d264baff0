"""Measured ceilings: peak dense GEMM GFLOP/s per dtype and memory bandwidth (read, write, copy)."""

from __future__ import annotations

import torch

from pyhwp.bench.timing import interleaved_medians

MiB = 2**20
# Per-dtype GEMM sizes: large enough for the BLAS to reach its steady rate, small enough to time
# a few repetitions within the budget.
GEMM_SIZES = {"cpu": (1024, 2048), "cuda": (4096, 8192)}
GEMM_SIZES_QUICK = {"cpu": (1024,), "cuda": (4096,)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def low_precision_support(device: torch.device, isa: dict, compute_capability=None) -> dict[str, str | None]:
    """For bfloat16 and float16: None where the hardware computes in it natively, else why not.

    On CPUs torch runs both everywhere, but without the ISA extension it converts to float32, so
    a 'peak' there would only measure the conversion.
    """
    if device.type == "cuda":
        bf16 = None if compute_capability and tuple(compute_capability) >= (8, 0) else \
            "bfloat16 tensor cores need compute capability >= 8.0"
        return {"bfloat16": bf16, "float16": None}
    return {
        "bfloat16": None if isa.get("avx512_bf16") or isa.get("amx_bf16") else
        "this CPU has neither avx512_bf16 nor amx_bf16; torch would emulate bfloat16 in float32",
        "float16": None if isa.get("avx512_fp16") or isa.get("amx_fp16") else
        "this CPU has neither avx512_fp16 nor amx_fp16; torch would emulate float16 in float32",
    }


def gemm_gflops(device: torch.device, dtypes: list[str], sizes: tuple[int, ...],
                budget_s: float = 1.0) -> dict[str, float]:
    """Best measured GFLOP/s over `sizes` of an n x n x n torch.mm (2 n^3 flops) per dtype name.

    All (dtype, size) products are timed interleaved in one run; the peak of a dtype is the
    highest median rate over its sizes. float32 on CUDA runs without TF32 (true float32 rate).
    """
    g = torch.Generator(device=device).manual_seed(0)
    fns, flops = {}, {}
    for name in dtypes:
        for n in sizes:
            a = torch.randn(n, n, generator=g, device=device, dtype=DTYPES[name])
            b = torch.randn(n, n, generator=g, device=device, dtype=DTYPES[name])
            c = torch.empty(n, n, device=device, dtype=DTYPES[name])
            fns[(name, n)] = lambda a=a, b=b, c=c: torch.mm(a, b, out=c)
            flops[(name, n)] = 2 * n**3
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        med = interleaved_medians(fns, warmup=1, min_reps=3, budget_s=budget_s, device=str(device))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    best: dict[str, float] = {}
    for (name, n), t in med.items():
        best[name] = max(best.get(name, 0.0), flops[(name, n)] / t / 1e9)
    return best


def bandwidth_array_bytes(device: torch.device, largest_cache: int | None, available: int | None) -> tuple[int, str]:
    """Bytes per array for the bandwidth test and the reason for that size.

    Two arrays of this size stream through memory; each is twice the largest cache, so that a
    cyclic sweep finds nothing of it cached, and at least 64 MiB on a CPU, 1 GiB on a GPU (where
    each call is timed with a synchronize, whose ~10 us must stay small next to the transfer).
    The size is capped at 1/8 of the available memory so the test cannot push a shared machine
    into swapping.
    """
    cache = largest_cache or 0
    floor = 2**30 if device.type == "cuda" else 64 * MiB
    want = max(2 * cache, floor)
    reason = (f"2x the largest cache ({cache // MiB} MiB)" if 2 * cache >= floor
              else f"{floor // MiB} MiB, the floor for {device.type} (more than 2x any cache reported)")
    if available is not None and want > available // 8:
        capped = max(available // 8 // MiB * MiB, MiB)
        return capped, (f"{capped // MiB} MiB: capped at 1/8 of the available memory "
                        f"({available // MiB} MiB) instead of {reason}, so the result may include cache hits")
    return want, reason


def bandwidth_gbps(device: torch.device, array_bytes: int, budget_s: float = 1.0) -> dict[str, float]:
    """Measured memory bandwidth in GB/s (1e9 bytes/s) for float32 arrays of `array_bytes`.

    read: a.sum() (bytes of a); write: b.fill_() (bytes of b, not counting the read-for-ownership
    the caches may add); copy: b.copy_(a) (bytes of a plus b, the STREAM convention). Timed
    interleaved, medians.
    """
    n = array_bytes // 4
    a = torch.ones(n, device=device)
    b = torch.zeros(n, device=device)  # touched now, so page faults stay out of the timing
    fns = {"read": lambda: a.sum(), "write": lambda: b.fill_(1.0), "copy": lambda: b.copy_(a)}
    med = interleaved_medians(fns, warmup=1, min_reps=3, budget_s=budget_s, device=str(device))
    nbytes = n * 4
    return {"read": nbytes / med["read"] / 1e9, "write": nbytes / med["write"] / 1e9,
            "copy": 2 * nbytes / med["copy"] / 1e9}
