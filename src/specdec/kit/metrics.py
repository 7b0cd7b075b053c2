"""The provided half of Week 4 Day 2's `metrics.py`, shared by the student tree and the reference.

Each tree's `metrics.py` imports these and re-exports them: `RequestMetrics` and
`MetricsAggregator` subclass the bases here and add the exercise (and the one provided method
that calls the tree's `acceptance_per_position`); `PlainBaseline` and the histogram buckets are
used as they are. Positions are 0-based, as in vLLM's `position` label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specdec.kit.stats import SpecStats

Rounds = Union[SpecStats, Iterable[tuple[int, int]]]  # a SpecStats, or (K, n) pairs, one per round


@dataclass
class RequestMetricsBase:
    """The fields and figures of `RequestMetrics`, whose docstring says what each field holds.

    Each tree's subclass adds `acceptance_per_position()` (its Task 1 on this request's rounds),
    which `as_dict` and `summary` use. `measure` fills the fields in; times are seconds on its
    clock.
    """

    stats: SpecStats = field(default_factory=SpecStats)
    start_s: Optional[float] = None
    first_token_s: Optional[float] = None
    end_s: Optional[float] = None
    tokens: int = 0
    first_round_tokens: int = 0
    draft_time_per_round: list[float] = field(default_factory=list)
    verify_time_per_round: list[float] = field(default_factory=list)

    @property
    def ttft_s(self) -> Optional[float]:
        """Time to first token: prefill plus the first round (None if no token came)."""
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def total_s(self) -> float:
        """Seconds from the request's start to its last token (0.0 if no token came)."""
        return 0.0 if self.end_s is None else self.end_s - self.start_s

    @property
    def tokens_per_s(self) -> float:
        """End to end: tokens / total_s, prefill included (0.0 if not timed)."""
        return self.tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens(self) -> int:
        """Tokens after the first target call: the ones decoding speed is measured on."""
        return max(self.tokens - self.first_round_tokens, 0)

    @property
    def decode_s(self) -> float:
        """Seconds from the first token to the last (the decode phase, prefill excluded)."""
        return 0.0 if self.end_s is None else self.end_s - self.first_token_s

    @property
    def decode_tokens_per_s(self) -> float:
        """decode_tokens / decode_s: the rate an honest speed-up compares (0.0 if not timed)."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def acceptance_per_position(self) -> list[float]:
        """Per-position acceptance of this request's rounds: the tree's subclass supplies it."""
        raise NotImplementedError("use specdec.metrics.RequestMetrics (or specdec_ref's), which "
                                  "computes it with that tree's acceptance_per_position")

    def as_dict(self) -> dict:
        """Every field and derived figure, for JSON (per-round lists included)."""
        s = self.stats
        return dict(
            ttft_s=self.ttft_s, total_s=self.total_s, tokens=self.tokens,
            tokens_per_s=self.tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s,
            drafted=s.drafted, accepted=s.accepted, alpha=s.alpha_estimate,
            tokens_per_target_call=s.tokens_per_round, target_calls=s.target_calls,
            fallback_rounds=s.fallback_rounds,
            acceptance_per_position=self.acceptance_per_position(),
            draft_time_s=sum(self.draft_time_per_round), verify_time_s=sum(self.verify_time_per_round),
            lookahead_per_round=list(s.lookahead_per_round),
            accepted_per_round=list(s.accepted_per_round),
            draft_time_per_round=list(self.draft_time_per_round),
            verify_time_per_round=list(self.verify_time_per_round),
        )

    def summary(self) -> str:
        """One line for people: speed, acceptance, per-position acceptance, plain rounds."""
        s = self.stats
        ttft = "-" if self.ttft_s is None else f"{self.ttft_s * 1e3:.1f} ms"
        positions = " ".join(f"{a:.2f}" for a in self.acceptance_per_position()) or "-"
        return (f"TTFT {ttft}, {self.tokens_per_s:.1f} tokens/s ({self.decode_tokens_per_s:.1f} after "
                f"the first call), alpha {s.alpha_estimate:.2f}, {s.tokens_per_round:.2f} tokens/call, "
                f"acceptance per position [{positions}], {s.fallback_rounds} plain rounds")


# Histogram buckets (upper bounds) of MetricsAggregator.
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ALPHA_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
TOKENS_PER_CALL_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
LOOKAHEAD_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16)


class MetricsAggregatorBase:
    """`MetricsAggregator`'s constructor (every metric already created), its pooled figures and its
    Prometheus text; each tree's `MetricsAggregator` adds `add` and `acceptance_per_position`."""

    def __init__(self, baseline: Optional["PlainBaseline"] = None):
        """A fresh registry with every metric of `MetricsAggregator`'s docstring at zero."""
        self.requests: list = []  # RequestMetrics, in the order added
        self.baseline = baseline
        self.registry = registry = CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple = ()) -> Counter:
            return Counter(f"specdec_{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"specdec_{name}", doc, buckets=buckets, registry=registry)

        self.requests_total = counter("requests", "Requests measured")
        self.tokens = counter("generation_tokens", "Tokens handed to callers")
        self.target_calls = counter("target_calls", "Target model calls (rounds)")
        self.fallback_rounds = counter("fallback_rounds", "Plain rounds (K = 0)")
        self.num_drafts = counter("spec_decode_num_drafts", "Rounds that drafted (K >= 1)")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted")
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Drafts accepted at each position (0-based)", ("position",))
        self.reached_per_pos = counter("spec_decode_num_reached_per_pos",
                                       "Drafts tested at each position (0-based)", ("position",))
        self.draft_seconds = counter("draft_seconds", "Seconds spent drafting")
        self.verify_seconds = counter("verify_seconds", "Seconds spent in target calls")
        self.decode_tokens = counter("decode_tokens", "Tokens after each request's first call")
        self.decode_seconds = counter("decode_seconds", "Seconds from first to last token")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", TIME_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request start to last token", TIME_BUCKETS)
        self.alpha = histogram("request_alpha", "Per-request acceptance estimate", ALPHA_BUCKETS)
        self.tokens_per_call = histogram("request_tokens_per_target_call", "Tokens per target call",
                                         TOKENS_PER_CALL_BUCKETS)
        self.lookahead = histogram("spec_decode_lookahead", "K per round (0 = plain)", LOOKAHEAD_BUCKETS)
        if baseline is not None:
            Gauge("specdec_plain_step_seconds", "Measured plain decode step",
                  registry=registry).set(baseline.step_s)

    def pooled_rounds(self) -> list[tuple[int, int]]:
        """(K, n) of every round of every request added, in order."""
        return [(k, n) for m in self.requests
                for k, n in zip(m.stats.lookahead_per_round, m.stats.accepted_per_round)]

    @property
    def decode_tokens_per_s(self) -> float:
        """Pooled decode rate: sum of decode_tokens / sum of decode_s."""
        seconds = sum(m.decode_s for m in self.requests)
        return sum(m.decode_tokens for m in self.requests) / seconds if seconds > 0 else 0.0

    def prometheus_text(self) -> str:
        """The registry in Prometheus's text exposition format (what a /metrics endpoint serves)."""
        return generate_latest(self.registry).decode()


@dataclass(frozen=True)
class PlainBaseline:
    """A plain decoding step, measured here and now: build it with
    `measure_plain_baseline`, not by hand.

    step_s   median seconds between consecutive tokens of a timed plain decode
    steps    how many gaps were timed
    """

    step_s: float
    steps: int

    @property
    def tokens_per_s(self) -> float:
        """Plain decoding speed: 1 / step_s."""
        return 1.0 / self.step_s
