"""Week 3 Day 1 — adaptive lookahead. Chapter: book/src/week3-01-adaptive-lookahead.md

Task 1: AdaptiveSpeculator.__init__ / update / threshold_step (the window and the threshold rule)
Task 2: AdaptiveSpeculator.heuristic_step (+2 / -1)
Task 3: best_lookahead (argmax of expected goodput)
Task 4: AdaptiveSpeculator.goodput_step (estimate alpha and c, then best_lookahead)
"""

from collections import deque

import mlx.core as mx
import pytest

from support import raises

CHAPTER = "book/src/week3-01-adaptive-lookahead.md"
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
SPECULATOR = ("adaptive.AdaptiveSpeculator.__init__", "adaptive.AdaptiveSpeculator.update")
WEEK_2 = ("speculative.speculative_generate",)


def feed(speculator, rounds):
    """Call update for each (num_drafted, num_accepted[, draft_s, verify_s]); return the Ks."""
    return [speculator.update(*r) for r in rounds]


def brute_force_best(ref, alpha, c, v, lo, hi):
    """argmax_K E(alpha, K) / (K c + v(K)), smallest K on ties — the book's formula, spelled out."""
    rates = {k: ref.theory.expected_tokens_per_round(alpha, k) / (k * c + v(k)) for k in range(lo, hi + 1)}
    best = max(rates.values())
    return min(k for k, r in rates.items() if r == best)


def greedy_exact_check(impl, ref, llama_models, speculator, max_tokens=40):
    """adaptive_generate (provided) must give the target's plain greedy tokens while K moves."""
    draft_model, target_model = llama_models
    prompt = mx.array(PROMPT, dtype=mx.int32)
    expected = list(ref.generate.generate_tokens(target_model, prompt, max_tokens))
    ks = []
    update = speculator.update

    def spy(*args):  # record every K the policy hands back
        ks.append(update(*args))
        return ks[-1]

    speculator.update = spy
    decoder = ref.draft.SpeculativeDecoder(draft_model, target_model, lookahead=2)
    got = [t for t, _ in impl.adaptive.adaptive_generate(decoder, speculator, prompt, max_tokens)]
    assert got == expected, (
        "with adaptive K the output must still be exactly the target's greedy output: changing K "
        f"between rounds never changes what is accepted. Got {got}, expected {expected} ({CHAPTER})"
    )
    return ks


# Task 1 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, named",  # named: what the message must mention (the bad argument)
    [
        (dict(min_lookahead=0), "min_lookahead"),
        (dict(min_lookahead=5, max_lookahead=3, initial_lookahead=4), "m(in|ax)_lookahead"),
        (dict(initial_lookahead=9), "initial_lookahead"),
        (dict(initial_lookahead=1), "initial_lookahead"),
        (dict(policy="greedy"), "greedy|policy"),
        (dict(window=0), "window"),
        (dict(raise_above=0.5, lower_below=0.6), "raise_above|lower_below"),
        (dict(raise_above=1.5), "raise_above"),
        (dict(lower_below=-0.1), "lower_below"),
        (dict(draft_cost=-0.1), "draft_cost"),
        (dict(verify_base=0.0), "verify_base"),
        (dict(verify_slope=-0.1), "verify_slope"),
    ],
)
def test_task_1_rejects_bad_arguments(impl, kwargs, named):
    with raises(ValueError, f"AdaptiveSpeculator({kwargs}) must raise ValueError naming the bad "
                f"argument and the fix ({CHAPTER}, Task 1)", match=named):
        impl.adaptive.AdaptiveSpeculator(**kwargs)


def test_task_1_init_sets_the_documented_attributes(impl):
    """The policies (yours or the reference's, mixed by use_reference_for_unfinished) read them."""
    args = dict(initial_lookahead=3, min_lookahead=1, max_lookahead=6, policy="goodput", window=7,
                raise_above=0.9, lower_below=0.5, draft_cost=0.2, verify_base=1.5, verify_slope=0.3)
    speculator = impl.adaptive.AdaptiveSpeculator(**args)
    for name, value in args.items():
        attribute = "_lookahead" if name == "initial_lookahead" else name
        assert getattr(speculator, attribute, None) == value, (
            f"__init__ must store {name}={value!r} as `self.{attribute}` (see the class "
            f"docstring); got {getattr(speculator, attribute, '<missing>')!r}"
        )
    assert speculator.lookahead == 3, "the lookahead property reads `_lookahead`"
    history = speculator.history
    assert isinstance(history, deque) and history.maxlen == 7 and len(history) == 0, (
        f"`history` must start as an empty deque(maxlen=window) = deque(maxlen=7), got {history!r}"
    )


def test_task_1_update_checks_its_round(impl):
    speculator = impl.adaptive.AdaptiveSpeculator()
    assert speculator.lookahead == 4, "a new speculator starts at initial_lookahead"
    for bad in [(0, 0), (3, 4), (3, -1)]:
        with raises(ValueError, f"update{bad} must raise ValueError: need num_drafted >= 1 and "
                    "0 <= num_accepted <= num_drafted"):
            speculator.update(*bad)
    assert len(speculator.history) == 0, "a rejected round must not enter the history"
    speculator.update(3, 2)
    assert list(speculator.history) == [(3, 2, None, None)], (
        "update appends (num_drafted, num_accepted, draft_time_s, verify_time_s) to `history`"
    )


@pytest.mark.parametrize("policy", ["threshold", "heuristic", "goodput"])
def test_task_1_update_calls_the_policy_step(impl, policy):
    """update appends the round, THEN calls the policy's method with the documented arguments,
    stores and returns its K, and refuses a K outside the bounds with RuntimeError."""
    speculator = impl.adaptive.AdaptiveSpeculator(initial_lookahead=4, policy=policy)
    calls = []

    def step(*args, **kwargs):  # stands in for the policy's method on this one object
        named = tuple(kwargs[k] for k in ("num_drafted", "num_accepted") if k in kwargs)
        calls.append((args + named, list(speculator.history)))
        return 6

    setattr(speculator, f"{policy}_step", step)
    got = speculator.update(5, 2, 0.01, 0.02)
    expected_args = (5, 2) if policy == "heuristic" else ()
    assert calls == [(expected_args, [(5, 2, 0.01, 0.02)])], (
        f"policy {policy!r}: update must append the round to `history` first, then call "
        f"self.{policy}_step{expected_args} once; the calls seen were (args, history) = {calls}"
    )
    assert got == 6 and speculator.lookahead == 6, (
        f"update must store the K the policy returns (6) and return it; returned {got}, "
        f"lookahead is {speculator.lookahead}"
    )
    setattr(speculator, f"{policy}_step", lambda *args: 99)
    with raises(RuntimeError, f"the {policy} policy returned K = 99, outside [2, 8]: update must "
                "raise RuntimeError (a policy bug must not reach the decoder)"):
        speculator.update(4, 4)


def test_task_1_threshold_climbs_and_falls(impl):
    speculator = impl.adaptive.AdaptiveSpeculator(initial_lookahead=4, window=3)
    ks = [speculator.update(speculator.lookahead, speculator.lookahead) for _ in range(16)]
    # Every round accepted: after each full window of 3, K + 1, and the window starts afresh.
    assert ks == [4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8, 8, 8], (
        "all-accepted rounds: K must stay until the window of 3 rounds is full, then grow by 1 and "
        f"clear the window, up to max_lookahead=8 and no further; got {ks} ({CHAPTER}, Task 1)"
    )
    ks = [speculator.update(speculator.lookahead, 0) for _ in range(20)]
    assert ks[:3] == [8, 7, 7] and ks[-1] == 2 and min(ks) == 2, (
        "all-rejected rounds: K must shrink by 1 per full window, down to min_lookahead=2; note "
        f"the window was not cleared at the top (K could not grow), so it is already full; got {ks}"
    )


def test_task_1_threshold_window_semantics(impl):
    speculator = impl.adaptive.AdaptiveSpeculator(initial_lookahead=4, window=4)
    # A middling rate (0.75 is between 0.60 and 0.85): K never moves.
    assert feed(speculator, [(4, 3)] * 12) == [4] * 12, "a mean acceptance of 0.75 keeps K"
    # The window slides: [0.75, 0.75, 0.75, 1.0] -> 0.8125 keeps K, [.., 0.75, 1, 1] -> 0.875 raises.
    assert feed(speculator, [(4, 4)]) == [4], "mean 0.8125 over the last 4 rounds is not > 0.85"
    assert feed(speculator, [(4, 4)]) == [5], (
        "the window must slide over the last `window` rounds: 0.75, 0.75, 1, 1 has mean 0.875 > 0.85"
    )
    assert len(speculator.history) == 0, "after K changes, the history is cleared (see the docstring)"
    # The fraction is n / num_drafted (the K actually drafted), not n / lookahead.
    assert feed(speculator, [(2, 2)] * 4) == [5, 5, 5, 6], (
        "rounds that drafted 2 of 2 are fully accepted (n / num_drafted = 1), even at lookahead 5"
    )
    # Fewer rounds than the window: no decision, however extreme.
    fresh = impl.adaptive.AdaptiveSpeculator(initial_lookahead=4, window=5)
    assert feed(fresh, [(4, 0)] * 4) == [4] * 4, "no move before the window holds `window` rounds"


def test_task_1_adaptive_generate_greedy_exact(impl, ref, use_ref, llama_models):
    speculator = impl.adaptive.AdaptiveSpeculator(initial_lookahead=4, window=2)
    use_ref(*WEEK_2)
    ks = greedy_exact_check(impl, ref, llama_models, speculator)
    assert len(set(ks)) > 1, f"with window=2 the threshold policy should have moved K; got {ks}"


# Task 2 -----------------------------------------------------------------------------------------
def test_task_2_heuristic_exact_sequence(impl, use_ref):
    use_ref(*SPECULATOR)
    speculator = impl.adaptive.AdaptiveSpeculator(initial_lookahead=4, policy="heuristic")
    rounds = [(4, 4), (6, 6), (8, 8), (8, 7), (7, 0), (6, 5), (5, 5), (7, 1), (6, 0), (5, 0),
              (4, 0), (3, 0), (2, 0), (2, 2)]
    ks = feed(speculator, rounds)
    assert ks == [6, 8, 8, 7, 6, 5, 7, 6, 5, 4, 3, 2, 2, 4], (
        "heuristic: +2 after a round that accepted every draft, -1 otherwise, clamped to [2, 8]; "
        f"got {ks} ({CHAPTER}, Task 2)"
    )
    # "Every draft" means every draft of that round: 1 of 1 drafted near the end counts.
    speculator = impl.adaptive.AdaptiveSpeculator(initial_lookahead=4, policy="heuristic")
    assert feed(speculator, [(1, 1)]) == [6], "a round that drafted 1 and accepted 1 accepted all"


def test_task_2_heuristic_greedy_exact(impl, ref, use_ref, llama_models):
    use_ref(*SPECULATOR)
    speculator = impl.adaptive.AdaptiveSpeculator(initial_lookahead=4, policy="heuristic")
    use_ref(*WEEK_2)
    ks = greedy_exact_check(impl, ref, llama_models, speculator)
    assert len(set(ks)) > 1, f"the heuristic moves K every round; got {ks}"


# Task 3 -----------------------------------------------------------------------------------------
def linear_v(k):
    return 1.0 + 0.1 * k


def quadratic_v(k):
    return 1.0 + 0.02 * k * k


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.6, 0.75, 0.9, 0.97, 1.0])
@pytest.mark.parametrize("c, v", [(0.1, linear_v), (0.02, linear_v), (0.4, linear_v), (0.05, quadratic_v)])
def test_task_3_best_lookahead_is_the_argmax(impl, ref, use_ref, alpha, c, v):
    _ = impl.adaptive  # import the module before use_ref rebinds its `from .theory import` copy
    use_ref("theory.expected_tokens_per_round")
    got = impl.adaptive.best_lookahead(alpha, c, v, 1, 12)
    expected = brute_force_best(ref, alpha, c, v, 1, 12)
    assert got == expected, (
        f"best_lookahead(alpha={alpha}, c={c}, v={v.__name__}, 1, 12) = {got}, but "
        f"E(K) / (K c + v(K)) is largest at K = {expected} ({CHAPTER}, Task 3)"
    )


def test_task_3_best_lookahead_edges(impl, use_ref):
    _ = impl.adaptive
    use_ref("theory.expected_tokens_per_round")
    best = impl.adaptive.best_lookahead
    assert best(1.0, 0.1, linear_v, 2, 8) == 8, "alpha = 1: every draft is kept, draft the most"
    assert best(0.0, 0.1, linear_v, 2, 8) == 2, "alpha = 0: drafts are wasted work, draft the least"
    assert best(1.0, 0.0, lambda k: k + 1.0, 3, 8) == 3, (
        "when every K has the same goodput (here (K+1)/(K+1)), ties go to the smaller K"
    )
    assert best(0.5, 0.1, linear_v, 5, 5) == 5, "a single allowed K is the answer"
    for args, why in [((0.5, 0.1, linear_v, 0, 8), "min_lookahead = 0 < 1"),
                      ((0.5, 0.1, linear_v, 6, 4), "max_lookahead 4 < min_lookahead 6"),
                      ((0.5, -0.1, linear_v, 2, 8), "c = -0.1 < 0")]:
        with raises(ValueError, f"best_lookahead(alpha=0.5, c={args[1]}, v, {args[3]}, {args[4]}) "
                    f"must raise ValueError: {why} ({CHAPTER}, Task 3)"):
            best(*args)


# Task 4 -----------------------------------------------------------------------------------------
def goodput_speculator(impl, use_ref, **kwargs):
    _ = impl.adaptive
    use_ref(*SPECULATOR, "adaptive.best_lookahead", "theory.expected_tokens_per_round")
    return impl.adaptive.AdaptiveSpeculator(initial_lookahead=4, policy="goodput", **kwargs)


def test_task_4_goodput_extremes_and_estimator(impl, ref, use_ref):
    speculator = goodput_speculator(impl, use_ref)
    assert feed(speculator, [(4, 4)] * 3)[-1] == 8, "every draft accepted: alpha = 1, K = max"
    speculator = goodput_speculator(impl, use_ref)
    assert feed(speculator, [(4, 0)] * 3)[-1] == 2, "every draft rejected: alpha = 0, K = min"
    # Rounds (4,4), (4,1), (4,2): 7 accepts in 4 + 2 + 3 = 9 trials.
    speculator = goodput_speculator(impl, use_ref)
    got = feed(speculator, [(4, 4), (4, 1), (4, 2)])[-1]
    expected = brute_force_best(ref, 7 / 9, 0.1, linear_v, 2, 8)
    assert got == expected, (
        f"alpha must be estimated as sum(n) / sum(n + [n < K]) = 7/9 here (default costs c = 0.1, "
        f"v(K) = 1 + 0.1 K give K = {expected}); got K = {got} ({CHAPTER}, Task 4)"
    )
    # Long drafts that stop after 3 accepts: alpha = 3/4, while n/K = 3/8 would suggest a short K.
    naive = brute_force_best(ref, 3 / 8, 0.1, linear_v, 2, 8)
    aware = brute_force_best(ref, 3 / 4, 0.1, linear_v, 2, 8)
    assert naive != aware  # the test can tell the two estimators apart
    speculator = goodput_speculator(impl, use_ref)
    got = feed(speculator, [(8, 3)] * 5)[-1]
    assert got == aware, (
        f"rounds of 8 drafts with 3 accepted mean alpha = 3/(3+1) = 0.75 (K = {aware}), not "
        f"3/8 (K = {naive}): drafts after the first rejection were never tested; got K = {got}"
    )


@pytest.mark.parametrize("c_true", [0.0, 0.02, 0.1, 0.3])  # best K: 5, 4, 3, 2
def test_task_4_goodput_follows_measured_costs(impl, ref, use_ref, c_true):
    # Synthetic timings: a target step lasts 10 ms, verifying K drafts costs v(K) steps, each
    # draft step c_true steps. Acceptance: 3 of 4 drafts per round, alpha = 3/4.
    step_s = 0.010
    rounds = [(4, 3, 4 * c_true * step_s, linear_v(4) * step_s)] * 6
    speculator = goodput_speculator(impl, use_ref)
    ks = feed(speculator, rounds)
    expected = brute_force_best(ref, 0.75, c_true, linear_v, 2, 8)
    assert ks[-1] == expected, (
        f"with timings, c = (draft seconds per draft) / (seconds per target step) = {c_true}; "
        f"the best K for alpha = 0.75 is then {expected}, got {ks[-1]} ({CHAPTER}, Task 4)"
    )
    # One round without timings in the window: fall back to the default draft_cost.
    speculator = goodput_speculator(impl, use_ref, draft_cost=0.5)
    ks = feed(speculator, rounds[:3] + [(4, 3)])
    expected = brute_force_best(ref, 0.75, 0.5, linear_v, 2, 8)
    assert ks[-1] == expected, "a round without timings in the window: use c = draft_cost"


def test_task_4_goodput_uses_its_verify_costs(impl, ref, use_ref):
    """v(K) = verify_base + verify_slope * K with the constructor's values, not the defaults."""
    v_steep = lambda k: 1.0 + 0.6 * k  # noqa: E731
    rounds = [(4, 3)] * 4  # alpha = 3/4, no timings: c = draft_cost
    expected = brute_force_best(ref, 0.75, 0.1, v_steep, 2, 8)
    assert expected != brute_force_best(ref, 0.75, 0.1, linear_v, 2, 8)  # the test can tell
    speculator = goodput_speculator(impl, use_ref, verify_base=1.0, verify_slope=0.6)
    got = feed(speculator, rounds)[-1]
    assert got == expected, (
        f"with verify_base=1.0, verify_slope=0.6 the verify cost is v(K) = 1 + 0.6 K, and the best "
        f"K for alpha = 0.75, c = 0.1 is {expected}; got {got}: build v from the speculator's "
        f"verify_base and verify_slope ({CHAPTER}, Task 4)"
    )


def test_task_4_goodput_greedy_exact(impl, ref, use_ref, llama_models):
    speculator = goodput_speculator(impl, use_ref, max_lookahead=6)
    use_ref(*WEEK_2)
    ks = greedy_exact_check(impl, ref, llama_models, speculator)
    assert all(2 <= k <= 6 for k in ks), f"goodput K must stay in [2, 6]; got {ks}"
