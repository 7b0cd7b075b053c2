"""Week 5 Day 1's measurements: what the coupled rule costs, and what it buys.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python scripts/bench_coupling.py                   # all three sections (a few minutes)
    python scripts/bench_coupling.py --section repro --seeds 3    # one section, smaller

Sections (the embedded pair, held-out prompts, EOS ignored so every run has max_tokens tokens):
  acceptance  per-position acceptance P(accept draft j | reached j) of exact rejection sampling
              (Week 2's `speculative_generate`) and of the coupled rule (`coupled_generate`), K
              fixed, at T = 0.6, 0.8, 1.0; also tokens per target call.
  speed       tokens/s of plain sampled decoding (`generate_tokens`), plain seeded decoding
              (`seeded_generate`), rejection sampling and the coupled rule, T = 0.8, K fixed.
              Per prompt the four modes run interleaved, `--repeats` times, in rotated orders;
              a mode's figure is the median over prompts of median(plain sampled s) / median(its s).
  repro       the reproducibility matrix: for each seed, the text of every setting (K = 1, 2, 4, 8,
              the n-gram drafter, the fallback controller, batch 4 with batch-mates) compared with
              plain seeded decoding (coupled rule) or with the same seed at K = 4 (rejection
              sampling, which has no "plain" text for a seed to mean). Counts of identical texts.
Timings depend on the machine and its load: run it on a quiet machine, and read small gaps as
noise. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

from specdec.kit.cli import bench_prompts
from specdec.kit.loading import load_pair
from specdec.kit.stats import SpecStats
from specdec.kit.timing import blas_info
from specdec_ref.batched import batched_speculative_decode
from specdec_ref.coupling import batched_coupled_decode, coupled_generate, seeded_generate
from specdec_ref.draft import SpeculativeDecoder
from specdec_ref.drafters import DrafterDecoder, NgramDrafter
from specdec_ref.fallback import FallbackController, fallback_generate
from specdec_ref.generate import generate_tokens
from specdec_ref.metrics import acceptance_per_position
from specdec_ref.sampling import make_probs
from specdec_ref.speculative import speculative_generate


class Runner:
    """The embedded pair, the prompts, and one function per way of decoding."""

    def __init__(self, num_prompts: int):
        self.target, self.draft, tokenizer = load_pair("tiny-code", "tiny-code-draft")
        texts = bench_prompts("tiny-code", num_prompts + 3)
        self.prompts = [list(tokenizer.encode(text)) for _, text in texts]

    def plain(self, prompt, n, seed, T):
        return list(generate_tokens(self.target, mx.array(prompt), n, T, mx.random.key(seed)))

    def seeded(self, prompt, n, seed, T):
        return list(seeded_generate(self.target, mx.array(prompt), n, seed, T))

    def rejection(self, prompt, n, seed, T, K=4, stats=None, drafter="model", controller=None):
        decoder = self.decoder(drafter, K)
        key = mx.random.key(seed)
        if controller is not None:
            stream = fallback_generate(decoder, controller, mx.array(prompt), n, T, key, stats=stats)
        else:
            stream = speculative_generate(decoder, mx.array(prompt), n, T, key, stats=stats)
        return [t for t, _ in stream]

    def coupled(self, prompt, n, seed, T, K=4, stats=None, drafter="model", controller=None):
        stream = coupled_generate(self.decoder(drafter, K), mx.array(prompt), n, seed, T,
                                  controller=controller, stats=stats)
        return [t for t, _ in stream]

    def decoder(self, drafter, K):
        if drafter == "ngram":
            return DrafterDecoder(NgramDrafter(), self.target, K)
        return SpeculativeDecoder(self.draft, self.target, K)


def tv_along(r: Runner, prompt: list[int], text: list[int], T: float) -> list[float]:
    """TV(p_t, q_t) at every generated position of `text`, from one forward of each model."""
    tokens = mx.array(prompt + text[:-1])[None]
    p = make_probs(r.target(tokens)[0, len(prompt) - 1 :], T)
    q = make_probs(r.draft(tokens)[0, len(prompt) - 1 :], T)
    return (0.5 * mx.abs(p - q).sum(axis=-1)).tolist()


def section_acceptance(r: Runner, args) -> dict:
    out = {}
    for T in (0.6, 0.8, 1.0):
        for rule in ("rejection", "coupled"):
            stats, tvs = SpecStats(), []
            for p, prompt in enumerate(r.prompts[: args.prompts]):
                for seed in range(args.acceptance_seeds):
                    text = getattr(r, rule)(prompt, args.max_tokens, 1000 * p + seed, T, args.k, stats)
                    tvs += tv_along(r, prompt, text, T)
            # What theory predicts from the TV along these texts: rejection sampling accepts
            # 1 - TV per position on average; the coupled rule at least (1 - TV)/(1 + TV).
            one_minus_tv = statistics.fmean(1 - tv for tv in tvs)
            bound = statistics.fmean((1 - tv) / (1 + tv) for tv in tvs)
            out[f"T={T} {rule}"] = {
                "mean_1_minus_tv": round(one_minus_tv, 3),
                "mean_coupling_bound": round(bound, 3),
                "per_position": [round(a, 3) for a in acceptance_per_position(stats)],
                "acceptance_rate": round(stats.accepted / stats.drafted, 3),
                "tokens_per_target_call": round(stats.emitted / stats.rounds, 3),
                "rounds": stats.rounds,
            }
            row = out[f"T={T} {rule}"]
            print(f"T={T} {rule:9s} per position {row['per_position']} tokens/call "
                  f"{row['tokens_per_target_call']}  (along these texts: mean 1 - TV "
                  f"{row['mean_1_minus_tv']}, mean (1 - TV)/(1 + TV) {row['mean_coupling_bound']})",
                  flush=True)
    return out


def section_speed(r: Runner, args) -> dict:
    T, n = 0.8, args.max_tokens
    modes = {"plain sampled": lambda p, s, n=n: r.plain(p, n, s, T),
             "plain seeded": lambda p, s, n=n: r.seeded(p, n, s, T),
             "rejection": lambda p, s, n=n: r.rejection(p, n, s, T, args.k),
             "coupled": lambda p, s, n=n: r.coupled(p, n, s, T, args.k)}
    names = list(modes)
    for name in names:  # warm-up
        modes[name](r.prompts[0], 16, 0)
    ratios = {name: [] for name in names}
    rates = {name: [] for name in names}
    for p, prompt in enumerate(r.prompts[: args.prompts]):
        seconds = {name: [] for name in names}
        for rep in range(args.repeats):
            shift = (p * args.repeats + rep) % len(names)
            for name in names[shift:] + names[:shift]:  # rotated orders
                start = time.perf_counter()
                modes[name](prompt, 7 * p + rep)
                seconds[name].append(time.perf_counter() - start)
        base = statistics.median(seconds["plain sampled"])
        for name in names:
            ratios[name].append(base / statistics.median(seconds[name]))
            rates[name].append(n / statistics.median(seconds[name]))
    out = {name: {"tokens_per_s": round(statistics.median(rates[name]), 1),
                  "vs_plain_sampled": round(statistics.median(ratios[name]), 3),
                  "per_prompt": [round(x, 3) for x in ratios[name]]} for name in names}
    for name in names:
        print(f"{name:14s} {out[name]['tokens_per_s']:7.1f} tok/s  {out[name]['vs_plain_sampled']:.2f}x "
              f"plain sampled  (per prompt {out[name]['per_prompt']})", flush=True)
    return out


def section_repro(r: Runner, args) -> dict:
    T, n = 0.8, args.repro_tokens
    prompt, mates = r.prompts[0], r.prompts[1:4]

    def settings(rule):
        run = getattr(r, rule)
        cases = {f"K={K}": (lambda s, K=K: run(prompt, n, s, T, K)) for K in (1, 2, 4, 8)}
        cases["ngram K=4"] = lambda s: run(prompt, n, s, T, 4, drafter="ngram")
        cases["fallback"] = lambda s: run(prompt, n, s, T, 4, controller=FallbackController(
            max_lookahead=4, calibration_rounds=2))
        if rule == "coupled":
            cases["batch 4"] = lambda s: batched_coupled_decode(
                [prompt] + mates, [s, s + 1, s + 2, s + 3], r.draft, r.target, n, 4, T)[0]
        else:
            cases["batch 4"] = lambda s: batched_speculative_decode(
                [prompt] + mates, r.draft, r.target, n, 4, T, mx.random.key(s))[0]
        return cases

    out = {}
    for rule in ("coupled", "rejection"):
        cases = settings(rule)
        counts = {name: 0 for name in cases}
        for seed in range(args.seeds):
            reference = r.seeded(prompt, n, seed, T) if rule == "coupled" else cases["K=4"](seed)
            for name, case in cases.items():
                counts[name] += case(seed) == reference
        out[rule] = {"against": "plain seeded decoding" if rule == "coupled" else "the same seed at K=4",
                     "identical": counts, "seeds": args.seeds}
        print(f"{rule:9s} identical to {out[rule]['against']} (of {args.seeds} seeds): {counts}",
              flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["acceptance", "speed", "repro", "all"], nargs="+",
                        default=["all"])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--acceptance-seeds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5, help="seeds in the reproducibility matrix")
    parser.add_argument("--repro-tokens", type=int, default=48)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    runner = Runner(args.prompts)
    print(f"# embedded pair, K={args.k}, {args.prompts} held-out prompts, {args.max_tokens} tokens; "
          f"{blas_info()}", flush=True)
    results = {}
    for name in ("acceptance", "speed", "repro"):
        if name in args.section or "all" in args.section:
            print(f"## {name}", flush=True)
            results[name] = globals()[f"section_{name}"](runner, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
