"""Kit tests: the provided half of the fallback controller and the loops' helpers.

specdec/kit/fallback_policy.py is provided code (Week 4 Days 3-4): the constructor's checks and
initial state, `verify_cost`, `could_win`, `probe_wait` (the probe budget), `memory_pressure`,
`disable_draft` and the helpers the loops call. It runs here on the reference's
FallbackController (the estimates it reads are Day 3 Task 1's); the graded tests of the exercise
are in tests/test_week_4_day_3.py (the controller) and tests/test_week_4_day_4.py (the loops).
"""

import warnings

import pytest

from specdec.kit import fallback_policy
from specdec.kit.impl import get_impl
from support import raises
from test_week_4_day_3 import controller_with

REF = get_impl("ref")
CHAPTER = "book/src/week4-03-fallback.md"


def winning_round(c, k, n, step=0.01, cost=0.1, slope=0.1):
    """Feed one speculative round whose times say c = cost and v(K) = 1 + slope K."""
    return c.update(k, n, k * cost * step, step * (1 + slope * k))


# The constructor -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(max_lookahead=0), dict(window=0), dict(margin=-0.1), dict(margin=1.0), dict(probe_every=0),
    dict(initial_lookahead=0), dict(calibration_rounds=0), dict(max_backoff=0), dict(probe_budget=0),
    dict(probe_budget=1.5),
])
def test_rejects_bad_arguments(kwargs):
    with raises(ValueError, f"FallbackController({kwargs}) must be refused with a message naming "
                            f"the value and the fix ({CHAPTER})") as caught:
        REF.fallback.FallbackController(**kwargs)
    name = next(iter(kwargs))
    assert name in str(caught.value), f"the message must name {name}: {caught.value}"


def test_initial_state():
    c = REF.fallback.FallbackController(max_lookahead=3, initial_lookahead=6, window=5, probe_every=7)
    assert c.lookahead == 0, "K is 0 (plain) until plain rounds have measured the unit s"
    assert c.initial_lookahead == 3, "initial_lookahead is clamped to max_lookahead"
    assert c.cap == 3 and c.speculating and not c.probing and c.draft_ok and c.faults == []
    assert c.until_probe == 7 and c.probe_interval == 7, "until_probe and probe_interval start at probe_every"
    assert c.rounds.maxlen == 5 and c.plain_times.maxlen == 5, "every history is a deque(maxlen=window)"
    assert c.verify_cost(0) == 1.0 and c.verify_cost(2) is None


def test_both_trees_share_the_provided_code():
    student = get_impl("student")
    for name in ("DRAFT_WINDOW", "MIN_ROUNDS", "is_out_of_memory", "FallbackWarning"):
        assert getattr(student.fallback, name) is getattr(REF.fallback, name), (
            f"fallback.{name} must be the kit's one object in both trees"
        )
    assert student.fallback.FallbackController.__mro__[1] is fallback_policy.ControllerBase
    assert REF.fallback.FallbackController.__mro__[1] is fallback_policy.ControllerBase


@pytest.mark.parametrize("prompt_tokens, pays", [(400, True), (2000, False)])
def test_could_win_prices_the_drafts_catch_up(prompt_tokens, pays):
    c = controller_with(REF, plain=[0.01] * 2, prefill=(prompt_tokens, prompt_tokens * 0.001), draft_step=0.003)
    g_best = c.best_lookahead(alpha=1.0)[1]
    saving = 32 * (1 - 1 / g_best)
    catch_up = 0.3 * prompt_tokens * 0.001 / 0.01
    assert c.could_win() is pays, (
        f"catch-up {catch_up:.0f} plain steps against a best saving of {saving:.1f} over probe_every "
        f"= 32 tokens: could_win() must be {pays}"
    )
    c.verify_times.append((4, 0.014))
    assert c.could_win(), "after a speculative round only alpha = 1's goodput decides"


def test_is_out_of_memory():
    assert fallback_policy.is_out_of_memory(MemoryError())
    assert fallback_policy.is_out_of_memory(RuntimeError("[metal::malloc] Unable to allocate 8 bytes"))
    assert not fallback_policy.is_out_of_memory(ValueError("malloc"))
    assert not fallback_policy.is_out_of_memory(RuntimeError("shape mismatch"))


def test_shortest_row_progress():
    # rows held 3, 5, 4; after: 6, 9, 5 -> the shortest moved from 3 to 5: d = 2.
    assert fallback_policy.shortest_row_progress([3, 5, 4], [6, 9, 5], [False] * 3, 24, 4) == 2
    # the row at 5 stopped at EOS: it is done, the others set the pace (6 - 3 = 3).
    assert fallback_policy.shortest_row_progress([3, 5, 4], [6, 9, 5], [False, False, True], 24, 4) == 3
    assert fallback_policy.shortest_row_progress([3], [24], [True], 24, 2) == 3, "at most K + 1"


def test_window_rows():
    seqs = [list(range(100)), list(range(10))]
    rows, fresh = fallback_policy.window_rows(seqs, 3, have_cache=False)
    assert fresh and rows == [seqs[0][-64:], seqs[1]]
    rows, fresh = fallback_policy.window_rows(seqs, 3, have_cache=True)
    assert not fresh and rows == [[97, 98, 99], [7, 8, 9]]
    rows, fresh = fallback_policy.window_rows(seqs, 65, have_cache=True)
    assert fresh and len(rows[0]) == 64, "a lag longer than the window makes the cache again"


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
def test_probe_wait_bounds_what_a_failed_probe_costs(kw, want, why):
    c = controller_with(REF, **{**PROBE_COSTS, **kw})
    got = c.probe_wait()
    assert got == want, (
        f"probe_wait() = {got}, expected {want}: {why}. A failed probe after m plain rounds wastes "
        f"the draft's catch-up, c p m plain steps, and K c + v(K) - 1 steps of its round; wait for "
        f"the smallest m where that is at most probe_budget * m ({CHAPTER})"
    )


def test_probe_wait_prices_the_probe_at_the_capped_k():
    c = controller_with(REF, probe_budget=0.06, **PROBE_COSTS)
    c.cap = 2  # memory pressure lowered the cap below initial_lookahead = 4
    got = c.probe_wait()
    assert got == 34, (
        f"probe_wait() = {got}, expected 34: the probe runs at K = min(initial_lookahead, cap) = 2, "
        f"where v(2) is the measured v(4) = 2.15: ceil((0.2 + 1.15) / 0.04) = 34 ({CHAPTER})"
    )




# The early rounds (refinements before MIN_ROUNDS counts) ---------------------------------------------
# A batch of 8 on a CPU: c = 0.1, v(4) = 2.1 plain steps measured; the line through (0, 1) and
# (4, 2.1) is v(K) = 1 + 0.275 K.
EARLY_COSTS = dict(plain=[0.01] * 2, draft=[(4, 0.004)], verify=[(4, 0.021)], initial_lookahead=4)


def test_early_lookahead_prices_an_unmeasured_k_by_the_line():
    c = controller_with(REF, rounds=[(4, (0,))], **EARLY_COSTS)
    assert c.measured_verify() == pytest.approx({4: 2.1}), "measured_verify: {K: mean seconds / s}"
    assert c.verify_cost(1) == pytest.approx(2.1), (
        "verify_cost keeps measured beats fitted: below a measured K, that K's v is an upper bound"
    )
    E = REF.theory.expected_tokens_per_round
    want = {k: E(0.5, k) / (0.1 * k + (2.1 if k == 4 else 1 + 0.275 * k)) for k in range(1, 5)}
    k, g = c.early_lookahead(0.5)
    assert (k, g) == (1, pytest.approx(want[1])), (
        f"early_lookahead(1/2) = {(k, g)}: the goodput at alpha = 1/2 with v(4) = 2.1 measured and "
        f"every smaller K priced by the line, v(K) = 1 + 0.275 K, is "
        f"{ {k: round(g, 3) for k, g in want.items()} }: expected K = 1, G = {want[1]:.3f} ({CHAPTER})"
    )
    assert c.refinements() == 1, (
        "before MIN_ROUNDS counts, one round with nothing accepted steps K down to the generous "
        "reading's best K (G(1) = 1.09 >= 1) instead of ending speculation"
    )


def test_an_early_round_leaves_when_even_the_generous_reading_loses():
    c = controller_with(REF, rounds=[(4, (0,)), (1, (0,))], plain=[0.01] * 2,
                        draft=[(4, 0.004), (1, 0.001)], verify=[(4, 0.021), (1, 0.016)])
    assert c.early_lookahead(1 / 3)[1] < 1.0
    assert c.refinements() is None, (
        "alpha = (0 + 1) / (2 + 1) = 1/3 and K = 1 measured at 1.6 plain steps: every K loses even "
        "read generously (G(1) = 0.78), so `refinements()` returns None and decide's own rule "
        f"leaves ({CHAPTER})"
    )


def test_a_lucky_early_round_never_raises_k():
    c = controller_with(REF, rounds=[(4, (4,))], plain=[0.01] * 2, draft=[(4, 0.004)], verify=[(4, 0.014)],
                        max_lookahead=8, initial_lookahead=4)
    assert c.best_lookahead(alpha=1.0)[0] == 8
    got = c.refinements()
    assert got == 4, (
        f"one round, every draft accepted: the generous alpha is 1 and K = 8 would look best, but "
        f"one round must not raise K: the early rule picks K <= min(initial_lookahead, cap) = 4; "
        f"got {got} ({CHAPTER})"
    )


def test_the_early_rule_ends_at_min_rounds_counts():
    rounds = [(4, (2,))] * (fallback_policy.MIN_ROUNDS - 1)  # 6 of 9 trials accepted
    c = controller_with(REF, rounds=rounds, **EARLY_COSTS)
    want = c.early_lookahead((6 + 1) / (9 + 1))[0]
    assert c.refinements() == want, (
        f"MIN_ROUNDS - 1 counts: still the early rule, K = early_lookahead(7/10)'s {want}"
    )
    c = controller_with(REF, rounds=rounds + [(4, (2,))], **EARLY_COSTS)
    assert c.refinements() is None, (
        "with MIN_ROUNDS counts of evidence alpha is read as it is: refinements() leaves the "
        "decision to decide"
    )
    c = controller_with(REF, rounds=[(4, (0,) * 8)], **EARLY_COSTS)
    assert c.refinements() is None, "a batched round of 8 rows brings 8 counts (>= MIN_ROUNDS)"


# The controller's side of faults ------------------------------------------------------------------
def test_disable_draft():
    c = REF.fallback.FallbackController()
    c.update(0, 0, None, 0.01)
    c.update(0, 0, None, 0.01)
    c.observe_draft_step(0.001)
    assert c.lookahead > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c.disable_draft("the draft raised boom")
    assert [w.category for w in caught] == [REF.fallback.FallbackWarning] and "boom" in str(caught[0].message), (
        "disable_draft reports through `report`: one FallbackWarning carrying the reason"
    )
    assert c.lookahead == 0 and not c.draft_ok and c.faults == ["the draft raised boom"], (
        "disable_draft reports the reason (faults + a FallbackWarning) and makes K = 0"
    )
    assert [winning_round(c, 0, 0) for _ in range(50)] == [0] * 50, "and K stays 0: no probes without a draft"


def test_memory_pressure_halves_the_cap():
    c = REF.fallback.FallbackController(initial_lookahead=4)
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
