"""The CPU as the OS reports it: model, ISA flags, cores and threads, cache sizes, memory."""

from __future__ import annotations

import os
from pathlib import Path

from pyhwp._ext import _C
from pyhwp.info import cpu_model

SYS_CPU = Path("/sys/devices/system/cpu")
_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    """Bytes of a sysfs cache size such as '48K', '2048K' or '480M'."""
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in _SUFFIX:
        return int(text[:-1]) * _SUFFIX[text[-1]]
    return int(text)


def _cpu_count_in_list(text: str) -> int:
    """Number of CPUs in a sysfs list such as '0-3,8,10-11'."""
    n = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def caches(root: Path = SYS_CPU / "cpu0" / "cache") -> dict[str, dict[str, int]]:
    """Caches seen by cpu0: {'L1d': {'size_bytes': 49152, 'shared_by_cpus': 1}, 'L2': ..., 'L3': ...}.

    Sizes are per instance (one L3 shared by `shared_by_cpus` CPUs counts once). Empty when the
    OS does not expose /sys/devices/system/cpu (not Linux).
    """
    out: dict[str, dict[str, int]] = {}
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = parse_size((index / "size").read_text())
            shared = _cpu_count_in_list((index / "shared_cpu_list").read_text())
        except (OSError, ValueError):
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        out[f"L{level}{suffix}"] = {"size_bytes": size, "shared_by_cpus": shared}
    return out


def largest_cache_bytes(cache_table: dict[str, dict[str, int]]) -> int | None:
    """Size of the largest data/unified cache (the last level), None when unknown."""
    sizes = [c["size_bytes"] for name, c in cache_table.items() if not name.endswith("i")]
    return max(sizes) if sizes else None


def physical_cores() -> int | None:
    """Distinct (package, core) pairs among online CPUs, None when the topology is not exposed."""
    pairs = set()
    for cpu in SYS_CPU.glob("cpu[0-9]*"):
        try:
            pairs.add(((cpu / "topology" / "physical_package_id").read_text().strip(),
                       (cpu / "topology" / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(pairs) or None


def cpu_flags() -> set[str]:
    """The flags line of /proc/cpuinfo (Linux), empty elsewhere. Used for ISA facts _C does not
    report, such as avx512_fp16 and amx_fp16."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def memory_bytes(field: str = "MemTotal") -> int | None:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable), None when unavailable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def isa_flags() -> dict[str, bool | str]:
    """ISA extensions from pyhwp._C.cpu_features (CPUID) plus fp16 ones from /proc/cpuinfo, and the
    ISA pyhwp's kernels dispatch to now ('active')."""
    flags = cpu_flags()
    isa: dict[str, bool | str] = dict(_C.cpu_features())
    isa["avx512_fp16"] = "avx512_fp16" in flags
    isa["amx_fp16"] = "amx_fp16" in flags
    isa["active"] = _C.active_isa()
    return isa


def cpu_info() -> dict:
    """Everything the profile records about the CPU, read from the OS (nothing measured)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    return {
        "name": cpu_model(),
        "isa": isa_flags(),
        "cores": physical_cores(),
        "threads": os.cpu_count() or usable,
        "usable_threads": usable,
        "caches": caches(),
        "memory_bytes": memory_bytes(),
    }
