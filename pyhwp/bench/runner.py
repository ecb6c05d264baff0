"""The benchmark runner: builds each case's contenders, times them interleaved, derives the metrics.

For every case the pyhwp kernel and the torch baselines (dense F.linear / F.conv2d / mm,
torch.sparse CSR, and on CUDA torch semi-structured 2:4) run in the same process, round-robin
(pyhwp.bench.timing.interleaved_medians); the figures of merit are ratios of those medians.
A case whose pattern or kernel is not available in this build is skipped with the reason.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import pyhwp
from pyhwp.bench import dlmc
from pyhwp.bench.cases import Case, prune
from pyhwp.bench.timing import interleaved_medians
from pyhwp.formats import SparseWeight, patterns, to_sparse
from pyhwp.kernels import KERNELS

BASELINES = ("torch_dense", "torch_csr", "torch_24")


# -- machine ceilings --------------------------------------------------------------------------

def measure_peak_gflops(device: str, dtype: torch.dtype = torch.float32, n: int | None = None,
                        budget_s: float = 0.5) -> float:
    """Dense GEMM rate (n x n x n, torch.mm) in GFLOP/s: the compute ceiling quoted as % of peak."""
    n = n or (2048 if device == "cpu" else 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = interleaved_medians({"mm": lambda: torch.mm(a, b)}, warmup=1, min_reps=3, budget_s=budget_s,
                            device=device)["mm"]
    return 2 * n**3 / t / 1e9


def measure_copy_gbs(device: str, megabytes: int = 256, budget_s: float = 0.5) -> float:
    """Copy bandwidth in GB/s (read + write counted, as STREAM does) on a buffer far above cache."""
    src = torch.randn(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    t = interleaved_medians({"copy": lambda: dst.copy_(src)}, warmup=1, min_reps=3, budget_s=budget_s,
                            device=device)["copy"]
    return 2 * src.numel() * 4 / t / 1e9


# -- availability --------------------------------------------------------------------------------

def kernel_op(case: Case) -> str:
    """The op name kernels declare in pyhwp.kernels (the DLMC product runs as a linear)."""
    return "conv2d" if case.op == "conv2d" else "linear"


def unavailable(case: Case, device: str) -> str | None:
    """Why pyhwp cannot run `case` on `device` in this build (None when it can)."""
    if case.pattern not in patterns():
        return f"pattern {case.pattern!r} is not registered (pyhwp.formats.patterns() = {list(patterns())})"
    if case.op == "conv2d" and not hasattr(pyhwp, "conv2d"):
        return "pyhwp.conv2d is not available in this build"
    op = kernel_op(case)
    candidates = [k for k in KERNELS if k.provider == "pyhwp" and k.pattern == case.pattern]
    if not candidates:
        return f"no pyhwp kernel for pattern {case.pattern!r} in pyhwp.kernels.KERNELS"
    reasons = []
    for k in candidates:
        r = k.unsupported_reasons(op, device, case.torch_dtype)
        if not r:
            return None
        reasons.extend(r)
    return "; ".join(reasons)


# -- preparation ----------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A case's operands: dense pruned weight (GEMM or conv shape), its keep mask, the pyhwp
    SparseWeight, and the input (x for linear/conv2d, B (in, N) for matmul)."""

    weight: torch.Tensor
    mask: torch.Tensor
    sparse: SparseWeight
    x: torch.Tensor
    kept: int  # weights that survived pruning: the useful multiply-adds per output column


_WEIGHTS: dict[tuple, tuple[torch.Tensor, torch.Tensor, SparseWeight]] = {}


def _seed(*key) -> torch.Generator:
    """A generator seeded from `key`, the same in every process (unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def pruned_weight(case: Case, device: str) -> tuple[torch.Tensor, torch.Tensor, SparseWeight]:
    """(dense pruned weight, keep mask, SparseWeight) of a case, on device in the case's dtype.

    The random weight depends only on the shape (and DLMC file), so every pattern and sparsity
    prunes the same weights; the last one is cached (cases come sorted by weight). Only one: the
    sliced-ELL copies of all live CSR weights share one budget (formats/csr.py sell_budget_bytes),
    and an idle cached weight's copy would take it from the case being measured.
    """
    key = (case.op, case.shape, case.pattern, case.sparsity, case.dtype, case.source, device)
    if key in _WEIGHTS:
        return _WEIGHTS[key]
    if case.source:
        shape, ro, ci = dlmc.load_smtx(case.source)
        w = dlmc.dense_from_pattern(shape, ro, ci, _seed(case.source))
        mask = w != 0
    else:
        w = torch.randn(case.shape, generator=_seed(case.shape))
        w, mask = prune(w, case.pattern, case.sparsity)
    w = w.to(device=device, dtype=case.torch_dtype)
    mask = mask.to(device)
    # Keep exactly the pruned positions: rounding to bf16 never creates zeros from normals, but a
    # mask makes that independent of the dtype.
    sw = to_sparse(w, case.pattern, mask=mask)
    _WEIGHTS.clear()
    _WEIGHTS[key] = (w, mask, sw)
    return w, mask, sw


def prepare(case: Case, device: str) -> Prepared:
    w, mask, sw = pruned_weight(case, device)
    g = _seed("x", case.name)
    if case.op == "linear":
        x = torch.randn(case.batch, case.in_features, generator=g)
    elif case.op == "conv2d":
        c = case.conv
        x = torch.randn(case.batch, c.in_channels, c.size, c.size, generator=g)
    else:  # matmul: B (in, N)
        x = torch.randn(case.in_features, case.batch, generator=g)
    return Prepared(w, mask, sw, x.to(device=device, dtype=case.torch_dtype), int(mask.sum()))


# -- contenders -----------------------------------------------------------------------------------

def _pyhwp_fn(case: Case, p: Prepared) -> Callable[[], object]:
    x, sw = p.x, p.sparse
    if case.op == "linear":
        return lambda: pyhwp.linear(x, sw)
    if case.op == "conv2d":
        pad = case.conv.padding
        return lambda: pyhwp.conv2d(x, sw, bias=None, padding=pad)
    # matmul: Y (out, N) = W @ B through the pattern's MATMULS entry with the conv layout
    # (x2 = B.T as a strided view, transpose_out).
    from pyhwp.kernels import find_kernel
    from pyhwp.ops.linear import MATMULS

    mm = MATMULS[find_kernel("linear", sw.pattern, x.device, x.dtype).name]
    xt = x.t()
    return lambda: mm(xt, sw, None, True)


def _torch_dense_fn(case: Case, p: Prepared) -> Callable[[], object]:
    x, w = p.x, p.weight
    if case.op == "linear":
        return lambda: F.linear(x, w)
    if case.op == "conv2d":
        pad = case.conv.padding
        return lambda: F.conv2d(x, w, padding=pad)
    return lambda: torch.mm(w, x)


def _to_torch_csr(w2: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*beta.*", category=UserWarning)
        return w2.to_sparse_csr()


def _torch_csr_fn(case: Case, p: Prepared) -> Callable[[], object]:
    """torch.sparse.mm on a torch CSR tensor. It is given its preferred operand layout (B as a
    contiguous (in, columns) matrix, prepared outside the timing) and its (out, columns) result
    is not transposed back: the most favourable form of the baseline."""
    wc = _to_torch_csr(p.weight.reshape(case.out_features, -1))
    x = p.x
    if case.op == "linear":
        xt = x.t().contiguous()
        return lambda: torch.sparse.mm(wc, xt)
    if case.op == "conv2d":
        c = case.conv

        def run():  # im2col + SpMM, the CSR route of a conv
            cols = F.unfold(x, c.kernel, padding=c.padding)  # (batch, in*k*k, pixels)
            b = cols[0] if case.batch == 1 else cols.transpose(0, 1).reshape(cols.shape[1], -1)
            return torch.sparse.mm(wc, b)
        return run
    return lambda: torch.sparse.mm(wc, x)


def _torch_24_fn(case: Case, p: Prepared) -> Callable[[], object]:
    """torch semi-structured 2:4 (cuSPARSELt / CUTLASS): CUDA only, 2:4 weights, half precision."""
    if not p.x.is_cuda:
        raise RuntimeError("torch semi-structured 2:4 runs on CUDA only")
    if case.pattern != "2:4" or case.op != "linear":
        raise RuntimeError("torch semi-structured 2:4 applies to 2:4 linear weights")
    ws = torch.sparse.to_sparse_semi_structured(p.weight)
    x = p.x
    return lambda: F.linear(x, ws)


# contender name -> builder(case, prepared) -> fn(); a builder raising means "not available here".
CONTENDERS: dict[str, Callable[[Case, Prepared], Callable[[], object]]] = {
    "pyhwp": _pyhwp_fn,
    "torch_dense": _torch_dense_fn,
    "torch_csr": _torch_csr_fn,
    "torch_24": _torch_24_fn,
}


def contenders(case: Case, prepared: Prepared, device: str,
               only: Iterable[str] | None = None) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """(name -> callable) of every contender (or those named in `only`) that runs this case here,
    and (name -> reason) of those that do not. Each callable was run once, so a failing baseline
    never reaches timing."""
    fns, skipped = {}, {}
    for name, build in CONTENDERS.items():
        if only is not None and name not in only:
            continue
        if name == "torch_24" and device == "cpu":
            continue  # torch has no CPU 2:4 kernel; not a per-case skip
        try:
            fn = build(case, prepared)
            with torch.inference_mode():
                fn()
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            if name == "pyhwp":
                raise
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        fns[name] = fn
    return fns, skipped


# -- measuring -------------------------------------------------------------------------------------

@dataclass
class Machine:
    """Ceilings measured at suite start: dense GEMM GFLOP/s per dtype, copy GB/s."""

    device: str
    peak_gflops: dict[str, float] = field(default_factory=dict)
    copy_gbs: float = float("nan")

    @classmethod
    def measure(cls, device: str, dtypes: Iterable[str] = ("float32",), budget_s: float = 0.5,
                small: bool = False) -> Machine:
        """`small`: a 256^3 GEMM and a 16 MB copy (smoke runs; in-cache, so not real ceilings)."""
        m = cls(device)
        for d in dict.fromkeys(dtypes):
            m.peak_gflops[d] = measure_peak_gflops(device, getattr(torch, d), n=256 if small else None,
                                                   budget_s=budget_s)
        m.copy_gbs = measure_copy_gbs(device, megabytes=16 if small else 256, budget_s=budget_s)
        return m


def _pct(value: float, ceiling: float | None) -> float | None:
    return None if not ceiling or not math.isfinite(ceiling) else 100.0 * value / ceiling


def run_case(case: Case, device: str, machine: Machine | None = None, budget_s: float = 0.3,
             before: Callable[[], object] | None = None) -> dict:
    """Measure one case; returns its result row (see report.py for the fields). `before` runs
    ahead of every timed call (interleaved_medians; the cold-cache eviction)."""
    row = {"name": case.name, **{k: v for k, v in asdict(case).items() if k not in ("conv", "label")},
           "conv": str(case.conv) if case.conv else None, "device": device}
    row["shape"] = list(case.shape)
    reason = unavailable(case, device)
    if reason:
        row["skipped"] = reason
        return row
    previous_threads = torch.get_num_threads()
    if case.threads:
        torch.set_num_threads(case.threads)
    try:
        p = prepare(case, device)
        fns, skipped = contenders(case, p, device)
        times = interleaved_medians(fns, budget_s=budget_s, device=device, before=before)
    finally:
        torch.set_num_threads(previous_threads)
    t = times["pyhwp"]
    cols = case.columns
    useful = 2.0 * p.kept * cols
    dense_eq = 2.0 * case.out_features * case.in_features * cols
    row.update({
        "threads": case.threads or previous_threads,
        "nnz": p.kept,
        "density": p.kept / (case.out_features * case.in_features),
        "nbytes": p.sparse.nbytes,
        "time_s": times,
        "useful_gflops": useful / t / 1e9,
        "dense_equiv_gflops": dense_eq / t / 1e9,
        "ratio": {b: times[b] / t for b in BASELINES if b in times},
        "baseline_skipped": skipped,
    })
    if machine is not None:
        row["pct_peak"] = _pct(row["useful_gflops"], machine.peak_gflops.get(case.dtype))
        if case.batch == 1 and case.op in ("linear", "matmul"):
            # Bytes a batch-1 product must move at least once: the stored weight, x and y.
            moved = p.sparse.nbytes + (case.in_features + case.out_features) * p.x.element_size()
            row["pct_bw"] = _pct(moved / t / 1e9, machine.copy_gbs)
    return row


def measure_overhead(device: str = "cpu", budget_s: float = 0.5) -> dict:
    """Python overhead of pyhwp.linear on a 1x384 input (1536x384 CSR weight, 90% sparse): the
    median of pyhwp.linear and of the raw kernel behind it (pyhwp._C.csr_matmul on preallocated
    output), timed interleaved with each other only, so both run with the same (warm) caches; the
    custom op called directly (the path autograd and torch.compile see) and dense F.linear are
    timed after them, for scale.
    Microseconds. (Right after a call that evicts the caches, such as a large dense layer, every
    call is slower, the Python path included: that cost is in the suite's per-case ratios.)"""
    from pyhwp.ops.csr import csr_cpu_args

    case = Case("linear", (1536, 384), 1, 0.9, "csr")
    p = prepare(case, device)
    sw, x = p.sparse, p.x
    y = torch.empty(1, 1536)
    ro, ci, v, sell = sw.row_offsets, sw.kernel_col_indices, sw.values, sw.kernel_sell()
    nt = torch.get_num_threads()
    # the arrays and flags pyhwp.linear's plan passes
    kernels, head, tail = csr_cpu_args(ro, ci, v, 384, sell, sw.kernel_resident())
    args = (*head, x.data_ptr(), 1, x.stride(1), x.stride(0), 0, y.data_ptr(), 1, 1536, nt, *tail)
    fns = {
        "pyhwp.linear": lambda: pyhwp.linear(x, sw),
        "kernel": lambda: kernels[torch.float32](*args),
    }
    t = interleaved_medians(fns, warmup=20, min_reps=50, max_reps=20000, budget_s=budget_s)
    for name, fn in (("custom_op", lambda: torch.ops.pyhwp.csr_matmul(x, ro, ci, v, None, False, None, sell)),
                     ("torch_dense", lambda: F.linear(x, p.weight))):
        t |= interleaved_medians({name: fn}, warmup=20, min_reps=50, max_reps=20000, budget_s=budget_s / 4)
    us = {k: v * 1e6 for k, v in t.items()}
    return {"case": case.name, "median_us": us,
            "overhead_us": us["pyhwp.linear"] - us["kernel"],
            "op_dispatch_us": us["custom_op"] - us["kernel"],
            "linear_wrapper_us": us["pyhwp.linear"] - us["custom_op"]}
