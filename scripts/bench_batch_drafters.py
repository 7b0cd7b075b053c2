"""Batch 8 with every drafter that can draft for a batch: Week 5 Day 5's batched bake-off.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \
        python scripts/bench_batch_drafters.py --groups 3 --max-tokens 64

Every drafter runs through Week 4 Day 5's scheduler (the reference's), the path `specdec serve`
and `specdec generate|bench --batch` take: the draft model and layer skipping as its draft
model, Medusa heads and EAGLE through `specdec.kit.self_serving`. On `--groups` groups of
`--batch` held-out prompts (`bench_prompts`, the suite's; 256 tokens at most), --max-tokens each,
EOS ignored, greedy, the modes interleaved in a rotated order after a warm-up. --regime queue
(default) queues all the prompts at once with at most --batch running, as a server does, so the
batch stays full until the queue runs dry; --regime groups decodes each group alone, and a group
takes as many rounds as its slowest row needs (`specdec bench --batch` measures this):

- plain: Week 3 Day 2's `batched_plain_decode` (one padded prefill, one [B, 1] call per token),
  the baseline of the issue's bar; plain (scheduler) and plain (scheduler, A/A): the scheduler
  with no draft, twice, the like-for-like baseline and its drift;
- each drafter at fixed K in --ks, and with Week 4 Day 3's fallback controller (K <= max --ks).

Speed-ups are per unit (a group, or a pass over the queue) against plain, median over units. Greedy output must equal plain's on
every row (the script stops if not). Per mode it also records the decomposition of a round from
the scheduler's own clock: draft seconds and verify seconds (target call + commit) per batched
round, in plain-step units of the same run (plain (scheduler)'s seconds per round), and tokens per
row-round. Not a test: timings depend on the machine and its load; the JSON records BLAS and load.
Writes `--out` (default src/specdec/kit/assets/bakeoff/batch8-REGIME.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from specdec.kit.cli.common import bench_prompts
from specdec.kit.drafter_registry import DrafterOptions, batched_draft
from specdec.kit.impl import get_impl
from specdec.kit.loading import load_pair
from specdec.kit.self_serving import self_draft_scheduler
from specdec.kit.timing import blas_info

REF = get_impl("ref")
OUT = Path(__file__).resolve().parents[1] / "src/specdec/kit/assets/bakeoff"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def scheduled(target, draft, k: int, controller: bool, max_tokens: int):
    """A decode function (rows, max_batch) -> (outputs, stats, batched rounds) through the
    scheduler: `draft` None (plain), a draft model, or a self_serving adapter; fixed K = k, or
    the fallback controller (K <= k)."""
    def run(rows, max_batch):
        settings = dict(lookahead=k, max_batch=max_batch, controller=REF.fallback.FallbackController(
            max_lookahead=k, initial_lookahead=k) if controller else None)
        if draft is not None and hasattr(draft, "row_features"):  # a self_serving adapter
            scheduler = self_draft_scheduler(REF.serving.Scheduler)(draft, **settings)
        else:
            scheduler = REF.serving.Scheduler(target, draft, **settings)
        requests = [scheduler.submit(REF.serving.Request(list(r), max_tokens=max_tokens)) for r in rows]
        rounds = 0
        while scheduler.has_work:
            scheduler.step()
            rounds += 1
        return [r.output for r in requests], scheduler.stats, rounds
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=3, help="groups of --batch held-out prompts")
    p.add_argument("--regime", choices=["groups", "queue"], default="queue",
                   help="groups: each group of --batch decoded alone, so the batch drains as its rows "
                        "finish (what `specdec bench --batch` measures); queue (default): all groups "
                        "queued at once, at most --batch running (continuous batching: `specdec serve`)")
    p.add_argument("--repeats", type=int, default=2, help="queue regime: timed passes over the queue")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ks", default="1,2,3", help="fixed K values to time (the controller's cap is the largest)")
    p.add_argument("--drafters", default="model,ngram,layerskip,medusa,eagle")
    p.add_argument("--out", type=Path, default=None, help="default: the shipped batch8-REGIME.json")
    a = p.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    a.out = a.out or OUT / f"batch{a.batch}-{a.regime}.json"
    start_time, load_start = time.time(), os.getloadavg()[0]
    target, draft, tok = load_pair("tiny-code", "tiny-code-draft")
    pool = bench_prompts("tiny-code", a.groups * a.batch)
    encoded = [tok.encode(t)[:256] for _, t in pool]
    groups = [encoded[g * a.batch : (g + 1) * a.batch] for g in range(a.groups)]
    calibration = sum(encoded, [])[:128]
    labels = {"model": "draft model", "ngram": "n-gram", "layerskip": "layer skip", "medusa": "Medusa", "eagle": "EAGLE"}
    drafts = {}
    for name in a.drafters.split(","):
        options = DrafterOptions(skip_layers="auto:1" if name == "layerskip" else "auto", calibration=calibration)
        drafts[name] = batched_draft(REF, name, target, draft, options)
        if name == "layerskip":
            labels[name] = f"layer skip {list(drafts[name].skip)}"
            log(f"layer skip: skipping {list(drafts[name].skip)}")
    cap = max(ks)
    modes = {"plain": None, "plain (scheduler)": scheduled(target, None, 0, False, a.max_tokens),
             "plain (scheduler, A/A)": scheduled(target, None, 0, False, a.max_tokens)}
    for name, d in drafts.items():
        for k in ks:
            modes[f"{labels[name]} K={k}"] = scheduled(target, d, k, False, a.max_tokens)
        modes[f"{labels[name]} + controller (K<={cap})"] = scheduled(target, d, cap, True, a.max_tokens)

    def plain_run(rows, max_batch):  # batched plain decoding, one group of max_batch at a time
        out = []
        for i in range(0, len(rows), max_batch):
            out += REF.batched.batched_plain_decode(rows[i : i + max_batch], target, a.max_tokens, eos_token_ids=[])
        return out, None, a.max_tokens

    modes["plain"] = plain_run
    units = groups if a.regime == "groups" else [encoded] * a.repeats
    log(f"{len(modes)} modes x {len(units)} {'groups' if a.regime == 'groups' else 'passes over the queue'} "
        f"of {len(units[0])} requests, batch {a.batch}; warm-up")
    for fn in modes.values():
        fn(groups[0][:2], a.batch)
    seconds = {m: [] for m in modes}
    stats = {m: [] for m in modes}
    names = list(modes)
    for g, rows in enumerate(units):
        order = names[g % len(names):] + names[: g % len(names)]
        outs = {}
        for m in order:
            start = time.perf_counter()
            out, s, rounds = modes[m](rows, a.batch)
            seconds[m].append(time.perf_counter() - start)
            stats[m].append((s, rounds))
            outs[m] = [[int(t) for t in r] for r in out]
        for m in names:
            if outs[m] != outs["plain"]:
                raise SystemExit(f"{m}: greedy rows differ from plain's on group {g}")
        log(f"unit {g}: " + ", ".join(f"{m} {len(rows) * a.max_tokens / seconds[m][-1]:.0f}" for m in names) + " tok/s")
    report = {"settings": vars(a) | {"out": str(a.out)}, "groups_prompts": [[n for n, _ in pool[g * a.batch:(g + 1) * a.batch]]
                                                                           for g in range(a.groups)],
              "environment": blas_info() | {"openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                                            "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
                                            "cpu_count": os.cpu_count()},
              "identical_to_plain": True, "modes": {}}
    tokens = len(units[0]) * a.max_tokens
    # One plain round of the scheduler, by its own clock (prefill excluded, as in every mode's
    # draft and verify seconds): the unit of the decomposition.
    plain_round = statistics.median([(s.draft_time_s + s.verify_time_s) / r for s, r in stats["plain (scheduler)"]])
    for m in names:
        row = {"tokens_per_s": tokens / statistics.median(seconds[m]),
               "per_group_tokens_per_s": [tokens / t for t in seconds[m]],
               "speedup": statistics.median([p / t for p, t in zip(seconds["plain"], seconds[m])]),
               "speedup_vs_scheduler_plain": statistics.median(
                   [p / t for p, t in zip(seconds["plain (scheduler)"], seconds[m])])}
        runs = [x for x in stats[m] if x[0] is not None]
        if runs and m != "plain":
            s0, rounds = [x for x, _ in runs], sum(r for _, r in runs)
            row.update({
                "batched_rounds": rounds,
                "tokens_per_row_round": sum(x.emitted for x in s0) / max(1, sum(x.rounds for x in s0)),
                "draft_s_per_round_in_plain_steps": sum(x.draft_time_s for x in s0) / rounds / plain_round,
                "verify_s_per_round_in_plain_steps": sum(x.verify_time_s for x in s0) / rounds / plain_round,
                "plain_row_rounds": sum(x.fallback_rounds for x in s0), "row_rounds": sum(x.rounds for x in s0)})
        report["modes"][m] = row
    report["plain_scheduler_round_ms"] = 1e3 * plain_round
    report["seconds"] = time.time() - start_time
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {a.out} ({report['seconds']:.0f} s, load {load_start:.1f} -> {os.getloadavg()[0]:.1f})")
    print(f"batch {a.batch}, regime {a.regime} ({len(units)} x {len(units[0])} requests), {a.max_tokens} tokens per row, greedy; {blas_info().get('blas', '')}; "
          f"plain (scheduler) round {1e3 * plain_round:.1f} ms")
    print("| mode | tok/s (median) | speed-up vs plain | vs plain (scheduler) | tokens per row-round | draft / round | verify / round | plain row-rounds |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r in report["modes"].items():
        extra = (f"{r['tokens_per_row_round']:.2f} | {r['draft_s_per_round_in_plain_steps']:.2f} | "
                 f"{r['verify_s_per_round_in_plain_steps']:.2f} | {r['plain_row_rounds']} of {r['row_rounds']}"
                 if "tokens_per_row_round" in r else "— | — | — | —")
        print(f"| {m} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | {r['speedup_vs_scheduler_plain']:.2f}× | {extra} |")


if __name__ == "__main__":
    main()
