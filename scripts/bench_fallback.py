"""Benchmark of Week 4 Day 3's fallback controller: does speculation ever lose to plain decoding?

    python scripts/bench_fallback.py                       # all four regimes, 5 prompts, 128 tokens
    python scripts/bench_fallback.py --regime batch8 --prompts 3 --max-tokens 64    # a short run
    python scripts/bench_fallback.py --regime heldout      # controller vs the best fixed K, T = 0 and 1

Regimes (the embedded pair unless said otherwise, greedy, EOS ignored so lengths are equal):
  openblas   OpenBLAS preloaded: speculation wins (the controller must keep >= 1.8x plain)
  bundled    MLX's bundled CPU BLAS (SPECDEC_NO_OPENBLAS=1): a 5-token forward costs ~5 plain steps
  batch8     8 prompts at once, OpenBLAS, against batched plain decoding
  same-size  the target as its own draft (c ~ 1), OpenBLAS
Each regime runs in its own process (LD_PRELOAD only acts at start), one thread per BLAS
(OPENBLAS_NUM_THREADS=1). Per prompt, plain decoding, fixed K (controller off) and the controller
(on) run interleaved, `--repeats` times after a warm-up, in the orders of a Williams design: over
its rows every mode runs right after every other mode equally often, so what a run leaves behind
(allocator caches, garbage) weighs on each mode alike. A prompt's ratio is median(plain seconds) /
median(mode seconds), and a regime reports the median over prompts. It also reports a paired
figure with its 95 % confidence interval: plain seconds / mode seconds within each repeat (the
same prompt, seconds apart), their geometric mean over all prompts and repeats, and a Student t
interval on the log-ratios: it uses every run, and it says how sure the run is.
--regime heldout (not part of `all`): where speculation wins (OpenBLAS, one stream), does the
controller keep the win on prompts nobody tuned it on? It skips the held-out prompts the four
regimes use (`--skip`, default 5), takes the next `--prompts` (default 12), and runs plain decoding,
fixed K = 1 .. --k and the controller as the CLI builds it (K_max = initial K = --k) interleaved
in Williams orders, at temperature 0 and at temperature 1 (every mode of a repeat gets the same
key). It reports each mode's paired ratio against plain, and the controller's paired ratio
against the best fixed K (the K with the best paired figure at that temperature) and against
fixed K = --k: the bar is >= 0.95x where speculation wins.
Memory (the seed's production target "< 2x baseline"): peak MLX memory of one plain run and one
speculative run; the baseline excludes the draft's weights, which sit in memory in both.
--compare FILE adds another controller as one more interleaved mode ("compare"): FILE defines
make_controller(max_lookahead, initial_lookahead) (e.g. the controller of an older commit, for an
A/B of a rule change); the report adds the shipped controller's paired ratio against it.
--control adds an A/A ratio: plain decoding timed a second time in the same orders, against
itself. Its distance from 1.00x is this machine's noise floor for the other columns.
Not a test: timings depend on the machine. The chapter quotes its output with the machine named.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

REGIMES = ["openblas", "bundled", "batch8", "same-size"]  # --regime all
EXTRA_REGIMES = ["heldout"]  # run only when named
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def williams_orders(n: int) -> list[list[int]]:
    """Orders of n modes in which each mode directly follows every other mode equally often.

    The Williams construction: row i is i, i+1, i-1, i+2, i-2, ... (mod n); for odd n the rows
    and their reverses (2n orders), for even n the n rows alone.
    """
    steps = [0] + [(j + 1) // 2 * (1 if j % 2 else -1) for j in range(1, n)]
    rows = [[(i + d) % n for d in steps] for i in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def paired_ratio(plain: list[float], mode: list[float]) -> tuple[float, float, float]:
    """(geometric mean, 95 % low, 95 % high) of plain[i] / mode[i]: a t interval on the logs."""
    from scipy import stats  # a dev dependency; child() imports it first, so a missing one fails fast

    logs = [math.log(a / b) for a, b in zip(plain, mode)]
    mean = statistics.fmean(logs)
    if len(logs) < 2:  # one pair: no spread to speak of
        return math.exp(mean), math.nan, math.nan
    half = stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def ratio_of(paired_logs: list[float]) -> tuple[float, float, float]:
    """paired_ratio on precomputed log-ratios (exp of their mean, and its 95 % t interval)."""
    return paired_ratio([math.exp(x) for x in paired_logs], [1.0] * len(paired_logs))


def load_compare(path: str):
    """make_controller(max_lookahead, initial_lookahead) from the --compare file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_controller


def heldout_child(args) -> dict:
    """Controller vs fixed K = 1 .. k on held-out prompts, greedy and sampled (one stream, OpenBLAS)."""
    import mlx.core as mx
    import scipy.stats  # noqa: F401  (paired_ratio needs it: fail now, not after the runs)

    from specdec.kit.cli import bench_prompts
    from specdec.kit.loading import load_pair
    from specdec.kit.stats import SpecStats
    from specdec.kit.timing import blas_info
    from specdec_ref.draft import SpeculativeDecoder
    from specdec_ref.fallback import FallbackController, fallback_generate
    from specdec_ref.generate import generate_tokens
    from specdec_ref.speculative import speculative_generate

    target, draft, tokenizer = load_pair("tiny-code", "tiny-code-draft")
    texts = bench_prompts("tiny-code", args.skip + args.prompts)[args.skip :]
    encoded = [mx.array(tokenizer.encode(text), dtype=mx.int32) for _, text in texts]
    ks = list(range(1, args.k + 1))
    modes = ["plain"] + [f"K={k}" for k in ks] + ["controller"] + (["compare"] if args.compare else [])
    make_compare = load_compare(args.compare) if args.compare else None

    def run(mode: str, prompt, temperature: float, key, stats):
        if mode == "plain":
            return list(generate_tokens(target, prompt, args.max_tokens, temperature, key))
        k = args.k if mode in ("controller", "compare") else int(mode[2:])
        decoder = SpeculativeDecoder(draft, target, lookahead=k)
        if mode in ("controller", "compare"):  # as the CLI builds it: K_max = initial K = --k
            controller = (FallbackController(max_lookahead=args.k, initial_lookahead=args.k) if mode == "controller"
                          else make_compare(args.k, args.k))
            stream = fallback_generate(decoder, controller, prompt, args.max_tokens, temperature, key,
                                       stats=stats)
        else:
            stream = speculative_generate(decoder, prompt, args.max_tokens, temperature, key, stats=stats)
        return [t for t, _ in stream]

    for mode in modes:  # warm-up: kernels, allocator caches
        run(mode, encoded[0], 1.0, mx.random.key(0), None)
    orders = williams_orders(len(modes))
    results = {}
    for temperature in (0.0, 1.0):
        seconds = {m: [] for m in modes}  # one entry per (prompt, repeat), paired across modes
        prompts, identical = [], True
        for g, prompt in enumerate(encoded):
            per_prompt = {m: [] for m in modes}
            for r in range(args.repeats):
                key = mx.random.key(1000 * g + r) if temperature > 0 else None
                outs, traces = {}, {}
                for mode in (modes[i] for i in orders[(g * args.repeats + r) % len(orders)]):
                    st = SpecStats()
                    start = time.perf_counter()
                    outs[mode] = run(mode, prompt, temperature, key, st)
                    per_prompt[mode].append(time.perf_counter() - start)
                    if mode in ("controller", "compare"):
                        traces[mode] = "".join(str(k) for k in st.lookahead_per_round)
                if temperature == 0:
                    identical &= all(outs[m] == outs["plain"] for m in modes)
            for m in modes:
                seconds[m] += per_prompt[m]
            ctrl = statistics.median(per_prompt["controller"])
            best_here = min(statistics.median(per_prompt[m]) for m in modes if m.startswith("K="))
            prompts.append({"name": texts[g][0], "tokens": int(prompt.size),
                            "controller_vs_best_fixed_here": best_here / ctrl,
                            "controller_vs_plain": statistics.median(per_prompt["plain"]) / ctrl,
                            "k_trace_last_repeat": traces["controller"],
                            "compare_k_trace_last_repeat": traces.get("compare")})
            print(f"  [heldout T={temperature:g}] prompt {g + 1}/{len(encoded)} {texts[g][0]}: controller "
                  f"{prompts[-1]['controller_vs_plain']:.2f}x plain, {prompts[-1]['controller_vs_best_fixed_here']:.2f}x "
                  f"its best fixed K; K per round {traces['controller']}"
                  + (f"; compare {traces['compare']}" if args.compare else ""), file=sys.stderr, flush=True)
        vs_plain = {m: paired_ratio(seconds["plain"], seconds[m]) for m in modes[1:]}
        best = max((m for m in modes if m.startswith("K=")), key=lambda m: vs_plain[m][0])
        results[f"{temperature:g}"] = {
            "vs_plain": vs_plain,
            "best_fixed": best,
            "controller_vs_best_fixed": paired_ratio(seconds[best], seconds["controller"]),
            "controller_vs_fixed_k": paired_ratio(seconds[f"K={args.k}"], seconds["controller"]),
            "controller_vs_compare": (paired_ratio(seconds["compare"], seconds["controller"])
                                      if args.compare else None),
            "compare_vs_best_fixed": (paired_ratio(seconds[best], seconds["compare"])
                                      if args.compare else None),
            "all_identical": identical if temperature == 0 else None,
            "prompts": prompts,
            "seconds": seconds,
        }
    return {"regime": "heldout", "blas": blas_info()["blas"], "device": str(mx.default_device()),
            "k": args.k, "skip": args.skip, "prompts": args.prompts, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "modes": modes, "compare": args.compare, "temperatures": results}


def heldout_report(r: dict) -> None:
    print(f"# held-out prompts {r['skip'] + 1}..{r['skip'] + r['prompts']} (not the four regimes' {r['skip']}), "
          f"{r['max_tokens']} tokens, {r['repeats']} interleaved repeats, {r['blas']}, one stream; "
          f"controller: K_max = initial K = {r['k']}")
    print("# paired: seconds ratio within each repeat, geometric mean over prompts x repeats [95 % t interval]")
    for temperature, t in r["temperatures"].items():
        cells = "  ".join(f"{m} {g:.2f}x [{lo:.2f}, {hi:.2f}]" for m, (g, lo, hi) in t["vs_plain"].items())
        print(f"T={temperature}  vs plain: {cells}")
        g, lo, hi = t["controller_vs_best_fixed"]
        gk, lok, hik = t["controller_vs_fixed_k"]
        print(f"T={temperature}  controller vs best fixed ({t['best_fixed']}): {g:.3f}x [{lo:.3f}, {hi:.3f}]   "
              f"vs K={r['k']}: {gk:.3f}x [{lok:.3f}, {hik:.3f}]"
              + ("" if t["all_identical"] is None else f"   identical: {'yes' if t['all_identical'] else 'NO'}"))
        if t.get("controller_vs_compare"):
            g, lo, hi = t["controller_vs_compare"]
            gc, loc, hic = t["compare_vs_best_fixed"]
            print(f"T={temperature}  controller vs compare ({r['compare']}): {g:.3f}x [{lo:.3f}, {hi:.3f}]   "
                  f"compare vs best fixed: {gc:.3f}x [{loc:.3f}, {hic:.3f}]")


def child(args) -> dict:
    """Measure one regime in this process (its BLAS is whatever the parent preloaded)."""
    import mlx.core as mx
    import scipy.stats  # noqa: F401  (paired_ratio needs it: fail now, not after the runs)
    from mlx.utils import tree_flatten

    from specdec.kit.cli import bench_prompts
    from specdec.kit.loading import load_model, load_pair
    from specdec.kit.stats import SpecStats
    from specdec.kit.timing import blas_info
    from specdec_ref.batched import batched_plain_decode, batched_speculative_decode
    from specdec_ref.draft import SpeculativeDecoder
    from specdec_ref.fallback import FallbackController, batched_fallback_decode, fallback_generate
    from specdec_ref.generate import generate_tokens
    from specdec_ref.speculative import speculative_generate

    regime = args.child
    if regime == "same-size":
        target, tokenizer = load_model("tiny-code")
        draft = target  # the target as its own draft: same weights, its own cache
    else:
        target, draft, tokenizer = load_pair("tiny-code", "tiny-code-draft")
    batch = 8 if regime == "batch8" else 1
    texts = bench_prompts("tiny-code", args.prompts * batch)
    encoded = [list(tokenizer.encode(text)) for _, text in texts]
    groups = [encoded[i * batch : (i + 1) * batch] for i in range(args.prompts)]
    K = args.k
    make_compare = load_compare(args.compare) if args.compare else None

    def controller(mode: str):
        return make_compare(8, K) if mode == "compare" else FallbackController(initial_lookahead=K)

    def run(mode: str, group: list[list[int]], max_tokens: int, stats=None):
        mode = "plain" if mode == "plain again" else mode  # the A/A control: plain, timed again
        if batch > 1:
            if mode == "plain":
                return batched_plain_decode(group, target, max_tokens)
            if mode == "fixed":
                return batched_speculative_decode(group, draft, target, max_tokens, lookahead=K, stats=stats)
            return batched_fallback_decode(group, draft, target, controller(mode), max_tokens, stats=stats)
        prompt = mx.array(group[0], dtype=mx.int32)
        if mode == "plain":
            return [list(generate_tokens(target, prompt, max_tokens))]
        decoder = SpeculativeDecoder(draft, target, lookahead=K)
        if mode == "fixed":
            return [[t for t, _ in speculative_generate(decoder, prompt, max_tokens, stats=stats)]]
        return [[t for t, _ in fallback_generate(decoder, controller(mode), prompt, max_tokens, stats=stats)]]

    modes = ["plain", "fixed", "fallback"] + (["plain again"] if args.control else []) + (
        ["compare"] if args.compare else [])
    for mode in modes:  # warm-up: kernels, allocator caches
        run(mode, groups[0], 16)
    rows, orders = [], williams_orders(len(modes))
    for g, group in enumerate(groups):
        times = {m: [] for m in modes}
        outputs, stats = {}, {}
        for r in range(args.repeats):
            for mode in (modes[i] for i in orders[(g * args.repeats + r) % len(orders)]):
                st = SpecStats()
                start = time.perf_counter()
                outputs[mode] = run(mode, group, args.max_tokens, st)
                times[mode].append(time.perf_counter() - start)
                stats[mode] = st
        plain_s = statistics.median(times["plain"])
        fb = stats["fallback"]
        rows.append({
            "prompt_tokens": sum(map(len, group)),
            "fixed": plain_s / statistics.median(times["fixed"]),
            "fallback": plain_s / statistics.median(times["fallback"]),
            "control": plain_s / statistics.median(times["plain again"]) if args.control else None,
            "compare": plain_s / statistics.median(times["compare"]) if args.compare else None,
            "alpha_fixed": stats["fixed"].alpha_estimate,
            "acceptance_fixed": stats["fixed"].acceptance_rate,
            "plain_rounds_fallback": sum(k == 0 for k in fb.lookahead_per_round) / max(fb.rounds, 1),
            "identical": outputs["plain"] == outputs["fixed"] == outputs["fallback"],
            "seconds": times,
        })
        print(f"  [{regime}] prompt {g + 1}/{len(groups)}: fixed {rows[-1]['fixed']:.2f}x, "
              f"controller {rows[-1]['fallback']:.2f}x"
              + (f", A/A {rows[-1]['control']:.2f}x" if args.control else "")
              + (f", compare {rows[-1]['compare']:.2f}x" if args.compare else ""), file=sys.stderr, flush=True)

    # Peak memory, plain vs speculative (the seed's "< 2x baseline usage").
    draft_bytes = 0 if draft is target else sum(v.nbytes for _, v in tree_flatten(draft.parameters()))
    peaks = {}
    for mode in modes[:3]:
        mx.synchronize()
        mx.reset_peak_memory()
        run(mode, groups[0], args.max_tokens)
        peaks[mode] = mx.get_peak_memory()
    baseline = peaks["plain"] - draft_bytes  # the draft's weights are resident in both runs
    median = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    pooled = {m: [t for r in rows for t in r["seconds"][m]] for m in modes}
    paired = {m: paired_ratio(pooled["plain"], pooled[m]) for m in modes[1:]}
    if args.compare:  # the shipped controller against the compared one, paired within each repeat
        paired["fallback vs compare"] = paired_ratio(pooled["compare"], pooled["fallback"])
    return {
        "regime": regime,
        "blas": blas_info()["blas"],
        "device": str(mx.default_device()),
        "batch": batch,
        "k": K,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "speedup_fixed": median("fixed"),
        "speedup_fallback": median("fallback"),
        "control": median("control") if args.control else None,
        "paired": paired,
        "alpha_fixed": median("alpha_fixed"),
        "acceptance_fixed": median("acceptance_fixed"),
        "plain_round_share_fallback": median("plain_rounds_fallback"),
        "all_identical": all(r["identical"] for r in rows),
        "peak_mb": {m: peaks[m] / 2**20 for m in peaks},
        "memory_vs_baseline": {m: peaks[m] / baseline for m in ("fixed", "fallback")},
        "rows": rows,
    }


def parent(args) -> int:
    regimes = REGIMES if args.regime == "all" else [args.regime]
    if args.prompts is None:
        args.prompts = 12 if args.regime == "heldout" else 5
    results = []
    for regime in regimes:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("LD_PRELOAD", None)
        if regime != "bundled":
            if not os.path.exists(OPENBLAS):
                print(f"skipping {regime}: {OPENBLAS} is not installed", file=sys.stderr)
                continue
            env["LD_PRELOAD"] = OPENBLAS
        command = [sys.executable, __file__, "--child", regime, "--prompts", str(args.prompts),
                   "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats), "--k", str(args.k)]
        command += ["--control"] if args.control else []
        command += ["--skip", str(args.skip)] + (["--compare", args.compare] if args.compare else [])
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(done.stdout))
    if args.save:
        with open(args.save, "w") as f:
            json.dump(results, f, indent=1)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    if args.regime == "heldout":
        print(f"# {' '.join(['python', 'scripts/bench_fallback.py'] + sys.argv[1:])}")
        heldout_report(results[0])
        return 0
    print(f"# {' '.join(['python', 'scripts/bench_fallback.py'] + sys.argv[1:])}")
    print(f"# greedy, K = {args.k} (fixed) / initial K = {args.k} (controller), {args.max_tokens} tokens, "
          f"{args.prompts} prompts (batches), median of {args.repeats} interleaved runs each")
    print(f"{'regime':<10} {'BLAS':<9} {'B':>2} {'fixed K':>8} {'controller':>10} {'alpha':>6} "
          f"{'plain rnds':>10} {'mem fixed':>9} {'mem ctrl':>8} {'identical':>9}" + (f" {'A/A':>6}" if args.control else ""))
    for r in results:
        blas = "OpenBLAS" if r["blas"].startswith("OpenBLAS") else "bundled"
        print(f"{r['regime']:<10} {blas:<9} {r['batch']:>2} {r['speedup_fixed']:>7.2f}x "
              f"{r['speedup_fallback']:>9.2f}x {r['alpha_fixed']:>6.3f} "
              f"{r['plain_round_share_fallback']:>10.0%} {r['memory_vs_baseline']['fixed']:>8.2f}x "
              f"{r['memory_vs_baseline']['fallback']:>7.2f}x {'yes' if r['all_identical'] else 'NO':>9}"
              + (f" {r['control']:>5.2f}x" if args.control else ""))
    print(f"# paired: plain / mode seconds within each repeat, geometric mean over "
          f"{args.prompts} x {args.repeats} pairs [95 % t interval]")
    shown = ["fixed", "fallback"] + (["plain again"] if args.control else []) + (
        ["compare", "fallback vs compare"] if args.compare else [])
    names = {"fixed": "fixed K", "fallback": "controller", "plain again": "A/A", "compare": "compare",
             "fallback vs compare": "controller/compare"}
    print(f"{'regime':<10} " + " ".join(f"{names[m]:>20}" for m in shown))
    for r in results:
        cells = [r["paired"][m] for m in shown]
        print(f"{r['regime']:<10} " + " ".join(f"{g:>5.2f}x [{lo:.2f}, {hi:.2f}]".rjust(20)
                                            for g, lo, hi in cells))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=["all"] + REGIMES + EXTRA_REGIMES, default="all")
    p.add_argument("--prompts", type=int, default=None, help="prompts (batches): 5, or 12 for heldout")
    p.add_argument("--skip", type=int, default=5,
                   help="heldout: skip this many held-out prompts (the ones the four regimes use)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=4, help="fixed K, and the controller's initial K")
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--control", action="store_true",
                   help="also time plain decoding a second time (an A/A ratio: this machine's noise floor)")
    p.add_argument("--compare", metavar="FILE",
                   help="also run make_controller(max_lookahead, initial_lookahead) from FILE, interleaved")
    p.add_argument("--child", choices=REGIMES + EXTRA_REGIMES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(heldout_child(args) if args.child == "heldout" else child(args)))
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
