"""Week 4 Day 3 — fallback: speculation that never loses. Chapter: book/src/week4-03-fallback.md

Task 1: FallbackController estimates (alpha, s, c, v(K), goodput, best K) — synthetic timings
Task 2: FallbackController.update / could_win / probe_wait / decide (calibration, hysteresis, probing)
Task 3: FallbackController.disable_draft / memory_pressure (the controller's side of faults)
Task 4: fallback_generate (K = 0 rounds, exact across switches, faults survived)
Task 5: batched_fallback_decode (one K for the batch)

Grade one task with
    pytest tests/test_week_4_day_3.py --impl student -k task_1
No test reads a clock: timings are injected, so every check is deterministic.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache
from scipy import stats as scipy_stats

from specdec.kit.models import markov_pair, tiny_llama_pair
from specdec.kit.stats import SpecStats
from support import BATCHED_FOUNDATIONS, CallCounter, mlx_lm_greedy, raises

CHAPTER = "book/src/week4-03-fallback.md"
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
ESTIMATES = tuple(
    f"fallback.FallbackController.{m}"
    for m in ("__init__", "alpha", "step_time", "draft_cost", "verify_line", "verify_cost",
              "goodput", "best_lookahead")
)
DECISIONS = tuple(f"fallback.FallbackController.{m}" for m in ("update", "could_win", "probe_wait", "decide"))
FAULTS = ("fallback.FallbackController.disable_draft", "fallback.FallbackController.memory_pressure")
EARLIER_WEEKS = BATCHED_FOUNDATIONS + (
    "speculative.commit_round", "draft.SpeculativeDecoder.__init__",
    "draft.SpeculativeDecoder.draft_generation",
)
OOM = "[metal::malloc] Unable to allocate 1073741824 bytes"


def controller_with(impl, plain=(), draft=(), verify=(), rounds=(), prefill=None, draft_step=None, **kw):
    """A controller whose evidence is set by hand (Task 1 never needs update)."""
    c = impl.fallback.FallbackController(**kw)
    c.plain_times.extend(plain)
    c.draft_times.extend(draft)
    c.verify_times.extend(verify)
    c.rounds.extend(rounds)
    c.prefill, c.draft_step_s = prefill, draft_step
    return c


def brute_force_best(ref, alpha, c, v, cap):
    """argmax over K in [1, cap] of E(alpha, K) / (K c + v(K)), smallest K on ties."""
    rates = {k: ref.theory.expected_tokens_per_round(alpha, k) / (k * c + v(k)) for k in range(1, cap + 1)}
    best = max(rates.values())
    k = min(k for k, r in rates.items() if r == best)
    return k, best


# Task 1: estimates --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(max_lookahead=0), dict(window=0), dict(margin=-0.1), dict(margin=1.0), dict(probe_every=0),
    dict(initial_lookahead=0), dict(calibration_rounds=0), dict(max_backoff=0),
])
def test_task_1_rejects_bad_arguments(impl, kwargs):
    with raises(ValueError, f"FallbackController({kwargs}) must be refused with a message naming "
                            f"the value and the fix ({CHAPTER})"):
        impl.fallback.FallbackController(**kwargs)


def test_task_1_a_new_controller_knows_nothing(impl):
    c = impl.fallback.FallbackController(max_lookahead=3, initial_lookahead=6, window=5)
    assert c.lookahead == 0, "K is 0 (plain) until plain rounds have measured the unit s"
    assert c.initial_lookahead == 3, "initial_lookahead is clamped to max_lookahead"
    assert c.cap == 3 and c.speculating and c.draft_ok and c.faults == []
    assert c.rounds.maxlen == 5 and c.plain_times.maxlen == 5, "every history is a deque(maxlen=window)"
    assert c.alpha() is None and c.step_time() is None and c.draft_cost() is None, (
        "with no evidence the estimates are None, not a guess"
    )
    assert c.verify_cost(0) == 1.0, "v(0) = 1 by definition: a plain step is the unit"
    assert c.verify_cost(2) is None and c.goodput(2) is None and c.best_lookahead() is None
    assert c.goodput(0) == 1.0, "G(0) = 1: plain decoding is the baseline"


def test_task_1_alpha_counts_only_the_trials_that_ran(impl):
    # K=4 all accepted: 4 trials; K=4, n=1: 2 trials; a batched round K=2 with rows n=0 and n=2.
    c = controller_with(impl, rounds=[(4, (4,)), (4, (1,)), (2, (0, 2))])
    assert c.alpha() == pytest.approx(7 / 9), (
        "alpha = sum(n) / sum(n + [n < K]) over every row of every round: the drafts after a "
        f"rejection never ran, they are not failures; expected 7/9, got {c.alpha()} ({CHAPTER})"
    )


def test_task_1_costs_in_plain_steps(impl):
    c = controller_with(impl, plain=[0.010, 0.030, 0.010, 0.012], draft=[(4, 0.002), (2, 0.001)],
                        verify=[(4, 0.015), (2, 0.012)], draft_step=0.009)
    assert c.step_time() == pytest.approx(0.011), (
        "s is the median of plain_times (the mean of the middle two for an even count): one "
        "slow round must not move it"
    )
    assert c.draft_cost() == pytest.approx(0.0005 / 0.011), (
        "c = (sum of draft seconds / sum of K) / s, from draft_times when it has entries (the "
        "draft_step_s prior only stands in before any timed draft round)"
    )
    xs, ys = [0, 4, 2], [1.0, 0.015 / 0.011, 0.012 / 0.011]
    b, a = np.polyfit(xs, ys, 1)
    line = c.verify_line()
    assert line == pytest.approx((a, b)), (
        f"v(K) = a + b K is the least-squares line through (0, 1) and (K_r, seconds_r / s) for "
        f"each verify time; expected (a, b) = ({a:.4f}, {b:.4f}), got {line}"
    )
    assert c.verify_cost(5) == pytest.approx(max(1.0, a + 5 * b)) and c.verify_cost(0) == 1.0, (
        "a K above every verified one gets v(K) = max(1, a + b K) from the line"
    )
    assert c.verify_cost(3) == pytest.approx(0.015 / 0.011) and c.verify_cost(1) == pytest.approx(0.012 / 0.011), (
        "a K never verified, below a verified one, costs the measured v of the nearest larger K "
        "(an upper bound: a speculative round's fixed costs make the line through (0, 1) too "
        "optimistic below what was measured)"
    )
    c.verify_times.append((4, 0.019))
    assert c.verify_cost(4) == pytest.approx((0.015 + 0.019) / 2 / 0.011), (
        "a K already verified gets its own measured mean (seconds / s): measured beats fitted"
    )
    c.verify_times.pop()
    c.draft_times.clear()
    assert c.draft_cost() == pytest.approx(0.009 / 0.011), "without timed rounds c comes from draft_step_s"


def test_task_1_priors_and_clamps(impl):
    c = controller_with(impl, plain=[0.01], prefill=(101, 0.06))
    assert c.verify_line() == pytest.approx((1.0, 0.05)), (
        "before any verify time, the prompt's call is the prior: L tokens in one call is a verify "
        "over L - 1 drafts, so the line runs through (0, 1) and (100, 6)"
    )
    assert controller_with(impl, plain=[0.01], prefill=(1, 0.01)).verify_line() == pytest.approx((1.0, 0.0)), (
        "a one-token prompt says nothing about the slope: b = 0"
    )
    c = controller_with(impl, plain=[0.01], verify=[(4, 0.008)])
    a, b = c.verify_line()
    assert b == 0.0 and a == pytest.approx(0.9), (
        "a negative slope (noise) is clamped to b = 0, with a the mean of the points' v values"
    )
    assert c.verify_cost(4) == 1.0 and c.verify_cost(2) == 1.0, (
        "v(K) is never below 1: a verify call costs at least a plain step"
    )
    assert controller_with(impl, plain=[0.01]).verify_line() is None, "no verify time, no prefill: unknown"


def test_task_1_goodput_and_best_lookahead(impl, ref, use_ref):
    use_ref("theory.expected_tokens_per_round")
    c = controller_with(impl, plain=[0.01], draft=[(4, 0.004)], verify=[(4, 0.014), (1, 0.011)],
                        rounds=[(4, (3,)), (4, (4,)), (4, (1,))], max_lookahead=6)
    alpha, cost = 8 / 10, 0.1
    a, b = c.verify_line()

    def v(k):  # measured where verified (K = 4: 1.4, K = 1: 1.1), the nearest larger measured
        return {4: 1.4, 1: 1.1}.get(k, 1.4 if k < 4 else max(1.0, a + b * k))  # K, else the line

    assert c.goodput(3) == pytest.approx(ref.theory.expected_tokens_per_round(alpha, 3) / (3 * cost + v(3))), (
        "G(K) = E(alpha, K) / (K c + v(K)), in tokens per plain step"
    )
    assert c.goodput(2, alpha=1.0) == pytest.approx(3 / (2 * cost + v(2))), "an explicit alpha overrides the estimate"
    want = brute_force_best(ref, alpha, cost, v, 6)
    assert c.best_lookahead() == pytest.approx(want), (
        f"best_lookahead is the argmax of G over K in [1, cap] with its G: expected {want}, got "
        f"{c.best_lookahead()} ({CHAPTER})"
    )
    c.cap = 2
    assert c.best_lookahead()[0] <= 2, "K never exceeds cap (memory pressure lowers it)"
    c.cap = 0
    assert c.best_lookahead() is None


def test_task_1_ties_go_to_the_smaller_k(impl, use_ref):
    use_ref("theory.expected_tokens_per_round")
    # alpha = 0, c = 0, v = 1: every K gives G = 1.
    c = controller_with(impl, plain=[0.01], draft=[(4, 0.0)], verify=[(4, 0.01)], rounds=[(4, (0,))])
    assert c.best_lookahead() == (1, pytest.approx(1.0)), "on a tie keep the smaller K (less wasted work)"


# Task 2: calibration, hysteresis, probing ---------------------------------------------------------
def winning_round(c, k, n, step=0.01, cost=0.1, slope=0.1):
    """Feed one speculative round whose times say c = cost and v(K) = 1 + slope K."""
    return c.update(k, n, k * cost * step, step * (1 + slope * k))


def test_task_2_update_records_its_round(impl, use_ref):
    use_ref(*ESTIMATES)
    c = impl.fallback.FallbackController()
    for bad in [(-1, 0), (2, 3), (2, -1), (3, [1, 4]), (3, [])]:
        with raises(ValueError, f"update{bad}: every count must be in [0, num_drafted]"):
            c.update(*bad)
    c.update(0, 0, None, 0.01)
    c.update(0, 0)  # an untimed plain round
    c.update(3, 2, None, 0.02)
    c.update(2, [1, 2], 0.003, None)
    assert list(c.plain_times) == [0.01], "a plain round's seconds go to plain_times (None: nothing)"
    assert list(c.rounds) == [(3, (2,)), (2, (1, 2))], "rounds holds (K, tuple of per-row counts)"
    assert list(c.draft_times) == [(2, 0.003)] and list(c.verify_times) == [(3, 0.02)], (
        "times that are None are not recorded"
    )


def test_task_2_calibrates_then_speculates(impl, ref, use_ref):
    use_ref(*ESTIMATES)
    c = impl.fallback.FallbackController(initial_lookahead=3, calibration_rounds=2)
    c.observe_prefill(101, 0.01 * 11)  # the prompt: 101 tokens cost 11 plain steps
    assert c.update(0, 0, None, 0.01) == 0, "one timed plain round of two: still calibrating (K = 0)"
    assert c.update(0, 0, None, 0.01) == 3, (
        "calibrated, c unknown: the tentative K is initial_lookahead (the loop times a draft step next)"
    )
    assert c.needs_draft_step
    assert c.observe_draft_step(0.001) == 3
    ks = [winning_round(c, c.lookahead, c.lookahead) for _ in range(8)]  # every draft accepted
    a, b, s = *c.verify_line(), c.step_time()
    measured = {}
    for kr, t in c.verify_times:
        measured.setdefault(kr, []).append(t / s)

    def v_contract(k):  # verify_cost's contract, from the controller's own verify_times
        if k in measured:
            return max(1.0, sum(measured[k]) / len(measured[k]))
        larger = [kr for kr in measured if kr > k]
        if larger:
            return max(1.0, sum(measured[min(larger)]) / len(measured[min(larger)]))
        return max(1.0, a + b * k)

    want, _ = brute_force_best(ref, 1.0, 0.1, v_contract, 8)
    assert ks[:3] == [3, 3, 3], (
        f"until MIN_ROUNDS rounds of evidence, keep initial_lookahead: one lucky or unlucky round "
        f"must not set K; got {ks}"
    )
    assert ks[-1] == want, f"with enough evidence K is best_lookahead's: expected {want}, got {ks}"


def test_task_2_costs_alone_can_rule_speculation_out(impl, use_ref):
    use_ref(*ESTIMATES)
    c = impl.fallback.FallbackController(probe_every=4)
    c.observe_prefill(20, 0.2)  # a slow BLAS: 20 tokens cost 20 plain steps
    c.update(0, 0, None, 0.01)
    c.update(0, 0, None, 0.01)
    assert c.observe_draft_step(0.002) == 0, (
        "v(K) ~ 1 + K: even a perfect draft (alpha = 1) cannot beat plain, so K = 0 (could_win "
        f"is False) ({CHAPTER})"
    )
    assert not c.could_win() and not c.speculating
    ks = [c.update(0, 0, None, 0.01) for _ in range(100)]
    assert set(ks) == {0}, (
        "costs belong to the machine, not the text: when alpha = 1 cannot win there is nothing to "
        "probe for, and a probe would cost a draft prefill; got a probe"
    )


def test_task_2_a_cost_verdict_outlasts_a_drifting_step_time(impl, use_ref):
    """Measured costs that rule speculation out hold it off until the longest backoff."""
    use_ref(*ESTIMATES)
    c = impl.fallback.FallbackController(probe_every=4, max_backoff=4, margin=0.05)
    c.observe_prefill(8, 0.02)  # the prior looks cheap: a speculative round is tried
    c.update(0, 0, None, 0.01)
    c.update(0, 0, None, 0.01)
    assert c.observe_draft_step(0.001) == 4
    # Measured: v(4) = 5 plain steps, c = 0.1, so G*(alpha = 1) = 5 / 5.4 < 1 + margin.
    assert c.update(4, 4, 0.004, 0.05) == 0 and not c.could_win(), (
        f"v(4) = 5 steps and c = 0.1: not even alpha = 1 can win, so K = 0 ({CHAPTER})"
    )
    # The context grows and plain steps slow to 13 ms: at that s the same seconds read
    # v(4) = 3.85 and G*(alpha = 1) = 1.2, so the verdict flips back although nothing got cheaper.
    flipped = probe = None
    for i in range(60):
        k = c.update(0, 0, None, 0.013)
        if flipped is None and c.could_win():
            flipped = i
        if k > 0:
            probe = i
            break
    assert flipped is not None, "the test needs could_win() to flip back (check the estimates)"
    longest = 4 * 4
    assert probe is not None and longest - 1 <= probe - flipped <= longest, (
        f"could_win() was False on measured costs, then True from plain round {flipped} on as s "
        f"drifted up; the next probe must wait for the longest backoff, probe_every * max_backoff "
        f"= {longest} plain rounds (until_probe set again every round the verdict stood), and "
        f"then come: it came {'never' if probe is None else f'at round {probe}'} ({CHAPTER})"
    )


@pytest.mark.parametrize("prompt_tokens, pays", [(400, True), (2000, False)])
def test_task_2_the_drafts_prompt_prefill_must_pay_back(impl, use_ref, prompt_tokens, pays):
    """Before its first round the draft must prefill the whole prompt (c target prefills)."""
    use_ref(*ESTIMATES)
    c = impl.fallback.FallbackController(probe_every=32)
    c.observe_prefill(prompt_tokens, prompt_tokens * 0.001)  # 0.1 plain steps per prompt token
    c.update(0, 0, None, 0.01)
    c.update(0, 0, None, 0.01)
    c.observe_draft_step(0.003)  # c = 0.3: G*(alpha = 1) is about 2.15 at K = 8
    g_best = c.best_lookahead(alpha=1.0)[1]
    catch_up = 0.3 * prompt_tokens * 0.001 / 0.01
    saving = 32 * (1 - 1 / g_best)
    assert c.could_win() is pays, (
        f"a {prompt_tokens}-token prompt costs the draft about c * prefill / s = {catch_up:.0f} plain "
        f"steps before its first round; the best saving over probe_every = 32 tokens is "
        f"32 * (1 - 1 / G*) = {saving:.1f} steps, so could_win() must be {pays} ({CHAPTER})"
    )
    if not pays:
        ks = [c.update(0, 0, None, 0.01) for _ in range(100)]
        assert set(ks) == {0}, f"a catch-up that cannot pay back rules out probes too; got K = {sorted(set(ks))}"
    c.update(4, 4, 0.012, 0.014)  # a speculative round ran: the draft has seen the prompt
    assert c.could_win(), (
        "once a speculative round has run (verify_times is not empty) the draft has caught up on the "
        "prompt: only alpha = 1's goodput decides could_win"
    )


def dropped_controller(impl, probe_every=4, max_backoff=4):
    """Calibrated on winning costs, then rounds where nothing is accepted: it leaves speculation.

    probe_budget = 1: a failed probe (0.8 plain steps lost here) may cost as much as the plain
    time before it, so probe_wait() is 1 and the backoff alone spaces the probes."""
    c = impl.fallback.FallbackController(probe_every=probe_every, max_backoff=max_backoff, margin=0.05,
                                         probe_budget=1.0)
    c.update(0, 0, None, 0.01)
    c.update(0, 0, None, 0.01)
    c.observe_draft_step(0.001)
    ks = []
    while not ks or (ks[-1] > 0 and len(ks) < 10):
        ks.append(winning_round(c, c.lookahead, 0))
    return c, ks


def test_task_2_leaves_below_the_margin_and_probes_with_backoff(impl, use_ref):
    use_ref(*ESTIMATES)
    c, ks = dropped_controller(impl)
    assert ks[-1] == 0 and not c.speculating, (
        f"alpha = 0 makes every G(K) < 1: the controller must go plain; K per round {ks}"
    )
    assert len(c.rounds) == 0, "leaving speculation clears `rounds` (stale alpha evidence)"
    assert ks == [4, 0], (
        "before MIN_ROUNDS counts only a generous alpha, one more accepted trial than observed, "
        "may end speculation: after 0 of 4 accepted it is 1/2 and G(3) = 1.875 / 1.7 > 1 (below the "
        "measured K = 4, v(K) is v(4) = 1.4), keep K = 4; "
        f"after two such rounds it is 1/3 and every G(K) < 1, leave; K per round {ks} ({CHAPTER})"
    )
    plain = [c.update(0, 0, None, 0.01) for _ in range(4)]
    assert plain == [0, 0, 0, 4], (
        f"while plain, probe once until_probe reaches 0 (probe_every = 4 plain rounds); got {plain}"
    )
    assert c.probing
    assert winning_round(c, 4, 0) == 0, "a probe that accepts nothing: back to plain"
    assert c.probe_interval == 8, "a failed probe doubles the interval (backoff)"
    assert len(c.rounds) == 0, "back to plain after a probe: `rounds` is cleared, each probe is judged alone"
    plain = [c.update(0, 0, None, 0.01) for _ in range(8)]
    assert plain[:7] == [0] * 7 and plain[7] > 0, f"the next probe comes 8 plain rounds later, got {plain}"
    for _ in range(3):  # fail twice more: 16, then capped at probe_every * max_backoff = 16
        winning_round(c, c.lookahead, 0)
        while c.lookahead == 0:
            c.update(0, 0, None, 0.01)
    assert c.probe_interval == 16, f"the interval is capped at probe_every * max_backoff, got {c.probe_interval}"
    k = winning_round(c, c.lookahead, c.lookahead)  # a probe where everything is accepted
    assert k > 0 and c.speculating and c.probe_interval == 4, (
        "a probe whose G beats 1 + margin brings speculation back, and resets the backoff"
    )


def test_task_2_an_early_round_ends_speculation_only_if_a_generous_alpha_loses(impl, use_ref):
    use_ref(*ESTIMATES)
    # Costs of a batch of 8 on a CPU: c = 0.1, v(4) = 2.1 plain steps (v(K < 4) = v(4)).
    costs = dict(plain=[0.01] * 2, draft=[(4, 0.004)], verify=[(4, 0.021)], initial_lookahead=4)
    # 1 of 4 accepted (2 trials): alpha = 1/2 loses (G(4) = 1.94 / 2.5 = 0.78), but the
    # generous (1 + 1) / (2 + 1) = 2/3 gives G(4) = 2.6 / 2.5 = 1.04: too little evidence to leave.
    c = controller_with(impl, rounds=[(4, (1,))], **costs)
    assert c.decide() == 4 and c.speculating, (
        "one round, 1 of 4 drafts accepted: alpha = 1/2 loses here, but the generous alpha "
        "(accepted + 1) / (trials + 1) = 2/3 wins (G(4) = 1.04): keep initial_lookahead until "
        f"MIN_ROUNDS counts are in ({CHAPTER})"
    )
    # 0 of 4 accepted (1 trial): even (0 + 1) / (1 + 1) = 1/2 loses: leave now.
    c = controller_with(impl, rounds=[(4, (0,))], **costs)
    c.until_probe = 0
    assert c.decide() == 0 and not c.speculating, (
        "one round, nothing accepted, where a verify costs 2.1 plain steps: even the generous "
        "alpha 1/2 gives G < 1, so each further round at K = 4 only loses; leave for plain now "
        f"({CHAPTER})"
    )
    assert len(c.rounds) == 0 and c.until_probe == max(c.probe_interval, c.probe_wait()), (
        "leaving early is leaving: `rounds` cleared, the next probe max(probe_interval, "
        "probe_wait()) rounds away"
    )


def test_task_2_hysteresis_band(impl, use_ref):
    use_ref(*ESTIMATES)
    # c = 0.25, v = 1 + 0 K, alpha = 0.3: G(1) = 1.3 / 1.25 = 1.04, inside the band [1, 1.05].
    evidence = dict(plain=[0.01] * 2, draft=[(1, 0.0025)], verify=[(1, 0.01)],
                    rounds=[(1, (0,))] * 7 + [(1, (1,))] * 3)
    c = controller_with(impl, **evidence)
    assert 1.0 < c.best_lookahead()[1] < 1.05
    assert c.decide() == 1 and c.speculating, "inside the band, a speculating controller keeps speculating"
    c = controller_with(impl, **evidence)
    c.speculating, c.until_probe = False, 10
    assert c.decide() == 0 and not c.speculating, (
        "inside the band, a plain controller stays plain: leave below 1, come back "
        f"above 1 + margin, or it flips every round ({CHAPTER})"
    )
    # alpha = 0.2: G(1) = 1.2 / 1.25 = 0.96 — below plain, though within `margin` of it.
    slow = dict(evidence, rounds=[(1, (0,))] * 8 + [(1, (1,))] * 2)
    c = controller_with(impl, **slow)
    assert 0.95 < c.best_lookahead()[1] < 1.0
    assert c.decide() == 0 and not c.speculating, (
        "G* = 0.96 < 1: a speculating controller leaves at once — the margin only delays the "
        f"return, never the exit, or a 4% slow-down would be kept ({CHAPTER})"
    )


def test_task_2_a_batched_round_counts_once_per_row(impl, use_ref):
    use_ref(*ESTIMATES)
    c = impl.fallback.FallbackController(margin=0.05)
    c.update(0, 0, None, 0.01)
    c.update(0, 0, None, 0.01)
    c.observe_draft_step(0.001)
    k = c.update(4, [0] * 8, 0.004, 0.016)  # one batched round of 8 rows, nothing accepted
    assert k == 0 and not c.speculating, (
        "a batched round of 8 rows is 8 row-rounds of evidence (>= MIN_ROUNDS): with nothing "
        f"accepted, G* < 1 and the batch goes plain after one round; got K = {k} ({CHAPTER})"
    )


# A batch of 8 on a CPU: c = 0.1, v(4) = 2.15 plain steps, and a 100-token prefill of 20 plain
# steps (p = 0.2 steps per token): a failed probe after m plain rounds wastes 0.02 m + 1.55 steps.
PROBE_COSTS = dict(plain=[0.01] * 2, draft=[(4, 0.004)], verify=[(4, 0.0215)], prefill=(100, 0.2))


@pytest.mark.parametrize("kw, want, why", [
    (dict(probe_budget=0.05), 52,
     "ceil((K c + v(K) - 1) / (probe_budget - c p)) = ceil(1.55 / (0.05 - 0.02)) = 52"),
    (dict(probe_budget=0.06), 39, "with probe_budget 0.06: ceil(1.55 / 0.04) = 39"),
    (dict(probe_budget=0.06, initial_lookahead=2), 34,
     "the probe runs at K = initial_lookahead = 2, where v(2) is the measured v(4) = 2.15: "
     "ceil((0.2 + 1.15) / 0.04) = 34"),
    (dict(prefill=None, probe_budget=0.04), 39, "without a prefill p = 0: ceil(1.55 / 0.04) = 39"),
    (dict(probe_budget=0.015), 256,
     "probe_budget 0.015 <= c p = 0.02: the catch-up alone is over budget, so the longest backoff "
     "probe_every * max_backoff = 256"),
    (dict(probe_budget=0.001, prefill=None), 256, "ceil(1.55 / 0.001) = 1550 is capped at 256"),
    (dict(draft=(), verify=()), 0, "c unknown (no draft call timed yet): no wait, 0"),
])
def test_task_2_probe_wait_bounds_what_a_failed_probe_costs(impl, use_ref, kw, want, why):
    use_ref(*ESTIMATES)
    c = controller_with(impl, **{**PROBE_COSTS, **kw})
    got = c.probe_wait()
    assert got == want, (
        f"probe_wait() = {got}, expected {want}: {why}. A failed probe after m plain rounds wastes "
        f"the draft's catch-up, c p m plain steps, and K c + v(K) - 1 steps of its round; wait for "
        f"the smallest m where that is at most probe_budget * m ({CHAPTER})"
    )


def test_task_2_probe_wait_prices_the_probe_at_the_capped_k(impl, use_ref):
    use_ref(*ESTIMATES)
    c = controller_with(impl, probe_budget=0.06, **PROBE_COSTS)
    c.cap = 2  # memory pressure lowered the cap below initial_lookahead = 4
    got = c.probe_wait()
    assert got == 34, (
        f"probe_wait() = {got}, expected 34: the probe runs at K = min(initial_lookahead, cap) = 2, "
        f"where v(2) is the measured v(4) = 2.15: ceil((0.2 + 1.15) / 0.04) = 34 ({CHAPTER})"
    )


def test_task_2_probes_wait_for_their_budget(impl, use_ref):
    use_ref(*ESTIMATES, "fallback.FallbackController.probe_wait")
    c = controller_with(impl, rounds=[(4, (0,))] * 4, probe_every=8, max_backoff=8,
                       probe_budget=0.05, **PROBE_COSTS)
    assert c.decide() == 0 and not c.speculating, "nothing accepted in 4 rounds: leave for plain"
    assert c.until_probe == 52, (
        f"leaving speculation sets until_probe = max(probe_interval, probe_wait()) = max(8, 52) = "
        f"52, got {c.until_probe}: a probe every 8 tokens would cost 1.7 plain steps each time "
        f"it fails, a fifth of the time it interrupts ({CHAPTER})"
    )
    plain = [c.update(0, 0, None, 0.01) for _ in range(52)]
    assert plain[:51] == [0] * 51 and plain[51] == 4 and c.probing, (
        f"the probe comes after 52 plain rounds; K per round: {plain}"
    )
    assert c.update(4, 0, 0.004, 0.0215) == 0 and c.probe_interval == 16, (
        "a failed probe goes back to plain and doubles probe_interval (8 -> 16)"
    )
    assert c.until_probe == 52, (
        f"after a failed probe, until_probe = max(probe_interval, probe_wait()) = max(16, 52) = 52, "
        f"got {c.until_probe} ({CHAPTER})"
    )


# Task 3: the controller's side of faults ----------------------------------------------------------
def test_task_3_disable_draft(impl, use_ref):
    use_ref(*ESTIMATES, *DECISIONS)
    c = impl.fallback.FallbackController()
    c.update(0, 0, None, 0.01)
    c.update(0, 0, None, 0.01)
    c.observe_draft_step(0.001)
    assert c.lookahead > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c.disable_draft("the draft raised boom")
    assert [w.category for w in caught] == [impl.fallback.FallbackWarning] and "boom" in str(caught[0].message), (
        "disable_draft reports through `report`: one FallbackWarning carrying the reason"
    )
    assert c.lookahead == 0 and not c.draft_ok and c.faults == ["the draft raised boom"], (
        "disable_draft reports the reason (faults + a FallbackWarning) and makes K = 0"
    )
    assert [winning_round(c, 0, 0) for _ in range(50)] == [0] * 50, "and K stays 0: no probes without a draft"


def test_task_3_memory_pressure_halves_the_cap(impl, use_ref):
    use_ref(*ESTIMATES, *DECISIONS)
    c = impl.fallback.FallbackController(initial_lookahead=4)
    c._lookahead = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = []
        for _ in range(3):
            assert c.memory_pressure() is True
            steps.append((c.cap, c.lookahead))
    assert steps == [(2, 2), (1, 1), (0, 0)], (
        f"each allocation failure halves the cap from the current K (4 -> 2 -> 1 -> 0) and K "
        f"follows; got (cap, K) = {steps}"
    )
    assert len(c.faults) == 3 and len(caught) == 3, "each lowering is reported (faults + FallbackWarning)"
    assert c.memory_pressure() is False and len(c.faults) == 3, (
        "at cap 0 nothing is left to lower: return False (the batch must shrink) and report nothing"
    )
    assert c.update(0, 0, None, 0.01) == 0, "with cap 0 every round is plain"


# Task 4: the single-stream loop -------------------------------------------------------------------
class ScheduleController:
    """A controller that ignores the evidence: K follows `schedule` round by round (cycling)."""

    needs_draft_step = False

    def __init__(self, schedule):
        self.schedule, self.i, self.updates, self.faults = list(schedule), 0, [], []

    @property
    def lookahead(self):
        return self.schedule[self.i % len(self.schedule)]

    def update(self, num_drafted, num_accepted, draft_time_s=None, verify_time_s=None):
        self.updates.append((num_drafted, num_accepted, draft_time_s, verify_time_s))
        self.i += 1
        return self.lookahead

    def observe_prefill(self, num_tokens, seconds):
        self.prefill = (num_tokens, seconds)
        self.i += 1

    def observe_draft_step(self, seconds):
        return self.lookahead

    def report(self, message):
        self.faults.append(message)

    def disable_draft(self, reason):
        self.faults.append(reason)
        self.schedule, self.i = [0], 0

    def memory_pressure(self):
        self.faults.append("memory")
        self.schedule = [min(k, 1) for k in self.schedule]
        return True


def forced(ref, schedule, **kwargs):
    """The reference controller forced through a schedule (its fault handling stays real)."""

    class Forced(ref.fallback.FallbackController):
        needs_draft_step = False

        def decide(self):
            self.i = getattr(self, "i", 0) + 1
            if not self.draft_ok:
                return 0
            return min(schedule[self.i % len(schedule)], self.cap)

    c = Forced(**kwargs)
    c._lookahead = schedule[0]
    return c


SCHEDULES = [[0, 0, 3, 0, 1, 2, 0, 0, 0, 5], [4, 0, 1], [0]]


def run_single(impl, ref, models, controller, prompt=PROMPT, max_tokens=40, **kwargs):
    draft, target = models
    decoder = ref.draft.SpeculativeDecoder(draft, target, lookahead=2)
    return list(impl.fallback.fallback_generate(decoder, controller, mx.array(prompt), max_tokens, **kwargs))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["mixed", "spec-first", "plain"])
@pytest.mark.parametrize("pair", ["llama", "markov"])
def test_task_4_greedy_equals_plain_across_switches(impl, ref, use_ref, pair, schedule, llama_models, markov_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    models = {"llama": llama_models, "markov": markov_models}[pair]
    expected = mlx_lm_greedy(models[1], PROMPT, 40)
    controller, stats = ScheduleController(schedule), SpecStats()
    out = run_single(impl, ref, models, controller, stats=stats)
    got = [t for t, _ in out]
    assert got == expected, (
        f"{pair}, K schedule {schedule}: the output must be the target's greedy output token for "
        f"token whatever K the controller picks, 0 (plain) included.\n got      {got}\n expected "
        f"{expected}\nAfter plain rounds the draft cache lags: feed it every unseen token ({CHAPTER})"
    )
    ks = stats.lookahead_per_round
    assert stats.emitted == 40 and len(ks) == stats.rounds
    plain_rounds = [u for u in controller.updates if u[0] == 0]
    assert sum(k == 0 for k in ks) == len(plain_rounds) + (schedule[0] == 0), (
        "every plain round is recorded as stats.record_round(0, 0, 1) and reported as "
        "controller.update(0, 0, None, seconds) — except the prompt's own call, which goes to "
        "observe_prefill"
    )
    if schedule[0] == 0:
        assert controller.prefill[0] == len(PROMPT), "observe_prefill(L, seconds) for the prompt's call"
    assert all(u[3] is not None and u[3] >= 0 for u in controller.updates), "every round is timed"


def test_task_4_calls(impl, ref, use_ref, llama_models):
    """Plain rounds cost one target call and no draft call; the draft catches up in one call."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    draft, target = CallCounter(llama_models[0]), CallCounter(llama_models[1])
    schedule = [0, 0, 0, 0, 2, 0, 0, 0, 3]
    controller, stats = ScheduleController(schedule), SpecStats()
    run_single(impl, ref, (draft, target), controller, max_tokens=30, stats=stats)
    ks = stats.lookahead_per_round
    assert target.calls == stats.rounds, (
        f"one target call per round, plain or speculative: {target.calls} calls for {stats.rounds} rounds"
    )
    assert draft.calls == sum(ks), (
        f"the draft runs only in speculative rounds, K calls each (sum K = {sum(ks)}), got "
        f"{draft.calls}: catch up on the tokens of the plain rounds inside the first draft call, "
        "not one call per token"
    )
    assert [k for k, _, _, _ in controller.updates if k] == [k for k in ks if k], (
        "controller.update(K, n, ...) after every speculative round, with the K actually drafted"
    )


def test_task_4_the_draft_catches_up(impl, ref, use_ref):
    """A draft equal to the target accepts every greedy draft, if it has seen every token."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    stats = SpecStats()
    run_single(impl, ref, tiny_llama_pair(seed=0, noise=0.0), ScheduleController([0, 0, 0, 3, 0, 0, 4]),
               max_tokens=40, stats=stats)
    assert stats.drafted > 0 and stats.accepted == stats.drafted, (
        f"an identical draft rejected {stats.drafted - stats.accepted} of {stats.drafted} drafts: "
        "after plain rounds, feed the draft every committed token its cache has not seen "
        f"(its offset tells how many it has) before drafting ({CHAPTER})"
    )


def test_task_4_max_tokens_and_eos(impl, ref, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    expected = mlx_lm_greedy(llama_models[1], PROMPT, 30)
    for schedule in ([0], [5], [0, 3]):
        for n in (1, 2, 7):
            got = [t for t, _ in run_single(impl, ref, llama_models, ScheduleController(schedule), max_tokens=n)]
            assert got == expected[:n], f"schedule {schedule}, max_tokens={n}: exactly {n} tokens"
        eos = expected[9]
        first = expected.index(eos)
        got = [t for t, _ in run_single(impl, ref, llama_models, ScheduleController(schedule), eos_token_ids=[eos])]
        assert got == expected[: first + 1], f"schedule {schedule}: stop right after the first EOS"
    assert run_single(impl, ref, llama_models, ScheduleController([2]), max_tokens=0) == []
    with raises(ValueError, "an empty prompt is refused"):
        run_single(impl, ref, llama_models, ScheduleController([0]), prompt=[])
    with raises(ValueError, "temperature > 0 without a key is refused"):
        run_single(impl, ref, llama_models, ScheduleController([0]), temperature=1.0)


def exact_marginals(model, prompt, num_tokens):
    """The exact distribution of each of the first num_tokens tokens (Markov chain)."""
    transitions = np.array(model.transitions, dtype=np.float64)
    dist = np.eye(model.vocab_size)[prompt[-1]]
    out = []
    for j in range(num_tokens):
        dist = dist @ transitions[(len(prompt) - 1 + j) % model.period]
        out.append(dist)
    return out


def chi_square_p(samples, probs):
    """Chi-square goodness of fit; cells expected below 5 are pooled into one."""
    observed = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    expected = probs * len(samples)
    big = expected >= 5
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return scipy_stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


SAMPLING_PROMPT, NUM_SAMPLES, SAMPLED_TOKENS = [2, 5], 1200, 4


@pytest.fixture(scope="module")
def sampling_pair():
    """V = 8, period 3, a draft far from the target (acceptance ~ 0.5): rejections are common."""
    return markov_pair(vocab_size=8, seed=11, mix=0.6, period=3, concentration=0.5)


def test_task_4_samples_follow_the_target_across_switches(impl, ref, use_ref, sampling_pair):
    """Tokens 1-4 come from plain rounds, accepted drafts, corrections and bonus tokens, mixed."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    keys = mx.random.split(mx.random.key(77), NUM_SAMPLES)
    samples = []
    for i in range(NUM_SAMPLES):
        schedule = [[0, 2, 0, 1], [2, 0, 1], [0, 0, 1]][i % 3]
        out = run_single(impl, ref, sampling_pair, ScheduleController(schedule), SAMPLING_PROMPT,
                         SAMPLED_TOKENS, temperature=1.0, key=keys[i])
        samples.append([t for t, _ in out])
    samples = np.array(samples)
    # 5 tests at a 1e-3 false-alarm rate each (seeded: the outcome is deterministic anyway).
    for j, p_j in enumerate(exact_marginals(sampling_pair[1], SAMPLING_PROMPT, SAMPLED_TOKENS)):
        p_value = chi_square_p(samples[:, j], p_j)
        assert p_value > 1e-3, (
            f"token {j + 1} over {NUM_SAMPLES} sampled runs with forced switches does not follow "
            f"the target's distribution (chi-square p = {p_value:.1e}): a plain round samples "
            "make_probs(logits, T) with a fresh split of the key; a speculative round splits "
            "the key for drafting and verifying, as in Week 2"
        )
    first = exact_marginals(sampling_pair[1], SAMPLING_PROMPT, 1)[0]
    joint = first[:, None] * np.array(sampling_pair[1].transitions, dtype=np.float64)[len(SAMPLING_PROMPT) % 3]
    p_value = chi_square_p(samples[:, 0] * 8 + samples[:, 1], joint.reshape(-1))
    assert p_value > 1e-3, (
        f"the pair (token 1, token 2) does not follow the target's joint law (chi-square p = "
        f"{p_value:.1e}): consecutive plain rounds must each split the key, never reuse it"
    )


class FlakyModel(CallCounter):
    """A model that raises `error` on its calls number `on` (1-based).

    An allocation failure strikes while the call runs: the model has already written its new
    keys and values into the cache when it raises (a draft fault raises before).
    """

    def __init__(self, model, on, error):
        super().__init__(model)
        self.on, self.error = set(on), error

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.on:
            if "malloc" in str(self.error):
                self.model(*args, **kwargs)
            raise self.error
        return self.model(*args, **kwargs)


class StickyCache(KVCache):
    """A KVCache that refuses to roll back once it holds `limit` tokens (a wrapped window)."""

    limit = 14

    def is_trimmable(self):
        return self.offset < self.limit


class StickyModel(CallCounter):
    def make_cache(self):
        return [StickyCache() for _ in self.model.layers]


def fault_run(impl, ref, draft, target, schedule=(0, 0, 3, 2, 0, 4), **kwargs):
    controller = forced(ref, list(schedule))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [t for t, _ in run_single(impl, ref, (draft, target), controller, max_tokens=40, **kwargs)]
    return got, controller, caught


def test_task_4_survives_a_draft_that_raises(impl, ref, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    expected = mlx_lm_greedy(llama_models[1], PROMPT, 40)
    draft = FlakyModel(llama_models[0], on=[6], error=ValueError("draft weights went missing"))
    got, controller, caught = fault_run(impl, ref, draft, llama_models[1])
    assert got == expected, (
        "when the draft raises mid-generation, continue on the target alone: nothing emitted may "
        f"be lost or repeated.\n got      {got}\n expected {expected} ({CHAPTER})"
    )
    assert not controller.draft_ok and any("draft weights went missing" in f for f in controller.faults), (
        "report it: controller.disable_draft(reason) with the draft's error in the reason"
    )
    assert draft.calls == 6, "after the failure the draft is never called again"


@pytest.mark.parametrize("who", ["target", "draft"])
def test_task_4_memory_pressure_lowers_k_and_retries(impl, ref, use_ref, llama_models, who):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    expected = mlx_lm_greedy(llama_models[1], PROMPT, 40)
    draft, target = llama_models
    if who == "target":  # calls 1-3 are plain (prefill, then two queued steps); 4 verifies K = 3
        target = FlakyModel(target, on=[4, 5], error=RuntimeError(OOM))
    else:
        draft = FlakyModel(draft, on=[2], error=RuntimeError(OOM))
    try:
        got, controller, _ = fault_run(impl, ref, draft, target)
    except NotImplementedError:
        raise
    except Exception as error:
        pytest.fail(f"after an allocation failure in the {who} model the loop raised "
                    f"{type(error).__name__}({error}): in a K > 0 round, put both caches back to "
                    "their lengths before the round (the failed call may have written to them), "
                    "call controller.memory_pressure() and run the round again")
    assert got == expected, (
        f"an allocation failure in the {who} model must not lose or repeat tokens: put both caches "
        "back to their lengths before the round, lower K (controller.memory_pressure()) and run "
        f"the round again.\n got      {got}\n expected {expected}"
    )
    assert controller.cap < 8 and any("memory" in f for f in controller.faults), (
        "the failure must reach controller.memory_pressure()"
    )
    assert controller.draft_ok, "memory pressure is not a broken draft: keep speculating at a smaller K"


def test_task_4_memory_limit(impl, ref, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    expected = mlx_lm_greedy(llama_models[1], PROMPT, 40)
    got, controller, _ = fault_run(impl, ref, *llama_models, memory_limit_mb=1e-6)
    assert got == expected
    assert controller.cap == 0, (
        "memory_limit_mb: after every speculative round whose active memory (mx.get_active_memory) "
        "exceeds the limit, call memory_pressure(): K goes down to 0"
    )


def test_task_4_a_cache_that_cannot_roll_back(impl, ref, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    draft, target = llama_models
    expected = mlx_lm_greedy(target, PROMPT, 40)
    for schedule in ([0, 0, 3, 2, 0, 4], [2, 3]):  # wraps before a round / during one
        got, controller, caught = fault_run(impl, ref, draft, StickyModel(target), schedule)
        assert got == expected, (
            f"schedule {schedule}: a cache that cannot roll back must finish the request with plain "
            f"decoding, not an error nor a wrong token.\n got      {got}\n expected {expected}. A "
            "target cache left holding rejected drafts must be rebuilt from the committed tokens"
        )
        assert not controller.draft_ok and any("roll back" in f or "trim" in f for f in controller.faults), (
            "say so clearly: controller.disable_draft with a reason that names the rollback"
        )


def test_task_4_with_the_controller(impl, ref, use_ref, llama_models):
    """The real controller (the reference's) on tiny llamas: any decision, same tokens."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    expected = mlx_lm_greedy(llama_models[1], PROMPT, 40)
    controller, stats = ref.fallback.FallbackController(calibration_rounds=1), SpecStats()
    got = [t for t, _ in run_single(impl, ref, llama_models, controller, stats=stats)]
    assert got == expected
    assert stats.lookahead_per_round[0] == 0, "a fresh controller says K = 0 first (calibration)"
    assert controller.prefill is not None and controller.prefill[0] == len(PROMPT)
    assert controller.draft_step_s is not None, (
        "before the first draft round, time one draft call on a throwaway cache "
        "(controller.observe_draft_step) when controller.needs_draft_step"
    )


# Task 5: the batched loop -------------------------------------------------------------------------
BATCH = [[5], [1, 5, 7], [3, 9, 2, 7, 11, 4, 0, 6, 8], [2, 2]]


def run_batch(impl, models, controller, prompts=BATCH, max_tokens=24, **kwargs):
    draft, target = models
    return impl.fallback.batched_fallback_decode(
        [list(p) for p in prompts], draft, target, controller, max_tokens, **kwargs)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["mixed", "spec-first", "plain"])
@pytest.mark.parametrize("pair", ["llama", "markov"])
def test_task_5_rows_equal_plain_greedy(impl, use_ref, pair, schedule, llama_models, markov_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    models = {"llama": llama_models, "markov": markov_models}[pair]
    controller, stats = ScheduleController(schedule), SpecStats()
    got = run_batch(impl, models, controller, stats=stats)
    for i, prompt in enumerate(BATCH):
        expected = mlx_lm_greedy(models[1], prompt, 24)
        assert got[i] == expected, (
            f"{pair}, schedule {schedule}, row {i} (prompt length {len(prompt)}): each row must be "
            f"its prompt's greedy output.\n got      {got[i]}\n expected {expected}\nAfter m plain "
            "rounds every row's draft lags by m + 2 tokens: feed them in one [B, m + 2] call "
            f"({CHAPTER})"
        )
    spec = [u for u in controller.updates if u[0] > 0]
    assert all(isinstance(u[1], (list, tuple)) for u in spec), (
        "a batched round reports one accepted count per live row: update(K, [n_0, n_1, ...], ...)"
    )
    assert stats.emitted == 24 * len(BATCH)


def test_task_5_the_draft_catches_up(impl, use_ref):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    stats = SpecStats()
    run_batch(impl, tiny_llama_pair(seed=0, noise=0.0), ScheduleController([0, 0, 3, 0, 0, 0, 2]), stats=stats)
    assert stats.drafted > 0 and stats.accepted == stats.drafted, (
        f"an identical draft rejected {stats.drafted - stats.accepted} of {stats.drafted} drafts: "
        "after m plain rounds every row's draft lags by m + 2 tokens; feed all of them"
    )


class InputWidths(CallCounter):
    """A model that records how many tokens each of its calls was fed (the input's width)."""

    def __init__(self, model):
        super().__init__(model)
        self.widths = []

    def __call__(self, inputs, *args, **kwargs):
        self.widths.append(inputs.shape[1])
        return super().__call__(inputs, *args, **kwargs)


def test_task_5_the_draft_catches_up_on_a_window(impl, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    draft, target = llama_models
    window = impl.fallback.DRAFT_WINDOW
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, size=n).tolist() for n in (window + 30, window + 5, 7)]
    spy, lag = InputWidths(draft), window + 2  # plain rounds: then the draft lags window + 4 tokens
    schedule = [0, 2] + [0] * lag + [2] + [0] * 40
    got = impl.fallback.batched_fallback_decode(prompts, spy, target, ScheduleController(schedule), lag + 12)
    for i, prompt in enumerate(prompts):
        assert got[i] == mlx_lm_greedy(target, prompt, lag + 12), f"row {i}: not its greedy output"
    assert spy.widths == [window, 1, window, 1], (
        f"draft calls were fed {spy.widths} tokens wide; expected {[window, 1, window, 1]}: the draft's "
        f"first round sees each row's last DRAFT_WINDOW = {window} tokens (prompts of {window + 30} "
        f"and {window + 5} tokens would cost it their whole length), and after {lag} plain rounds "
        f"the lag ({lag} + 2) exceeds the window, so the draft cache is made again from the window "
        f"instead of catching up ({CHAPTER})"
    )


def test_task_5_rows_leave_at_eos(impl, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    full = [mlx_lm_greedy(llama_models[1], p, 24) for p in BATCH]
    eos = full[1][5]
    got = run_batch(impl, llama_models, ScheduleController([0, 2, 0, 0, 3]), eos_token_ids=[eos])
    for i, row in enumerate(full):
        cut = row[: row.index(eos) + 1] if eos in row else row
        assert got[i] == cut, f"row {i} stops right after its first EOS ({eos}); the others go on"


def test_task_5_samples_follow_the_target_per_row(impl, use_ref, sampling_pair):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    prompts, copies = [[2, 5], [1, 3, 4]], 500
    batch = [p for p in prompts for _ in range(copies)]
    got = run_batch(impl, sampling_pair, ScheduleController([0, 2, 0, 1]), batch, SAMPLED_TOKENS,
                    temperature=1.0, key=mx.random.key(5))
    samples = np.array(got).reshape(len(prompts), copies, SAMPLED_TOKENS)
    # 8 tests at 1e-3 each: under 1% for a correct loop (and seeded: deterministic).
    for p, prompt in enumerate(prompts):
        for j, probs in enumerate(exact_marginals(sampling_pair[1], prompt, SAMPLED_TOKENS)):
            p_value = chi_square_p(samples[p, :, j], probs)
            assert p_value > 1e-3, (
                f"prompt {prompt}, token {j + 1}: over {copies} rows the tokens do not follow the "
                f"target (chi-square p = {p_value:.1e}); each row samples with its own key, split "
                "every round, in plain rounds too"
            )


def test_task_5_faults(impl, ref, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    draft, target = llama_models
    expected = [mlx_lm_greedy(target, p, 24) for p in BATCH]
    cases = {
        "draft raises": (FlakyModel(draft, [4], ValueError("draft lost")), target, [0, 2, 3], {}),
        "OOM in a speculative round": (draft, FlakyModel(target, [3], RuntimeError(OOM)), [0, 0, 3], {}),
        "OOM at K = 0 (halve the batch)": (draft, FlakyModel(target, [3, 4], RuntimeError(OOM)), [0], {}),
        "memory limit": (draft, target, [0, 2], dict(memory_limit_mb=1e-6)),
    }
    for name, (d, t, schedule, kwargs) in cases.items():
        controller = forced(ref, schedule)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            got = run_batch(impl, (d, t), controller, **kwargs)
        assert got == expected, (
            f"{name}: every row must still be its prompt's greedy output, nothing lost or "
            f"repeated.\n got      {got}\n expected {expected} ({CHAPTER})"
        )
        assert controller.faults, f"{name}: the fault must be reported through the controller"


def test_task_5_a_batch_reports_how_far_its_shortest_row_moved(impl, use_ref, markov_models, monkeypatch):
    """A batch ends when its last row does: each speculative round reports one count, d - 1,
    where d is how far the shortest live row's length moved (a row stopped by EOS is done)."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    verified = []
    real_verify = impl.fallback.verify_speculation

    def spy(*args, **kwargs):
        n, tokens = real_verify(*args, **kwargs)
        verified.append(n)
        return n, tokens

    monkeypatch.setattr(impl.fallback, "verify_speculation", spy)
    max_tokens = 24
    free = run_batch(impl, markov_models, ScheduleController([0]), max_tokens=max_tokens)
    eos_token = free[0][9]  # a token the first row emits mid-way: rows stop at different times
    seen = {"drifted": False, "eos": False}
    for eos in ([], [eos_token]):
        verified.clear()
        controller = ScheduleController([0, 0, 3])
        outputs = run_batch(impl, markov_models, controller, max_tokens=max_tokens, eos_token_ids=eos)
        first = 1 if hasattr(controller, "prefill") else 0  # the prompts' plain call: one token each
        lengths, live, calls = [first] * len(BATCH), list(range(len(BATCH))), iter(verified)
        done = {r for r in live if first and outputs[r][0] in eos}

        def advance(r, gained):
            """Row r's length after gaining up to `gained` tokens (cut at max_tokens and EOS)."""
            new = outputs[r][lengths[r] : min(lengths[r] + gained, max_tokens)]
            cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            if new[cut - 1] in eos:
                done.add(r)
            return lengths[r] + cut

        live = [r for r in live if r not in done]
        for k, counts, _, _ in controller.updates:
            if k == 0:
                for r in list(live):
                    lengths[r] = advance(r, 1)
            else:
                ns = {r: next(calls) for r in live}
                behind = min(lengths[r] for r in live)
                seen["drifted"] |= len({lengths[r] for r in live}) > 1
                for r in live:
                    lengths[r] = advance(r, ns[r] + 1)
                lowest = min(max_tokens if r in done else lengths[r] for r in live)
                seen["eos"] |= any(r in done and lengths[r] < max_tokens for r in live)
                want = [min(lowest - behind, k + 1) - 1]
                assert list(counts) == want, (
                    f"a batched round drafting {k} (eos {eos}): the shortest of rows {live} held "
                    f"{behind} tokens before the round; after it the rows hold "
                    f"{[lengths[r] for r in live]} (accepted {[ns[r] for r in live]}, done "
                    f"{sorted(done & set(live))}), so the shortest live row moved d = "
                    f"{want[0] + 1}: report [d - 1] = {want}, not {list(counts)}. The batch ends "
                    f"when its last row does: that is the progress a round buys ({CHAPTER})"
                )
            live = [r for r in live if lengths[r] < max_tokens and r not in done]
    assert seen["drifted"], "the test needs rows that drift apart (check the Markov pair's acceptance)"
    assert seen["eos"], "the test needs a row stopped by EOS while others decode (check eos_token)"
