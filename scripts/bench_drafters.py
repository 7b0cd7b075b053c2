#!/usr/bin/env python
"""The Week 5 Day 5 bake-off: every drafter of the course, one target, one cost model.

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1
    export PYTHONPATH=$PWD/src:$PWD/solutions
    nice -n 10 python -u scripts/bench_drafters.py --out src/specdec/kit/assets/bakeoff/bakeoff.json
    nice -n 10 python -u scripts/bench_drafters.py --quick --out /tmp/bakeoff.json   # pipeline check

Drafters: the draft model (Week 2), n-gram (Week 3 Day 3), token tree (Week 3 Day 4), Medusa
heads (Week 5 Day 2), EAGLE (Week 5 Day 3, when `specdec.kit.suite.find_eagle` finds it), layer skipping
(Week 5 Day 4). What it does, in order (the reference `specdec_ref`, embedded target, float32):

1. Tuning, on held-out prompts that are NOT timed later (`--tune` files after the timed ones):
   every chain drafter decodes at K = --max-k, greedy and at temperature 1, to measure its
   per-position acceptance curve a_j (Week 4 Day 2). Layer skipping picks its one skipped layer
   on the same tuning text (`choose_layers_to_skip`, Week 5 Day 4).
2. Costs, in target steps (a one-token step after a 64-token prefill, medians, the models
   interleaved): c_token per drafted token (draft model, layer-skip model), c_round per round
   (Medusa: the heads' call and its host sync; n-gram: its Python lookup), and v(K) = t(K+1)/t(1)
   of the target, at batch 1 and at batch 8.
3. The cost model: each drafter's best K from its own curve and costs (`bakeoff.best_lookahead`).
4. Timed decoding on `--prompts` held-out prompts (`bench_prompts`, the suite's), --max-tokens
   each, EOS ignored, after a warm-up, the modes interleaved per prompt and repeat in a rotated
   order: plain, plain again (the A/A control), every drafter at its best K, the fallback
   controller for every `Drafter`, and sampled (T = 1) runs. Every greedy output is compared
   with plain greedy, token for token (the script stops if one differs). Speed-ups are paired
   per prompt and judged against the A/A drift (`bakeoff.paired_comparison`).
5. Batch 8: batched plain vs batched speculation with the draft model (the only batched
   drafter path); for the others, the cost model's prediction from v(K) and c measured at
   batch 8 (marked "predicted").
6. Predictions for other devices from the measured curves and stated cost ratios (see
   DEVICE_ASSUMPTIONS): acceptance does not depend on the device, costs do.
Not a test: timings depend on the machine and its load; the JSON records BLAS and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from specdec.kit.cli.common import bench_prompts, heldout_prompts
from specdec.kit.features import MEDUSA_HEADS, feature_model, load_heads
from specdec.kit.impl import get_impl
from specdec.kit.loading import load_model
from specdec.kit.stats import SpecStats
from specdec.kit.suite import find_eagle
from specdec.kit.timing import blas_info

REF = get_impl("ref")
DEVICE_ASSUMPTIONS = {
    "apple_silicon": "memory-bound decoding (MLX on an M-series GPU, batch 1): a call costs the "
                     "bytes it reads, so c = draft bytes / target bytes, Medusa's c_round = (heads "
                     "+ LM head) bytes / target bytes, layer skip c = kept bytes / target bytes; "
                     "v(K) = 1 + 0.02 K (Week 1 Day 3: close to 1 for small K; the 0.02 is Week 2 "
                     "Day 5's illustration). n-gram: 0.",
    "gpu_launch_bound": "a tiny model on a datacenter GPU at batch 1 is bound by kernel launches, "
                        "not bytes: a call costs about its number of layers (+1 for embedding, "
                        "norm and head together), Medusa's heads one such unit, v(K) = 1.0, "
                        "n-gram 0 (its Python lookup overlaps nothing: kept at 0 for the bound).",
}


# Decoding modes: each a function (prompt list[int], max_tokens, stats, key) -> list[int] --------
def plain(target, temperature=0.0):
    def run(prompt, n, stats, key):
        return [int(t) for t in REF.generate.generate_tokens(target, mx.array(prompt), n, temperature=temperature,
                                                             key=key, eos_token_ids=[])]
    return run


def chain(make_drafter, target, k, temperature=0.0, controller=None):
    """Any `Drafter` through DrafterDecoder: speculative_generate, or fallback_generate."""
    def run(prompt, n, stats, key):
        decoder = REF.drafters.DrafterDecoder(make_drafter(), target, lookahead=k)
        if controller is not None:
            stream = REF.fallback.fallback_generate(decoder, controller(k), mx.array(prompt), n,
                                                    temperature=temperature, key=key, stats=stats)
        else:
            stream = REF.speculative.speculative_generate(decoder, mx.array(prompt), n, temperature=temperature,
                                                          key=key, stats=stats)
        return [int(t) for t, _ in stream]
    return run


def medusa(target, heads, k, temperature=0.0, widths=None):
    def run(prompt, n, stats, key):
        if temperature == 0:
            stream = REF.medusa.medusa_generate(target, heads, prompt, n, stats=stats, widths=widths or (1,) * k)
        else:
            stream = REF.medusa.medusa_sample_generate(target, heads, prompt, n, key, temperature=temperature,
                                                       num_drafts=k, stats=stats)
        return [int(t) for t, _ in stream]
    return run


def tree(draft, target, depth, branching=2):
    def run(prompt, n, stats, key):
        return [int(t) for t, _ in REF.tree.tree_speculative_generate(draft, target, mx.array(prompt), n, stats=stats,
                                                                      branching=branching, depth=depth)]
    return run


def controller_for(k):
    return REF.fallback.FallbackController(max_lookahead=k, initial_lookahead=k)


# Costs ------------------------------------------------------------------------------------------
def step_times(models: dict, prefill: list[int], batch: int, ks: list[int], steps: int, rounds: int = 3) -> dict:
    """Median seconds of calls after a prefill of `prefill` (batch rows): for every model one
    token per row; for the target also K + 1 tokens per row (v(K)). Interleaved over `rounds`."""
    times: dict = {}
    x = mx.array([prefill] * batch)
    for _ in range(rounds):
        for name, model in models.items():
            widths = [1] + ([k + 1 for k in ks] if name == "target" else [])
            for w in widths:
                cache = make_prompt_cache(model)
                mx.eval(model(x, cache=cache))
                tokens = mx.ones((batch, w), dtype=mx.int32)
                for _ in range(steps):
                    start = time.perf_counter()
                    mx.eval(model(tokens, cache=cache))
                    times.setdefault((name, w), []).append(time.perf_counter() - start)
                    for c in cache:
                        c.trim(w)  # the same context length for every timed call
    return {key: statistics.median(v) for key, v in times.items()}


def medusa_round_seconds(target, heads, prefill: list[int], batch: int, steps: int) -> float:
    """One round's drafting with the heads for `batch` rows at once: one heads call on the rows'
    last hidden states, the ranking sort and its host sync (what `medusa_tree` does per row)."""
    fm = feature_model(target)
    mx.eval(fm(mx.array([prefill] * batch)))
    hidden = fm.hidden[:, -1]  # [B, D]
    out = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        mx.argsort(-heads(hidden, fm.lm_head), axis=-1)[..., :2].tolist()  # [B, K, 2]
        out.append(time.perf_counter() - start)
    return statistics.median(out[2:])


def ngram_round_seconds(history: list[int], k: int, steps: int) -> float:
    drafter = REF.drafters.NgramDrafter(vocab_size=4096)
    out = []
    for _ in range(steps + 2):
        drafter.reset()
        start = time.perf_counter()
        mx.eval(drafter.draft(mx.array(history), k)[0])
        out.append(time.perf_counter() - start)
    return statistics.median(out[2:])


def drafter_step_seconds(drafter, prefill: list[int], steps: int) -> float:
    """Median seconds of a `Drafter`'s one-token draft call after a prefill (context kept fixed)."""
    drafter.reset()
    mx.eval(drafter.draft(mx.array(prefill), 1)[0])
    out = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        mx.eval(drafter.draft(mx.array([1]), 1)[0])
        out.append(time.perf_counter() - start)
        for c in drafter.cache:
            c.trim(1)
    drafter.reset()
    return statistics.median(out[2:])


def nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


# Main -------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=5, help="timed held-out prompts")
    p.add_argument("--tune", type=int, default=4, help="held-out prompts for curves and layer choice (not timed)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the prompts")
    p.add_argument("--max-k", type=int, default=6, help="K of the tuning runs (the curves' length)")
    p.add_argument("--steps", type=int, default=8, help="timed calls per cost measurement and round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 prompts x 16 tokens, 1 repeat: pipeline check, not numbers")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if a.quick:
        a.prompts, a.tune, a.max_tokens, a.repeats, a.max_k, a.steps = 2, 1, 16, 1, 3, 2
    started = time.time()
    log = lambda msg: print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)  # noqa: E731
    quick_note = "--quick: a pipeline check (2 prompts x 16 tokens), not for conclusions"
    if a.quick:
        log(quick_note)
    target, tok = load_model("tiny-code", dtype=mx.float32)
    draft, _ = load_model("tiny-code-draft", dtype=mx.float32)
    heads = load_heads(MEDUSA_HEADS, REF.medusa.MedusaHeads, target)
    eagle, eagle_note = find_eagle(target)  # None until Week 5 Day 3 lands
    log(f"BLAS {blas_info()['blas']}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
        f"load {os.getloadavg()[0]:.1f}; EAGLE: {'yes' if eagle else eagle_note}")
    timed = bench_prompts("tiny-code", a.prompts)
    timed_names = {n for n, _ in timed}
    tune = [(n, t) for n, t in heldout_prompts("tiny-code", a.prompts + a.tune + 8, lines=40)
            if n not in timed_names][: a.tune]
    prompts = [tok.encode(t)[:256] for _, t in timed]
    tune_prompts = [tok.encode(t)[:256] for _, t in tune]
    report = {"timed_prompts": [n for n, _ in timed], "tuning_prompts": [n for n, _ in tune],
              "settings": vars(a) | {"out": str(a.out)}, "environment": blas_info() | {
                  "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                  "load_average_start": os.getloadavg()[0], "cpu_count": os.cpu_count()},
              "device_assumptions": DEVICE_ASSUMPTIONS, "eagle": eagle_note or "included",
              "note": quick_note if a.quick else "timings from a shared machine: see load_average_*"}

    # 1. Tuning: the layer to skip, then every chain drafter's curve at K = max_k.
    select = mx.array(sum(tune_prompts, [])[:1024], dtype=mx.int32)
    (skip, skip_alpha), = REF.layerskip.choose_layers_to_skip(target, select, 1)
    log(f"layer skip: {list(skip)} (greedy agreement {skip_alpha:.3f} on the tuning text)")
    drafters = {  # name -> a fresh Drafter (chain drafters behind DrafterDecoder)
        "draft model": lambda: REF.drafters.ModelDrafter(draft),
        "n-gram": lambda: REF.drafters.NgramDrafter(),
        f"layer skip {list(skip)}": lambda: REF.layerskip.LayerSkipDrafter(target, skip),
    }
    if eagle is not None:
        drafters["EAGLE"] = lambda: eagle  # DrafterDecoder resets it for every prompt
    curves: dict = {}
    for temperature in (0.0, 1.0):
        for name in [*drafters, "medusa"]:
            stats = SpecStats()
            for i, prompt in enumerate(tune_prompts):
                key = mx.random.key(a.seed + i) if temperature else None
                run = (medusa(target, heads, min(a.max_k, heads.num_heads), temperature) if name == "medusa"
                       else chain(drafters[name], target, a.max_k, temperature))
                run(prompt, a.max_tokens, stats, key)
            curve = REF.metrics.acceptance_per_position(stats)
            curves.setdefault(name, {})[f"T={temperature:g}"] = {
                "curve": curve, "rounds": stats.rounds, "alpha_estimate": stats.alpha_estimate,
                "mean_accepted_length": stats.mean_accepted_length}
            log(f"curve {name:20s} T={temperature:g}: " + " ".join(f"{x:.2f}" for x in curve))
    report["curves"] = curves

    # 2. Costs, at batch 1 and batch B.
    ks = list(range(1, a.max_k + 1))
    models = {"target": target, "draft model": draft, "layer skip": REF.layerskip.LayerSkipModel(target, skip)}
    prefill = prompts[0][:64]
    costs = {}
    for batch in (1, a.batch):
        t = step_times(models, prefill, batch, ks, a.steps)
        step = t["target", 1]
        medusa_s = medusa_round_seconds(target, heads, prefill, batch, a.steps)
        ngram_s = ngram_round_seconds(prefill, a.max_k, a.steps) * batch
        costs[f"batch {batch}"] = {
            "target_step_ms": 1e3 * step, "v": {k: t["target", k + 1] / step for k in ks},
            "c_token": {"draft model": t["draft model", 1] / step, f"layer skip {list(skip)}": t["layer skip", 1] / step,
                        "n-gram": 0.0, "medusa": 0.0, "EAGLE": None},
            "c_round": {"draft model": 0.0, f"layer skip {list(skip)}": 0.0, "n-gram": ngram_s / step,
                        "medusa": medusa_s / step, "EAGLE": None}}
        log(f"costs batch {batch}: target step {1e3 * step:.1f} ms, " + json.dumps(
            {k: ({n: round(x, 3) for n, x in v.items() if x is not None} if isinstance(v, dict) else round(v, 2))
             for k, v in costs[f"batch {batch}"].items()}))
    if eagle is not None:  # no model to time alone: time its one-token draft call (batch 1 only)
        costs["batch 1"]["c_token"]["EAGLE"] = drafter_step_seconds(eagle, prefill, a.steps) / costs[
            "batch 1"]["target_step_ms"] * 1e3
        costs["batch 1"]["c_round"]["EAGLE"] = 0.0
    report["costs"] = costs

    # 3. The cost model picks each drafter's K (greedy curves, batch-1 costs).
    c1 = costs["batch 1"]
    best = {}
    for name in [*drafters, "medusa"]:
        k, s = REF.bakeoff.best_lookahead(curves[name]["T=0"]["curve"], c1["c_token"][name], c1["v"],
                                          c_round=c1["c_round"][name])
        best[name] = {"K": max(k, 1), "predicted_speedup": s, "cost_model_says_plain": k == 0}
    best["tree"] = {"K": best["draft model"]["K"]}
    report["best_k"] = best
    log("best K by the cost model: " + json.dumps({n: (b["K"], round(b.get("predicted_speedup", 0), 2)) for n, b in best.items()}))

    # 4. Timed single-stream decoding, interleaved.
    modes = {"plain": (plain(target), 0.0), "plain (A/A)": (plain(target), 0.0)}
    for name, make in drafters.items():
        modes[f"{name} K={best[name]['K']}"] = (chain(make, target, best[name]["K"]), 0.0)
    mk = best["medusa"]["K"]
    modes[f"medusa chain K={mk}"] = (medusa(target, heads, mk), 0.0)
    modes["medusa tree (2,2,1)"] = (medusa(target, heads, 3, widths=(2, 2, 1)), 0.0)
    modes[f"tree (2 x 2, depth {best['tree']['K']})"] = (tree(draft, target, best["tree"]["K"]), 0.0)
    for name, make in drafters.items():
        modes[f"{name} + fallback (K<={best[name]['K']})"] = (chain(make, target, best[name]["K"],
                                                                     controller=controller_for), 0.0)
    modes["plain T=1"] = (plain(target, 1.0), 1.0)
    modes["plain T=1 (A/A)"] = (plain(target, 1.0), 1.0)
    for name, make in drafters.items():
        modes[f"{name} K={best[name]['K']} T=1"] = (chain(make, target, best[name]["K"], 1.0), 1.0)
    modes[f"medusa chain K={mk} T=1"] = (medusa(target, heads, mk, 1.0), 1.0)

    names = list(modes)
    for name in names:  # warm-up
        run, temperature = modes[name]
        run(prompts[0], a.max_tokens, SpecStats(), mx.random.key(a.seed) if temperature else None)
    log(f"warm-up done; timing {len(names)} modes x {len(prompts)} prompts x {a.repeats} repeats")
    secs = {n: [[None] * len(prompts) for _ in range(a.repeats)] for n in names}
    stats = {n: SpecStats() for n in names}
    outputs = {n: [None] * len(prompts) for n in names}
    for r in range(a.repeats):
        for i, prompt in enumerate(prompts):
            shift = (r * len(prompts) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                run, temperature = modes[name]
                key = mx.random.key(a.seed + 1000 * r + i) if temperature else None
                start = time.perf_counter()
                out = run(prompt, a.max_tokens, stats[name] if r == 0 else SpecStats(), key)
                secs[name][r][i] = time.perf_counter() - start
                if len(out) != a.max_tokens:
                    raise SystemExit(f"{name}: {len(out)} tokens, not {a.max_tokens}")
                outputs[name][i] = out
            for name in names:
                if modes[name][1] == 0 and outputs[name][i] != outputs["plain"][i]:
                    raise SystemExit(f"prompt {i}: {name} differs from plain greedy")
        log(f"repeat {r + 1}/{a.repeats} done (load {os.getloadavg()[0]:.1f})")

    # Per prompt: median seconds over repeats -> tokens/s. Pair against plain at the same T.
    tps = {n: [a.max_tokens / statistics.median(secs[n][r][i] for r in range(a.repeats))
               for i in range(len(prompts))] for n in names}
    rows = {}
    for name in names:
        base = "plain T=1" if modes[name][1] else "plain"
        verdict = REF.bakeoff.paired_comparison(tps[name], tps[base], tps[base + " (A/A)"] if modes[name][1]
                                                else tps["plain (A/A)"])
        st = stats[name]
        rows[name] = {"temperature": modes[name][1], "tokens_per_s": statistics.median(tps[name]),
                      "tokens_per_s_min": min(tps[name]), "tokens_per_s_max": max(tps[name]),
                      "tokens_per_s_per_prompt": tps[name], **verdict,
                      "identical_to_plain": all(outputs[name][i] == outputs["plain"][i] for i in range(len(prompts)))
                      if modes[name][1] == 0 else None,
                      "rounds": st.rounds, "tokens_per_call": st.tokens_per_round if st.rounds else 1.0,
                      "mean_accepted_length": st.mean_accepted_length if st.rounds else None,
                      "alpha_estimate": st.alpha_estimate if st.drafted else None,
                      "plain_rounds": st.fallback_rounds,
                      "curve": REF.metrics.acceptance_per_position(st) if st.drafted else []}
        log(f"{name:34s} {rows[name]['tokens_per_s']:6.1f} tok/s [{rows[name]['tokens_per_s_min']:.1f}, "
            f"{rows[name]['tokens_per_s_max']:.1f}] x{verdict['speedup']:.2f} ({verdict['verdict']}, A/A noise "
            f"{verdict['noise']:.2f}) tokens/call {rows[name]['tokens_per_call']:.2f}")
    report["single_stream"] = rows

    # Predicted vs measured at each drafter's K (greedy).
    predictions = {}
    for name in [*drafters, "medusa"]:
        if name not in best or "predicted_speedup" not in best[name]:
            continue
        k = best[name]["K"]
        row = rows[f"medusa chain K={k}" if name == "medusa" else f"{name} K={k}"]
        measured_curve = row["curve"]
        pred_run = (REF.bakeoff.predicted_speedup(measured_curve, k, c1["c_token"][name], c1["v"][k], c1["c_round"][name])
                    if len(measured_curve) >= k else None)
        predictions[name] = {"K": k, "predicted_from_tuning": best[name]["predicted_speedup"],
                             "predicted_from_this_run_curve": pred_run, "measured": row["speedup"],
                             "break_even_c_token": REF.bakeoff.break_even_draft_cost(
                                 curves[name]["T=0"]["curve"], k, c1["v"][k], c1["c_round"][name])}
    report["predictions"] = predictions

    # 5. Batch B: the draft model's batched path, measured; the others predicted.
    B = a.batch
    groups = [[prompts[(g + j) % len(prompts)] for j in range(B)] for g in range(min(len(prompts), 3))]
    kb = best["draft model"]["K"]
    batch_modes = {
        "plain": lambda rows_: REF.batched.batched_plain_decode(rows_, target, a.max_tokens, eos_token_ids=[]),
        f"draft model K={kb}": lambda rows_: REF.batched.batched_speculative_decode(
            rows_, draft, target, a.max_tokens, lookahead=kb, eos_token_ids=[]),
    }
    for fn in batch_modes.values():
        fn(groups[0])
    bsecs, batch_outputs = {n: [] for n in batch_modes}, {}
    for g, rows_ in enumerate(groups):
        for name in (list(batch_modes) if g % 2 == 0 else list(reversed(batch_modes))):
            start = time.perf_counter()
            out = batch_modes[name](rows_)
            bsecs[name].append(time.perf_counter() - start)
            assert all(len(o) == a.max_tokens for o in out)
            batch_outputs.setdefault(name, []).append(out)
    cb = costs[f"batch {B}"]
    batch_report = {"batch_size": B, "groups": len(groups), "measured": {
        n: {"tokens_per_s": B * a.max_tokens / statistics.median(v),
            "per_group_tokens_per_s": [B * a.max_tokens / s for s in v]} for n, v in bsecs.items()}}
    batch_report["identical_to_plain"] = batch_outputs["plain"] == batch_outputs[f"draft model K={kb}"]
    batch_report["measured"][f"draft model K={kb}"]["speedup"] = statistics.median(
        [p / s for p, s in zip(bsecs["plain"], bsecs[f"draft model K={kb}"])])
    batch_report["predicted"] = {}
    for name in [*drafters, "medusa"]:
        if cb["c_token"].get(name) is None:
            continue
        k, s = REF.bakeoff.best_lookahead(curves[name]["T=0"]["curve"], cb["c_token"][name], cb["v"],
                                          c_round=cb["c_round"][name])
        batch_report["predicted"][name] = {"best_K": k, "speedup": s, "at_single_stream_K": REF.bakeoff.predicted_speedup(
            curves[name]["T=0"]["curve"], best[name]["K"], cb["c_token"][name], cb["v"][best[name]["K"]], cb["c_round"][name])}
    report["batch"] = batch_report
    log(f"batch {B}: " + json.dumps(batch_report["measured"], default=lambda x: round(x, 2))[:400])
    log(f"batch {B} predicted: " + json.dumps({n: (v['best_K'], round(v['speedup'], 2))
                                                for n, v in batch_report['predicted'].items()}))

    # 6. Other devices: the same curves, stated cost ratios.
    layers = target.model.layers if hasattr(target, "model") else target.layers
    n_layers, skipped = len(layers), len(skip)
    total = nbytes(target)
    layer_bytes = sum(nbytes(layers[j]) for j in skip)
    lm_head = nbytes(target.model.embed_tokens) if hasattr(target, "model") else 0
    devices = {
        "apple_silicon": {"v": {k: 1 + 0.02 * k for k in ks}, "c_token": {
            "draft model": nbytes(draft) / total, f"layer skip {list(skip)}": (total - layer_bytes) / total, "n-gram": 0.0,
            "medusa": 0.0}, "c_round": {"draft model": 0.0, f"layer skip {list(skip)}": 0.0, "n-gram": 0.0,
                                        "medusa": (nbytes(heads) + lm_head) / total}},
        "gpu_launch_bound": {"v": {k: 1.0 for k in ks}, "c_token": {
            "draft model": (len(draft.layers) + 1) / (n_layers + 1),
            f"layer skip {list(skip)}": (n_layers - skipped + 1) / (n_layers + 1), "n-gram": 0.0, "medusa": 0.0},
            "c_round": {"draft model": 0.0, f"layer skip {list(skip)}": 0.0, "n-gram": 0.0, "medusa": 1 / (n_layers + 1)}},
    }
    for device, d in devices.items():
        d["best"] = {}
        for name in d["c_token"]:
            k, s = REF.bakeoff.best_lookahead(curves[name]["T=0"]["curve"], d["c_token"][name], d["v"],
                                              c_round=d["c_round"][name])
            d["best"][name] = {"K": k, "speedup": s}
        log(f"{device}: " + json.dumps({n: (b["K"], round(b["speedup"], 2)) for n, b in d["best"].items()}))
    report["devices"] = devices

    # The bars, stated against this run.
    learned = {n: r for n, r in rows.items() if r["temperature"] == 0 and "fallback" not in n
               and any(n.startswith(x) for x in ("medusa", "layer skip", "EAGLE"))}
    model_row = rows[f"draft model K={best['draft model']['K']}"]
    top = max(learned, key=lambda n: learned[n]["tokens_per_s"])
    report["bars"] = {
        "best_learned_or_self": top, "vs_plain": learned[top]["speedup"],
        "vs_draft_model": learned[top]["tokens_per_s"] / model_row["tokens_per_s"],
        "accepted_per_round": learned[top]["mean_accepted_length"],
        "draft_model_accepted_per_round": model_row["mean_accepted_length"],
        "greedy_identical_everywhere": all(r["identical_to_plain"] for r in rows.values() if r["temperature"] == 0)}
    report["environment"]["load_average_end"] = os.getloadavg()[0]
    report["seconds"] = time.time() - started
    log("bars: " + json.dumps(report["bars"], default=str))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        log(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
