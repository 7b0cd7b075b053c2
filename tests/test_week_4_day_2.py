"""Week 4 Day 2 — metrics. Chapter: book/src/week4-02-metrics.md

Task 1: position_counts, acceptance_per_position (P(draft j accepted | reached))
Task 2: measure (a timed stream fills a RequestMetrics)
Task 3: MetricsAggregator.add (counters and histograms in Prometheus's text format)
Task 4: measure_plain_baseline, honest_speedup (against a measured plain step, never a constant)

Every time here comes from a fake clock, so the numbers are exact and the tests deterministic.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specdec.kit.models import MarkovLM
from specdec.kit.stats import SpecStats
from support import raises

CHAPTER = "book/src/week4-02-metrics.md"
# Five rounds (K drafted, n accepted); (0, 0) is a plain round of the fallback.
ROUNDS = [(4, 4), (4, 1), (2, 0), (0, 0), (3, 3)]
# Position j is reached iff K > j and n >= j; accepted iff n > j.
REACHED, ACCEPTED = [4, 3, 2, 1], [3, 2, 2, 1]


class FakeClock:
    """A clock that moves only when told to: `clock()` reads it, `clock.advance(s)` moves it."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def scripted_stream(clock, stats, script, token=7):
    """A decoding loop that follows a script of rounds (K, n, emitted, draft_s, verify_s).

    Like speculative_generate it drafts (clock += draft_s), verifies (clock += verify_s), records
    the round in `stats` and then yields the round's tokens as (token, from_draft).
    """
    for k, n, emitted, draft_s, verify_s in script:
        clock.advance(draft_s)
        clock.advance(verify_s)
        stats.record_round(k, n, emitted)
        stats.draft_calls += k
        stats.draft_time_s += draft_s
        stats.verify_time_s += verify_s
        for i in range(emitted):
            yield token + i, i < n


def plain_tokens(clock, prefill_s, gaps, token=3):
    """A plain decoder's stream: the first token after `prefill_s`, the next ones after `gaps`."""
    clock.advance(prefill_s)
    yield token
    for gap in gaps:
        clock.advance(gap)
        yield token


def stats_of(rounds, emitted_per_round=None):
    stats = SpecStats()
    for i, (k, n) in enumerate(rounds):
        stats.record_round(k, n, emitted_per_round[i] if emitted_per_round else n + 1)
    return stats


# Task 1 -----------------------------------------------------------------------------------------
def test_task_1_counts_reached_and_accepted_per_position(impl):
    reached, accepted = impl.metrics.position_counts(ROUNDS)
    assert (list(reached), list(accepted)) == (REACHED, ACCEPTED), (
        f"rounds {ROUNDS}: position j (0-based) is reached when K > j and n >= j (every earlier "
        f"draft passed) and accepted when n > j, so reached = {REACHED}, accepted = {ACCEPTED}; "
        f"got reached = {reached}, accepted = {accepted} ({CHAPTER}, Task 1)"
    )


def test_task_1_acceptance_is_conditional_on_reaching(impl):
    got = impl.metrics.acceptance_per_position(ROUNDS)
    expected = [a / r for a, r in zip(ACCEPTED, REACHED)]
    assert got == pytest.approx(expected), (
        f"acceptance per position is accepted[j] / reached[j] = {expected} for {ROUNDS}, got {got}. "
        "Dividing by the number of rounds (vLLM's per-position rate, [0.75, 0.5, 0.5, 0.25]) gives "
        f"P(accepted at j), which falls with j even for a draft that never gets worse ({CHAPTER}, Task 1)"
    )


def test_task_1_reads_a_spec_stats(impl):
    stats = stats_of(ROUNDS)
    reached, accepted = impl.metrics.position_counts(stats)
    assert (list(reached), list(accepted)) == (REACHED, ACCEPTED), (
        "given a SpecStats, use its lookahead_per_round (K) and accepted_per_round (n): the "
        f"rounds {ROUNDS} give reached {REACHED}, accepted {ACCEPTED}; got {reached}, {accepted} "
        f"({CHAPTER}, Task 1)"
    )
    assert impl.metrics.acceptance_per_position(stats) == pytest.approx(
        impl.metrics.acceptance_per_position(ROUNDS)), "a SpecStats and its (K, n) pairs must agree"


def test_task_1_plain_rounds_add_nothing(impl):
    for rounds in ([], [(0, 0)] * 3):
        reached, accepted = impl.metrics.position_counts(rounds)
        assert (list(reached), list(accepted)) == ([], []), (
            f"rounds {rounds} drafted nothing: both lists are empty (length = the largest K, "
            f"0 here), got {reached}, {accepted} ({CHAPTER}, Task 1)"
        )
        got = impl.metrics.acceptance_per_position(rounds)
        assert list(got) == [], f"no round drafted, so no position was reached: expected [], got {got}"
    with_plain = ROUNDS + [(0, 0)] * 5
    assert impl.metrics.acceptance_per_position(with_plain) == pytest.approx(
        impl.metrics.acceptance_per_position(ROUNDS)), (
        "a plain round (K = 0, the fallback's) tests no draft: adding some must not change the "
        f"per-position acceptance ({CHAPTER}, Task 1)"
    )


def test_task_1_positions_nobody_reached_are_left_out(impl):
    rounds = [(8, 0), (8, 1), (3, 0)]
    reached, accepted = impl.metrics.position_counts(rounds)
    assert (list(reached), list(accepted)) == ([3, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]), (
        f"{rounds}: the counts have one entry per position up to the largest K (8), zeros where "
        f"no round got that far; got {reached}, {accepted} ({CHAPTER}, Task 1)"
    )
    got = impl.metrics.acceptance_per_position(rounds)
    assert got == pytest.approx([1 / 3, 0.0]), (
        f"{rounds}: positions 0 and 1 were reached (1/3 and 0/1 accepted); positions 2..7 never "
        f"were, so they carry no evidence and are left out (not 0.0, not NaN): expected "
        f"[0.333, 0.0], got {got} ({CHAPTER}, Task 1)"
    )


@pytest.mark.parametrize("bad", [(3, 4), (2, -1), (-1, 0)])
def test_task_1_rejects_impossible_rounds(impl, bad):
    rounds = [(4, 2), bad]
    with raises(ValueError, f"the round (K, n) = {bad} is impossible (need K >= 0 and 0 <= n <= K): "
                f"raise ValueError naming it ({CHAPTER}, Task 1)", match="1|round|K|n"):
        impl.metrics.position_counts(rounds)


def geometric_pair(vocab_size: int = 8, seed: int = 5):
    """(draft, target, alpha): Markov LMs whose rows are cyclic shifts of two fixed vectors.

    p(x | s) = w[(x - s) mod V] and q(x | s) = u[(x - s) mod V], so every state accepts a draft
    with the same probability alpha = sum_x min(w, u): the book's geometric model holds exactly.
    """
    rng = np.random.default_rng(seed)
    w, other = rng.dirichlet(np.full(vocab_size, 0.5)), rng.dirichlet(np.full(vocab_size, 0.5))
    u = 0.5 * w + 0.5 * other
    shifts = np.arange(vocab_size)
    index = (shifts[None, :] - shifts[:, None]) % vocab_size  # [s, x] -> (x - s) mod V
    p, q = w[index].astype(np.float32), u[index].astype(np.float32)
    return MarkovLM(mx.array(q)), MarkovLM(mx.array(p)), p, q


def test_task_1_flat_at_alpha_under_the_geometric_model(impl, ref, key):
    draft, target, p, q = geometric_pair()
    alphas = ref.theory.acceptance_rate(mx.array(p), mx.array(q))
    alpha = float(alphas[0])
    assert np.allclose(np.array(alphas), alpha, atol=1e-5), "test setup: every state has one alpha"
    stats = SpecStats()
    decoder = ref.draft.SpeculativeDecoder(draft, target, lookahead=4)
    for i, subkey in enumerate(mx.random.split(key, 3)):
        prompt = mx.array([i], dtype=mx.int32)
        for _ in ref.speculative.speculative_generate(decoder, prompt, 500, temperature=1.0,
                                                       key=subkey, stats=stats):
            pass
    reached, accepted = impl.metrics.position_counts(stats)
    rates = impl.metrics.acceptance_per_position(stats)
    assert len(rates) == 4, f"K = 4 and every position was reached: 4 entries expected, got {rates}"
    # accepted[j] - alpha * reached[j] is a sum of reached[j] centred Bernoulli(alpha) steps.
    # |z| < 4.5 at each of 4 positions: a false alarm about once in 70 000 seeds.
    for j, (r, a) in enumerate(zip(reached, accepted)):
        z = (a - alpha * r) / math.sqrt(r * alpha * (1 - alpha))
        assert abs(z) < 4.5, (
            f"position {j}: {a} of {r} reached drafts accepted ({a / r:.3f}); when every draft "
            f"passes with the same probability alpha = {alpha:.3f}, P(accepted | reached) is alpha "
            f"at every position (z = {z:.1f}). All positions: {[round(x, 3) for x in rates]} "
            f"({CHAPTER}, Task 1)"
        )


# Task 2 -----------------------------------------------------------------------------------------
# Round 1 (prefill + 3 drafts): 0.3 s drafting, 0.5 s verifying, 3 tokens. Round 2 is plain
# (K = 0): 0.2 s, 1 token. Round 3: 4 drafts, all accepted, 5 tokens in 0.1 + 0.3 s.
SCRIPT = [(3, 2, 3, 0.3, 0.5), (0, 0, 1, 0.0, 0.2), (4, 4, 5, 0.1, 0.3)]


def run_script(impl, script=SCRIPT, wait_before=5.0):
    clock, metrics = FakeClock(), impl.metrics.RequestMetrics(SpecStats())
    stream = impl.metrics.measure(scripted_stream(clock, metrics.stats, script), metrics, clock=clock)
    clock.advance(wait_before)  # nothing runs before the first token is asked for
    items = list(stream)
    return clock, metrics, items


def test_task_2_times_a_request(impl):
    _, m, _ = run_script(impl)
    checks = [
        ("start_s", m.start_s, 105.0, "clock() when the first token is asked for (not when measure() was called)"),
        ("first_token_s", m.first_token_s, 105.8, "clock() when the first token arrives"),
        ("end_s", m.end_s, 106.4, "clock() when the last token arrives"),
        ("tokens", m.tokens, 9, "every item the stream yielded"),
        ("first_round_tokens", m.first_round_tokens, 3, "stats.emitted when the first token arrives"),
    ]
    for name, got, expected, why in checks:
        assert got == pytest.approx(expected), (
            f"metrics.{name} = {got}, expected {expected}: {why} ({CHAPTER}, Task 2)")
    assert (m.ttft_s, m.decode_tokens, m.decode_tokens_per_s) == pytest.approx((0.8, 6, 10.0)), (
        f"derived: ttft 0.8 s, 6 tokens after the first call in 0.6 s = 10 tokens/s; got ttft "
        f"{m.ttft_s}, {m.decode_tokens} decode tokens, {m.decode_tokens_per_s} tokens/s ({CHAPTER}, Task 2)"
    )


def test_task_2_times_each_round(impl):
    _, m, _ = run_script(impl)
    assert m.draft_time_per_round == pytest.approx([0.3, 0.0, 0.1]), (
        "draft_time_per_round: one entry per round, the growth of stats.draft_time_s since the "
        f"last round ([0.3, 0.0, 0.1] here, the plain round drafted nothing); got "
        f"{m.draft_time_per_round} ({CHAPTER}, Task 2)"
    )
    assert m.verify_time_per_round == pytest.approx([0.5, 0.2, 0.3]), (
        f"verify_time_per_round: the growth of stats.verify_time_s per round, [0.5, 0.2, 0.3]; got "
        f"{m.verify_time_per_round} ({CHAPTER}, Task 2)"
    )


def test_task_2_rounds_that_yield_nothing(impl):
    # A round that hands out no token: its time shows up with the next token (split evenly between
    # the rounds that ended since), or, at the very end, when the stream is exhausted.
    script = [(2, 0, 0, 0.1, 0.3), (2, 1, 2, 0.1, 0.1), (3, 0, 0, 0.3, 0.3)]
    _, m, _ = run_script(impl, script)
    assert m.draft_time_per_round == pytest.approx([0.1, 0.1, 0.3]), (
        "round 1 yielded nothing, so round 2's first token finds two new rounds: their 0.2 s of "
        "drafting is split evenly (0.1, 0.1); round 3 yielded nothing either and is only seen "
        f"when the stream ends (look once more then). Expected [0.1, 0.1, 0.3], got "
        f"{m.draft_time_per_round} ({CHAPTER}, Task 2)"
    )
    assert m.verify_time_per_round == pytest.approx([0.2, 0.2, 0.3])


def test_task_2_passes_the_stream_through(impl):
    clock, stats = FakeClock(), SpecStats()
    expected = list(scripted_stream(clock, stats, SCRIPT))
    _, _, items = run_script(impl)
    assert items == expected, (
        f"measure must yield the stream's items unchanged and in order: expected {expected}, got "
        f"{items} ({CHAPTER}, Task 2)"
    )


def test_task_2_a_caller_that_stops_early(impl):
    clock, metrics = FakeClock(), impl.metrics.RequestMetrics(SpecStats())
    stream = impl.metrics.measure(scripted_stream(clock, metrics.stats, SCRIPT), metrics, clock=clock)
    taken = [item for _, item in zip(range(4), stream)]
    assert len(taken) == 4 and metrics.tokens == 4 and metrics.end_s == pytest.approx(101.0), (
        "after a caller took 4 tokens and stopped, metrics describe those 4: tokens = 4, end_s = "
        f"the 4th token's arrival (101.0); got tokens = {metrics.tokens}, end_s = {metrics.end_s} "
        f"({CHAPTER}, Task 2)"
    )


def test_task_2_an_empty_stream(impl):
    clock, metrics = FakeClock(), impl.metrics.RequestMetrics(SpecStats())
    items = list(impl.metrics.measure(iter(()), metrics, clock=clock))
    assert items == [] and metrics.tokens == 0 and metrics.ttft_s is None, (
        f"a request that produced nothing (max_tokens = 0) has tokens = 0 and no time to first "
        f"token (None); got tokens = {metrics.tokens}, ttft = {metrics.ttft_s} ({CHAPTER}, Task 2)"
    )
    assert metrics.start_s == 100.0 and metrics.tokens_per_s == 0.0 and metrics.decode_tokens_per_s == 0.0


def test_task_2_a_plain_stream_that_records_no_rounds(impl):
    clock, metrics = FakeClock(), impl.metrics.RequestMetrics(SpecStats())
    items = list(impl.metrics.measure(plain_tokens(clock, 0.5, [0.1] * 4), metrics, clock=clock))
    assert items == [3] * 5, "items of any kind (here plain ints) pass through unchanged"
    assert metrics.first_round_tokens == 1 and metrics.decode_tokens_per_s == pytest.approx(10.0), (
        "a stream whose loop records no rounds (stats.rounds == 0) is plain decoding: its first call "
        f"gave 1 token, then 4 tokens in 0.4 s = 10 tokens/s; got first_round_tokens = "
        f"{metrics.first_round_tokens}, {metrics.decode_tokens_per_s} tokens/s ({CHAPTER}, Task 2)"
    )


def test_task_2_refuses_stats_that_already_hold_rounds(impl):
    stats = stats_of([(4, 2)])
    metrics = impl.metrics.RequestMetrics(stats)
    with raises(ValueError, "measure needs a fresh SpecStats per request: this one already holds a "
                f"round, and its totals would be counted twice ({CHAPTER}, Task 2)"):
        list(impl.metrics.measure(iter([(1, False)]), metrics, clock=FakeClock()))


def test_task_2_on_the_real_loop(impl, ref, markov_models):
    draft, target = markov_models
    metrics = impl.metrics.RequestMetrics(SpecStats())
    decoder = ref.draft.SpeculativeDecoder(draft, target, lookahead=3)
    stream = ref.speculative.speculative_generate(decoder, mx.array([1, 2, 3]), 40, stats=metrics.stats)
    tokens = list(impl.metrics.measure(stream, metrics))
    s = metrics.stats
    assert metrics.tokens == len(tokens) == s.emitted == 40
    assert len(metrics.draft_time_per_round) == len(metrics.verify_time_per_round) == s.rounds, (
        f"one draft and one verify time per round: {s.rounds} rounds, got "
        f"{len(metrics.draft_time_per_round)} and {len(metrics.verify_time_per_round)} ({CHAPTER}, Task 2)"
    )
    assert sum(metrics.draft_time_per_round) == pytest.approx(s.draft_time_s, abs=1e-9)
    assert sum(metrics.verify_time_per_round) == pytest.approx(s.verify_time_s, abs=1e-9)
    assert metrics.first_round_tokens == s.accepted_per_round[0] + 1, (
        "the first round gave its accepted drafts plus one target token: first_round_tokens = "
        f"{s.accepted_per_round[0] + 1}, got {metrics.first_round_tokens} ({CHAPTER}, Task 2)"
    )
    assert 0 <= metrics.ttft_s <= metrics.total_s


# Task 3 -----------------------------------------------------------------------------------------
def request(impl, rounds, emitted, start, first, end, first_round_tokens, draft_times, verify_times):
    """A finished RequestMetrics, built by hand (no measure needed)."""
    stats = stats_of(rounds, emitted)
    stats.draft_time_s, stats.verify_time_s = sum(draft_times), sum(verify_times)
    return impl.metrics.RequestMetrics(
        stats=stats, start_s=start, first_token_s=first, end_s=end, tokens=sum(emitted),
        first_round_tokens=first_round_tokens, draft_time_per_round=list(draft_times),
        verify_time_per_round=list(verify_times))


def two_requests(impl):
    # A speculative request with one plain round, and a request decoded plain throughout.
    spec = request(impl, [(3, 2), (0, 0), (4, 4), (4, 0)], [3, 1, 5, 1], 10.0, 10.8, 11.6, 3,
                   [0.3, 0.0, 0.1, 0.1], [0.5, 0.2, 0.3, 0.2])
    plain = request(impl, [(0, 0)] * 4, [1, 1, 1, 1], 20.0, 20.04, 20.1, 1,
                    [0.0] * 4, [0.04, 0.02, 0.02, 0.02])
    return spec, plain


def scrape(text: str) -> dict:
    """{(sample name, ((label, value), ...)): value} from Prometheus text, via its own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def exported(impl, *requests):
    aggregator = impl.metrics.MetricsAggregator()
    for r in requests:
        aggregator.add(r)
    return aggregator, scrape(aggregator.prometheus_text())


def test_task_3_counters(impl, use_ref):
    use_ref("metrics.position_counts")
    _, values = exported(impl, *two_requests(impl))
    expected = {
        "specdec_requests_total": 2,
        "specdec_generation_tokens_total": 14,
        "specdec_target_calls_total": 8,
        "specdec_fallback_rounds_total": 5,
        "specdec_spec_decode_num_drafts_total": 3,  # rounds with K >= 1 only
        "specdec_spec_decode_num_draft_tokens_total": 11,
        "specdec_spec_decode_num_accepted_tokens_total": 6,
        "specdec_draft_seconds_total": 0.5,
        "specdec_verify_seconds_total": 1.3,
        "specdec_decode_tokens_total": 10,  # 10 - 3 and 4 - 1
        "specdec_decode_seconds_total": 0.86,  # 0.8 and 0.06
    }
    for name, value in expected.items():
        got = values.get((name, ()))
        assert got is not None and got == pytest.approx(value), (
            f"{name} should be {value} after the two requests (a speculative one with a plain "
            f"round, a plain one), got {got}. See the table of metrics in {CHAPTER}, Task 3"
        )


def test_task_3_per_position_counters(impl, use_ref):
    use_ref("metrics.position_counts")
    _, values = exported(impl, *two_requests(impl))
    per_pos = {}
    for (name, labels), value in values.items():
        if name in ("specdec_spec_decode_num_accepted_tokens_per_pos_total",
                    "specdec_spec_decode_num_reached_per_pos_total"):
            per_pos[(name.split("_num_")[1].split("_")[0], dict(labels)["position"])] = value
    # rounds (3, 2), (4, 4), (4, 0): reached [3, 2, 2, 1], accepted [2, 2, 1, 1]
    expected = {("reached", "0"): 3, ("reached", "1"): 2, ("reached", "2"): 2, ("reached", "3"): 1,
                ("accepted", "0"): 2, ("accepted", "1"): 2, ("accepted", "2"): 1, ("accepted", "3"): 1}
    assert per_pos == expected, (
        "per position j (label position=\"j\", 0-based as in vLLM) the reached and accepted counts of "
        f"position_counts: expected {expected}, got {per_pos} ({CHAPTER}, Task 3)"
    )


def test_task_3_a_position_reached_but_never_accepted_still_has_a_series(impl, use_ref):
    use_ref("metrics.position_counts")
    only = request(impl, [(2, 0)], [1], 0.0, 0.1, 0.1, 1, [0.01], [0.09])
    _, values = exported(impl, only)
    key = ("specdec_spec_decode_num_accepted_tokens_per_pos_total", (("position", "0"),))
    assert values.get(key) == 0.0, (
        "position 0 was tested and rejected: its accepted series must exist with value 0 (so "
        "accepted / reached reads 0, not 'no data'); position 1 was never reached and has no "
        f"series. Got {values.get(key)} ({CHAPTER}, Task 3)"
    )
    assert ("specdec_spec_decode_num_reached_per_pos_total", (("position", "1"),)) not in values


def test_task_3_histograms(impl, use_ref):
    use_ref("metrics.position_counts")
    spec, plain = two_requests(impl)
    empty = request(impl, [], [], 30.0, None, None, 0, [], [])  # max_tokens = 0: no token, no round
    _, values = exported(impl, spec, plain, empty)
    checks = [
        ("specdec_time_to_first_token_seconds_count", 2, "one per request that produced a token"),
        ("specdec_time_to_first_token_seconds_sum", 0.84, "TTFTs 0.8 and 0.04"),
        ("specdec_e2e_request_latency_seconds_sum", 1.7, "total_s 1.6 and 0.1"),
        ("specdec_request_alpha_count", 1, "only requests that tested a draft have an alpha"),
        ("specdec_request_alpha_sum", 6 / 8, "alpha_estimate of the first: 6 accepted / 8 tested"),
        ("specdec_request_tokens_per_target_call_count", 2, "one per request with a round"),
        ("specdec_request_tokens_per_target_call_sum", 2.5 + 1.0, "10 tokens / 4 calls, and 1.0"),
        ("specdec_spec_decode_lookahead_count", 8, "one observation per round, K = 0 included"),
        ("specdec_spec_decode_lookahead_sum", 11, "the sum of K over all rounds"),
    ]
    for name, value, why in checks:
        got = values.get((name, ()))
        assert got is not None and got == pytest.approx(value), (
            f"{name} should be {value} ({why}), got {got} ({CHAPTER}, Task 3)")
    plain_rounds = values.get(("specdec_spec_decode_lookahead_bucket", (("le", "0.0"),)))
    assert plain_rounds == 5, (
        f"the K histogram's first bucket (le=\"0.0\") counts the plain rounds: 5, got {plain_rounds} "
        f"({CHAPTER}, Task 3)"
    )
    under_50ms = values.get(("specdec_time_to_first_token_seconds_bucket", (("le", "0.05"),)))
    assert under_50ms == 1, f"one TTFT (0.04 s) is <= 0.05 s, got {under_50ms} ({CHAPTER}, Task 3)"
    assert values.get(("specdec_requests_total", ())) == 3, "an empty request is still a request"


def test_task_3_keeps_the_requests(impl, use_ref):
    use_ref("metrics.position_counts", "metrics.acceptance_per_position")
    spec, plain = two_requests(impl)
    aggregator, _ = exported(impl, spec, plain)
    assert aggregator.requests == [spec, plain], (
        f"add appends each request to aggregator.requests, in order ({CHAPTER}, Task 3)")
    pooled = [(3, 2), (0, 0), (4, 4), (4, 0)] + [(0, 0)] * 4
    assert aggregator.acceptance_per_position() == pytest.approx(
        impl.metrics.acceptance_per_position(pooled)), "the pooled per-position acceptance"
    assert aggregator.decode_tokens_per_s == pytest.approx(10 / 0.86)


# Task 4 -----------------------------------------------------------------------------------------
def test_task_4_median_gap_after_the_first_token(impl):
    clock = FakeClock()
    baseline = impl.metrics.measure_plain_baseline(plain_tokens(clock, 1.0, [0.01, 0.02, 0.04]), clock=clock)
    assert (baseline.step_s, baseline.steps) == pytest.approx((0.02, 3)), (
        "4 tokens: the first pays for the 1.0 s prefill and only starts the clock; the gaps after "
        "it are 0.01, 0.02, 0.04 s, so step_s = their median 0.02 (the mean would be 0.023, and "
        f"counting the prefill 0.03) and steps = 3; got step_s = {baseline.step_s}, steps = "
        f"{baseline.steps} ({CHAPTER}, Task 4)"
    )


@pytest.mark.parametrize("gaps, why", [
    (None, "no token at all"),
    ([], "a single token: it only starts the clock"),
    ([0.0, 0.0], "a clock that never moved: a step time of 0 s is not a measurement"),
])
def test_task_4_refuses_streams_too_short_to_time(impl, gaps, why):
    clock = FakeClock()
    stream = iter(()) if gaps is None else plain_tokens(clock, 0.5, gaps)
    with raises(ValueError, f"{why}: measure_plain_baseline must raise ValueError ({CHAPTER}, Task 4)"):
        impl.metrics.measure_plain_baseline(stream, clock=clock)


def test_task_4_speedup_is_the_ratio_of_measured_rates(impl):
    spec = request(impl, [(3, 2), (4, 4)], [3, 5], 0.0, 0.5, 0.75, 3, [0.1, 0.1], [0.3, 0.15])
    baseline = impl.metrics.PlainBaseline(step_s=0.1, steps=16)  # 10 tokens/s plain
    got = impl.metrics.honest_speedup(spec, baseline)
    assert got == pytest.approx(2.0), (
        "5 tokens after the first call in 0.25 s is 20 tokens/s; plain decoding measured 0.1 s a "
        f"step (10 tokens/s): the speed-up is 2.0, got {got}. Both rates leave the first call "
        f"(prefill) out ({CHAPTER}, Task 4)"
    )


def test_task_4_speedup_of_an_aggregator(impl, use_ref):
    use_ref("metrics.position_counts", "metrics.MetricsAggregator.add")
    aggregator = impl.metrics.MetricsAggregator()
    for r in two_requests(impl):
        aggregator.add(r)
    got = impl.metrics.honest_speedup(aggregator, impl.metrics.PlainBaseline(step_s=0.02, steps=16))
    assert got == pytest.approx(10 / 0.86 * 0.02), (
        "for a MetricsAggregator use its pooled decode_tokens_per_s (10 tokens in 0.86 s) times the "
        f"plain step: {10 / 0.86 * 0.02:.4f}, got {got} ({CHAPTER}, Task 4)"
    )


@pytest.mark.parametrize("assumed", [0.02, 20, "0.02"])
def test_task_4_refuses_an_assumed_constant(impl, assumed):
    spec = request(impl, [(3, 2), (4, 4)], [3, 5], 0.0, 0.5, 0.75, 3, [0.1, 0.1], [0.3, 0.15])
    with raises(TypeError, f"honest_speedup(metrics, {assumed!r}): a bare number is an assumed plain "
                "step time, not a measurement; only a PlainBaseline (step_s, steps) from "
                f"measure_plain_baseline is accepted ({CHAPTER}, Task 4)"):
        impl.metrics.honest_speedup(spec, assumed)


def test_task_4_refuses_what_cannot_be_timed(impl):
    one_round = request(impl, [(4, 4)], [5], 0.0, 0.5, 0.5, 5, [0.1], [0.4])
    baseline = impl.metrics.PlainBaseline(step_s=0.1, steps=16)
    with raises(ValueError, "every token came with the first call: there is no decode rate to "
                f"compare, so no speed-up ({CHAPTER}, Task 4)"):
        impl.metrics.honest_speedup(one_round, baseline)
    spec = request(impl, [(3, 2), (4, 4)], [3, 5], 0.0, 0.5, 0.75, 3, [0.1, 0.1], [0.3, 0.15])
    with raises(ValueError, f"a baseline step of 0 s is impossible ({CHAPTER}, Task 4)"):
        impl.metrics.honest_speedup(spec, impl.metrics.PlainBaseline(step_s=0.0, steps=3))


def test_task_4_matches_the_cost_model(impl, use_ref):
    """Both sides timed on one fake clock: the speed-up is Week 2 Day 5's E / (K c + v)."""
    use_ref("metrics.measure")
    step, c, v, K = 0.05, 0.1, 1.3, 4  # a target step, a draft step / step, a verify / step, K
    accepted = [4, 1, 3, 0, 4, 2, 4, 4, 1]  # n per round; the first round also prefills
    script = [(K, n, n + 1, K * c * step, v * step) for n in accepted]
    clock, metrics = FakeClock(), impl.metrics.RequestMetrics(SpecStats())
    list(impl.metrics.measure(scripted_stream(clock, metrics.stats, script), metrics, clock=clock))
    baseline = impl.metrics.measure_plain_baseline(plain_tokens(clock, 0.7, [step] * 16), clock=clock)
    got = impl.metrics.honest_speedup(metrics, baseline)
    tokens_per_round = sum(n + 1 for n in accepted[1:]) / len(accepted[1:])
    expected = tokens_per_round / (K * c + v)
    assert got == pytest.approx(expected), (
        f"rounds of K = {K} drafts costing K c + v = {K * c + v} plain steps and committing "
        f"{tokens_per_round:.3f} tokens each (after the first): the measured speed-up must be "
        f"E / (K c + v) = {expected:.4f}, got {got} ({CHAPTER}, Task 4)"
    )
