"""Hardware evaluation: measured compute and bandwidth ceilings, power, and kernel latency tables."""

from pyhwp.hardware.latency import KernelTiming, LatencyResult, kernel_latency
from pyhwp.hardware.profile import HardwareProfile, profile

__all__ = ["HardwareProfile", "KernelTiming", "LatencyResult", "kernel_latency", "profile"]
