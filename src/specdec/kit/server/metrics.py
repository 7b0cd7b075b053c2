"""Prometheus metrics of `specdec serve` (kit), and each response's `speculative` object.

Names follow vLLM's (`spec_decode_num_drafts`, `spec_decode_num_draft_tokens`,
`spec_decode_num_accepted_tokens`, `spec_decode_num_accepted_tokens_per_pos`), with the prefix
`specdec_`. Positions are 0-based: position i counts the rounds whose draft token i was accepted.
"""

from __future__ import annotations

from collections import Counter as Tally


class Metrics:
    """Prometheus counters and gauges for everything served."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: counters and gauges only
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("specdec_requests", "finished requests by finish_reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("specdec_rejected_requests",
                                "requests refused before they ran (4xx), by HTTP status",
                                ["status"], registry=r)
        self.failed = Counter("specdec_failed_requests",
                              "requests answered 500 (a server fault, not the client's)", registry=r)
        self.prompt_tokens = Counter("specdec_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("specdec_generation_tokens", "tokens generated", registry=r)
        self.num_drafts = Counter("specdec_spec_decode_num_drafts", "speculative row-rounds (K > 0)", registry=r)
        self.num_draft_tokens = Counter("specdec_spec_decode_num_draft_tokens", "draft tokens proposed", registry=r)
        self.num_accepted = Counter("specdec_spec_decode_num_accepted_tokens", "draft tokens accepted", registry=r)
        self.accepted_per_pos = Counter(
            "specdec_spec_decode_num_accepted_tokens_per_pos",
            "row-rounds whose draft token at this 0-based position was accepted", ["position"], registry=r)
        self.fallback_rounds = Counter("specdec_fallback_rounds", "row-rounds decoded plainly (K = 0)", registry=r)
        self.running = Gauge("specdec_num_requests_running", "rows in the running batch", registry=r)
        self.waiting = Gauge("specdec_num_requests_waiting", "requests waiting to join (the queue depth)",
                             registry=r)
        self.latency = Histogram("specdec_request_latency_seconds", "request latency", registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    def finished(self, request, seconds: float) -> None:
        s = request.stats
        self.requests.labels(request.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(request.prompt))
        self.generation_tokens.inc(len(request.output))
        self.num_drafts.inc(sum(1 for k in s.lookahead_per_round if k > 0))
        self.num_draft_tokens.inc(s.drafted)
        self.num_accepted.inc(s.accepted)
        for position, count in sorted(Tally(i for n in s.accepted_per_round for i in range(n)).items()):
            self.accepted_per_pos.labels(str(position)).inc(count)
        self.fallback_rounds.inc(sum(1 for k in s.lookahead_per_round if k == 0))
        self.latency.observe(seconds)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def speculative_summary(request) -> dict:
    """What speculation did for one request: K as actually used, round by round."""
    s = request.stats
    ks = s.lookahead_per_round
    return {
        "drafted": s.drafted,
        "accepted": s.accepted,
        "acceptance_rate": round(s.acceptance_rate, 4),
        "target_calls": s.rounds,
        "tokens_per_target_call": round(s.tokens_per_round, 4),
        "lookahead": max(ks, default=0),  # the largest K its rounds used (0: all plain)
        "lookahead_per_round": {str(k): n for k, n in sorted(Tally(ks).items())},  # K -> rounds
        "fallback_rounds": sum(1 for k in ks if k == 0),
        "sampling": request.sampling.name if request.temperature > 0 else "greedy",
    }
