"""Latency of channel removal: a layer at full and reduced width and its consumers at full and reduced
input, timed interleaved in one run with torch's dense kernels, cached per machine like kernel_latency."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyhwp.bench.timing import interleaved_medians
from pyhwp.hardware import cache
from pyhwp.hardware.device import device_slug, fingerprint, on_device, resolve_device
from pyhwp.hardware.latency import OPS, dtype_name, parse_dtype
from pyhwp.select.layers import LayerInfo


def _case(info: LayerInfo) -> tuple[str, tuple[int, ...], int]:
    op, shape, batch, _ = info.latency_case
    return op, shape, batch


def _runner(op: str, shape: tuple[int, ...], batch: int, dtype, device, gen):
    spec = OPS[op]
    w = torch.randn(spec.weight_shape(shape), generator=gen).to(dtype).to(device)
    x = torch.randn(spec.input_shape(shape, batch), generator=gen).to(dtype).to(device)
    return lambda: spec.dense(x, w, shape)


def channel_latency(info: LayerInfo, kept: int, consumers: Sequence, *, device="cpu", dtype="float32",
                    cache_dir=None, refresh: bool = False, budget_s: float = 0.3) -> dict:
    """Median seconds of the layer's dense op at full width ("own_full_s") and with `kept` output
    channels ("own_reduced_s"), and of each consumer (Consumer: info, factor) reading the full and
    the reduced input ("consumers": name -> {"full_s", "reduced_s"}), all timed in one interleaved run
    on random normal weights and inputs (convs as kernel_latency times them: padding k // 2)."""
    dev, dt = resolve_device(device), parse_dtype(dtype)
    cases = {"own_full": _case(info), "own_reduced": _case(info.with_out(kept))}
    for i, c in enumerate(consumers):  # by position: the cache key holds shapes, not layer names
        cases[f"c{i}|full"] = _case(c.info)
        cases[f"c{i}|reduced"] = _case(c.info.with_in(kept * c.factor))
    key = "|".join(f"{op}:{'x'.join(map(str, shape))}:b{b}" for op, shape, b in cases.values()) + \
        f"|{dtype_name(dt)}|{dev}"
    path = cache.cache_dir(cache_dir) / f"channel_latency-{device_slug(dev)}.json"
    fp, version = fingerprint(dev), cache.code_version()
    hit = None if refresh else cache.load(path, fp, version).get(key)
    if not isinstance(hit, dict) or set(hit) != set(cases):  # absent, or an entry of another layout
        gen = torch.Generator().manual_seed(0)
        fns = {name: _runner(*case, dt, dev, gen) for name, case in cases.items()}
        with on_device(dev):
            hit = interleaved_medians(fns, budget_s=budget_s, device=str(dev))
        entries = cache.load(path, fp, version)
        entries[key] = hit
        cache.store(path, fp, version, entries)
    return {"own_full_s": hit["own_full"], "own_reduced_s": hit["own_reduced"],
            "consumers": {c.info.name: {"full_s": hit[f"c{i}|full"], "reduced_s": hit[f"c{i}|reduced"]}
                          for i, c in enumerate(consumers)}}
