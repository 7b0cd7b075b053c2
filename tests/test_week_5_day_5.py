"""Week 5 Day 5 — the bake-off. Chapter: book/src/week5-05-bakeoff.md

Task 1: expected_tokens_from_curve (tokens per round from a per-position acceptance curve)
Task 2: predicted_speedup and best_lookahead (each drafter's own costs: per token, per round, v(K))
Task 3: break_even_draft_cost (the draft cost at which a drafter ties plain decoding)
Task 4: paired_comparison (per-prompt ratios and an A/A control: a speed-up's verdict)

Nothing here times real work: the costs are tables, the tokens/s are lists, and the one decoding
run (Task 1) counts tokens, not seconds.
"""

import json
import math

import mlx.core as mx
import pytest

from specdec.kit.stats import SpecStats
from support import raises

CHAPTER = "book/src/week5-05-bakeoff.md"
DECAYING = [0.8, 0.5, 0.25]  # a Medusa-like curve: each position further ahead is harder
CURVE = "bakeoff.expected_tokens_from_curve"


def by_hand(curve, k, c_token, v, c_round=0.0):
    """The chapter's formula written out: (1 + a0 + a0 a1 + ...) / (c_round + K c_token + v)."""
    tokens = 1.0 + sum(math.prod(curve[: i + 1]) for i in range(k))
    return tokens / (c_round + k * c_token + v)


def refuses(call, why, *needles):
    """`call()` must raise ValueError, and its message must name every one of `needles`."""
    with raises(ValueError, why) as caught:
        call()
    for needle in needles:
        assert needle in str(caught.value), (
            f"the ValueError {str(caught.value)!r} should name {needle!r}: {why}")


# Task 1 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.76, 1.0])
def test_task_1_a_constant_curve_is_the_geometric_model(impl, ref, alpha):
    for k in range(7):
        got = impl.bakeoff.expected_tokens_from_curve([alpha] * 8, k)
        want = ref.theory.expected_tokens_per_round(alpha, k)
        assert math.isclose(got, want, rel_tol=1e-9), (
            f"a constant curve alpha = {alpha} at K = {k} must give Week 2 Day 5's "
            f"(1 - alpha^(K+1)) / (1 - alpha) = {want:.6f}, got {got} ({CHAPTER}, Task 1)")


def test_task_1_a_decaying_curve_multiplies_along_the_chain(impl):
    want = {0: 1.0, 1: 1.8, 2: 2.2, 3: 2.3}  # 1, + 0.8, + 0.8*0.5, + 0.8*0.5*0.25
    for k, tokens in want.items():
        got = impl.bakeoff.expected_tokens_from_curve(DECAYING, k)
        assert math.isclose(got, tokens, rel_tol=1e-9), (
            f"curve {DECAYING}, K = {k}: draft i counts only if drafts 0..i are all accepted, so "
            f"E = 1 + a0 + a0 a1 + ... = {tokens}, got {got} (summing the a_j alone gives 2.55 at "
            f"K = 3; forgetting the target's own token gives 1 less) ({CHAPTER}, Task 1)")
    assert impl.bakeoff.expected_tokens_from_curve(DECAYING + [0.9, 0.9], 2) == pytest.approx(2.2), (
        "only the first K positions of the curve count: a longer curve than K is fine")


def test_task_1_a_real_run_is_summed_up_exactly_by_its_curve(impl, ref, markov_models, key):
    """The curve measured on a run (Week 4 Day 2) predicts that run's tokens per round exactly:
    the products telescope, accepted[i] / rounds. A context-dependent pair, sampled."""
    draft, target = markov_models
    stats = SpecStats()
    decoder = ref.draft.SpeculativeDecoder(draft, target, lookahead=3)
    for _ in ref.speculative.speculative_generate(decoder, mx.array([1, 2, 3]), 400,
                                                  temperature=1.0, key=key, stats=stats):
        pass
    rounds = [(k, n) for k, n in zip(stats.lookahead_per_round, stats.accepted_per_round) if k == 3]
    assert len(rounds) > 80, "the reference run should have made many K = 3 rounds"
    curve = ref.metrics.acceptance_per_position(rounds)
    measured = 1 + sum(n for _, n in rounds) / len(rounds)
    got = impl.bakeoff.expected_tokens_from_curve(curve, 3)
    assert math.isclose(got, measured, rel_tol=1e-9), (
        f"per-position acceptance {[round(a, 3) for a in curve]} of a run with K = 3 must give that "
        f"run's tokens per round, {measured:.4f}, exactly: got {got:.4f} ({CHAPTER}, Task 1)")


def test_task_1_rejects_what_it_cannot_use(impl):
    f = impl.bakeoff.expected_tokens_from_curve
    refuses(lambda: f(DECAYING, -1), "a negative K (name the value)", "-1")
    refuses(lambda: f(DECAYING, 4), "a curve of 3 positions cannot predict K = 4 (name both numbers)",
            "3", "4")
    refuses(lambda: f([0.5, 1.2, 0.5], 3),
            "an acceptance of 1.2 at position 1 (name the position and the value)", "1", "1.2")


# Task 2 -----------------------------------------------------------------------------------------
def test_task_2_a_constant_curve_is_week_2s_speedup(impl, ref, use_ref):
    use_ref(CURVE)
    for alpha, k, c, v in [(0.8, 4, 0.05, 1.08), (0.5, 8, 0.2, 1.16), (0.9, 1, 0.0, 1.0), (0.3, 3, 1.0, 2.5)]:
        got = impl.bakeoff.predicted_speedup([alpha] * 8, k, c, v)
        want = ref.theory.expected_speedup(alpha, k, c, v)
        assert math.isclose(got, want, rel_tol=1e-9), (
            f"alpha {alpha}, K {k}, c {c}, v {v}, no per-round cost: expected Week 2 Day 5's "
            f"E / (K c + v) = {want:.6f}, got {got} ({CHAPTER}, Task 2)")


def test_task_2_a_per_round_cost_is_paid_once_per_round(impl, use_ref):
    use_ref(CURVE)
    curve = [0.6, 0.3, 0.1, 0.05]
    got = impl.bakeoff.predicted_speedup(curve, 4, 0.0, 1.2, c_round=0.15)
    want = by_hand(curve, 4, 0.0, 1.2, 0.15)
    assert math.isclose(got, want, rel_tol=1e-9), (
        f"Medusa-like costs (c_token 0, c_round 0.15, v 1.2) at K = 4: the heads run once per "
        f"round, so the round costs 0.15 + 1.2 target steps; expected {want:.5f}, got {got} "
        f"(K * c_round would give {by_hand(curve, 4, 0.15, 1.2):.5f}) ({CHAPTER}, Task 2)")
    got = impl.bakeoff.predicted_speedup(DECAYING, 2, 0.1, 1.1, c_round=0.05)
    assert math.isclose(got, by_hand(DECAYING, 2, 0.1, 1.1, 0.05), rel_tol=1e-9), (
        f"both costs at once: E / (c_round + K c_token + v) = {by_hand(DECAYING, 2, 0.1, 1.1, 0.05):.5f}, "
        f"got {got}")
    assert impl.bakeoff.predicted_speedup(DECAYING, 0, 0.3, 1.5, c_round=0.2) == 1.0, (
        "K = 0 is plain decoding: exactly 1.0, whatever the drafter's costs")


def test_task_2_best_lookahead_follows_the_curve_not_an_average(impl, use_ref):
    use_ref(CURVE)
    v = {1: 1.05, 2: 1.10, 3: 1.15, 4: 1.20, 6: 1.30, 8: 1.40}
    curves = {"decaying": [0.9, 0.6, 0.3, 0.1, 0.05, 0.02, 0.01, 0.01], "constant": [0.75] * 8}
    for name, curve in curves.items():
        want = max(((k, by_hand(curve, k, 0.05, v[k])) for k in sorted(v)), key=lambda kv: kv[1])
        got = impl.bakeoff.best_lookahead(curve, 0.05, v)
        assert got[0] == want[0] and math.isclose(got[1], want[1], rel_tol=1e-9), (
            f"{name} curve {curve[:4]}..., c_token 0.05, v {v}: the best K is {want[0]} "
            f"({want[1]:.4f}x), got {got} ({CHAPTER}, Task 2)")
    got = impl.bakeoff.best_lookahead([0.9] * 3, 0.05, v)
    assert got[0] == 3, (
        f"a curve of 3 positions says nothing about K = 4, 6, 8: try only K <= 3 (got K = {got[0]})")


def test_task_2_best_lookahead_falls_back_to_plain_and_breaks_ties_low(impl, use_ref):
    use_ref(CURVE)
    got = impl.bakeoff.best_lookahead([0.1, 0.1], 0.5, {1: 1.2, 2: 1.3})
    assert got == (0, 1.0), (
        f"no K beats plain decoding (acceptance 0.1, c 0.5): the answer is K = 0 at 1.0x, as the "
        f"fallback controller would choose; got {got} ({CHAPTER}, Task 2)")
    got = impl.bakeoff.best_lookahead([1.0, 0.0, 0.0], 0.0, {1: 1.0, 2: 1.0, 3: 1.0})
    assert got == (1, 2.0), (
        f"K = 1, 2, 3 all predict 2.0x (the second draft is never accepted): ties go to the "
        f"smaller K, expected (1, 2.0), got {got}")


def test_task_2_rejects_impossible_costs(impl, use_ref):
    use_ref(CURVE)
    f = impl.bakeoff.predicted_speedup
    refuses(lambda: f(DECAYING, 2, -0.1, 1.1), "a negative draft cost", "-0.1")
    refuses(lambda: f(DECAYING, 2, 0.1, 1.1, c_round=-1.0), "a negative per-round cost", "-1")
    refuses(lambda: f(DECAYING, 2, 0.1, 0.0), "a verify call that costs nothing", "v")


# Task 3 -----------------------------------------------------------------------------------------
def test_task_3_break_even_values(impl, use_ref):
    use_ref(CURVE)
    cases = [((DECAYING, 2, 1.1), 0.55), ((DECAYING, 2, 1.1, 0.3), 0.4), (([0.05], 1, 1.2), -0.15),
             (([0.75] * 4, 4, 1.2), (1 + 0.75 + 0.75**2 + 0.75**3 + 0.75**4 - 1.2) / 4)]
    for args, want in cases:
        got = impl.bakeoff.break_even_draft_cost(*args)
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (
            f"break_even_draft_cost{args}: (E(K) - v - c_round) / K = {want:.5f}, got {got} "
            f"({CHAPTER}, Task 3; a negative value means even a free draft loses)")


def test_task_3_the_break_even_cost_is_where_the_speedup_crosses_one(impl, ref, use_ref):
    use_ref(CURVE)
    curve = [0.9, 0.8, 0.6, 0.4]
    for k, v, c_round in [(1, 1.05, 0.0), (3, 1.15, 0.0), (4, 1.2, 0.1)]:
        c = impl.bakeoff.break_even_draft_cost(curve, k, v, c_round)
        speed = lambda c_token: ref.bakeoff.predicted_speedup(curve, k, c_token, v, c_round)  # noqa: E731
        assert math.isclose(speed(c), 1.0, rel_tol=1e-9), (
            f"at the break-even draft cost {c:.4f} (K {k}, v {v}, c_round {c_round}) the predicted "
            f"speed-up must be exactly 1.0, got {speed(c):.6f} ({CHAPTER}, Task 3)")
        assert speed(c - 0.01) > 1.0 > speed(c + 0.01), "cheaper drafts win, dearer ones lose"


def test_task_3_rejects_a_round_without_drafts(impl, use_ref):
    use_ref(CURVE)
    f = impl.bakeoff.break_even_draft_cost
    refuses(lambda: f(DECAYING, 0, 1.1), "K = 0 drafts nothing: no draft cost to break even", "k")
    refuses(lambda: f(DECAYING, 2, 0.0), "v must be > 0", "v")


# Task 4 -----------------------------------------------------------------------------------------
def test_task_4_pairs_prompts_before_taking_the_median(impl):
    # Prompt 1 is slow for both (a long, hard text), prompt 2 fast for both.
    got = impl.bakeoff.paired_comparison([12.0, 20.0, 30.0], [10.0, 40.0, 12.0], [10.0, 40.0, 12.0])
    assert math.isclose(got["speedup"], 1.2, rel_tol=1e-9), (
        f"speed-up = median of per-prompt ratios [1.2, 0.5, 2.5] = 1.2, got {got['speedup']} "
        f"(the ratio of the two medians, 20 / 12, mixes different prompts) ({CHAPTER}, Task 4)")
    assert math.isclose(got["low"], 0.5) and math.isclose(got["high"], 2.5), (
        f"low/high: the smallest and largest per-prompt ratio, 0.5 and 2.5, got {got['low']}, {got['high']}")


def test_task_4_the_a_a_control_sets_the_noise_floor(impl):
    base = [20.0, 20.0, 20.0, 20.0, 20.0]
    cand = [25.0, 24.0, 23.0, 26.0, 22.0]  # median ratio 1.2
    for control, noise, verdict in [([21.0, 19.0, 20.0, 20.0, 20.0], 0.05, "faster"),
                                     ([26.0, 20.0, 20.0, 18.0, 20.0], 0.3, "within noise")]:
        got = impl.bakeoff.paired_comparison(cand, base, control)
        assert math.isclose(got["noise"], noise, rel_tol=1e-9) and got["verdict"] == verdict, (
            f"A/A ratios {[c / b for c, b in zip(control, base)]}: noise = the largest |ratio - 1| "
            f"= {noise}, and a 1.2x speed-up is {verdict!r}; got noise {got['noise']}, verdict "
            f"{got['verdict']!r} ({CHAPTER}, Task 4)")
    got = impl.bakeoff.paired_comparison([14.0, 15.0, 16.0], [20.0] * 3, [21.0, 20.0, 19.0])
    assert got["verdict"] == "slower", f"a 0.75x median against 5 % noise is 'slower', got {got['verdict']!r}"


def test_task_4_rejects_unpaired_or_empty_runs(impl):
    f = impl.bakeoff.paired_comparison
    refuses(lambda: f([1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0]),
            "different numbers of prompts cannot be paired (name the lengths)", "2", "3")
    refuses(lambda: f([], [], []), "no prompts at all", "0")
    refuses(lambda: f([1.0, 0.0], [1.0, 1.0], [1.0, 1.0]), "a run with 0 tokens/s", "0")


# The suite's drafters section (kit: reporting only, no decoding) ----------------------------------
def test_suite_drafters_table_and_plot(tmp_path):
    from specdec.kit import suite

    rows = [{"label": f"drafter {name}", "K": 3, "tokens_per_s": 30.0, "plain_tokens_per_s": 25.0,
             "speedup": s, "speedup_per_prompt": [s - 0.1, s, s + 0.1], "accepted_per_round": 1.5,
             "tokens_per_call": 2.5, "accept_at_position": curve, "identical": True}
            for name, s, curve in [("model", 1.2, [0.8, 0.7, 0.7]), ("tree", 1.1, None),
                                   ("medusa", 0.9, [0.4, 0.3, 0.2])]]
    markdown = "\n".join(suite._drafter_table(rows))
    assert "0.80 0.70 0.70" in markdown and "1.10-1.30" in markdown, (
        "the drafters table shows each drafter's acceptance by position and its per-prompt range")
    assert "| 2.50 | tree |" in markdown, "a tree row says 'tree' instead of a chain's acceptance by position"
    paths = suite.write_plots({"settings": {"quick": True}, "results": {"drafters": rows}}, tmp_path)
    assert tmp_path / "drafters.png" in paths, "a drafters section draws drafters.png"
    assert (tmp_path / "drafters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# scripts/bench_drafters.py: --modes and --merge-into (kit: JSON bookkeeping, no decoding) ----------
def bench_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_drafters.py"
    spec = importlib.util.spec_from_file_location("bench_drafters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bakeoff_report(prompts, rows, drafters, eagle="not in this tree"):
    """The parts of a bench_drafters report that --merge-into reads and writes."""
    row = lambda s: {"temperature": 0.0, "tokens_per_s": 20.0 * s, "speedup": s}  # noqa: E731
    costs = {"c_token": {n: 0.1 for n in drafters}, "c_round": {n: 0.0 for n in drafters}}
    return {"timed_prompts": prompts, "settings": {"max_tokens": 64}, "environment": {}, "seconds": 1.0,
            "eagle": eagle, "single_stream": {n: row(s) for n, s in rows.items()},
            "curves": {n: {"T=0": {"curve": [0.5]}} for n in drafters},
            "best_k": {n: {"K": 1} for n in drafters}, "predictions": {n: {"K": 1} for n in drafters},
            "costs": {"batch 1": costs, "batch 8": costs},
            "devices": {"apple_silicon": {"c_token": {n: 0.1 for n in drafters},
                                          "c_round": {n: 0.0 for n in drafters},
                                          "best": {n: {"K": 1} for n in drafters}}}}


def test_bench_merge_adds_only_what_the_shipped_report_lacks(tmp_path):
    bench = bench_script()
    shipped = bakeoff_report(["a", "b"], {"plain": 1.0, "plain (A/A)": 1.0, "draft model K=3": 1.4},
                             ["draft model"])
    path = tmp_path / "bakeoff.json"
    path.write_text(json.dumps(shipped))
    run = bakeoff_report(["a", "b"], {"plain": 1.0, "plain (A/A)": 1.1, "draft model K=3": 1.2,
                                      "EAGLE K=2": 1.3, "EAGLE + fallback (K<=2)": 1.25},
                         ["draft model", "EAGLE"], eagle="included")
    merged, added = bench.merge_into(path, run)
    assert added == ["EAGLE K=2", "EAGLE + fallback (K<=2)"], (
        f"--merge-into adds the rows the shipped report has no row of that name for, got {added}")
    assert merged["single_stream"]["draft model K=3"]["speedup"] == 1.4, (
        "--merge-into keeps the shipped rows: a new run's draft-model row goes to merged_runs only")
    assert merged["single_stream"]["EAGLE K=2"]["merged_run"] == 1
    assert merged["merged_runs"][0]["single_stream"]["plain (A/A)"]["speedup"] == 1.1, (
        "the whole new run (its plain and A/A rows) is kept under merged_runs, to read its rows against")
    for section in ("curves", "best_k", "predictions"):
        assert "EAGLE" in merged[section] and merged[section]["draft model"] == shipped[section]["draft model"]
    assert merged["costs"]["batch 1"]["c_token"]["EAGLE"] == 0.1 and merged["eagle"] == "included"
    assert "EAGLE" in merged["devices"]["apple_silicon"]["best"]
    other = bakeoff_report(["a", "c"], {"EAGLE K=2": 1.3}, ["EAGLE"])
    with pytest.raises(SystemExit, match="same --prompts"):
        bench.merge_into(path, other)  # speed-ups are paired per prompt: other prompts cannot merge


def test_bench_modes_always_time_plain_and_the_a_a_control():
    bench = bench_script()
    assert bench.parse_modes("eagle,eagle+controller") == {"plain", "aa", "eagle", "eagle+controller"}, (
        "--modes always adds plain and aa: every speed-up is paired with plain and judged by the A/A drift")
    with pytest.raises(SystemExit, match="eagel"):
        bench.parse_modes("plain,eagel")
