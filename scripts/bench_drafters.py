#!/usr/bin/env python
"""The Week 5 Day 5 bake-off: every drafter of the course, one target, one cost model.

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1
    export PYTHONPATH=$PWD/src:$PWD/solutions
    nice -n 10 python -u scripts/bench_drafters.py --out src/specdec/kit/assets/bakeoff/bakeoff.json
    nice -n 10 python -u scripts/bench_drafters.py --quick --out /tmp/bakeoff.json   # pipeline check
    # only some rows, added to the shipped report (same prompts and lengths as it):
    nice -n 10 python -u scripts/bench_drafters.py --prompts 5 --max-tokens 64 --repeats 3 \
        --modes plain,aa,model,eagle,eagle+controller,medusa+controller,sampled --out /tmp/eagle.json \
        --merge-into src/specdec/kit/assets/bakeoff/bakeoff.json

Drafters: the draft model (Week 2), n-gram (Week 3 Day 3), token tree (Week 3 Day 4), Medusa
heads (Week 5 Day 2), EAGLE (Week 5 Day 3, when the course has it), layer skipping (Week 5 Day 4).
Every chain drafter's decoder comes from `specdec.kit.drafter_registry.build_decoder` (the one
place that builds drafters; EAGLE is there exactly when the registry can build it); Medusa's
own Day 2 loop (its chain and its tree) stays beside the registry's Medusa `Drafter`, which the
fallback controller drives. What it does, in order (the reference `specdec_ref`, embedded
target, float32):

1. Tuning, on held-out prompts that are NOT timed later (`--tune` files after the timed ones):
   every chain drafter decodes at K = --max-k, greedy and at temperature 1, to measure its
   per-position acceptance curve a_j (Week 4 Day 2). Layer skipping picks its one skipped layer
   on the same tuning text (`choose_skip(..., "auto:1", ...)`: Week 5 Day 4's choice).
2. Costs, in target steps (a one-token step after a 64-token prefill, medians, the models
   interleaved): c_token per drafted token (draft model, layer-skip model, EAGLE's layer and
   LM head), c_round per round
   (Medusa: the heads' call and its host sync; n-gram: its Python lookup), and v(K) = t(K+1)/t(1)
   of the target, at batch 1 and at batch 8.
3. The cost model: each drafter's best K from its own curve and costs (`bakeoff.best_lookahead`).
4. Timed decoding on `--prompts` held-out prompts (`bench_prompts`, the suite's), --max-tokens
   each, EOS ignored, after a warm-up, the modes interleaved per prompt and repeat in a rotated
   order: plain, plain again (the A/A control), every drafter at its best K, the fallback
   controller for every `Drafter` (Medusa's as the registry's MedusaDrafter), and sampled
   (T = 1) runs; `--modes` picks a subset (plain and the A/A control always run). Every
   greedy output is compared with plain greedy, token for token (the script stops if one differs). Speed-ups are paired
   per prompt and judged against the A/A drift (`bakeoff.paired_comparison`).
5. Batch 8: batched plain vs Week 3 Day 2's batched loop with the draft model, and for the
   others the cost model's prediction from v(K) and c measured at batch 8 (marked
   "predicted"). Every batched drafter measured through the scheduler (draft model, layer
   skipping, Medusa heads, EAGLE): `scripts/bench_batch_drafters.py`.
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
from specdec.kit.drafter_registry import DrafterError, DrafterOptions, build_decoder, choose_skip, load_medusa_heads
from specdec.kit.features import feature_model
from specdec.kit.impl import get_impl
from specdec.kit.loading import load_model
from specdec.kit.stats import SpecStats
from specdec.kit.timing import blas_info

REF = get_impl("ref")
DEVICE_ASSUMPTIONS = {
    "apple_silicon": "memory-bound decoding (MLX on an M-series GPU, batch 1): a call costs the "
                     "bytes it reads, so c = draft bytes / target bytes, Medusa's c_round = (heads "
                     "+ LM head) bytes / target bytes, layer skip c = kept bytes / target bytes; "
                     "v(K) = 1 + 0.02 K (Week 1 Day 3: close to 1 for small K; the 0.02 is Week 2 "
                     "Day 5's illustration). n-gram: 0. EAGLE c = (its layer + LM head) bytes / "
                     "target bytes.",
    "gpu_launch_bound": "a tiny model on a datacenter GPU at batch 1 is bound by kernel launches, "
                        "not bytes: a call costs about its number of layers (+1 for embedding, "
                        "norm and head together), Medusa's heads one such unit, v(K) = 1.0, "
                        "n-gram 0 (its Python lookup overlaps nothing: kept at 0 for the bound), "
                        "EAGLE two units (its layer; the LM head).",
}


# Decoding modes: each a function (prompt list[int], max_tokens, stats, key) -> list[int] --------
def plain(target, temperature=0.0):
    def run(prompt, n, stats, key):
        return [int(t) for t in REF.generate.generate_tokens(target, mx.array(prompt), n, temperature=temperature,
                                                             key=key, eos_token_ids=[])]
    return run


def chain(decoder, temperature=0.0, controller=None):
    """A decoder from `drafter_registry.build_decoder` (built once: every loop resets it per
    prompt) through speculative_generate at its fixed K, or fallback_generate with `controller`."""
    def run(prompt, n, stats, key):
        if controller is not None:
            stream = REF.fallback.fallback_generate(decoder, controller(decoder.lookahead), mx.array(prompt), n,
                                                    temperature=temperature, key=key, stats=stats)
        else:
            stream = REF.speculative.speculative_generate(decoder, mx.array(prompt), n, temperature=temperature,
                                                          key=key, stats=stats)
        return [int(t) for t, _ in stream]
    return run


def medusa(target, heads, k, temperature=0.0, widths=None):
    """Week 5 Day 2's own loop (chain or tree of the heads' top tokens): the registry's Medusa
    drafter is the chain behind the `Drafter` interface, without the tree."""
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


def eagle_step_seconds(drafter, prefill: list[int], steps: int) -> float:
    """Median seconds of one EAGLE draft step after `prefill` pairs in its cache: one call of
    its layer on a (feature, token) pair, the target's LM head and the argmax (what each draft
    after the first costs in `eagle_draft`; the re-feed of a round rides on its first call)."""
    layer, fm = drafter.layer, drafter.target_model
    embed = fm.model.model.embed_tokens
    drafter.reset()
    cache = drafter.cache[0]
    D = layer.hidden_size
    mx.eval(layer(mx.zeros((1, len(prefill), D)), embed(mx.array([prefill])), cache=cache))
    h, token = mx.zeros((1, 1, D)), mx.array([[1]])
    out = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        mx.eval(mx.argmax(fm.lm_head(layer(h, embed(token), cache=cache)[0, -1])))
        out.append(time.perf_counter() - start)
        cache.trim(1)
    drafter.reset()
    return statistics.median(out[2:])


def nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


# What to run -------------------------------------------------------------------------------------
# --modes names: plain and aa (always timed: every speed-up is paired against plain and judged
# against the A/A drift), a registry drafter (its row at the cost model's K; medusa: Day 2's loop,
# chain and tree), NAME+controller (that drafter through Week 4's fallback controller), tree,
# sampled (the T = 1 rows of the chosen drafters) and batch (section 5, the draft model's path).
CHAIN = {"model": "draft model", "ngram": "n-gram", "layerskip": "layer skip", "eagle": "EAGLE"}
MODES = ["plain", "aa", "model", "ngram", "tree", "medusa", "layerskip", "eagle", "model+controller",
         "ngram+controller", "medusa+controller", "layerskip+controller", "eagle+controller", "sampled", "batch"]


def parse_modes(text: str) -> set:
    modes = {m.strip() for m in text.split(",") if m.strip()}
    unknown = sorted(modes - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)}; use a comma list of {','.join(MODES)}")
    return modes | {"plain", "aa"}


def merge_into(path: Path, report: dict) -> tuple[dict, list[str]]:
    """The report at `path` (the shipped bakeoff.json) with what it lacks from this run: the
    rows it has no row of that name for (EAGLE's, Medusa through the controller), and the
    curves, costs, K, predictions and device predictions of the drafters it has no curve of.
    What it already has stays; this whole run (its plain, A/A and draft-model rows too, to read
    the new rows against) goes to `merged_runs`. Returns (report, the rows added). Refused unless
    both timed the same prompts and lengths: speed-ups are paired per prompt."""
    base = json.loads(path.read_text())
    if (base["timed_prompts"], base["settings"]["max_tokens"]) != (report["timed_prompts"],
                                                                   report["settings"]["max_tokens"]):
        raise SystemExit(f"--merge-into {path}: it timed {base['timed_prompts']} x {base['settings']['max_tokens']} "
                         f"tokens, this run {report['timed_prompts']} x {report['settings']['max_tokens']}: "
                         "rerun with the same --prompts and --max-tokens, or write --out to a new file")
    run = len(base.setdefault("merged_runs", [])) + 1
    added = [n for n in report["single_stream"] if n not in base["single_stream"]]
    new = [n for n in report["curves"] if n not in base["curves"]]
    base["merged_runs"].append({"run": run, "rows_added": added, "drafters_added": new, "eagle": report["eagle"],
                                "settings": report["settings"], "environment": report["environment"],
                                "single_stream": report["single_stream"], "seconds": report["seconds"]})
    for name in added:
        base["single_stream"][name] = report["single_stream"][name] | {"merged_run": run}
    for section in ("curves", "best_k", "predictions"):
        base[section].update({n: v for n, v in report[section].items() if n in new})
    for batch, costs in report["costs"].items():
        for kind in ("c_token", "c_round"):
            if batch in base["costs"]:
                base["costs"][batch][kind].update({n: costs[kind][n] for n in new if n in costs[kind]})
    for device, d in report["devices"].items():
        for part in ("c_token", "c_round", "best"):
            base["devices"][device][part].update({n: d[part][n] for n in new if n in d[part]})
    if "EAGLE" in new:
        base["eagle"] = report["eagle"]
    return base, added


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
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma list of what to time (default all): {','.join(MODES)}; plain and aa always")
    p.add_argument("--quick", action="store_true", help="2 prompts x 16 tokens, 1 repeat: pipeline check, not numbers")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--merge-into", type=Path, default=None,
                   help="also add to that report (the shipped bakeoff.json) the rows and drafters it lacks "
                        "(EAGLE, Medusa + fallback); it must have timed the same prompts and --max-tokens")
    a = p.parse_args()
    modes_wanted = parse_modes(a.modes)
    if a.quick:
        a.prompts, a.tune, a.max_tokens, a.repeats, a.max_k, a.steps = 2, 1, 16, 1, 3, 2
    started = time.time()
    log = lambda msg: print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)  # noqa: E731
    quick_note = "--quick: a pipeline check (2 prompts x 16 tokens), not for conclusions"
    if a.quick:
        log(quick_note)
    target, tok = load_model("tiny-code", dtype=mx.float32)
    draft, _ = load_model("tiny-code-draft", dtype=mx.float32)
    heads = load_medusa_heads(REF, target)
    want = lambda name: name in modes_wanted or f"{name}+controller" in modes_wanted  # noqa: E731
    eagle_note = None
    if want("eagle"):
        try:  # the registry's feature test: the kit's load_eagle and the course's EagleDrafter
            build_decoder(REF, "eagle", target, lookahead=1)
        except DrafterError as e:
            eagle_note = str(e)
            modes_wanted -= {"eagle", "eagle+controller"}
    else:
        eagle_note = "not asked for (--modes)"
    log(f"BLAS {blas_info()['blas']}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
        f"load {os.getloadavg()[0]:.1f}; modes {','.join(m for m in MODES if m in modes_wanted)}; "
        f"EAGLE: {eagle_note or 'yes'}")
    timed = bench_prompts("tiny-code", a.prompts)
    timed_names = {n for n, _ in timed}
    tune = [(n, t) for n, t in heldout_prompts("tiny-code", a.prompts + a.tune + 8, lines=40)
            if n not in timed_names][: a.tune]
    prompts = [tok.encode(t)[:256] for _, t in timed]
    tune_prompts = [tok.encode(t)[:256] for _, t in tune]
    report = {"timed_prompts": [n for n, _ in timed], "tuning_prompts": [n for n, _ in tune],
              "settings": vars(a) | {"out": str(a.out), "merge_into": str(a.merge_into)}, "environment": blas_info() | {
                  "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                  "load_average_start": os.getloadavg()[0], "cpu_count": os.cpu_count()},
              "device_assumptions": DEVICE_ASSUMPTIONS, "eagle": eagle_note or "included",
              "note": quick_note if a.quick else "timings from a shared machine: see load_average_*"}

    # 1. Tuning: the layer to skip, then every chain drafter's curve at K = max_k. Every decoder
    # comes from the drafter registry (the draft model's too), built once per K.
    select = sum(tune_prompts, [])[:1024]
    skip = choose_skip(REF, target, "auto:1", select)
    log(f"layer skip: {list(skip)} (the one layer choose_layers_to_skip picks on the tuning text)")
    options = DrafterOptions(heads=heads, skip_layers=skip)
    labels = {"model": "draft model", "ngram": "n-gram", "layerskip": f"layer skip {list(skip)}",
              "medusa": "medusa", "eagle": "EAGLE"}
    decoders: dict = {}

    def decoder(name: str, k: int, role: str = "fixed"):
        """The registry's decoder for drafter `name` at K = k (one per name, K and role: the
        controller's rows get their own)."""
        if (name, k, role) not in decoders:
            decoders[name, k, role] = build_decoder(REF, name, target, draft, lookahead=k, options=options)
        return decoders[name, k, role]

    need_model = want("model") or "tree" in modes_wanted or "batch" in modes_wanted
    chain_names = [n for n in CHAIN if want(n) or (n == "model" and need_model)]  # chain drafters with a curve
    curve_names = chain_names + (["medusa"] if want("medusa") else [])
    drafters = {labels[n]: n for n in chain_names}  # label -> registry name
    curves: dict = {}
    for temperature in (0.0, 1.0):
        for name in curve_names:
            stats = SpecStats()
            for i, prompt in enumerate(tune_prompts):
                key = mx.random.key(a.seed + i) if temperature else None
                run = (medusa(target, heads, min(a.max_k, heads.num_heads), temperature) if name == "medusa"
                       else chain(decoder(name, a.max_k), temperature))
                run(prompt, a.max_tokens, stats, key)
            curve = REF.metrics.acceptance_per_position(stats)
            curves.setdefault(labels[name], {})[f"T={temperature:g}"] = {
                "curve": curve, "rounds": stats.rounds, "alpha_estimate": stats.alpha_estimate,
                "mean_accepted_length": stats.mean_accepted_length}
            log(f"curve {labels[name]:20s} T={temperature:g}: " + " ".join(f"{x:.2f}" for x in curve))
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
    if "EAGLE" in drafters:  # no model to time alone: time one draft step of its layer (batch 1 only)
        costs["batch 1"]["c_token"]["EAGLE"] = eagle_step_seconds(decoder("eagle", 1).drafter, prefill, a.steps) / (
            costs["batch 1"]["target_step_ms"] / 1e3)
        costs["batch 1"]["c_round"]["EAGLE"] = 0.0
        log(f"costs batch 1: EAGLE c_token {costs['batch 1']['c_token']['EAGLE']:.3f} (its layer, the LM head)")
    report["costs"] = costs

    # 3. The cost model picks each drafter's K (greedy curves, batch-1 costs).
    c1 = costs["batch 1"]
    best = {}
    for name in [labels[n] for n in curve_names]:
        k, s = REF.bakeoff.best_lookahead(curves[name]["T=0"]["curve"], c1["c_token"][name], c1["v"],
                                          c_round=c1["c_round"][name])
        best[name] = {"K": max(k, 1), "predicted_speedup": s, "cost_model_says_plain": k == 0}
    if need_model:
        best["tree"] = {"K": best["draft model"]["K"]}
    report["best_k"] = best
    log("best K by the cost model: " + json.dumps({n: (b["K"], round(b.get("predicted_speedup", 0), 2)) for n, b in best.items()}))

    # 4. Timed single-stream decoding, interleaved: the --modes asked for.
    sampled = "sampled" in modes_wanted
    modes = {"plain": (plain(target), 0.0), "plain (A/A)": (plain(target), 0.0)}
    for label, name in drafters.items():
        if name in modes_wanted:
            modes[f"{label} K={best[label]['K']}"] = (chain(decoder(name, best[label]["K"])), 0.0)
    if "medusa" in modes_wanted:
        mk = best["medusa"]["K"]
        modes[f"medusa chain K={mk}"] = (medusa(target, heads, mk), 0.0)
        modes["medusa tree (2,2,1)"] = (medusa(target, heads, 3, widths=(2, 2, 1)), 0.0)
    if "tree" in modes_wanted:
        modes[f"tree (2 x 2, depth {best['tree']['K']})"] = (tree(draft, target, best["tree"]["K"]), 0.0)
    for label, name in [*drafters.items(), ("medusa", "medusa")]:  # Medusa here: MedusaDrafter, the registry's
        if f"{name}+controller" in modes_wanted:
            k = best[label]["K"]
            modes[f"{label} + fallback (K<={k})"] = (chain(decoder(name, k, "controller"),
                                                                      controller=controller_for), 0.0)
    if sampled:
        modes["plain T=1"] = (plain(target, 1.0), 1.0)
        modes["plain T=1 (A/A)"] = (plain(target, 1.0), 1.0)
        for label, name in drafters.items():
            if name in modes_wanted:
                modes[f"{label} K={best[label]['K']} T=1"] = (chain(decoder(name, best[label]["K"]), 1.0), 1.0)
        if "medusa" in modes_wanted:
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
        row = rows.get(f"medusa chain K={k}" if name == "medusa" else f"{name} K={k}")
        if row is None:  # tuned (for the tree or batch), not timed at fixed K: not asked for
            continue
        measured_curve = row["curve"]
        pred_run = (REF.bakeoff.predicted_speedup(measured_curve, k, c1["c_token"][name], c1["v"][k], c1["c_round"][name])
                    if len(measured_curve) >= k else None)
        predictions[name] = {"K": k, "predicted_from_tuning": best[name]["predicted_speedup"],
                             "predicted_from_this_run_curve": pred_run, "measured": row["speedup"],
                             "break_even_c_token": REF.bakeoff.break_even_draft_cost(
                                 curves[name]["T=0"]["curve"], k, c1["v"][k], c1["c_round"][name])}
    report["predictions"] = predictions

    # 5. Batch B: the draft model's batched path, measured; the others predicted.
    if "batch" in modes_wanted:
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
    if "EAGLE" in drafters:  # one layer and the target's LM head per draft
        layer = decoder("eagle", 1).drafter.layer
        for device, c in (("apple_silicon", (nbytes(layer) + lm_head) / total), ("gpu_launch_bound", 2 / (n_layers + 1))):
            devices[device]["c_token"]["EAGLE"], devices[device]["c_round"]["EAGLE"] = c, 0.0
    for device, d in devices.items():
        d["best"] = {}
        for name in [n for n in d["c_token"] if n in curves]:
            k, s = REF.bakeoff.best_lookahead(curves[name]["T=0"]["curve"], d["c_token"][name], d["v"],
                                              c_round=d["c_round"][name])
            d["best"][name] = {"K": k, "speedup": s}
        log(f"{device}: " + json.dumps({n: (b["K"], round(b["speedup"], 2)) for n, b in d["best"].items()}))
    report["devices"] = devices

    # The bars, stated against this run.
    learned = {n: r for n, r in rows.items() if r["temperature"] == 0 and "fallback" not in n
               and any(n.startswith(x) for x in ("medusa", "layer skip", "EAGLE"))}
    model_row = rows.get(f"draft model K={best['draft model']['K']}") if need_model else None
    top = max(learned, key=lambda n: learned[n]["tokens_per_s"]) if learned else None
    report["bars"] = {
        "best_learned_or_self": top, "vs_plain": learned[top]["speedup"] if top else None,
        "vs_draft_model": learned[top]["tokens_per_s"] / model_row["tokens_per_s"] if top and model_row else None,
        "accepted_per_round": learned[top]["mean_accepted_length"] if top else None,
        "draft_model_accepted_per_round": model_row["mean_accepted_length"] if model_row else None,
        "greedy_identical_everywhere": all(r["identical_to_plain"] for r in rows.values() if r["temperature"] == 0)}
    report["environment"]["load_average_end"] = os.getloadavg()[0]
    report["seconds"] = time.time() - started
    log("bars: " + json.dumps(report["bars"], default=str))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        log(f"wrote {a.out}")
    if a.merge_into:
        merged, added = merge_into(a.merge_into, report)
        a.merge_into.write_text(json.dumps(merged, indent=1, default=str) + "\n")
        log(f"merged into {a.merge_into}: {', '.join(added) or 'no new rows'} (the whole run in merged_runs)")


if __name__ == "__main__":
    sys.exit(main())
