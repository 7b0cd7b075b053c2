"""Fake-clock simulator of Week 4 Day 3's fallback controller: its decisions, without timing noise.

    python scripts/sim_fallback.py                     # the reference controller, every prompt set
    python scripts/sim_fallback.py --compare old.py    # ... and another controller, side by side
    python scripts/sim_fallback.py -v                  # also each prompt's K per round
    python scripts/sim_fallback.py --make-traces       # re-measure the acceptance traces (models run)

Real timings on a loaded machine cannot tell a 2 % change in the controller from noise. Here the
controller (the reference's `FallbackController`, or `make_controller(max_lookahead,
initial_lookahead)` from a --compare file) is driven through `fallback_generate`'s protocol —
prefill, calibration rounds, the timed draft step, the draft's catch-up, update(K, n, draft
seconds, verify seconds) — by a clock that only moves by a cost model, and acceptance comes from
recorded per-position traces of the embedded pair (scripts/sim_fallback_traces.json: greedy,
does the draft's argmax equal the target's token; T = 1, beta = sum min(p, q) along one sampled
target path). No model runs, and a run is deterministic for its seeds.

Costs, in plain steps (one plain step = 1), measured on the course's CPU VM with OpenBLAS:
c = 0.11 per drafted token; a speculative round at K costs R(K) = 1.29 / 1.62 / 1.80 / 2.03
(draft included); a prompt call over L tokens 1 + 0.045 (L - 1); the first two plain rounds
after it are 15 % slower (not pipelined). Regimes:
  heldout      prompts 6-17 (the ones `bench_fallback.py --regime heldout` runs), --seeds seeds
  heldout-2    prompts 18-60, another held-out set, --seeds / 4 seeds
  tuned        prompts 1-5 (the four regimes' prompts), --seeds seeds
  batch8-like  the batch's shortest row: i.i.d. acceptance 0.3 .. 0.6, v(K) = 1.1 .. 1.5 plus
               0.15 .. 0.25 K (per-row verification and rollback), c = 0.09, a 100-token prompt
               at 0.2 steps per token; against batched plain
  bundled      MLX's bundled BLAS: v(K) = 1 + K, a prompt call costs L steps; against plain
  same-size    the target as its own draft: c = 1; against plain
Each figure is a geometric mean over prompts x seeds: the controller against the best fixed K
(the K with the best mean at that temperature) where speculation wins, against plain where it
loses. The clock may be noisy (--sigma: lognormal factor; --spike: share of rounds 1-3x slower).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import statistics
import sys
from pathlib import Path

TRACES = Path(__file__).with_name("sim_fallback_traces.json")
N = 128  # tokens per request


class Costs:
    """A cost model in plain steps: draft c per token, verify v(K), prompt call, first plain rounds."""

    def __init__(self, c=0.11, rounds=None, verify=None, prefill_per_token=0.045,
                 draft_prefill_per_token=0.045, calibration_slowdown=1.15):
        self.c = c
        if rounds is not None:  # measured whole rounds: the verify share is what the draft left
            self.v = {k: r - k * c for k, r in rounds.items()}
        else:
            self.v = dict(verify)
        self.prefill_per_token = prefill_per_token
        self.draft_prefill_per_token = draft_prefill_per_token
        self.calibration_slowdown = calibration_slowdown

    def verify(self, k: int) -> float:
        if k in self.v:
            return self.v[k]
        top = max(self.v)
        return self.v[top] + (k - top) * (self.v[top] - self.v[top - 1])

    def prompt(self, num_tokens: int) -> float:
        return 1.0 + self.prefill_per_token * (num_tokens - 1)

    def draft(self, fed: int, k: int) -> float:
        """A draft round fed `fed` tokens it has not seen, then K - 1 more steps."""
        return self.c * (1.0 + self.draft_prefill_per_token * (fed - 1)) + (k - 1) * self.c


OPENBLAS = Costs(rounds={1: 1.29, 2: 1.62, 3: 1.80, 4: 2.03})


class Clock:
    """Seconds = model seconds times a lognormal factor (sigma) and, on a `spike` share, 1-3x."""

    def __init__(self, seed: int, sigma: float, spike: float):
        self.rng, self.sigma, self.spike = random.Random(seed), sigma, spike

    def __call__(self, t: float) -> float:
        factor = math.exp(self.rng.gauss(0.0, self.sigma)) if self.sigma else 1.0
        if self.spike and self.rng.random() < self.spike:
            factor *= 1.0 + 2.0 * self.rng.random()
        return t * factor


def accepted(trace, pos: int, k: int, rng: random.Random, greedy: bool) -> int:
    """Drafts accepted at positions pos, pos + 1, ...: greedy traces are 0/1, sampled ones beta."""
    n = 0
    while n < k and pos + n < len(trace):
        ok = trace[pos + n] == "1" if greedy else rng.random() < trace[pos + n]
        if not ok:
            break
        n += 1
    return n


def run_fixed(rec: dict, k_fixed: int, greedy: bool, seed: int, costs: Costs, sigma=0.0, spike=0.0) -> float:
    """Model seconds of speculative_generate at a fixed K (its first round also prefills both)."""
    rng, clock = random.Random(seed), Clock(seed + 7, sigma, spike)
    trace = rec["greedy" if greedy else "t1"]
    pos, t, first = 0, 0.0, True
    while pos < N:
        k = max(1, min(k_fixed, N - pos - 1))
        if first:
            t += clock(costs.draft(rec["L"], k) + costs.prompt(rec["L"] + k))
            first = False
        else:
            t += clock(k * costs.c + costs.verify(k))
        pos += accepted(trace, pos, k, rng, greedy) + 1
    return t


def run_controller(rec: dict, greedy: bool, seed: int, make, costs: Costs, sigma=0.0, spike=0.0,
                   log: list | None = None) -> float:
    """Model seconds of fallback_generate with the controller make() builds; K per round -> log."""
    rng, clock = random.Random(seed), Clock(seed + 7, sigma, spike)
    trace = rec["greedy" if greedy else "t1"]
    controller = make()
    pos, t, prefilled, plain_rounds = 0, 0.0, False, 0
    committed, draft_seen = rec["L"], 0  # tokens committed (prompt included); tokens the draft holds
    while pos < N:
        k = min(controller.lookahead, N - pos - 1)
        if k > 0 and controller.needs_draft_step:
            seconds = clock(costs.c)
            t += seconds
            k = min(controller.observe_draft_step(seconds), N - pos - 1)
        if k <= 0:
            if not prefilled:
                seconds = clock(costs.prompt(rec["L"]))
                controller.observe_prefill(rec["L"], seconds)
                prefilled = True
            else:
                slow = costs.calibration_slowdown if plain_rounds < 2 else 1.0
                seconds = clock(slow)
                controller.update(0, 0, None, seconds)
                plain_rounds += 1
            t += seconds
            pos += 1
            committed += 1
            if log is not None:
                log.append(0)
            continue
        fed = committed - draft_seen
        draft_s, verify_s = clock(costs.draft(fed, k)), clock(costs.verify(k))
        n = accepted(trace, pos, k, rng, greedy)
        t += draft_s + verify_s
        pos += n + 1
        committed += n + 1
        draft_seen = committed - (2 if n == k else 1)
        controller.update(k, n, None if fed > 2 else draft_s, verify_s)
        if log is not None:
            log.append(k)
    return t


def reference_controller(max_lookahead: int, initial_lookahead: int):
    from specdec_ref.fallback import FallbackController

    return FallbackController(max_lookahead=max_lookahead, initial_lookahead=initial_lookahead)


def winning(make, records, seeds, sigma, spike, kmax=4, verbose=False, label=""):
    """Where speculation wins: {"greedy"/"T=1": (controller / best fixed K, that K, worst pair)}."""
    out = {}
    for greedy in (True, False):
        rows = []
        for i, rec in records:
            for sd in seeds:
                fixed = {k: run_fixed(rec, k, greedy, 1000 * i + sd, OPENBLAS, sigma, spike)
                         for k in range(1, kmax + 1)}
                log = []
                ctrl = run_controller(rec, greedy, 1000 * i + sd, make, OPENBLAS, sigma, spike, log)
                rows.append((i, sd, fixed, ctrl, "".join(map(str, log))))
        best = max(range(1, kmax + 1), key=lambda k: statistics.geometric_mean([1 / r[2][k] for r in rows]))
        ratios = [r[2][best] / r[3] for r in rows]
        tag = "greedy" if greedy else "T=1"
        out[tag] = (statistics.geometric_mean(ratios), best, min(ratios))
        if verbose:
            for (i, sd, _, _, trace), ratio in zip(rows, ratios):
                print(f"  {label} {tag:6s} p{i + 1:<2d} s{sd} vs K={best} {ratio:.3f}  {trace}")
    return out


def batch8_like(make, seeds, sigma, spike):
    """Controller / batched plain over 9 cost models x 3 shortest-row alphas (a 100-token prompt)."""
    ratios = []
    for fixed_cost, slope in ((0.3, 0.2), (0.1, 0.25), (0.5, 0.15)):
        costs = Costs(c=0.09, verify={k: 1 + fixed_cost + slope * k for k in range(1, 9)},
                      prefill_per_token=0.2, draft_prefill_per_token=0.2, calibration_slowdown=1.0)
        plain = costs.prompt(100) + (N - 1)
        for alpha in (0.3, 0.45, 0.6):
            rec = {"L": 100, "t1": [alpha] * N}
            for sd in seeds:
                ratios.append(plain / run_controller(rec, False, 17 * sd + int(100 * alpha), make, costs, sigma, spike))
    return statistics.geometric_mean(ratios), min(ratios)


def losing(make, records, seeds, sigma, spike, costs):
    """Controller / plain where no K can win (greedy and T = 1 pooled)."""
    ratios = []
    for i, rec in records:
        plain = costs.prompt(rec["L"]) + (N - 1)
        for greedy in (True, False):
            for sd in seeds:
                ratios.append(plain / run_controller(rec, greedy, 1000 * i + sd, make, costs, sigma, spike))
    return statistics.geometric_mean(ratios), min(ratios)


def table(make, args) -> dict:
    prompts = json.loads(TRACES.read_text())["prompts"]
    sets = {"heldout": (range(5, 17), range(args.seeds)), "heldout-2": (range(17, 60), range(max(1, args.seeds // 4))),
            "tuned": (range(0, 5), range(args.seeds))}
    out = {}
    for name, (indices, seeds) in sets.items():
        records = [(i, prompts[i]) for i in indices]
        out[name] = winning(make, records, seeds, args.sigma, args.spike, args.k, args.verbose, name)
    out["batch8-like"] = batch8_like(make, range(3), args.sigma, args.spike)
    records = [(i, prompts[i]) for i in range(0, 5)]
    out["bundled"] = losing(make, records, range(2), args.sigma, args.spike,
                            Costs(c=0.11, verify={k: 1.0 + k for k in range(1, 9)}, prefill_per_token=1.0,
                                  draft_prefill_per_token=1.0))
    out["same-size"] = losing(make, records, range(2), args.sigma, args.spike,
                              Costs(c=1.0, rounds={k: 1.0 + k + 0.2 * k for k in range(1, 9)}))
    return out


def make_traces(count: int = 60) -> None:
    """Measure the acceptance traces of the embedded pair (runs the models: about a minute)."""
    import mlx.core as mx

    from specdec.kit.cli import bench_prompts
    from specdec.kit.loading import load_pair
    from specdec_ref.generate import generate_tokens

    target, draft, tokenizer = load_pair("tiny-code", "tiny-code-draft")
    records = []
    for g, (name, text) in enumerate(bench_prompts("tiny-code", count)):
        ids = tokenizer.encode(text)
        rec = {"name": name, "L": len(ids)}
        for tag, temperature in (("greedy", 0.0), ("t1", 1.0)):
            key = mx.random.key(g) if temperature else None
            tokens = list(generate_tokens(target, mx.array(ids, dtype=mx.int32), N, temperature, key))
            full = mx.array(ids + tokens, dtype=mx.int32)[None]
            target_logits = target(full)[0, len(ids) - 1 : len(ids) - 1 + N]
            draft_logits = draft(full)[0, len(ids) - 1 : len(ids) - 1 + N]
            if temperature == 0:
                match = mx.argmax(draft_logits, axis=-1) == mx.array(tokens)
                rec[tag] = "".join("1" if m else "0" for m in match.tolist())
            else:
                overlap = mx.minimum(mx.softmax(target_logits, axis=-1), mx.softmax(draft_logits, axis=-1))
                rec[tag] = [round(x, 3) for x in overlap.sum(axis=-1).tolist()]
        records.append(rec)
        print(g, name, len(ids), rec["greedy"].count("1") / N, sum(rec["t1"]) / N, file=sys.stderr, flush=True)
    about = (f"per-position acceptance of bench_prompts('tiny-code', {count}) with tiny-code-draft, {N} tokens: "
             "greedy = the draft's argmax is the target's token (1/0); t1 = sum min(p, q) along one sampled "
             "target path (T = 1). Made by scripts/sim_fallback.py --make-traces.")
    TRACES.write_text(json.dumps({"about": about, "prompts": records}, separators=(",", ":")))


def load_compare(path: str):
    spec = importlib.util.spec_from_file_location("sim_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_controller


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", metavar="FILE", action="append", default=[],
                   help="a .py file defining make_controller(max_lookahead, initial_lookahead)")
    p.add_argument("--k", type=int, default=4, help="K_max = initial K of the controller; fixed K = 1 .. k")
    p.add_argument("--seeds", type=int, default=20,
                   help="seeds per prompt (a quarter of them for heldout-2); T = 1 varies a lot from seed to seed")
    p.add_argument("--sigma", type=float, default=0.0, help="lognormal noise of every timed call")
    p.add_argument("--spike", type=float, default=0.0, help="share of calls 1-3x slower")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="each prompt's K per round")
    p.add_argument("--make-traces", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_traces:
        make_traces()
        return 0
    controllers = {"reference": reference_controller}
    controllers.update({Path(f).stem: load_compare(f) for f in args.compare})
    results = {name: table(lambda make=make: make(args.k, args.k), args) for name, make in controllers.items()}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"# fake clock (sigma {args.sigma}, spikes {args.spike}), K_max = initial K = {args.k}, {N} tokens; "
          "geometric mean [worst pair]")
    for name, r in results.items():
        cells = [f"{s} {k}: {r[s][k][0]:.3f}x K={r[s][k][1]} [{r[s][k][2]:.2f}]"
                 for s in ("heldout", "heldout-2", "tuned") for k in ("greedy", "T=1")]
        print(f"{name}: vs best fixed K: " + "  ".join(cells))
        print(f"{name}: vs plain: " + "  ".join(f"{s} {r[s][0]:.3f}x [{r[s][1]:.2f}]"
                                                 for s in ("batch8-like", "bundled", "same-size")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
