"""Interleaved timing: every contender timed in the same run, A B C A B C ..., medians compared.

Absolute times on shared machines drift from run to run; ratios measured this way hold.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], object]], *, warmup: int = 3,
                        min_reps: int = 5, max_reps: int = 200, budget_s: float = 1.0,
                        device: str = "cpu", before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin.

    Each round calls every function once (each call timed alone), starting one function later
    than the round before (A B C, B C A, C A B, ...), so that no function always follows the
    same one: a call right after another's pass over a large operand finds the caches in the
    state that pass left (NOTES.md, stop 22). Rounds continue until `budget_s` of total time is
    spent, at least `min_reps` and at most `max_reps` rounds. `before`, where given, runs ahead
    of every timed call, outside its interval (the cold-cache runs' eviction, bench/cold.py); the
    budget counts it.
    """
    if not fns:
        raise ValueError("fns must name at least one function to time")
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        _sync(device)
        samples: dict[str, list[float]] = {k: [] for k in fns}
        start = time.perf_counter()
        reps = 0
        items = list(fns.items())
        while reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget_s):
            first = reps % len(items)
            for k, f in items[first:] + items[:first]:
                if before is not None:
                    before()
                    _sync(device)
                t0 = time.perf_counter()
                f()
                _sync(device)
                samples[k].append(time.perf_counter() - t0)
            reps += 1
    return {k: statistics.median(v) for k, v in samples.items()}


def interleaved_cuda_medians(fns: dict[str, Callable[[], object]], *, warmup: int = 3,
                             min_reps: int = 10, max_reps: int = 200, budget_s: float = 0.5,
                             lead_cycles: int = 2_000_000) -> dict[str, float]:
    """Median GPU seconds per call of each function, from CUDA events, timed round-robin.

    Each round first queues a spin kernel of `lead_cycles` clock cycles so that the host has
    enqueued the whole round before the GPU reaches it: the events then bracket device time
    only, not Python launch overhead. Functions must run on the current stream.
    """
    if not fns:
        raise ValueError("fns must name at least one function to time")
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        torch.cuda.synchronize()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        start = time.perf_counter()
        reps = 0
        while reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget_s):
            torch.cuda._sleep(lead_cycles)
            marks = []
            for k, f in fns.items():
                e0 = torch.cuda.Event(enable_timing=True)
                e1 = torch.cuda.Event(enable_timing=True)
                e0.record()
                f()
                e1.record()
                marks.append((k, e0, e1))
            torch.cuda.synchronize()
            for k, e0, e1 in marks:
                samples[k].append(e0.elapsed_time(e1) / 1e3)
            reps += 1
    return {k: statistics.median(v) for k, v in samples.items()}
