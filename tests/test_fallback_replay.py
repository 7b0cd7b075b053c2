"""Kit test: the shipped fallback controller decides exactly as it did before Day 3 was resized.

Week 4 Day 3 moved the controller's production refinements (probe budget, generous alpha,
could-win with the draft's catch-up, DRAFT_WINDOW, halving, OOM restore-and-retry, ...) from
`fallback.py` into `specdec.kit.fallback_policy`, which both trees import. The measured
four-regime table of the chapter must not change, so the reference must make the same decisions
token for token. This file replays scenarios under a fake clock and scripted acceptances and
compares every round with traces recorded from the reference *before* the move
(tests/fallback_replay.json):

- controller scenarios (win, lose on costs, lose on alpha, drift, batch counts, faults, probe
  budgets, a long prompt): the K of every round and the state behind it;
- loop scenarios (single stream and batched, greedy and sampled, winning and losing costs,
  faults): the K of every round, the tokens, the faults and every update() call's arguments.

Re-record only on purpose (a decision is meant to change):
    python tests/test_fallback_replay.py --record
Re-recorded once on purpose since the move: the early rule (before MIN_ROUNDS counts) now steps
K down instead of leaving (`ControllerBase.early_lookahead`), which changed 10 controller and 6
loop scenarios from their first early round on; every other decision replays as recorded.
"""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from specdec.kit.impl import get_impl
from specdec.kit.models import markov_pair, tiny_llama_pair
from specdec.kit.stats import SpecStats

TRACES = Path(__file__).with_name("fallback_replay.json")
OOM = "[metal::malloc] Unable to allocate 1073741824 bytes"


# A fake clock ------------------------------------------------------------------------------------
class Clock:
    """Time that moves only when a model is called: per_call + per_token * B * L seconds."""

    def __init__(self):
        self.t = 1000.0

    def perf_counter(self) -> float:
        return self.t


class Clocked:
    """A model whose calls advance `clock` by a fixed cost model (and may fail on call numbers)."""

    def __init__(self, model, clock, per_call, per_token, fail_on=(), error=None):
        self.model, self.clock, self.per_call, self.per_token = model, clock, per_call, per_token
        self.fail_on, self.error, self.calls = set(fail_on), error, 0

    def __call__(self, inputs, *args, **kwargs):
        self.calls += 1
        batch, length = inputs.shape
        self.clock.t += self.per_call + self.per_token * batch * length
        if self.calls in self.fail_on:
            if "malloc" in str(self.error):
                self.model(inputs, *args, **kwargs)  # an allocation failure strikes mid-call
            raise self.error
        return self.model(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def fake_time(monkeypatch, clock):
    """Every `time` module the fallback code reads (reference tree and kit) tells the fake time."""
    fake = types.SimpleNamespace(perf_counter=clock.perf_counter)
    for name, module in list(sys.modules.items()):
        if (name.startswith("specdec_ref.") or name.startswith("specdec.")) and getattr(module, "time", None) is __import__("time"):
            monkeypatch.setattr(module, "time", fake)


# Controller scenarios ----------------------------------------------------------------------------
def costs(scenario, r):
    """(s, c, slope) at round r: seconds per plain step, draft cost in steps, v(K) = 1 + slope K."""
    kind = scenario["costs"]
    s = 0.01 * (1 + scenario.get("drift", 0.0) * r)
    return {"win": (s, 0.06, 0.15), "bundled": (s, 0.1, 1.0), "gpu": (s, 1.0, 0.02),
            "batch8": (s, 0.1, 0.28), "margin": (s, 0.25, 0.0)}[kind]


def alpha_at(scenario, r):
    phases = scenario["alpha"]  # [(from_round, alpha), ...]
    return [a for start, a in phases if start <= r][-1]


def run_controller(ref, scenario):
    rng = np.random.default_rng(scenario.get("seed", 0))
    c = ref.fallback.FallbackController(**scenario.get("kwargs", {}))
    rows = scenario.get("rows", 1)
    prompt = scenario.get("prompt", 100)
    s0, _, slope0 = costs(scenario, 0)
    c.observe_prefill(prompt, s0 * (1 + slope0 * (prompt - 1)) * scenario.get("prefill_scale", 1.0))
    trace = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(scenario["rounds"]):
            s, cost, slope = costs(scenario, r)
            jitter = 1 + 0.05 * rng.standard_normal()
            if r in scenario.get("oom", ()):
                c.memory_pressure()
            if r == scenario.get("disable", -1):
                c.disable_draft("scripted: the draft is gone")
            k = c.lookahead
            step = None
            if k > 0 and c.needs_draft_step:
                k = c.observe_draft_step(cost * s * jitter)
                step = True
            if k == 0:
                c.update(0, 0, None, s * jitter)
                n = 0
            else:
                a = alpha_at(scenario, r)
                counts = []
                for _ in range(rows):
                    n_row = 0
                    while n_row < k and rng.random() < a:
                        n_row += 1
                    counts.append(n_row)
                n = counts if rows > 1 or scenario.get("as_list") else counts[0]
                c.update(k, n, k * cost * s * jitter, s * (1 + slope * k) * jitter)
            trace.append([k, n, step, c.lookahead, c.speculating, c.probing, c.until_probe,
                          c.probe_interval, c.cap, len(c.rounds)])
    return {"trace": trace, "faults": list(c.faults)}


CONTROLLER_SCENARIOS = {
    "win": dict(costs="win", alpha=[(0, 0.8)], rounds=200),
    "win-k4": dict(costs="win", alpha=[(0, 0.8)], rounds=120, kwargs=dict(max_lookahead=4)),
    "lose-bundled": dict(costs="bundled", alpha=[(0, 0.8)], rounds=150),
    "lose-gpu": dict(costs="gpu", alpha=[(0, 0.9)], rounds=150, prompt=10),
    "lose-alpha": dict(costs="win", alpha=[(0, 0.05)], rounds=400, kwargs=dict(probe_budget=0.2)),
    "lose-alpha-default-budget": dict(costs="win", alpha=[(0, 0.05)], rounds=400),
    "drift": dict(costs="win", alpha=[(0, 0.85), (60, 0.05), (200, 0.85)], rounds=400,
                  kwargs=dict(probe_every=8, probe_budget=1.0), seed=3),
    "drift-s": dict(costs="bundled", alpha=[(0, 0.9)], rounds=300, drift=0.004,
                    kwargs=dict(probe_every=4, max_backoff=4), prefill_scale=0.2),
    "batch8": dict(costs="batch8", alpha=[(0, 0.78)], rounds=200, rows=8, seed=5),
    "batch8-one-count": dict(costs="batch8", alpha=[(0, 0.5)], rounds=200, as_list=True, seed=6),
    "margin": dict(costs="margin", alpha=[(0, 0.3)], rounds=300, kwargs=dict(probe_every=8), seed=7),
    "faults": dict(costs="win", alpha=[(0, 0.8)], rounds=120, oom=(10, 11, 40), disable=80),
    "long-prompt": dict(costs="win", alpha=[(0, 0.8)], rounds=120, prompt=2000, prefill_scale=0.5),
    "budget-5pc": dict(costs="batch8", alpha=[(0, 0.2)], rounds=300, kwargs=dict(probe_budget=0.05), seed=9),
}


# Loop scenarios ----------------------------------------------------------------------------------
LOOP_COSTS = {  # (target per call, target per token, draft per call, draft per token), seconds
    "win": (0.010, 0.0005, 0.0004, 0.00001),
    "lose": (0.010, 0.0100, 0.0010, 0.00005),
    "same-size": (0.010, 0.0005, 0.0100, 0.0005),
}


def clocked_run(ref, monkeypatch, pair, cost, faults, kwargs):
    """Fake time, clocked models (with their faults) and a reference controller whose update()
    calls are recorded: (draft, target, controller, updates)."""
    clock = Clock()
    fake_time(monkeypatch, clock)
    tc, tt, dc, dt = LOOP_COSTS[cost]
    faults = faults or {}
    draft = Clocked(pair[0], clock, dc, dt, **faults.get("draft", {}))
    target = Clocked(pair[1], clock, tc, tt, **faults.get("target", {}))
    controller = ref.fallback.FallbackController(**(kwargs or {}))
    updates = []
    real_update = controller.update

    def spy(*args):
        counts = list(args[1]) if isinstance(args[1], (list, tuple)) else args[1]
        updates.append([args[0], counts, _r(args[2]), _r(args[3])])
        return real_update(*args)

    controller.update = spy
    return draft, target, controller, updates


def run_single_loop(ref, monkeypatch, pair, cost, temperature=0.0, faults=None, max_tokens=48,
                    memory_limit_mb=None, kwargs=None):
    draft, target, controller, updates = clocked_run(ref, monkeypatch, pair, cost, faults, kwargs)
    stats = SpecStats()
    decoder = ref.draft.SpeculativeDecoder(draft, target, lookahead=2)
    key = mx.random.key(3) if temperature > 0 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = [t for t, _ in ref.fallback.fallback_generate(
            decoder, controller, mx.array([1, 2, 3, 4, 5, 6, 7, 8]), max_tokens, temperature=temperature,
            key=key, stats=stats, memory_limit_mb=memory_limit_mb)]
    return {"ks": list(stats.lookahead_per_round), "tokens": tokens, "faults": list(controller.faults),
            "updates": updates, "prefill": [controller.prefill[0], _r(controller.prefill[1])],
            "draft_step": _r(controller.draft_step_s)}


def run_batch_loop(ref, monkeypatch, pair, cost, temperature=0.0, faults=None, max_tokens=32,
                   prompts=None, memory_limit_mb=None, kwargs=None):
    draft, target, controller, updates = clocked_run(ref, monkeypatch, pair, cost, faults, kwargs)
    stats = SpecStats()
    prompts = prompts or [[5], [1, 5, 7], [3, 9, 2, 7, 11, 4, 0, 6, 8], [2, 2]]
    key = mx.random.key(4) if temperature > 0 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ref.fallback.batched_fallback_decode(
            [list(p) for p in prompts], draft, target, controller, max_tokens, temperature=temperature,
            key=key, stats=stats, memory_limit_mb=memory_limit_mb)
    return {"ks": list(stats.lookahead_per_round), "tokens": out, "faults": list(controller.faults),
            "updates": updates}


def _r(x):
    return None if x is None else round(float(x), 9)


def long_prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 64, size=n).tolist() for n in (94, 69, 7)]


LOOP_SCENARIOS = {
    "single-llama-win": ("single", "llama", "win", {}),
    "single-markov-win": ("single", "markov", "win", {}),
    "single-markov-lose": ("single", "markov", "lose", {}),
    "single-llama-same-size": ("single", "llama", "same-size", {}),
    "single-markov-win-sampled": ("single", "markov", "win", dict(temperature=1.0)),
    "single-draft-raises": ("single", "markov", "win",
                            dict(faults={"draft": dict(fail_on=[5], error=ValueError("draft gone"))})),
    "single-oom-target": ("single", "markov", "win",
                          dict(faults={"target": dict(fail_on=[6, 7], error=RuntimeError(OOM))})),
    "single-oom-draft": ("single", "markov", "win",
                         dict(faults={"draft": dict(fail_on=[3], error=RuntimeError(OOM))})),
    "single-memory-limit": ("single", "markov", "win", dict(memory_limit_mb=1e-6)),
    "batch-markov-win": ("batch", "markov", "win", {}),
    "batch-llama-win": ("batch", "llama", "win", {}),
    "batch-markov-lose": ("batch", "markov", "lose", {}),
    "batch-markov-win-sampled": ("batch", "markov", "win", dict(temperature=1.0)),
    "batch-llama-window": ("batch", "llama", "win", dict(prompts="long", max_tokens=40,
                                                         kwargs=dict(probe_every=4, probe_budget=1.0))),
    "batch-draft-raises": ("batch", "markov", "win",
                           dict(faults={"draft": dict(fail_on=[4], error=ValueError("draft gone"))})),
    "batch-oom-speculative": ("batch", "markov", "win",
                              dict(faults={"target": dict(fail_on=[5], error=RuntimeError(OOM))})),
    "batch-oom-halves": ("batch", "markov", "lose",
                         dict(faults={"target": dict(fail_on=[4, 5], error=RuntimeError(OOM))})),
    "batch-memory-limit": ("batch", "markov", "win", dict(memory_limit_mb=1e-6)),
}


def run_loop(ref, monkeypatch, name):
    kind, pair_name, cost, options = LOOP_SCENARIOS[name]
    pair = {"llama": lambda: tiny_llama_pair(seed=0),
            "markov": lambda: markov_pair(vocab_size=12, seed=3, mix=0.4, period=3)}[pair_name]()
    options = dict(options)
    if options.get("prompts") == "long":
        options["prompts"] = long_prompts()
    if kind == "single":
        return run_single_loop(ref, monkeypatch, pair, cost, **options)
    return run_batch_loop(ref, monkeypatch, pair, cost, **options)


# The tests ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded():
    assert TRACES.exists(), f"{TRACES} is missing: record it with python {__file__} --record"
    return json.loads(TRACES.read_text())


def first_difference(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return i, g, w
    return min(len(got), len(want)), got[len(want):][:1], want[len(got):][:1]


@pytest.mark.parametrize("name", sorted(CONTROLLER_SCENARIOS))
def test_controller_decisions_replay(recorded, name):
    ref = get_impl("ref")
    got = json.loads(json.dumps(run_controller(ref, CONTROLLER_SCENARIOS[name])))
    want = recorded["controller"][name]
    if got != want:
        i, g, w = first_difference(got["trace"], want["trace"])
        pytest.fail(f"{name}: the controller's decisions changed at round {i}: got {g}, recorded "
                    f"{w} ([K, counts, timed draft step, next K, speculating, probing, until_probe, "
                    f"probe_interval, cap, len(rounds)]); faults {got['faults']} vs {want['faults']}")


@pytest.mark.parametrize("name", sorted(LOOP_SCENARIOS))
def test_loop_decisions_replay(recorded, monkeypatch, name):
    ref = get_impl("ref")
    got = json.loads(json.dumps(run_loop(ref, monkeypatch, name)))
    want = recorded["loops"][name]
    for field in want:
        if got[field] != want[field]:
            detail = ""
            if isinstance(want[field], list):
                i, g, w = first_difference(got[field], want[field])
                detail = f" first at index {i}: got {g}, recorded {w}"
            pytest.fail(f"{name}: `{field}` changed under the fake clock;{detail}")


def record() -> None:
    ref = get_impl("ref")
    out = {"controller": {n: run_controller(ref, s) for n, s in sorted(CONTROLLER_SCENARIOS.items())},
           "loops": {}}
    for name in sorted(LOOP_SCENARIOS):
        mp = pytest.MonkeyPatch()
        try:
            out["loops"][name] = run_loop(ref, mp, name)
        finally:
            mp.undo()
    TRACES.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {TRACES}: {len(out['controller'])} controller and {len(out['loops'])} loop scenarios")


if __name__ == "__main__":
    if "--record" in sys.argv:
        record()
    else:
        print(__doc__)
