"""Week 4 Day 3 — fallback: the controller. Chapter: book/src/week4-03-fallback.md

Task 1: FallbackController estimates (alpha, s, c, v(K) line, goodput, best K) — synthetic timings
Task 2: FallbackController.update / decide (calibration, hysteresis, probing with backoff)
The loops that run the controller's decisions are Day 4's (tests/test_week_4_day_4.py).

The provided code (specdec/kit/fallback_policy.py: the constructor, verify_cost, could_win,
probe_wait, the refinements, memory_pressure, disable_draft, the loops' fault helpers) has its
own kit tests in tests/test_fallback_policy.py.

Grade one task with
    pytest tests/test_week_4_day_3.py --impl student -k task_1
No test reads a clock: timings are injected, so every check is deterministic.
"""

import re

import numpy as np
import pytest

from support import raises

CHAPTER = "book/src/week4-03-fallback.md"
THEORY = ("theory.expected_tokens_per_round",)  # Week 2 Day 5: Task 1 uses the reference's E
ESTIMATES = THEORY + tuple(
    f"fallback.FallbackController.{m}"
    for m in ("alpha", "step_time", "draft_cost", "verify_line", "goodput", "best_lookahead")
)
DECISIONS = tuple(f"fallback.FallbackController.{m}" for m in ("update", "decide"))


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
def test_task_1_a_new_controller_knows_nothing(impl, use_ref):
    use_ref(*THEORY)
    c = impl.fallback.FallbackController(max_lookahead=3, initial_lookahead=6, window=5)
    assert c.alpha() is None and c.step_time() is None and c.draft_cost() is None, (
        "with no evidence the estimates are None, not a guess"
    )
    assert c.verify_cost(0) == 1.0, "v(0) = 1 by definition: a plain step is the unit"
    assert c.verify_cost(2) is None and c.goodput(2) is None and c.best_lookahead() is None
    assert c.goodput(0) == 1.0, "G(0) = 1: plain decoding is the baseline"


def test_task_1_alpha_counts_only_the_trials_that_ran(impl, use_ref):
    use_ref(*THEORY)
    # K=4 all accepted: 4 trials; K=4, n=1: 2 trials; a batched round K=2 with rows n=0 and n=2.
    c = controller_with(impl, rounds=[(4, (4,)), (4, (1,)), (2, (0, 2))])
    assert c.alpha() == pytest.approx(7 / 9), (
        "alpha = sum(n) / sum(n + [n < K]) over every row of every round: the drafts after a "
        f"rejection never ran, they are not failures; expected 7/9, got {c.alpha()} ({CHAPTER})"
    )


def test_task_1_costs_in_plain_steps(impl, use_ref):
    use_ref(*THEORY)
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


def test_task_1_priors_and_clamps(impl, use_ref):
    use_ref(*THEORY)
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
    use_ref(*THEORY)
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
    use_ref(*THEORY)
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
    for bad, wrong in [((-1, 0), "-1"), ((2, 3), "3"), ((2, -1), "-1"), ((3, [1, 4]), "4"),
                       ((3, []), r"(?i)empty|\[\]|no (accepted )?count")]:
        with raises(ValueError, f"update{bad} must be refused: num_drafted >= 0, at least one count, "
                                f"every count in [0, num_drafted] ({CHAPTER})") as caught:
            c.update(*bad)
        assert re.search(wrong, str(caught.value)), (
            f"update{bad} raised {caught.value!r}: the message must say what is wrong (name the "
            f"offending value{'; an empty list: say that no count was reported' if bad[1] == [] else ''})"
        )
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
        f"until MIN_ROUNDS rounds of evidence K stays at most initial_lookahead: lucky rounds must "
        f"not raise it; got {ks}"
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
    assert len(ks) == 4 and all(0 < k < 4 for k in ks[:-1]), (
        "before MIN_ROUNDS = 4 counts an unlucky round steps K down instead of leaving: read "
        "generously (alpha = (0 + 1) / (1 + 1) = 1/2 after the first round, a K not measured yet "
        "priced by the line, v(K) = 1 + 0.1 K) a smaller K still wins (G(1) = 1.5 / 1.2 > 1); at "
        f"MIN_ROUNDS counts alpha = 0 and every G(K) < 1: leave; K per round {ks} ({CHAPTER})"
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


def test_task_2_an_unlucky_early_round_steps_k_down_before_it_leaves(impl, use_ref):
    use_ref(*ESTIMATES)
    # Costs of a batch of 8 on a CPU: c = 0.1, v(4) = 2.1 plain steps measured.
    costs = dict(plain=[0.01] * 2, draft=[(4, 0.004)], verify=[(4, 0.021)], initial_lookahead=4)
    # 0 of 4 accepted (1 trial): the generous alpha is (0 + 1) / (1 + 1) = 1/2. Priced by the
    # measured v(4) every K loses (G(3) = 0.78), but K = 1 was not measured: the line through
    # (0, 1) and (4, 2.1) gives v(1) = 1.275, and G(1) = 1.5 / 1.375 = 1.09 > 1.
    c = controller_with(impl, rounds=[(4, (0,))], **costs)
    k = c.decide()
    assert k == 1 and c.speculating, (
        "one round at K = 4 accepted nothing: too little evidence to leave on. Read generously, "
        "alpha = (0 + 1) / (1 + 1) = 1/2, and a K not measured yet priced by the line through "
        "(0, 1): v(1) = 1.275, G(1) = 1.09 > 1, so `refinements()` steps K down to 1 and `decide` "
        f"returns it; got K = {k} ({CHAPTER})"
    )
    # K = 1 measured at 1.6 plain steps, and nothing accepted again: alpha = 1/3 even read
    # generously, G(1) = 1.33 / 1.7 = 0.78, and every K loses: leave now, before MIN_ROUNDS.
    c = controller_with(impl, rounds=[(4, (0,)), (1, (0,))], plain=[0.01] * 2,
                        draft=[(4, 0.004), (1, 0.001)], verify=[(4, 0.021), (1, 0.016)])
    c.until_probe = 0
    k = c.decide()
    assert k == 0 and not c.speculating, (
        "two rounds, nothing accepted, K = 1 measured at 1.6 plain steps: even the generous alpha "
        "1/3 gives G < 1 at every K, so each further round only loses; `refinements()` returns "
        f"None and `decide` leaves for plain now; got K = {k} ({CHAPTER})"
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
