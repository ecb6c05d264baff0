"""HardwareProfile: what a device is (from the OS) and what it does (measured), with a JSON round trip."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import torch

import pyhwp
from pyhwp.hardware import cache
from pyhwp.hardware.cpu import largest_cache_bytes, memory_bytes
from pyhwp.hardware.device import device_facts, device_slug, fingerprint, on_device, resolve_device
from pyhwp.hardware.measure import (GEMM_SIZES, GEMM_SIZES_QUICK, bandwidth_array_bytes, bandwidth_gbps,
                                    gemm_gflops, low_precision_support)
from pyhwp.hardware.power import average_watts, energy_meter

PROFILE_STEPS = ("system", "gemm", "bandwidth", "power")


@dataclass
class HardwareProfile:
    """One device: facts from the OS / driver and measured ceilings.

    Measured fields hold only measured numbers. What could not be measured is absent from them
    and `missing` says why (key: the field or "field.item", e.g. "peak_gflops.float16", "power").
    """

    device: str  # "cpu" or "cuda:N"
    name: str  # CPU model or GPU name
    compute_capability: tuple[int, int] | None  # CUDA only
    isa: dict[str, bool | str]  # CPU: avx2, avx512, avx512_bf16, amx_bf16, avx512_fp16, amx_fp16, active
    cores: int | None  # CPU: physical cores; CUDA: streaming multiprocessors
    threads: int | None  # CPU: logical CPUs (hardware threads); CUDA: None
    torch_threads: int  # threads torch (and pyhwp's kernels) use on the CPU
    caches: dict[str, dict[str, int]]  # "L1d", "L1i", "L2", "L3" -> size_bytes (per instance), shared_by_cpus
    memory_bytes: int | None
    peak_gflops: dict[str, float]  # dtype name -> measured dense GEMM GFLOP/s
    bandwidth_gbps: dict[str, float]  # "read", "write", "copy" -> measured GB/s (1e9 B/s)
    power: dict[str, float | str] | None  # {"source", "idle_w", "load_w"} measured, or None (see missing)
    missing: dict[str, str]
    method: dict  # how each figure was measured: sizes, budgets, the reason for the array size
    fingerprint: str
    pyhwp_version: str
    torch_version: str
    measured_at: str
    quick: bool = False
    cache_dir: Path | None = field(default=None, compare=False, repr=False)  # not serialised

    # -- derived --------------------------------------------------------------------------
    def ridge_point(self, dtype: str = "float32", bandwidth: str = "copy") -> float | None:
        """Roofline ridge point in flop/byte: peak GFLOP/s of `dtype` / `bandwidth` GB/s."""
        peak, bw = self.peak_gflops.get(dtype), self.bandwidth_gbps.get(bandwidth)
        return peak / bw if peak and bw else None

    def energy_per_inference(self, latency_s: float) -> float | None:
        """Joules for a run of `latency_s` at the measured load power; None where power is not measurable."""
        if not self.power or "load_w" not in self.power:
            return None
        return float(self.power["load_w"]) * latency_s

    def kernel_latency(self, op: str, shape, batch: int, pattern: str, sparsity: float, dtype="float32",
                       **kwargs):
        """Median latency of every available kernel for this case on this profile's device, measured
        interleaved and cached; see pyhwp.hardware.latency.kernel_latency for the arguments."""
        from pyhwp.hardware.latency import kernel_latency

        kwargs.setdefault("cache_dir", self.cache_dir)
        return kernel_latency(op, shape, batch, pattern, sparsity, dtype, device=self.device, **kwargs)

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cache_dir")
        d["compute_capability"] = None if self.compute_capability is None else list(self.compute_capability)
        return d

    @classmethod
    def from_dict(cls, d: dict, cache_dir: Path | None = None) -> HardwareProfile:
        names = {f.name for f in fields(cls)} - {"cache_dir"}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"not a HardwareProfile: unknown fields {sorted(unknown)}")
        missing = {f.name for f in fields(cls) if f.name in names and f.name not in d and f.name != "quick"}
        if missing:
            raise ValueError(f"not a HardwareProfile: missing fields {sorted(missing)}")
        d = dict(d)
        if d["compute_capability"] is not None:
            d["compute_capability"] = tuple(d["compute_capability"])
        return cls(**d, cache_dir=cache_dir)

    def to_json(self, path: str | Path | None = None) -> str:
        """The profile as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> HardwareProfile:
        """From JSON text or a file holding it."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


def profile(device: str | torch.device = "cpu", *, quick: bool = False, cache_dir=None, refresh: bool = False,
            gemm_sizes: tuple[int, ...] | None = None, bandwidth_bytes: int | None = None,
            budget_s: float | None = None, progress: Callable[[str], None] | None = None) -> HardwareProfile:
    """Measure `device` ("cpu", "cuda" or "cuda:N") and return its HardwareProfile.

    The result is cached in the user cache directory per device, stamped with the fingerprint
    and pyhwp version; a later call on the same machine returns it without measuring unless
    `refresh` (a quick profile never stands in for a full one). `gemm_sizes`, `bandwidth_bytes`
    and `budget_s` override the measurement sizes (the profile records them; such a profile is
    neither read from nor written to the cache). `progress(step)` is called after each of
    PROFILE_STEPS. Raises RuntimeError when CUDA is asked for and torch sees no GPU.
    """
    dev = resolve_device(device)
    facts = device_facts(dev)
    fp, version = fingerprint(dev, facts), pyhwp.__version__
    path = cache.cache_dir(cache_dir) / f"profile-{device_slug(dev)}.json"
    overrides = gemm_sizes is not None or bandwidth_bytes is not None or budget_s is not None
    if not refresh and not overrides:
        hit = cache.load(path, fp, cache.code_version())
        if hit and (quick or not hit.get("quick")):
            try:
                return HardwareProfile.from_dict(hit, cache_dir=cache_dir)
            except (TypeError, ValueError):
                pass  # an old layout: measure again
    step = progress or (lambda name: None)
    step("system")
    with on_device(dev):
        prof = _measure(dev, facts, fp, version, quick, gemm_sizes, bandwidth_bytes, budget_s, step)
    prof.cache_dir = cache_dir
    if not overrides:
        cache.store(path, fp, cache.code_version(), prof.to_dict())
    return prof


def _measure(dev, facts, fp, version, quick, gemm_sizes, bandwidth_bytes, budget_s, step) -> HardwareProfile:
    """The measurements of profile(), in PROFILE_STEPS order, with `dev` current."""
    missing: dict[str, str] = {}
    budget = budget_s if budget_s is not None else (0.3 if quick else 1.0)
    sizes = gemm_sizes or (GEMM_SIZES_QUICK if quick else GEMM_SIZES)[dev.type]
    native = low_precision_support(dev, facts.get("isa", {}), facts.get("compute_capability"))
    dtypes = ["float32"]
    for name, why in native.items():
        if why is None:
            dtypes.append(name)
        else:
            missing[f"peak_gflops.{name}"] = why
    peak = gemm_gflops(dev, dtypes, tuple(sizes), budget_s=budget * len(dtypes))
    step("gemm")

    if bandwidth_bytes is not None:
        array_bytes, why_size = int(bandwidth_bytes), "set by the caller"
    elif dev.type == "cuda":
        array_bytes, why_size = bandwidth_array_bytes(dev, largest_cache_bytes(facts["caches"]),
                                                      torch.cuda.mem_get_info(dev)[0])
    else:
        array_bytes, why_size = bandwidth_array_bytes(dev, largest_cache_bytes(facts["caches"]),
                                                      memory_bytes("MemAvailable"))
    bandwidth = bandwidth_gbps(dev, array_bytes, budget_s=budget)
    step("bandwidth")

    meter, why_not = energy_meter(dev)
    power = None
    if meter is None:
        missing["power"] = why_not
    else:
        n = max(sizes)
        a = torch.randn(n, n, device=dev)
        power = {"source": meter.source, "idle_w": average_watts(meter, 0.5),
                 "load_w": average_watts(meter, 1.0, lambda: torch.mm(a, a), dev),
                 "load": f"float32 GEMM {n}^3 in a loop"}
    step("power")

    cc = facts.get("compute_capability")
    return HardwareProfile(
        device=str(dev), name=facts["name"], compute_capability=None if cc is None else tuple(cc),
        isa=facts.get("isa", {}), cores=facts.get("cores"), threads=facts.get("threads"),
        torch_threads=torch.get_num_threads(), caches=facts["caches"], memory_bytes=facts.get("memory_bytes"),
        peak_gflops=peak, bandwidth_gbps=bandwidth, power=power, missing=missing,
        method={"gemm": f"torch.mm n x n x n, n in {list(sizes)}, best median, interleaved",
                "bandwidth": "float32 arrays; read a.sum(), write b.fill_(), copy b.copy_(a) (2 arrays' bytes)",
                "bandwidth_array_bytes": array_bytes, "bandwidth_array_reason": why_size,
                "budget_s": budget},
        fingerprint=fp, pyhwp_version=version, torch_version=torch.__version__,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), quick=quick,
    )
