"""GPU benchmark of the CUDA kernels: 2:4 (mma.sp) vs torch dense and torch semi-structured
(8192^3, and batches 1-16 on 4096-wide weights), conv2d for CSR, 2:4 and masked vs cuDNN, CSR at 90%
vs torch dense (cuBLAS) and torch CSR (cuSPARSE), masked (MaskedWeight through pyhwp.linear, and the
dense-weight + tile-flags op) at 0% / 75% zero tiles vs torch dense.

Run on a machine with an NVIDIA GPU and pyhwp built with CUDA (bench/gpu_check.sh does both):
    python bench/gpu_bench.py --out results.json [--quick]
Protocol (../shared/BENCHMARKS.md): every contender timed in the same run, interleaved, CUDA
events around device work only, medians; inputs and weights rotated among several copies whose
total exceeds twice the L2 cache, so no contender runs from a warm cache. Weights are iid normal,
so magnitude pruning keeps uniformly random positions: the pruning mask is uniform random.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import pyhwp
from pyhwp._ext import _C
from pyhwp.bench.timing import interleaved_cuda_medians
from pyhwp.ops.masked_cuda import masked_matmul_cuda, tile_flags

LINEAR_SHAPES = [(4096, 4096), (11008, 4096), (3072, 768), (768, 3072), (1536, 384)]
CSR_BATCHES = [1, 16, 256, 1024]
MASKED_BATCHES = [256, 1024]
DTYPES = {"float16": torch.float16, "float32": torch.float32}
TARGETS = {"csr_vs_dense": 2.0, "csr_vs_torch_csr": 3.0, "masked0_vs_dense": 0.8,
           "sparse24_vs_dense_large": 1.2, "sparse24_vs_dense_decode": 1.3, "sparse24_vs_torch_24": 1.0}
# (N, K, batch) of the 2:4 cases: the 8192^3 GEMM and decode batches on >= 4096 x 4096 weights.
SPARSE24_CASES = [(8192, 8192, 8192)] + [(n, k, b) for (n, k) in [(4096, 4096), (11008, 4096)]
                                          for b in (1, 2, 4, 8, 16)] + [(4096, 4096, 128)]
# (batch, C, H, W, out, kernel, padding) of the conv cases (stride 1).
CONV_CASES = [(8, 64, 56, 56, 64, 3, 1), (8, 256, 14, 14, 256, 3, 1), (8, 256, 28, 28, 128, 1, 0)]


def git_commit() -> str:
    if os.environ.get("PYHWP_COMMIT"):
        return os.environ["PYHWP_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def copies_for(bytes_per_set: int, l2_bytes: int) -> int:
    """Copies of the operands to rotate through: together more than twice the L2, 2 to 8."""
    return max(2, min(8, math.ceil(2 * l2_bytes / max(bytes_per_set, 1)) + 1))


def measure_ceilings() -> dict:
    """Measured device ceilings: dense matmul rates and copy bandwidth (bytes read + written)."""
    out = {}
    for name, dt in DTYPES.items():
        a = torch.randn(8192, 8192, device="cuda", dtype=dt)
        b = torch.randn(8192, 8192, device="cuda", dtype=dt)
        t = interleaved_cuda_medians({"mm": lambda: a @ b}, warmup=2, min_reps=5, max_reps=10, budget_s=0.3)["mm"]
        out[f"matmul_tflops_{name}"] = 2 * 8192**3 / t / 1e12
        del a, b
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = interleaved_cuda_medians({"copy": lambda: dst.copy_(src)}, warmup=2, min_reps=5, max_reps=20, budget_s=0.3)["copy"]
    out["copy_tb_per_s"] = 2 * src.numel() * 4 / t / 1e12
    del src, dst
    torch.cuda.empty_cache()
    return out


def rel_err(y, ref) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def bench_csr(n, k, batch, dtype, l2, sparsity=0.9):
    w0 = torch.randn(n, k, device="cuda", dtype=dtype)
    w0[torch.rand(n, k, device="cuda") < sparsity] = 0
    nnz = int((w0 != 0).sum())
    per_set = (n * k + batch * k + n * batch) * w0.element_size() + nnz * 8
    r = copies_for(per_set, l2)
    ws = [w0.clone() for _ in range(r)]
    sws = [pyhwp.to_sparse(w, "csr") for w in ws]
    with _quiet():
        tcsr = [w.to_sparse_csr() for w in ws]
    xs = [torch.randn(batch, k, device="cuda", dtype=dtype) for _ in range(r)]
    xts = [x.t().contiguous() for x in xs]  # (K, P): the conv layout, and torch CSR's best case
    cyc = {name: itertools.cycle(range(r)) for name in ("pyhwp", "pyhwp_conv", "dense", "tcsr")}

    def pyhwp_linear():
        i = next(cyc["pyhwp"])
        return pyhwp.linear(xs[i], sws[i])

    def pyhwp_conv():
        i = next(cyc["pyhwp_conv"])
        s = sws[i]
        return torch.ops.pyhwp.csr_matmul(xts[i].t(), s.row_offsets, s.col_indices, s.values, None, True, s.row_order)

    def dense():
        i = next(cyc["dense"])
        return F.linear(xs[i], ws[i])

    def torch_csr():
        i = next(cyc["tcsr"])
        return torch.sparse.mm(tcsr[i], xts[i])

    fns = {"pyhwp_csr": pyhwp_linear, "pyhwp_csr_conv_layout": pyhwp_conv, "torch_dense": dense}
    notes = {}
    try:
        with _quiet():
            ref_t = torch_csr()
        fns["torch_csr"] = torch_csr
    except RuntimeError as e:  # cuSPARSE via torch may not take this dtype
        notes["torch_csr"] = f"unavailable: {str(e).splitlines()[0][:200]}"
    ref = F.linear(xs[0], ws[0])
    errs = {"pyhwp_csr": rel_err(pyhwp.linear(xs[0], sws[0]), ref),
            "pyhwp_csr_conv_layout": rel_err(torch.ops.pyhwp.csr_matmul(
                xts[0].t(), sws[0].row_offsets, sws[0].col_indices, sws[0].values, None, True,
                sws[0].row_order).t(), ref)}
    if "torch_csr" in fns:
        errs["torch_csr"] = rel_err(ref_t.t(), ref)
    with _quiet():
        times = interleaved_cuda_medians(fns)
    rec = {"kind": "csr", "shape": [n, k], "batch": batch, "dtype": str(dtype).removeprefix("torch."),
           "sparsity": sparsity, "nnz": nnz, "copies": r, "median_s": times, "rel_err_vs_dense": errs,
           "notes": notes}
    rec["useful_gflops"] = {c: 2 * nnz * batch / t / 1e9 for c, t in times.items() if c != "torch_dense"}
    rec["dense_equiv_gflops"] = {c: 2 * n * k * batch / t / 1e9 for c, t in times.items()}
    rec["speedup_vs_torch_dense"] = {c: times["torch_dense"] / t for c, t in times.items()}
    if "torch_csr" in times:
        rec["speedup_vs_torch_csr"] = {c: times["torch_csr"] / t for c, t in times.items()}
    return rec


def bench_masked(n, k, batch, dtype, l2, zero_tiles):
    g = torch.Generator(device="cuda").manual_seed(0)
    w0 = torch.randn(n, k, device="cuda", dtype=dtype)
    if zero_tiles:
        keep = torch.rand(-(-n // 16), -(-k // 16), device="cuda", generator=g) >= zero_tiles
        w0 *= keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :k]
    per_set = (n * k + batch * k + n * batch) * w0.element_size()
    r = copies_for(per_set, l2)
    ws = [w0.clone() for _ in range(r)]
    fl = [tile_flags(w) for w in ws]
    mws = [pyhwp.to_sparse(w, "masked") for w in ws]  # stored tiles, read in place via the tile map
    xs = [torch.randn(batch, k, device="cuda", dtype=dtype) for _ in range(r)]
    xts = [x.t().contiguous() for x in xs]
    cyc = {name: itertools.cycle(range(r)) for name in ("m", "mc", "mf", "d")}

    def masked():
        i = next(cyc["m"])
        return pyhwp.linear(xs[i], mws[i])

    def masked_conv(i=None):
        i = next(cyc["mc"]) if i is None else i
        m = mws[i]
        return torch.ops.pyhwp.masked_matmul(xts[i].t(), m.tile_ptr, m.tile_idx, m.values, m.mask_bits, None,
                                             True, m.kernel_tile_map)

    def masked_flags():
        i = next(cyc["mf"])
        return masked_matmul_cuda(xs[i], ws[i], fl[i], None)

    def dense():
        i = next(cyc["d"])
        return F.linear(xs[i], ws[i])

    ref = F.linear(xs[0], ws[0])
    errs = {"pyhwp_masked": rel_err(pyhwp.linear(xs[0], mws[0]), ref),
            "pyhwp_masked_conv_layout": rel_err(masked_conv(0).t(), ref),
            "pyhwp_masked_dense_flags": rel_err(masked_matmul_cuda(xs[0], ws[0], fl[0], None), ref)}
    times = interleaved_cuda_medians({"pyhwp_masked": masked, "pyhwp_masked_conv_layout": masked_conv,
                                      "pyhwp_masked_dense_flags": masked_flags, "torch_dense": dense})
    kept = float(fl[0].float().mean())
    rec = {"kind": "masked", "shape": [n, k], "batch": batch, "dtype": str(dtype).removeprefix("torch."),
           "zero_tiles": zero_tiles, "kept_tile_fraction": kept, "copies": r, "median_s": times,
           "rel_err_vs_dense": errs, "weight_bytes": {"masked_tiles": mws[0].nbytes,
                                                      "dense": w0.numel() * w0.element_size()}}
    rec["dense_equiv_gflops"] = {c: 2 * n * k * batch / t / 1e9 for c, t in times.items()}
    rec["speedup_vs_torch_dense"] = {c: times["torch_dense"] / t for c, t in times.items()}
    return rec


def random_24_cuda(n, k, dtype):
    """A 2:4 weight on the GPU: the two largest of every group of 4 kept (magnitude pruning)."""
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    g = w.view(n, k // 4, 4)
    drop = g.abs().argsort(-1)[..., :2]
    return g.scatter(-1, drop, 0).view(n, k)


def count_launches(fn):
    """Device activities (kernels, memsets, copies) of one call of fn, from torch.profiler; None
    when the profiler is unavailable. A structural count, not a timing."""
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        torch.cuda.synchronize()
        with _quiet(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - a missing count must not end the benchmark
        return None


def bench_sparse24(n, k, batch, dtype, l2):
    w0 = random_24_cuda(n, k, dtype)
    per_set = (n * k + batch * k + n * batch) * w0.element_size()
    r = copies_for(per_set, l2)
    ws = [w0.clone() for _ in range(r)]
    sws = [pyhwp.to_sparse(w, "2:4") for w in ws]
    xs = [torch.randn(batch, k, device="cuda", dtype=dtype) for _ in range(r)]
    cyc = {name: itertools.cycle(range(r)) for name in ("p", "d", "t")}
    fns = {"pyhwp_sparse24": lambda: pyhwp.linear(xs[(i := next(cyc["p"]))], sws[i]),
           "torch_dense": lambda: F.linear(xs[(i := next(cyc["d"]))], ws[i])}
    ref = F.linear(xs[0], ws[0])
    errs = {"pyhwp_sparse24": rel_err(pyhwp.linear(xs[0], sws[0]), ref)}
    notes = {}
    try:
        with _quiet():
            semis = [torch.sparse.to_sparse_semi_structured(w) for w in ws]
            errs["torch_sparse24"] = rel_err(F.linear(xs[0], semis[0]), ref)
        fns["torch_sparse24"] = lambda: F.linear(xs[(i := next(cyc["t"]))], semis[i])
    except (RuntimeError, ValueError) as e:
        notes["torch_sparse24"] = f"unavailable: {str(e).splitlines()[0][:200]}"
    with _quiet():
        times = interleaved_cuda_medians(fns)
    rec = {"kind": "sparse24", "shape": [n, k], "batch": batch, "dtype": str(dtype).removeprefix("torch."),
           "copies": r, "median_s": times, "rel_err_vs_dense": errs, "notes": notes}
    rec["launches"] = {"pyhwp_sparse24": count_launches(lambda: pyhwp.linear(xs[0], sws[0])),
                       "torch_dense": count_launches(lambda: F.linear(xs[0], ws[0]))}
    rec["dense_equiv_tflops"] = {c: 2 * n * k * batch / t / 1e12 for c, t in times.items()}
    rec["speedup_vs_torch_dense"] = {c: times["torch_dense"] / t for c, t in times.items()}
    if "torch_sparse24" in times:
        rec["speedup_vs_torch_sparse24"] = {c: times["torch_sparse24"] / t for c, t in times.items()}
    return rec


def bench_conv(batch, c, h, w_, out, ksz, pad, dtype):
    """pyhwp.conv2d with CSR (90%), 2:4 and masked (75% zero 16x16 tiles of the GEMM-form weight)
    weights vs F.conv2d (cuDNN) on the dense weight."""
    x = torch.randn(batch, c, h, w_, device="cuda", dtype=dtype)
    dense = torch.randn(out, c, ksz, ksz, device="cuda", dtype=dtype)
    w24 = random_24_cuda(out, c * ksz * ksz, dtype).view_as(dense)
    wcsr = dense * (torch.rand_like(dense, dtype=torch.float32) >= 0.9)
    kg = c * ksz * ksz
    keep = torch.rand(-(-out // 16), -(-kg // 16), device="cuda") >= 0.75
    wmask = dense * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:out, :kg].view_as(dense)
    s24, scsr, smask = pyhwp.to_sparse(w24, "2:4"), pyhwp.to_sparse(wcsr, "csr"), pyhwp.to_sparse(wmask, "masked")
    fns = {"torch_dense": lambda: F.conv2d(x, w24, padding=pad),
           "pyhwp_sparse24": lambda: pyhwp.conv2d(x, s24, padding=pad),
           "pyhwp_csr90": lambda: pyhwp.conv2d(x, scsr, padding=pad),
           "pyhwp_masked75": lambda: pyhwp.conv2d(x, smask, padding=pad)}
    errs = {"pyhwp_sparse24": rel_err(pyhwp.conv2d(x, s24, padding=pad), F.conv2d(x, w24, padding=pad)),
            "pyhwp_csr90": rel_err(pyhwp.conv2d(x, scsr, padding=pad), F.conv2d(x, wcsr, padding=pad)),
            "pyhwp_masked75": rel_err(pyhwp.conv2d(x, smask, padding=pad), F.conv2d(x, wmask, padding=pad))}
    if ksz > 1:  # the per-tap path the CSR implicit GEMM replaced on CUDA, for the ratio
        from pyhwp.kernels import find_kernel
        from pyhwp.ops.conv2d import _kernel_taps, _shifted_conv
        from pyhwp.ops.linear import MATMULS
        mm = MATMULS[find_kernel("conv2d", "csr", x.device, dtype).name]
        taps, hw = _kernel_taps(scsr), (h + 2 * pad - ksz + 1, w_ + 2 * pad - ksz + 1)
        fns["pyhwp_csr90_per_tap"] = lambda: _shifted_conv(mm, taps, x, None, (pad,) * 4, (1, 1), (ksz, ksz), hw)
    times = interleaved_cuda_medians(fns, max_reps=20, budget_s=2.0)
    rec = {"kind": "conv2d", "shape": [out, c, ksz, ksz], "input": [batch, c, h, w_], "batch": batch,
           "dtype": str(dtype).removeprefix("torch."), "median_s": times, "rel_err_vs_dense": errs,
           "notes": {"path": "2:4 and masked: im2col (F.unfold) + per-image GEMM for kxk, direct for 1x1; "
                             "csr: implicit GEMM (csr_conv2d_cuda, whole batch) under inference_mode, "
                             "shifted views (one GEMM per tap) with autograd"}}
    rec["speedup_vs_torch_dense"] = {k: times["torch_dense"] / t for k, t in times.items()}
    return rec


class _quiet:
    """Silence torch's beta warning for sparse CSR tensors."""

    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def check_targets(results: list[dict]) -> list[dict]:
    checks = []
    for r in results:
        label = f"{r['kind']} {r['shape'][0]}x{r['shape'][1]} batch {r['batch']} {r['dtype']}"
        if r["kind"] == "csr" and r["batch"] >= 256:
            s = r["speedup_vs_torch_dense"]["pyhwp_csr"]
            checks.append({"case": label, "target": "csr >= 2x torch dense", "value": s, "pass": s >= TARGETS["csr_vs_dense"]})
            if "speedup_vs_torch_csr" in r:
                s = r["speedup_vs_torch_csr"]["pyhwp_csr"]
                checks.append({"case": label, "target": "csr >= 3x torch csr", "value": s, "pass": s >= TARGETS["csr_vs_torch_csr"]})
        if r["kind"] == "masked" and r["zero_tiles"] == 0:
            s = r["speedup_vs_torch_dense"]["pyhwp_masked"]
            checks.append({"case": label, "target": "masked(0%) >= 0.8x torch dense", "value": s,
                           "pass": s >= TARGETS["masked0_vs_dense"]})
        if r["kind"] == "sparse24":
            s = r["speedup_vs_torch_dense"]["pyhwp_sparse24"]
            decode = r["batch"] <= 16
            key = "sparse24_vs_dense_decode" if decode else "sparse24_vs_dense_large"
            checks.append({"case": label, "target": f"2:4 >= {TARGETS[key]}x torch dense", "value": s,
                           "pass": s >= TARGETS[key]})
            if "speedup_vs_torch_sparse24" in r:
                s = r["speedup_vs_torch_sparse24"]["pyhwp_sparse24"]
                checks.append({"case": label, "target": "2:4 >= torch 2:4", "value": s,
                               "pass": s >= TARGETS["sparse24_vs_torch_24"]})
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="two shapes only (a smoke run)")
    ap.add_argument("--kernels", default="sparse24,conv,csr,masked",
                    help="comma-separated subset of sparse24, conv, csr, masked (run in that order)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not _C.build_info()["cuda"]:
        print("gpu_bench: needs a CUDA device and pyhwp built with CUDA", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    t0 = time.time()
    meta = {
        "device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
        "multiprocessors": props.multi_processor_count, "l2_bytes": l2,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
        "pyhwp_build": _C.build_info(), "commit": git_commit(),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "protocol": "interleaved CUDA-event medians, device time only; operands rotated over copies > 2x L2",
    }
    print(f"device {meta['device']} sm_{''.join(map(str, meta['capability']))}, torch {meta['torch']}, commit {meta['commit']}")
    meta["ceilings"] = measure_ceilings()
    print("ceilings", {k: round(v, 1) for k, v in meta["ceilings"].items()})
    shapes = LINEAR_SHAPES[:2] if args.quick else LINEAR_SHAPES
    results = []

    def save(final=False):
        # Rewritten after every case: a run cut short by its time limit still leaves its results.
        meta["seconds"] = time.time() - t0
        meta["complete"] = final
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results, "targets": check_targets(results)}, f, indent=1)

    kinds = set(args.kernels.split(","))
    if "sparse24" in kinds:
        for dname, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
            for (n, k, batch) in SPARSE24_CASES[:3] if args.quick else SPARSE24_CASES:
                r = bench_sparse24(n, k, batch, dt, l2)
                results.append(r)
                sp = r["speedup_vs_torch_dense"]
                t24 = r.get("speedup_vs_torch_sparse24", {}).get("pyhwp_sparse24", float("nan"))
                print(f"2:4    {dname:8s} {n:5d}x{k:<5d} b={batch:<5d} vs dense {sp['pyhwp_sparse24']:6.2f}x  "
                      f"vs torch 2:4 {t24:6.2f}x  err {r['rel_err_vs_dense']['pyhwp_sparse24']:.1e}", flush=True)
                save()
                torch.cuda.empty_cache()
    if "conv" in kinds:
        for case in CONV_CASES[:1] if args.quick else CONV_CASES:
            r = bench_conv(*case, torch.float16)
            results.append(r)
            sp = r["speedup_vs_torch_dense"]
            print(f"conv   float16  {r['shape']} x {r['input']}: 2:4 {sp['pyhwp_sparse24']:6.2f}x  "
                  f"csr90 {sp['pyhwp_csr90']:6.2f}x (per tap {sp.get('pyhwp_csr90_per_tap', float('nan')):6.2f}x)  "
                  f"masked75 {sp['pyhwp_masked75']:6.2f}x vs cuDNN", flush=True)
            save()
            torch.cuda.empty_cache()
    for dname, dt in DTYPES.items():
        if not kinds & {"csr", "masked"}:
            break
        for (n, k) in shapes:
            for batch in CSR_BATCHES if "csr" in kinds else ():
                r = bench_csr(n, k, batch, dt, l2)
                results.append(r)
                sp = r["speedup_vs_torch_dense"]
                tc = r.get("speedup_vs_torch_csr", {}).get("pyhwp_csr", float("nan"))
                print(f"csr    {dname:8s} {n:5d}x{k:<5d} b={batch:<5d} vs dense {sp['pyhwp_csr']:6.2f}x "
                      f"(conv layout {sp['pyhwp_csr_conv_layout']:6.2f}x)  vs torch csr {tc:6.2f}x  "
                      f"err {r['rel_err_vs_dense']['pyhwp_csr']:.1e}", flush=True)
                save()
                torch.cuda.empty_cache()
            for batch in MASKED_BATCHES if "masked" in kinds else ():
                for zt in (0.0, 0.75):
                    r = bench_masked(n, k, batch, dt, l2, zt)
                    results.append(r)
                    sp = r["speedup_vs_torch_dense"]
                    print(f"masked {dname:8s} {n:5d}x{k:<5d} b={batch:<5d} zero tiles {zt:.2f} vs dense "
                          f"{sp['pyhwp_masked']:6.2f}x (conv layout {sp['pyhwp_masked_conv_layout']:6.2f}x, "
                          f"dense+flags {sp['pyhwp_masked_dense_flags']:6.2f}x)  "
                          f"err {r['rel_err_vs_dense']['pyhwp_masked']:.1e}", flush=True)
                    save()
                    torch.cuda.empty_cache()
    save(final=True)
    checks = check_targets(results)
    passed = sum(c["pass"] for c in checks)
    print(f"\ntargets: {passed}/{len(checks)} met")
    for c in checks:
        print(f"  {'PASS' if c['pass'] else 'miss'}  {c['target']:32s} {c['value']:6.2f}x  {c['case']}")
    print(f"wrote {args.out} in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
