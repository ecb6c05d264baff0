"""An NVIDIA GPU as torch reports it: name, compute capability, SMs, memory, L2."""

from __future__ import annotations

import torch


def gpu_info(index: int) -> dict:
    """Facts of CUDA device `index` (nothing measured). Needs torch.cuda.is_available()."""
    props = torch.cuda.get_device_properties(index)
    l2 = getattr(props, "L2_cache_size", 0)
    return {
        "name": props.name,
        "compute_capability": [props.major, props.minor],
        "cores": props.multi_processor_count,  # streaming multiprocessors
        "memory_bytes": props.total_memory,
        "caches": {"L2": {"size_bytes": int(l2)}} if l2 else {},
        "uuid": str(getattr(props, "uuid", "")) or None,
        "cuda": torch.version.cuda,
    }
