"""Week 4 Day 2 — metrics: per round, per request, across requests, and an honest speed-up.

Per round the loop already records K (drafted) and n (accepted) in a `SpecStats`. From those:
acceptance per draft position, P(draft j accepted | the target reached it). Per request, a
wrapper around the token stream (`measure`) stamps the clock: time to first token, tokens/s,
draft and verify time per round. Across requests, `MetricsAggregator` pools requests into
Prometheus counters and histograms named after vLLM's (`spec_decode_num_drafts`, ...). And the
speed-up is measured against a plain decode timed on this machine, never an assumed constant.

Positions are 0-based as in vLLM's `position` label: position j is the (j + 1)-th draft of a round.
"""

import statistics
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

# Provided code lives once, in the kit; re-exported here (specdec.metrics.PlainBaseline, ...).
from specdec.kit.metrics import (
    ALPHA_BUCKETS,
    LOOKAHEAD_BUCKETS,
    TIME_BUCKETS,
    TOKENS_PER_CALL_BUCKETS,
    MetricsAggregatorBase,
    PlainBaseline,
    RequestMetricsBase,
    Rounds,
)
from specdec.kit.stats import SpecStats


# Task 1: acceptance per draft position ----------------------------------------------------------
def position_counts(stats_or_rounds: Rounds) -> tuple[list[int], list[int]]:
    """How many rounds reached each draft position, and how many accepted it.

    stats_or_rounds: a SpecStats (its `lookahead_per_round` and `accepted_per_round`) or an
    iterable of (K, n) pairs, one per round: K drafts proposed, n accepted (0 <= n <= K).
    K = 0 is a plain round (the fallback's): it drafts nothing and adds nothing here.
    Position j (0-based) is *reached* in a round iff K > j and n >= j: the target tests the
    (j + 1)-th draft only if the j before it were all accepted. It is *accepted* iff n > j.
    Returns (reached, accepted): two lists of ints of length max K over the rounds (0 if no round
    drafted). Raises ValueError naming the round if K < 0 or n is not in [0, K].
    """
    if isinstance(stats_or_rounds, SpecStats):
        rounds = list(zip(stats_or_rounds.lookahead_per_round, stats_or_rounds.accepted_per_round))
    else:
        rounds = [tuple(r) for r in stats_or_rounds]
    for i, (k, n) in enumerate(rounds):
        if k < 0 or not 0 <= n <= k:
            raise ValueError(f"round {i}: K={k}, n={n} is impossible: need K >= 0 and 0 <= n <= K")
    size = max((k for k, _ in rounds), default=0)
    reached, accepted = [0] * size, [0] * size
    for k, n in rounds:
        # Positions 0..min(n, K-1) were tested; the first n of them passed.
        for j in range(min(n + 1, k)):
            reached[j] += 1
            accepted[j] += int(j < n)
    return reached, accepted


def acceptance_per_position(stats_or_rounds: Rounds) -> list[float]:
    """Entry j: P(draft j accepted | the target reached it) = accepted[j] / reached[j].

    stats_or_rounds as in `position_counts`. Under the book's geometric model every entry has
    expectation alpha. Positions no round reached are left out (no evidence either way): the list
    stops before the first position with reached == 0, and is empty if no round drafted.
    """
    reached, accepted = position_counts(stats_or_rounds)
    rates = []
    for r, a in zip(reached, accepted):
        if r == 0:  # reached is non-increasing in j: no later position was reached either
            break
        rates.append(a / r)
    return rates


# Task 2: one request, timed ---------------------------------------------------------------------
@dataclass
class RequestMetrics(RequestMetricsBase):
    """What one request did (provided: fields and figures in `RequestMetricsBase`,
    `specdec.kit.metrics`). `measure` fills it in; times are seconds on its clock.

    stats                the SpecStats the decoding loop fills for this request (a fresh one)
    start_s              clock when the first token was asked for (None before)
    first_token_s        clock when the first token arrived (None before)
    end_s                clock when the last token arrived (None before)
    tokens               tokens the stream yielded
    first_round_tokens   tokens the first target call produced (they arrive together; for a
                         stream that records no rounds, 1)
    draft_time_per_round, verify_time_per_round   seconds, one entry per round of `stats`
    Figures: ttft_s (first_token_s - start_s), total_s (end_s - start_s), tokens_per_s,
    decode_tokens (tokens - first_round_tokens), decode_s (end_s - first_token_s),
    decode_tokens_per_s; `as_dict()` and `summary()` for JSON and people.
    """

    def acceptance_per_position(self) -> list[float]:
        """`acceptance_per_position` of this request's rounds (provided)."""
        return acceptance_per_position(self.stats)


def measure(stream: Iterable, metrics: "RequestMetrics", clock=time.perf_counter) -> Iterator:
    """Yield `stream`'s items unchanged, filling `metrics` as they arrive.

    stream: tokens from a decoding loop that fills `metrics.stats` (speculative_generate,
    fallback_generate, ...); a plain stream that records nothing works too. The stream does not
    start before the first item is asked for, so neither does the clock:
      - at the first request for an item, start_s = clock(); ValueError if `metrics.stats`
        already holds rounds (one fresh SpecStats per request);
      - as each item arrives (before it is yielded): tokens += 1, end_s = clock(); for the first
        one also first_token_s and first_round_tokens = stats.emitted (1 if stats.rounds == 0);
      - whenever stats.rounds has grown since the last look (at each item, and once more when the
        stream ends), append the growth of stats.draft_time_s and stats.verify_time_s to
        draft_time_per_round / verify_time_per_round (split evenly if several rounds ended).
    A caller that stops early (break) leaves metrics describing the items it took.
    """
    stats = metrics.stats
    if stats.rounds:
        raise ValueError(f"metrics.stats already holds {stats.rounds} rounds: give each request a "
                         "fresh SpecStats (pool requests with MetricsAggregator instead)")
    seen = [0, stats.draft_time_s, stats.verify_time_s]  # rounds, draft s, verify s at last look

    def take_rounds() -> None:
        new = stats.rounds - seen[0]
        if new > 0:
            draft_s, verify_s = stats.draft_time_s - seen[1], stats.verify_time_s - seen[2]
            metrics.draft_time_per_round += [draft_s / new] * new
            metrics.verify_time_per_round += [verify_s / new] * new
            seen[:] = [stats.rounds, stats.draft_time_s, stats.verify_time_s]

    metrics.start_s = clock()
    for item in stream:
        now = clock()
        if metrics.tokens == 0:
            metrics.first_token_s = now
            metrics.first_round_tokens = stats.emitted if stats.rounds else 1
        metrics.tokens += 1
        metrics.end_s = now
        take_rounds()
        yield item
    take_rounds()


# Task 3: across requests, in Prometheus's format -------------------------------------------------
class MetricsAggregator(MetricsAggregatorBase):
    """Pools RequestMetrics across requests into Prometheus metrics (its own registry).

    Attributes (set by the provided `__init__`; `add` updates them):
        requests      list of the RequestMetrics added, in order
        registry      a prometheus_client CollectorRegistry holding only this aggregator's metrics
        baseline      the PlainBaseline given, or None
      Counters (exported with the suffix _total):
        requests_total    specdec_requests                  requests added
        tokens            specdec_generation_tokens         tokens handed to callers
        target_calls      specdec_target_calls              target calls (rounds, plain ones included)
        fallback_rounds   specdec_fallback_rounds           plain rounds (K = 0)
        num_drafts        specdec_spec_decode_num_drafts    rounds that drafted (K >= 1)
        num_draft_tokens  specdec_spec_decode_num_draft_tokens       sum of K
        num_accepted_tokens  specdec_spec_decode_num_accepted_tokens  sum of n
        accepted_per_pos  specdec_spec_decode_num_accepted_tokens_per_pos{position="j"}
        reached_per_pos   specdec_spec_decode_num_reached_per_pos{position="j"}
        draft_seconds, verify_seconds    specdec_draft_seconds, specdec_verify_seconds
        decode_tokens, decode_seconds    specdec_decode_tokens, specdec_decode_seconds
      Histograms:
        ttft              specdec_time_to_first_token_seconds     one per request with a token
        e2e               specdec_e2e_request_latency_seconds     one per request with a token
        alpha             specdec_request_alpha            one per request with a tested draft
        tokens_per_call   specdec_request_tokens_per_target_call   one per request with a round
        lookahead         specdec_spec_decode_lookahead    one observation per round: its K
      Gauge (only with a baseline): specdec_plain_step_seconds = baseline.step_s
    Provided (`MetricsAggregatorBase`, `specdec.kit.metrics`): the constructor
    `MetricsAggregator(baseline=None)`, which creates every metric above at zero with the
    buckets TIME_BUCKETS, ALPHA_BUCKETS, TOKENS_PER_CALL_BUCKETS and LOOKAHEAD_BUCKETS;
    `pooled_rounds()`, the property `decode_tokens_per_s` (pooled: sum of decode_tokens / sum
    of decode_s) and `prometheus_text()`.
    """

    def add(self, metrics: "RequestMetrics") -> None:
        """Count one finished request into every metric of the class docstring.

        Appends it to `requests`. Counters grow by the request's own totals (from metrics.stats
        and the per-round time lists, and its decode_tokens / decode_s); per position j reached
        at least once (`position_counts`), both per-position series grow (by 0 if none accepted).
        Histograms observe: ttft and e2e (total_s) if a token came; alpha_estimate if a draft was
        tested (accepted + rejections > 0); tokens per target call if a round ran; each round's K.
        """
        s = metrics.stats
        self.requests.append(metrics)
        self.requests_total.inc()
        self.tokens.inc(metrics.tokens)
        self.target_calls.inc(s.rounds)
        self.fallback_rounds.inc(s.fallback_rounds)
        self.num_drafts.inc(s.speculative_rounds)
        self.num_draft_tokens.inc(s.drafted)
        self.num_accepted_tokens.inc(s.accepted)
        reached, accepted = position_counts(s)
        for j, (r, a) in enumerate(zip(reached, accepted)):
            if r:  # a series per position the target ever tested
                self.reached_per_pos.labels(position=str(j)).inc(r)
                self.accepted_per_pos.labels(position=str(j)).inc(a)
        self.draft_seconds.inc(sum(metrics.draft_time_per_round))
        self.verify_seconds.inc(sum(metrics.verify_time_per_round))
        self.decode_tokens.inc(metrics.decode_tokens)
        self.decode_seconds.inc(metrics.decode_s)
        if metrics.tokens:
            self.ttft.observe(metrics.ttft_s)
            self.e2e.observe(metrics.total_s)
        if s.accepted + s.rejections:
            self.alpha.observe(s.alpha_estimate)
        if s.rounds:
            self.tokens_per_call.observe(s.tokens_per_round)
        for k in s.lookahead_per_round:
            self.lookahead.observe(k)

    def acceptance_per_position(self) -> list[float]:
        """`acceptance_per_position` over every round of every request added (provided)."""
        return acceptance_per_position(self.pooled_rounds())


# Task 4: an honest speed-up ----------------------------------------------------------------------
def measure_plain_baseline(plain_stream: Iterable, clock=time.perf_counter) -> "PlainBaseline":
    """Time a plain decode: the median gap between consecutive tokens after the first.

    plain_stream: tokens of a plain decoder on the machine, model and settings to compare with,
    e.g. `generate_tokens(target, prompt, 17)` (Week 1 Day 2). Consume it all, stamping clock()
    as each token arrives. The first token pays for the prompt's prefill, so it only starts the
    clock: the gaps are between tokens 1 and 2, 2 and 3, ... Median, not mean: a stray slow step
    cannot make plain decoding look slower than it is.
    Returns PlainBaseline(step_s=median gap, steps=number of gaps). Raises ValueError if the
    stream gave fewer than 2 tokens, or if the median gap is not > 0.
    """
    stamps = [clock() for _ in plain_stream]
    if len(stamps) < 2:
        raise ValueError(f"the plain stream gave {len(stamps)} token(s): a step time needs at least "
                         "2 (the first one pays for the prompt); decode more tokens")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    step_s = statistics.median(gaps)
    if step_s <= 0:
        raise ValueError(f"median plain step of {step_s} s: the clock did not advance between tokens")
    return PlainBaseline(step_s=step_s, steps=len(gaps))


def honest_speedup(measured, baseline: "PlainBaseline") -> float:
    """Speculative decode speed over plain decode speed, both measured: the only speed-up to report.

    measured: a RequestMetrics or a MetricsAggregator (anything with `decode_tokens_per_s`).
    baseline: a PlainBaseline from `measure_plain_baseline` — TypeError for anything without its
    `step_s` and `steps` (a bare number is an assumed step time: how speed-ups get invented).
    Returns measured.decode_tokens_per_s * baseline.step_s (= that rate / plain tokens per second).
    Raises ValueError if baseline.step_s <= 0, or if measured has no decode rate (0: every token
    came with the first call, so there is nothing to time).
    """
    if not (hasattr(baseline, "step_s") and hasattr(baseline, "steps")):
        raise TypeError(f"baseline must be a PlainBaseline from measure_plain_baseline, got "
                        f"{baseline!r}: time plain decoding on this machine instead of assuming it")
    if baseline.step_s <= 0:
        raise ValueError(f"baseline.step_s = {baseline.step_s}: a plain step takes > 0 seconds")
    rate = measured.decode_tokens_per_s
    if rate <= 0:
        raise ValueError("no decode rate to compare: every token came with the first target call "
                         "(decode more tokens per request)")
    return rate * baseline.step_s
