"""Week 3 Day 1 — adaptive lookahead: pick K from what the last rounds showed.

A fixed K is a bet on one acceptance rate. Code boilerplate accepts long runs of drafts, prose
rejects early; the best K moves with the text. An `AdaptiveSpeculator` watches every round
(K drafted, n accepted, optionally its draft and verify time) and returns the K for the next
round, with one of three policies:

  "threshold"  the mean per-round acceptance n/K over the last `window` rounds: above
               `raise_above` K grows by 1, below `lower_below` it shrinks by 1;
  "heuristic"  Hugging Face's assistant rule: +2 when the round accepted every draft, else -1;
  "goodput"    estimate alpha and the costs, then K = argmax E(alpha, K) / (K * c + v(K)).

alpha, c, v, E as in Week 2 Day 5 (`theory.py`). K always stays in [min_lookahead, max_lookahead].
"""

from collections import deque
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx

from specdec.kit.stats import SpecStats

from .speculative import speculative_generate
from .theory import expected_tokens_per_round

POLICIES = ("threshold", "heuristic", "goodput")


def best_lookahead(
    alpha: float, c: float, v: Callable[[int], float], min_lookahead: int, max_lookahead: int
) -> int:
    """The K in [min_lookahead, max_lookahead] that maximises E(alpha, K) / (K * c + v(K)).

    alpha: acceptance probability in [0, 1]. c: draft step cost / target step cost, >= 0.
    v: callable K -> cost of one verify call over K + 1 tokens (in target steps), > 0.
    E is `expected_tokens_per_round(alpha, K)`. Ties go to the smaller K (less wasted work).
    Raises ValueError if min_lookahead < 1, max_lookahead < min_lookahead, or c < 0.
    """
    raise NotImplementedError(
        "Week 3 Day 1 Task 3: best_lookahead — see book/src/week3-01-adaptive-lookahead.md"
    )


class AdaptiveSpeculator:
    """Chooses the lookahead K round by round. Read `lookahead`, call `update` after each round.

    Attributes set by `__init__` (the policies read them):
        min_lookahead, max_lookahead, policy, window, raise_above, lower_below,
        draft_cost, verify_base, verify_slope    the constructor arguments
        _lookahead   the current K (read it through the `lookahead` property)
        history      deque(maxlen=window) of (num_drafted, num_accepted, draft_time_s,
                     verify_time_s) tuples, newest last; times may be None
    """

    def __init__(
        self,
        initial_lookahead: int = 4,
        min_lookahead: int = 2,
        max_lookahead: int = 8,
        policy: str = "threshold",
        window: int = 10,
        raise_above: float = 0.85,
        lower_below: float = 0.60,
        draft_cost: float = 0.1,
        verify_base: float = 1.0,
        verify_slope: float = 0.1,
    ):
        """Check the arguments and start with K = initial_lookahead and an empty history.

        Raises ValueError, naming the value and the fix, when: min_lookahead < 1;
        max_lookahead < min_lookahead; initial_lookahead outside [min_lookahead, max_lookahead];
        policy not in POLICIES; window < 1; not 0 <= lower_below <= raise_above <= 1;
        draft_cost < 0; verify_base <= 0; verify_slope < 0.
        draft_cost, verify_base, verify_slope are the goodput policy's default costs:
        c = draft_cost and v(K) = verify_base + verify_slope * K, in target steps.
        """
        raise NotImplementedError(
            "Week 3 Day 1 Task 1: AdaptiveSpeculator.__init__ — see book/src/week3-01-adaptive-lookahead.md"
        )

    @property
    def lookahead(self) -> int:
        """The K to draft next round (provided)."""
        return self._lookahead

    def update(
        self,
        num_drafted: int,
        num_accepted: int,
        draft_time_s: Optional[float] = None,
        verify_time_s: Optional[float] = None,
    ) -> int:
        """Record one round, apply the policy, and return the new K (also `self.lookahead`).

        num_drafted >= 1 (the K actually drafted, which may be below `lookahead` near the end of
        a generation); 0 <= num_accepted <= num_drafted (ValueError otherwise). Appends the round
        to `history`, then calls the policy's method: `threshold_step()`,
        `heuristic_step(num_drafted, num_accepted)` or `goodput_step()`. Raises RuntimeError if
        the policy returns a K outside [min_lookahead, max_lookahead].
        """
        raise NotImplementedError(
            "Week 3 Day 1 Task 1: AdaptiveSpeculator.update — see book/src/week3-01-adaptive-lookahead.md"
        )

    def threshold_step(self) -> int:
        """The threshold policy: the next K from the per-round acceptance n/K in `history`.

        Until `history` holds `window` rounds, keep K. Then, with m the mean of n/K over them:
        m > raise_above -> K + 1; m < lower_below -> K - 1; else keep K; clamp to the bounds.
        When K changes, clear `history`: rounds drafted at the old K say little about the new
        one, and the next move waits for `window` fresh rounds (no run-away on stale evidence).
        """
        raise NotImplementedError(
            "Week 3 Day 1 Task 1: AdaptiveSpeculator.threshold_step — see book/src/week3-01-adaptive-lookahead.md"
        )

    def heuristic_step(self, num_drafted: int, num_accepted: int) -> int:
        """The heuristic policy (Hugging Face's assistant model), from this round alone.

        K + 2 if the round accepted every draft (num_accepted == num_drafted), else K - 1;
        clamped to [min_lookahead, max_lookahead].
        """
        raise NotImplementedError(
            "Week 3 Day 1 Task 2: AdaptiveSpeculator.heuristic_step — see book/src/week3-01-adaptive-lookahead.md"
        )

    def goodput_step(self) -> int:
        """The goodput policy: estimate alpha, c and v from `history`, return `best_lookahead`.

        alpha: truncation-aware. A round that drafted K and accepted n ran n + 1 accept/reject
        trials if n < K (the (n+1)-th failed) and K trials if n == K (the rest never ran), so
        alpha = sum(n) / sum(n + [n < K]). (The plain sum(n) / sum(K) counts drafts after the
        first rejection as failures and underestimates alpha badly at large K.)
        Costs: v(K) = verify_base + verify_slope * K. If every round in `history` has both
        times, calibrate c from them: one target step lasts s = sum(verify_time) / sum(v(K)),
        and c = (sum(draft_time) / sum(K)) / s. Otherwise c = draft_cost.
        """
        raise NotImplementedError(
            "Week 3 Day 1 Task 4: AdaptiveSpeculator.goodput_step — see book/src/week3-01-adaptive-lookahead.md"
        )


def adaptive_generate(
    decoder,
    speculator: "AdaptiveSpeculator",
    prompt_tokens: mx.array,
    max_tokens: int,
    temperature: float = 0.0,
    key: Optional[mx.array] = None,
    eos_token_ids: Sequence[int] = (),
    stats: Optional[SpecStats] = None,
) -> Iterator[tuple[int, bool]]:
    """`speculative_generate` with K chosen by `speculator` before every round (provided).

    Sets decoder.lookahead = speculator.lookahead, then after each round calls
    speculator.update(K, n, draft_time_s, verify_time_s) with that round's times (taken from
    `stats`, a fresh SpecStats if None) and sets decoder.lookahead to the K it returns.
    Yields what `speculative_generate` yields: (token, from_draft).
    """
    stats = SpecStats() if stats is None else stats
    seen = [stats.draft_time_s, stats.verify_time_s]  # totals so far: the next round is the delta

    def on_round(num_drafted: int, num_accepted: int) -> None:
        draft_s, verify_s = stats.draft_time_s - seen[0], stats.verify_time_s - seen[1]
        seen[:] = [stats.draft_time_s, stats.verify_time_s]
        decoder.lookahead = speculator.update(num_drafted, num_accepted, draft_s, verify_s)

    decoder.lookahead = speculator.lookahead
    yield from speculative_generate(
        decoder, prompt_tokens, max_tokens, temperature, key, eos_token_ids, stats, on_round
    )
