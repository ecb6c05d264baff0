"""pyhwp.optimize: profile -> score -> select -> prune -> restructure -> fine-tune -> convert -> measure."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pyhwp.bench.timing import interleaved_medians
from pyhwp.hardware.device import on_device, resolve_device
from pyhwp.prune import finetune as _finetune
from pyhwp.prune import fold_batchnorm, remove_channels
from pyhwp.prune import redistribute as _redistribute
from pyhwp.prune.bnfold import conv_bn_pairs
from pyhwp.prune.calibrate import activation_norms
from pyhwp.prune.graph import UnsupportedGraphError
from pyhwp.prune.layers import apply_masks, prunable_layers
from pyhwp.report import OptimizeReport, model_bytes
from pyhwp.select.candidates import channel_consumers, model_candidates
from pyhwp.select.cost import candidate_mask, layer_grams, score
from pyhwp.select.layers import at_batch, describe_layers
from pyhwp.select.retime import check_pick, label, retime_layer
from pyhwp.select.solver import Candidate, solve, useful_candidates
from pyhwp.select.torch_layers import TORCH_LAYERS

Plan = dict[str, Candidate]


@dataclass
class _Built:
    model: nn.Module
    masks: dict[str, torch.Tensor]  # non-channel picks, on the restructured model's weights
    metric: float | None = None
    finetuned: bool = False


def _plan_key(plan: Plan) -> tuple:
    return tuple((n, c.pattern, c.sparsity) for n, c in plan.items())


def _cost_grid(layers: dict[str, list[Candidate]], points: int) -> list[float]:
    """0 and `points` geometric steps from the smallest nonzero candidate cost to the largest total."""
    costs = [c.cost for cs in layers.values() for c in useful_candidates(cs) if c.cost > 0]
    if not costs:
        return [0.0]
    lo = min(costs)
    hi = sum(max(c.cost for c in useful_candidates(cs)) for cs in layers.values())
    if hi <= lo:
        return [0.0, hi]
    return [0.0] + [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]


def drop_negligible(layers: dict[str, list[Candidate]], min_gain: float) -> dict[str, list[Candidate]]:
    """Without the candidates that save less than `min_gain` of the model's summed dense layer latency:
    pruning that buys no measurable speed only costs accuracy."""
    dense = {n: next(c for c in cs if c.pattern == "dense").latency_s for n, cs in layers.items()}
    floor = min_gain * sum(dense.values())
    return {n: [c for c in cs if c.pattern == "dense" or dense[n] - c.latency_s >= floor] for n, cs in layers.items()}


def candidate_plans(layers: dict[str, list[Candidate]], points: int = 24) -> list[Plan]:
    """Distinct "fastest within accuracy cost" solutions over a grid of cost budgets, fastest first."""
    plans: dict[tuple, Plan] = {}
    bins = 2000
    for budget in _cost_grid(layers, points):
        # solve() rounds each cost up to its grid: widen by the most that rounding can add, so the
        # combination that exactly fits a grid budget stays feasible.
        plan = solve(layers, max_cost=budget * (1 + (len(layers) + 1) / bins), bins=bins)
        plans.setdefault(_plan_key(plan), plan)
    return sorted(plans.values(), key=lambda p: (sum(c.latency_s for c in p.values()), sum(c.cost for c in p.values())))


def remeasure(cands: dict[str, list[Candidate]], modules: dict[str, nn.Module], infos, consumers, masks, *,
              budget_s: float, progress: bool) -> dict[str, list[Candidate]]:
    """The candidates with latencies re-measured on the layers' own weights and masks, each layer's
    candidates interleaved in one run (consumers dense; channel removal counts their change), so the
    choice rests on one consistent measurement rather than on table cases timed at other moments.
    Candidates the tables put above 1.5x dense keep their table latency: they cannot be picked."""
    out = {}
    for name in tqdm(cands, desc="re-measure candidates", disable=not progress, leave=False):
        dense = next(c for c in cands[name] if c.pattern == "dense").latency_s
        near = [c for c in cands[name] if c.latency_s <= 1.5 * dense]
        cons = [(modules[c.info.name], c.info, c.factor, None) for c in (consumers.get(name) or [])]
        times = retime_layer(modules[name], infos[name], near, masks[name], cons, budget_s=budget_s,
                             attributable=True)
        out[name] = [replace(c, latency_s=max(0.0, times.get(label(c), c.latency_s)),
                             extra={**c.extra, "table_latency_s": c.latency_s, "remeasured": label(c) in times})
                     for c in cands[name]]
    return out


class _Pipeline:
    """The state optimize() threads through its steps (kept in one place so each step is small)."""

    def __init__(self, model, x, calib, masks, consumers, criterion, calib_batches, eval_fn, finetune,
                 do_redistribute, progress):
        self.model, self.x, self.calib, self.masks = model, x, calib, masks
        self.consumers, self.criterion, self.calib_batches = consumers, criterion, calib_batches
        self.eval_fn, self.finetune, self.do_redistribute, self.progress = eval_fn, finetune, do_redistribute, progress

    def build(self, plan: Plan, *, final: bool) -> _Built:
        """The model pruned to `plan`: channels removed, other masks (re)made on the restructured
        weights, applied (final: with least-squares redistribution, then fine-tuned)."""
        m = copy.deepcopy(self.model)
        channel = {n: self.masks[n][("channel", c.sparsity)] for n, c in plan.items() if c.pattern == "channel"}
        if channel:
            m = remove_channels(m, channel, example_input=self.x[0][:2] if len(self.x) == 1 else None)
        changed = {con.info.name for n in channel for con in (self.consumers.get(n) or [])}
        layers = prunable_layers(m)
        masks: dict[str, torch.Tensor] = {}
        redo = [n for n, c in plan.items() if c.pattern not in ("dense", "channel") and n in changed]
        acts = activation_norms(m, self.calib, layers=redo, batches=self.calib_batches) if redo else {}
        for n, c in plan.items():
            if c.pattern in ("dense", "channel"):
                continue
            if n in changed:
                w = layers[n].weight
                a = acts.get(n) if (not isinstance(layers[n], nn.Conv2d) or layers[n].groups == 1) else None
                masks[n] = candidate_mask(w, c.pattern, c.sparsity, criterion=self.criterion, activations=a)
            else:
                masks[n] = self.masks[n][(c.pattern, c.sparsity)]
        if final and self.do_redistribute and masks:
            _redistribute(m, masks, self.calib, batches=self.calib_batches)
        else:
            apply_masks(m, masks)
        built = _Built(m, masks)
        if final and self.finetune is not None:
            self.finetune(m, masks)
            apply_masks(m, masks)  # a user's fine-tune function may not hold them
            built.finetuned = True
        m.eval()
        if self.eval_fn is not None:
            built.metric = float(self.eval_fn(m))
        return built


def _make_finetune(finetune_fn, train_loader, loss_fn, epochs, lr, progress):
    if finetune_fn is not None:
        return finetune_fn
    if train_loader is None:
        return None

    def run(model, masks):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        steps = max(1, epochs * len(train_loader))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        _finetune(model, masks, train_loader, loss_fn, opt, epochs, scheduler=sched, progress=progress,
                  desc="fine-tune (masks held)")
    return run


def _entry(i: int, stage: str, plan: Plan, metric: float, drop: float) -> dict:
    return {"plan": i, "stage": stage, "predicted_latency_s": sum(c.latency_s for c in plan.values()),
            "cost": sum(c.cost for c in plan.values()), "metric": metric, "drop": drop}


def _search(pipe: _Pipeline, plans: list[Plan], baseline: float, max_drop: float, max_finetunes: int,
            bar) -> tuple[Plan, _Built, list[dict]]:
    """The fastest plan whose metric after the final pipeline stays within `max_drop` of `baseline`.

    Plans are screened first (pruned, no redistribution or fine-tuning): the fastest passing the
    screen is a safe fallback; faster ones are then tried with the full pipeline by bisection
    (at most `max_finetunes` runs), assuming faster plans cost more accuracy.
    """
    log: list[dict] = []
    screened: list[float] = []
    safe = len(plans) - 1  # the dense plan is last (slowest) and always passes
    for i, plan in enumerate(plans):
        b = pipe.build(plan, final=False)
        screened.append(b.metric)
        drop = baseline - b.metric
        log.append(_entry(i, "screen", plan, b.metric, drop))
        bar.update(1)
        if drop <= max_drop:
            safe = i
            break
    best_i, best = None, None
    lo, hi, runs = 0, safe, 0
    tried: dict[int, _Built] = {}
    while lo < hi and runs < max_finetunes:
        mid = (lo + hi) // 2
        b = pipe.build(plans[mid], final=True)
        tried[mid], runs = b, runs + 1
        drop = baseline - b.metric
        log.append(_entry(mid, "final", plans[mid], b.metric, drop))
        bar.update(1)
        if drop <= max_drop:
            hi, best_i, best = mid, mid, b
        else:
            lo = mid + 1
    if best is None:
        b = tried.get(safe) or pipe.build(plans[safe], final=True)
        drop = baseline - b.metric
        if safe not in tried:
            log.append(_entry(safe, "final", plans[safe], b.metric, drop))
        if drop <= max_drop:
            best_i, best = safe, b
        else:  # the full pipeline did worse than the screen: keep the screened model
            best_i, best = safe, pipe.build(plans[safe], final=False)
            log.append({"plan": safe, "stage": "fallback to screened", "metric": best.metric,
                        "drop": baseline - best.metric})
    return plans[best_i], best, log


def _convert(model: nn.Module, plan: Plan, masks: dict[str, torch.Tensor], fold_bn: bool) -> tuple[nn.Module, bool]:
    """Fold BatchNorms into convs (inference), then swap each sparse pick for its kernel's layer."""
    from pyhwp.nn import sparsify

    folded = False
    if fold_bn:
        try:
            if conv_bn_pairs(model):
                model = fold_batchnorm(model)
                folded = True
        except (UnsupportedGraphError, ValueError, TypeError):
            pass
    modules = dict(model.named_modules())
    ours = {}
    for name, mask in masks.items():
        c = plan[name]
        if c.kernel in TORCH_LAYERS:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    TORCH_LAYERS[c.kernel].from_dense(modules[name], c.pattern, mask))
        else:
            ours[name] = (c.pattern, mask)
    if ours:
        sparsify(model, ours)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), folded


def optimize(model: nn.Module, example_inputs, *, target="cpu", eval_fn: Callable[[nn.Module], float] | None = None,
             calib_loader: Iterable | None = None, finetune_fn: Callable[[nn.Module, dict], None] | None = None,
             train_loader: Iterable | None = None, max_accuracy_drop: float | None = None,
             latency_budget: float | None = None, batch_size: int | None = None,
             test_fn: Callable[[nn.Module], float] | None = None, loss_fn: Callable = F.cross_entropy,
             finetune_epochs: int = 2, finetune_lr: float = 1e-3, patterns=None, sparsities=None,
             criterion: str = "wanda", calib_batches: int | None = 8, redistribute: bool = True,
             fold_bn: bool = True, retime: bool = True, max_finetunes: int = 4, hardware=None, cache_dir=None,
             budget_s: float = 0.3, remeasure_s: float = 1.0, timing_s: float = 3.0, min_gain: float = 0.01,
             progress: bool = True) -> tuple[nn.Module, OptimizeReport]:
    """Prune `model` for `target` so it runs faster there, within an accuracy or latency budget.

    Args:
        model: any nn.Module whose Linear / Conv2d layers are to be pruned (not modified; a copy is).
        example_inputs: a tensor or tuple of tensors, model(*example_inputs); resized along dim 0 to
            `batch_size` (the batch the model will serve; default: as given) for every timing.
        target: "cpu", "cuda" or "cuda:N": where latencies are measured and the model will run.
        eval_fn: model -> metric (higher is better, e.g. accuracy in %): steers the accuracy budget.
        test_fn: model -> metric on held-out data for the report (default eval_fn).
        calib_loader: batches (input[, target]) for the accuracy proxy and redistribution (default:
            the example inputs).
        finetune_fn: fn(model, masks) fine-tuning in place with masks held; or train_loader with
            loss_fn: AdamW for `finetune_epochs` at `finetune_lr`, cosine schedule, masks held.
        max_accuracy_drop: the fastest model whose eval_fn drops at most this much (absolute, in
            eval_fn's units; needs eval_fn); or latency_budget: the most accurate (least proxy cost)
            model whose summed layer latency plus the rest of the dense model fits this many seconds.
        patterns, sparsities: candidate patterns and sparsity levels (pyhwp.select.candidates).
        criterion: "wanda" (|w| * input norm) or "magnitude" for the masks.
        hardware: a HardwareProfile of `target` (default: pyhwp.hardware.profile(target, quick=True), cached).
        budget_s: timing budget per latency-table case; remeasure_s: per layer, for re-measuring the
            candidates that can compete with dense on the layer's own weights before choosing (0: use
            the tables alone); timing_s: for the end-to-end timings.
        min_gain: a pattern must save at least this fraction of the summed dense layer latency to be
            considered (pruning for no measurable speed only costs accuracy).
    Returns (optimized model in eval mode with pyhwp sparse layers, OptimizeReport).
    """
    if (max_accuracy_drop is None) == (latency_budget is None):
        raise ValueError("give exactly one of max_accuracy_drop (with eval_fn) or latency_budget (seconds)")
    if max_accuracy_drop is not None and (eval_fn is None or not max_accuracy_drop >= 0):
        raise ValueError("max_accuracy_drop needs eval_fn (model -> metric) and a value >= 0")
    if latency_budget is not None and not latency_budget > 0:
        raise ValueError(f"latency_budget must be > 0 seconds, got {latency_budget!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    t_start = time.perf_counter()
    device = resolve_device(target)
    steps = tqdm(total=8, desc="pyhwp.optimize", disable=not progress)

    def step(name):
        steps.set_postfix_str(name)
        steps.update(1)

    dense = copy.deepcopy(model).to(device).eval()
    x = tuple(t.to(device) for t in at_batch(example_inputs, batch_size))
    calib = calib_loader if calib_loader is not None else [x[0]]
    dtype = next(dense.parameters()).dtype
    with on_device(device), torch.no_grad():  # warm the process up: its first timings run slow
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            dense(*x)

    if hardware is None:
        from pyhwp.hardware import profile

        hardware = profile(device, quick=True, cache_dir=cache_dir)
    step("profile")

    infos = describe_layers(dense, x)
    consumers = channel_consumers(dense, infos)
    cands, skipped = model_candidates(infos, consumers, device=device, dtype=dtype, patterns=patterns,
                                      sparsities=sparsities, cache_dir=cache_dir, budget_s=budget_s, progress=progress)
    step("latency tables")

    modules = dict(dense.named_modules())
    grams = layer_grams(dense, calib, list(infos), batches=calib_batches)
    masks: dict[str, dict] = {}
    for name in infos:
        cands[name], masks[name] = score(cands[name], modules[name].weight, grams[name], criterion=criterion)
    del grams
    if remeasure_s:
        cands = remeasure(cands, modules, infos, consumers, masks, budget_s=remeasure_s, progress=progress)
    step("accuracy proxy")

    finetune = _make_finetune(finetune_fn, train_loader, loss_fn, finetune_epochs, finetune_lr, progress)
    pipe = _Pipeline(dense, x, calib, masks, consumers, criterion, calib_batches, eval_fn, finetune,
                     redistribute, progress)
    baseline = float(eval_fn(dense)) if eval_fn is not None else None
    search_log: list[dict] = []
    if max_accuracy_drop is not None:
        plans = candidate_plans(drop_negligible(cands, min_gain))
        with tqdm(total=len(plans) + max_finetunes, desc="search plans", disable=not progress, leave=False) as bar:
            plan, built, search_log = _search(pipe, plans, baseline, max_accuracy_drop, max_finetunes, bar)
    else:
        dense_layers = sum(next(c for c in cs if c.pattern == "dense").latency_s for cs in cands.values())
        with on_device(device):
            e2e = interleaved_medians({"dense": lambda: dense(*x)}, budget_s=timing_s / 3, device=str(device))["dense"]
        rest = max(0.0, e2e - dense_layers)
        if latency_budget - rest <= 0:
            raise ValueError(f"latency_budget {latency_budget:.3g} s is below the model's non-prunable part "
                             f"({rest:.3g} s measured)")
        plan = solve(drop_negligible(cands, min_gain), max_latency_s=latency_budget - rest)
        built = pipe.build(plan, final=True)
        search_log.append({"stage": "latency budget", "layers_budget_s": latency_budget - rest, "rest_s": rest})
    step("select + prune + fine-tune")

    optimized, folded = _convert(built.model, plan, built.masks, fold_bn)
    step("convert")

    reference = {"dense": dense}
    if folded:
        reference["dense, BatchNorm folded"] = fold_batchnorm(dense)
    contenders = {k: (lambda m=m: m(*x)) for k, m in reference.items()}
    contenders["optimized"] = lambda: optimized(*x)
    with on_device(device):
        e2e = interleaved_medians(contenders, budget_s=timing_s, device=str(device))
    metric_fn = test_fn or eval_fn
    before = float(metric_fn(dense)) if metric_fn is not None else None
    after = float(metric_fn(optimized)) if metric_fn is not None else None
    step("measure")

    retimed = {}
    if retime:
        for name in tqdm(infos, desc="re-time candidates", disable=not progress, leave=False):
            cons = [(modules[c.info.name], c.info, c.factor, plan[c.info.name])
                    for c in (consumers.get(name) or [])]
            times = retime_layer(modules[name], infos[name], cands[name], masks[name], cons,
                                 budget_s=max(1.0, 5 * budget_s))
            retimed[name] = {"times_s": times, **check_pick(plan[name], cands[name], times)}
    step("re-time")
    steps.close()

    report = OptimizeReport.build(
        infos=infos, cands=cands, skipped=skipped, plan=plan, masks=built.masks, retimed=retimed,
        e2e=e2e, before=before, after=after,
        metric_name="test_fn" if test_fn else ("eval_fn" if eval_fn else None),
        baseline_eval=baseline, eval_after=built.metric, search_log=search_log, hardware=hardware,
        device=str(device), batch_size=x[0].shape[0], dense_bytes=model_bytes(dense),
        optimized_bytes=model_bytes(optimized), folded=folded, finetuned=built.finetuned,
        max_accuracy_drop=max_accuracy_drop, latency_budget=latency_budget,
        seconds=time.perf_counter() - t_start)
    return optimized, report
