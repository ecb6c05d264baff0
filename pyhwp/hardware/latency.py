"""Kernel latency tables: every kernel able to run one case, timed interleaved, cached per machine.

A case is (op, shape, batch, pattern, sparsity, dtype, device). Its candidates are the kernels of
pyhwp.kernels.KERNELS on that device whose pattern is the case's or "dense" (the baselines).
Each kernel name maps to a runner that builds the case for it; pyhwp kernels share one runner
(pyhwp.to_sparse + pyhwp.linear / pyhwp.conv2d), so a new pyhwp kernel needs no entry here,
and a new pattern needs at most a PRUNERS entry saying how a weight is pruned into it. A kernel
that cannot run the case is skipped with its reason, never an error.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import pyhwp
from pyhwp.bench.timing import interleaved_medians
from pyhwp.hardware import cache
from pyhwp.hardware.device import device_slug, fingerprint, on_device, resolve_device
from pyhwp.hardware.power import average_watts, energy_meter
from pyhwp.kernels import KERNELS, Kernel


# -- ops: shapes, inputs, work ---------------------------------------------------------------
@dataclass(frozen=True)
class OpSpec:
    """How to build and count one op. `shape` is the case's shape tuple (see `doc`)."""

    doc: str
    ndim: tuple[int, ...]  # the lengths `shape` may have
    weight_shape: Callable[[tuple], tuple]
    input_shape: Callable[[tuple, int], tuple]
    output_numel: Callable[[tuple, int], int]
    uses_per_weight: Callable[[tuple, int], int]  # multiply-adds per stored weight
    dense: Callable[[torch.Tensor, torch.Tensor, tuple], torch.Tensor]  # torch on the dense weight
    pyhwp: Callable[[torch.Tensor, object, tuple], torch.Tensor]  # pyhwp public function


def _conv_stride(shape: tuple) -> tuple[int, int]:
    return (shape[6], shape[7]) if len(shape) == 8 else (1, 1)


def _conv_pad(shape: tuple) -> tuple[int, int]:
    return shape[2] // 2, shape[3] // 2


def _conv_out(shape: tuple) -> tuple[int, int]:
    (kh, kw, h, w), (sh, sw) = shape[2:6], _conv_stride(shape)
    return (h + 2 * (kh // 2) - kh) // sh + 1, (w + 2 * (kw // 2) - kw) // sw + 1


OPS: dict[str, OpSpec] = {
    "linear": OpSpec(
        doc="(out_features, in_features); x is (batch, in_features)", ndim=(2,),
        weight_shape=lambda s: s, input_shape=lambda s, b: (b, s[1]),
        output_numel=lambda s, b: b * s[0], uses_per_weight=lambda s, b: b,
        dense=lambda x, w, s: F.linear(x, w), pyhwp=lambda x, sw, s: pyhwp.linear(x, sw)),
    # Padding k // 2 ("same" for odd kernels, as in the ResNet layers of BENCHMARKS.md), stride 1
    # or (stride_h, stride_w).
    "conv2d": OpSpec(
        doc="(out_channels, in_channels, kh, kw, height, width[, stride_h, stride_w]); x is (batch, "
            "in_channels, height, width)", ndim=(6, 8),
        weight_shape=lambda s: s[:4], input_shape=lambda s, b: (b, s[1], s[4], s[5]),
        output_numel=lambda s, b: b * s[0] * _conv_out(s)[0] * _conv_out(s)[1],
        uses_per_weight=lambda s, b: b * _conv_out(s)[0] * _conv_out(s)[1],
        dense=lambda x, w, s: F.conv2d(x, w, stride=_conv_stride(s), padding=_conv_pad(s)),
        pyhwp=lambda x, sw, s: pyhwp.conv2d(x, sw, None, _conv_stride(s), _conv_pad(s))),
}


# -- pruning the random weight to the case's pattern and sparsity ----------------------------
def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest |w|: exactly round(sparsity * numel) False entries (random normal w has no ties)."""
    k = round(sparsity * w.numel())
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    threshold = w.abs().flatten().kthvalue(k).values
    return w.abs() > threshold


def nm_sparsity(pattern: str) -> float | None:
    """1 - N/M for an "N:M" pattern such as "2:4", else None (the pattern takes any sparsity)."""
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    return None if m is None else 1.0 - int(m[1]) / int(m[2])


def nm_mask(w: torch.Tensor, pattern: str) -> torch.Tensor:
    """Keep the N largest |w| of every M consecutive weights along the flattened input dim."""
    n, m = (int(v) for v in pattern.split(":"))
    flat = w.reshape(w.shape[0], -1)
    if flat.shape[1] % m:
        raise ValueError(f"pattern {pattern!r} needs the input dimension ({flat.shape[1]}) to be a multiple of {m}")
    groups = flat.abs().reshape(flat.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(w.shape)


def block_mask(w: torch.Tensor, sparsity: float, block: tuple[int, int] = (16, 16)) -> torch.Tensor:
    """Prune whole blocks of the GEMM form (out, in*kh*kw): the round(sparsity * blocks) blocks of
    least total |w| (edge blocks are partial). The weight sparsity equals `sparsity` when the
    sizes are multiples of the block."""
    flat = w.reshape(w.shape[0], -1)
    br, bc = block
    rows, cols = -(-flat.shape[0] // br), -(-flat.shape[1] // bc)
    padded = F.pad(flat.abs(), (0, cols * bc - flat.shape[1], 0, rows * br - flat.shape[0]))
    scores = padded.reshape(rows, br, cols, bc).sum((1, 3))
    keep = magnitude_mask(scores, sparsity)
    full = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return full[: flat.shape[0], : flat.shape[1]].reshape(w.shape)


# Pattern -> fn(w, sparsity) -> keep mask, for patterns that prune other than unstructured by
# magnitude. "masked" is the tile-skipping pattern: 16x16 blocks, the case of BENCHMARKS.md.
PRUNERS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "masked": block_mask,
}


def prune_mask(w: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    """Magnitude pruning of `w` into `pattern` at `sparsity`: N:M groups, a PRUNERS entry, or unstructured."""
    if nm_sparsity(pattern) is not None:
        return nm_mask(w, pattern)
    if pattern == "dense":
        return torch.ones_like(w, dtype=torch.bool)
    return PRUNERS.get(pattern, magnitude_mask)(w, sparsity)


# -- runners: kernel name -> fn(case, pruned weight, mask, x, kernel) -> Prepared -------------
@dataclass
class Prepared:
    """A case built for one kernel: `fn()` runs it once; `weight_bytes` is what its weight storage
    holds (values and indices), None where the kernel does not say."""

    fn: Callable[[], object]
    weight_bytes: int | None


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _torch_dense(case: Case, w, mask, x, kernel) -> Prepared:
    dense = OPS[case.op].dense
    return Prepared(lambda: dense(x, w, case.shape), _nbytes(w))


def _torch_csr(case: Case, w, mask, x, kernel) -> Prepared:
    if case.op != "linear":
        raise NotImplementedError(f"{kernel.name} runs linear only")
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        wc = w.to_sparse_csr()
    # y (P, N) = (W x.T).T: the honest cost of a linear layer through torch.sparse.mm.
    return Prepared(lambda: torch.sparse.mm(wc, x.t()).t(),
                    _nbytes(wc.crow_indices(), wc.col_indices(), wc.values()))


def _torch_semi_structured(case: Case, w, mask, x, kernel) -> Prepared:
    if case.op != "linear":
        raise NotImplementedError(f"{kernel.name} runs linear only")
    from torch.sparse import to_sparse_semi_structured

    ws = to_sparse_semi_structured(w)
    parts = [getattr(ws, name, None) for name in ("packed", "meta")]
    nbytes = _nbytes(*parts) if all(isinstance(p, torch.Tensor) for p in parts) else None
    return Prepared(lambda: F.linear(x, ws), nbytes)


def _pyhwp_kernel(case: Case, w, mask, x, kernel) -> Prepared:
    from pyhwp.kernels import find_kernel
    from pyhwp.ops.linear import MATMULS

    sw = pyhwp.to_sparse(w, kernel.pattern, mask=mask)
    if case.op == "linear" and find_kernel("linear", kernel.pattern, case.device, case.dtype) is not kernel:
        # Another pyhwp kernel serves this pattern in pyhwp.linear; time this one directly.
        matmul = MATMULS[kernel.name]
        return Prepared(lambda: matmul(x, sw, None, False), sw.nbytes)
    if case.op == "conv2d" and not hasattr(pyhwp, "conv2d"):
        raise NotImplementedError("pyhwp.conv2d is not part of this pyhwp build")
    run = OPS[case.op].pyhwp
    return Prepared(lambda: run(x, sw, case.shape), sw.nbytes)


RUNNERS: dict[str, Callable[..., Prepared]] = {
    "torch_dense": _torch_dense,
    "torch_dense_cuda": _torch_dense,
    "torch_csr": _torch_csr,
    "torch_csr_cuda": _torch_csr,
    "torch_sparse24_cuda": _torch_semi_structured,
}


def runner_for(kernel: Kernel) -> Callable[..., Prepared] | None:
    """The runner of `kernel`: its RUNNERS entry, or the shared pyhwp one for our kernels."""
    return RUNNERS.get(kernel.name) or (_pyhwp_kernel if kernel.provider == "pyhwp" else None)


# -- the case and its result ------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]
    batch: int
    pattern: str
    sparsity: float
    dtype: torch.dtype
    device: torch.device

    @property
    def key(self) -> str:
        """Stable cache key of the case."""
        return (f"{self.op}|{'x'.join(map(str, self.shape))}|b{self.batch}|{self.pattern}|s{self.sparsity:.4f}"
                f"|{dtype_name(self.dtype)}|{self.device}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or its name (e.g. 'float32'), got {dtype!r}")
    return value


def make_case(op: str, shape, batch: int, pattern: str, sparsity: float, dtype, device) -> Case:
    """Validate the arguments of kernel_latency into a Case (ValueError naming the bad one)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    spec = OPS[op]
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) not in spec.ndim or \
            not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"shape for {op} must be {' or '.join(map(str, spec.ndim))} positive ints {spec.doc}, "
                         f"got {shape!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a pattern name such as 'csr' or '2:4', got {pattern!r}")
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    fixed = nm_sparsity(pattern)
    if fixed is not None and abs(sparsity - fixed) > 1e-9:
        raise ValueError(f"pattern {pattern!r} fixes the sparsity at {fixed:g}, got {sparsity!r}")
    if pattern == "dense" and sparsity != 0:
        raise ValueError(f"pattern 'dense' has sparsity 0, got {sparsity!r}")
    return Case(op, tuple(int(s) for s in shape), batch, pattern, float(sparsity), parse_dtype(dtype),
                resolve_device(device))


@dataclass
class KernelTiming:
    """One kernel on one case. `flops` is the work the kernel does: the dense product for dense
    kernels, 2 x stored weights x uses for the others; `bytes` is the weight storage plus input
    and output (None where unknown); power and energy only where a counter measured them."""

    kernel: str
    provider: str
    pattern: str
    median_s: float
    flops: int
    bytes: int | None
    power_w: float | None = None
    energy_j: float | None = None

    @property
    def gflops(self) -> float:
        return self.flops / self.median_s / 1e9

    @property
    def intensity(self) -> float | None:
        """Flops per byte moved, at least (each byte once)."""
        return self.flops / self.bytes if self.bytes else None


@dataclass
class LatencyResult:
    """Median latency of every kernel that ran the case, and why the others did not."""

    op: str
    shape: tuple[int, ...]
    batch: int
    pattern: str
    sparsity: float
    dtype: str
    device: str
    timings: dict[str, KernelTiming]
    skipped: dict[str, str]
    energy_note: str | None  # why energy is absent; None when measured
    measured_at: str
    fingerprint: str
    pyhwp_version: str
    cached: bool = field(default=False, compare=False)

    def fastest(self, pattern: str | None = None) -> KernelTiming | None:
        """The fastest kernel (of `pattern`, e.g. "dense" or the case's pattern), None if none ran."""
        runs = [t for t in self.timings.values() if pattern is None or t.pattern == pattern]
        return min(runs, key=lambda t: t.median_s, default=None)

    def speedup(self, kernel: str) -> float | None:
        """How many times faster `kernel` runs than the fastest dense kernel (None if either is missing)."""
        dense = self.fastest("dense")
        if dense is None or kernel not in self.timings:
            return None
        return dense.median_s / self.timings[kernel].median_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict, cached: bool = False) -> LatencyResult:
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        d["timings"] = {k: KernelTiming(**v) for k, v in d["timings"].items()}
        return cls(**d, cached=cached)


def candidates(case: Case) -> list[Kernel]:
    """Kernels on the case's device that consume its pattern, or the dense weight (baselines)."""
    return [k for k in KERNELS if k.device == case.device.type and k.pattern in ("dense", case.pattern)]


def measure_case(case: Case, *, budget_s: float = 0.5, energy_s: float | None = None, seed: int = 0,
                 rapl_root: Path | None = None) -> LatencyResult:
    """Build every candidate kernel for `case` and time them interleaved in one run (no cache).

    The weight is random normal, pruned by magnitude to the case's pattern and sparsity; the input
    is random normal. Where the device exposes an energy counter, each kernel is also run alone
    for `energy_s` (default 0.25 s on CPUs, 1 s on GPUs, whose NVML counter updates less often)
    to measure its mean power; energy per call = that power x its median latency.
    """
    if energy_s is None:
        energy_s = 1.0 if case.device.type == "cuda" else 0.25
    spec = OPS[case.op]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(spec.weight_shape(case.shape), generator=gen)
    mask = prune_mask(w, case.pattern, case.sparsity)
    w = (w * mask).to(case.dtype).to(case.device)
    mask = mask.to(case.device)
    x = torch.randn(spec.input_shape(case.shape, case.batch), generator=gen).to(case.dtype).to(case.device)
    nnz = int(mask.sum())
    io_bytes = (x.numel() + spec.output_numel(case.shape, case.batch)) * x.element_size()
    uses = spec.uses_per_weight(case.shape, case.batch)

    skipped: dict[str, str] = {}
    prepared: dict[str, Prepared] = {}
    kernels = {k.name: k for k in candidates(case)}
    if case.pattern != "dense" and not any(k.pattern == case.pattern for k in kernels.values()):
        skipped[case.pattern] = (f"no kernel in pyhwp.kernels.KERNELS consumes the {case.pattern!r} pattern "
                                 f"on {case.device.type}")
    for name, k in kernels.items():
        reasons = k.unsupported_reasons(case.op, case.device, case.dtype)
        runner = runner_for(k)
        if runner is None:
            reasons.append(f"no latency runner for {name} (add one to pyhwp.hardware.latency.RUNNERS)")
        if reasons:
            skipped[name] = "; ".join(reasons)
            continue
        try:
            p = runner(case, w, mask, x, k)
            with torch.inference_mode():
                p.fn()  # a kernel that fails on this case is skipped, with the error as the reason
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party kernel is a skip reason
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
            continue
        prepared[name] = p

    timings: dict[str, KernelTiming] = {}
    energy_note = "no kernel ran"
    if prepared:
        with on_device(case.device):
            med = interleaved_medians({n: p.fn for n, p in prepared.items()}, budget_s=budget_s,
                                      device=str(case.device))
        dense_flops = 2 * uses * math.prod(spec.weight_shape(case.shape))
        for name, p in prepared.items():
            k = kernels[name]
            flops = dense_flops if k.pattern == "dense" else 2 * uses * nnz
            nbytes = None if p.weight_bytes is None else p.weight_bytes + io_bytes
            timings[name] = KernelTiming(name, k.provider, k.pattern, med[name], flops, nbytes)
        meter, energy_note = energy_meter(case.device, **({} if rapl_root is None else {"rapl_root": rapl_root}))
        if meter is not None:
            with torch.inference_mode(), on_device(case.device):
                for name, p in prepared.items():
                    watts = average_watts(meter, energy_s, p.fn, case.device)
                    timings[name].power_w = watts
                    timings[name].energy_j = watts * timings[name].median_s
            energy_note = None
    return LatencyResult(case.op, case.shape, case.batch, case.pattern, case.sparsity, dtype_name(case.dtype),
                         str(case.device), timings, skipped, energy_note,
                         datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         fingerprint(case.device), pyhwp.__version__)


def cache_path(device: torch.device, cache_dir=None) -> Path:
    return cache.cache_dir(cache_dir) / f"kernel_latency-{device_slug(device)}.json"


def kernel_latency(op: str, shape, batch: int, pattern: str, sparsity: float, dtype="float32", *,
                   device="cpu", cache_dir=None, refresh: bool = False, budget_s: float = 0.5) -> LatencyResult:
    """Median latency of every available kernel for one case, measured once per machine and cached.

    Args:
        op: "linear" or "conv2d" (keys of OPS).
        shape: linear (out_features, in_features); conv2d (out, in, kh, kw, height, width), stride 1
            and padding k // 2, or (..., stride_h, stride_w) for a strided conv.
        batch: rows of x (linear) or images (conv2d).
        pattern: storage pattern of the pruned weight ("csr", "2:4", "masked", ... or "dense").
        sparsity: fraction of pruned weights, in [0, 1); N:M patterns require 1 - N/M.
        dtype: torch dtype or its name.
        device: "cpu", "cuda" or "cuda:N".
        cache_dir: cache directory (default $XDG_CACHE_HOME/pyhwp or ~/.cache/pyhwp).
        refresh: measure again even when the cache holds the case.
        budget_s: time spent timing the case (interleaved rounds until spent; at least 5 rounds).
    The cache file holds the fingerprint of the device and the code version (pyhwp's version and a
    digest of its compiled extension); when either differs from this process's, the whole file is
    stale and is replaced.
    """
    case = make_case(op, shape, batch, pattern, sparsity, dtype, device)
    path = cache_path(case.device, cache_dir)
    fp, version = fingerprint(case.device), cache.code_version()
    if not refresh:
        hit = cache.load(path, fp, version).get(case.key)
        if hit is not None:
            try:
                return LatencyResult.from_dict(hit, cached=True)
            except (TypeError, KeyError, ValueError):
                pass  # an entry of another layout: measure again
    result = measure_case(case, budget_s=budget_s)
    entries = cache.load(path, fp, version)  # re-read: another process may have added cases
    entries[case.key] = result.to_dict()
    cache.store(path, fp, version, entries)
    return result
