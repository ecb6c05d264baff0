"""Which device a profile is for, the facts that identify it, and their fingerprint (the cache key)."""

from __future__ import annotations

import hashlib
import json

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' -> torch.device with an explicit index for CUDA.

    Raises ValueError for anything else and RuntimeError, saying why, when CUDA is asked for on a
    machine where torch sees no GPU.
    """
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if d.type == "cpu":
        return torch.device("cpu")
    if d.type != "cuda":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) was built without CUDA support"
        else:
            why = (f"torch was built with CUDA {torch.version.cuda} but sees no GPU "
                   "(no NVIDIA driver or device, or CUDA_VISIBLE_DEVICES hides them)")
        raise RuntimeError(f"device={str(device)!r} needs an NVIDIA GPU, but {why}; profile device='cpu' instead")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if d.index is None else d.index
    if not 0 <= index < count:
        raise ValueError(f"device={str(device)!r}: torch sees {count} CUDA device(s), indices 0..{count - 1}")
    return torch.device("cuda", index)


def device_facts(device: torch.device) -> dict:
    """What the OS / driver says about `device` (CPU: cpu.cpu_info(); CUDA: gpu.gpu_info())."""
    if device.type == "cuda":
        from pyhwp.hardware.gpu import gpu_info

        return gpu_info(device.index)
    from pyhwp.hardware.cpu import cpu_info

    return cpu_info()


def fingerprint_facts(device: torch.device, facts: dict | None = None) -> dict:
    """The facts that change kernel timings: the hardware, plus the software around our kernels
    (torch version for the baselines, torch threads, the ISA our CPU kernels dispatch to)."""
    facts = device_facts(device) if facts is None else facts
    keep = ("name", "isa", "cores", "threads", "usable_threads", "caches", "compute_capability", "memory_bytes",
            "cuda")
    out = {k: facts[k] for k in keep if k in facts}
    out["device_type"] = device.type
    out["torch"] = torch.__version__
    if device.type == "cpu":
        out["torch_threads"] = torch.get_num_threads()
    return out


def fingerprint(device: torch.device, facts: dict | None = None) -> str:
    """16 hex digits identifying this device and timing-relevant software; equal facts, equal key."""
    blob = json.dumps(fingerprint_facts(device, facts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def device_slug(device: torch.device) -> str:
    """'cpu' or 'cuda0': a file-name-safe form of the device."""
    return device.type + ("" if device.index is None else str(device.index))


class on_device:
    """Make a CUDA device current for the block, so synchronize() waits for it (no-op on the CPU)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
