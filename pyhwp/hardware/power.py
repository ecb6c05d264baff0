"""Energy meters: RAPL counters (Linux CPUs) and NVML (NVIDIA GPUs); None plus the reason elsewhere.

Every figure comes from a hardware counter. Nothing here estimates power from a datasheet.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

POWERCAP = Path("/sys/class/powercap")


class RaplMeter:
    """Sum of the RAPL package energy counters under /sys/class/powercap.

    Reads `intel-rapl:N/energy_uj` of every top-level package zone (AMD CPUs expose the same
    files), handling the counter wrap at `max_energy_range_uj`. The figure is the whole package:
    other processes running at the same time are included.
    """

    def __init__(self, zones: list[Path]):
        self.zones = zones
        self._last = [self._raw(z) for z in zones]
        self._total_uj = 0
        self.source = "rapl:" + ",".join((z / "name").read_text().strip() for z in zones)

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def joules(self) -> float:
        """Energy in joules consumed since the meter was made (monotonic)."""
        for i, zone in enumerate(self.zones):
            now = self._raw(zone)
            delta = now - self._last[i]
            if delta < 0:  # the counter wrapped
                delta += int((zone / "max_energy_range_uj").read_text())
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj * 1e-6


class NvmlMeter:
    """NVML total energy of one GPU (nvmlDeviceGetTotalEnergyConsumption, millijoules, Volta+)."""

    def __init__(self, pynvml, handle, index: int):
        self._nvml = pynvml
        self._handle = handle
        self._start = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        self.source = f"nvml:gpu{index}"

    def joules(self) -> float:
        return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start) * 1e-3


def rapl_meter(root: Path = POWERCAP) -> tuple[RaplMeter | None, str | None]:
    """A RaplMeter over the package zones under `root`, or (None, why not)."""
    if not sys.platform.startswith("linux"):
        return None, f"RAPL energy counters are read from Linux powercap; this is {sys.platform}"
    if not root.is_dir():
        return None, (f"no RAPL: {root} does not exist (no powercap driver; usual inside VMs and "
                      "containers, or with the intel_rapl modules not loaded)")
    # Top-level zones (intel-rapl:0, intel-rapl:1) are packages; intel-rapl:0:0 are sub-zones.
    zones = sorted(z for z in root.glob("intel-rapl:*") if z.name.count(":") == 1
                   and (z / "name").is_file() and (z / "name").read_text().startswith("package"))
    if not zones:
        return None, f"no RAPL package zones (intel-rapl:N with name package-N) under {root}"
    try:
        return RaplMeter(zones), None
    except PermissionError:
        return None, (f"RAPL counters under {root} are not readable by this user (energy_uj is root-only "
                      "since Linux 5.10; grant read access or run as root)")
    except (OSError, ValueError) as exc:
        return None, f"RAPL counters under {root} could not be read: {exc}"


def nvml_meter(index: int) -> tuple[NvmlMeter | None, str | None]:
    """An NvmlMeter for CUDA device `index` (matched by UUID when torch reports one), or (None, why not)."""
    try:
        import pynvml
    except ImportError:
        return None, "NVML not available: install nvidia-ml-py (import pynvml) to read GPU energy"
    try:
        pynvml.nvmlInit()
        handle = None
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except pynvml.NVMLError:
                handle = None
        if handle is None:  # CUDA_VISIBLE_DEVICES may reorder; the index is the fallback
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return NvmlMeter(pynvml, handle, index), None
    except pynvml.NVMLError as exc:
        return None, f"NVML cannot read the energy counter of GPU {index}: {exc}"


def energy_meter(device: torch.device, rapl_root: Path = POWERCAP):
    """(meter, None) where `device` exposes an energy counter, else (None, the reason)."""
    if device.type == "cuda":
        return nvml_meter(device.index or 0)
    return rapl_meter(rapl_root)


def average_watts(meter, seconds: float, work: Callable[[], object] | None = None,
                  device: torch.device | None = None) -> float:
    """Mean power in watts over at least `seconds`, idle (work=None, sleeping) or calling `work`
    in a loop. Measured: energy counter delta over wall time."""
    e0, t0 = meter.joules(), time.perf_counter()
    if work is None:
        time.sleep(seconds)
    else:
        while time.perf_counter() - t0 < seconds:
            work()
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
    e1, t1 = meter.joules(), time.perf_counter()
    return (e1 - e0) / (t1 - t0)
