"""Cold-cache timing (`pyhwp bench --cold`): a read-and-write pass over twice the last-level
cache before every timed call, so that each call finds its weights in DRAM, as the layers of a
model whose weights exceed the cache do. The default (warm) timing is what a layer called again
and again sees; the two can rank kernels differently (bench/NOTES.md, stop 30: the 16-column
CSR kernel's prefetches cost about 10% on cached weights and gain 15-20% from DRAM)."""

from __future__ import annotations

import torch

from pyhwp.hardware.cpu import caches, largest_cache_bytes

_UNKNOWN_LLC_BYTES = 32 << 20  # what the eviction assumes where the OS does not say


def eviction_bytes() -> int:
    """Twice the last-level cache (32 MiB assumed where the OS does not say)."""
    return 2 * (largest_cache_bytes(caches()) or _UNKNOWN_LLC_BYTES)


class CacheEvictor:
    """Calling it adds 1 to every float32 of a buffer of `nbytes` (default eviction_bytes()):
    every line of the buffer is read and written, which evicts what the caches held before.
    About 4 ms for 64 MiB at 30 GB/s; it is called outside the timed interval."""

    def __init__(self, nbytes: int | None = None):
        nbytes = eviction_bytes() if nbytes is None else nbytes
        if not isinstance(nbytes, int) or nbytes < 64:
            raise ValueError(f"CacheEvictor needs at least one 64-byte line, got nbytes={nbytes!r}")
        self.nbytes = nbytes
        self._buffer = torch.zeros(nbytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self._buffer.add_(1.0)
