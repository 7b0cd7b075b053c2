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
    if min_lookahead < 1 or max_lookahead < min_lookahead:
        raise ValueError(
            f"need 1 <= min_lookahead <= max_lookahead, got [{min_lookahead}, {max_lookahead}]"
        )
    if c < 0:
        raise ValueError(f"c (draft step cost / target step cost) must be >= 0, got {c}")
    best_k, best_rate = min_lookahead, -1.0
    for k in range(min_lookahead, max_lookahead + 1):
        # Tokens committed per unit of target-step time: the goodput of a round with K drafts.
        rate = expected_tokens_per_round(alpha, k) / (k * c + v(k))
        if rate > best_rate:  # strict: a tie keeps the smaller K
            best_k, best_rate = k, rate
    return best_k


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
        if min_lookahead < 1:
            raise ValueError(f"min_lookahead must be >= 1, got {min_lookahead}")
        if max_lookahead < min_lookahead:
            raise ValueError(
                f"max_lookahead {max_lookahead} < min_lookahead {min_lookahead}: swap them"
            )
        if not min_lookahead <= initial_lookahead <= max_lookahead:
            raise ValueError(
                f"initial_lookahead {initial_lookahead} is outside [{min_lookahead}, "
                f"{max_lookahead}]: pick a start inside the bounds or widen them"
            )
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: choose one of {POLICIES}")
        if window < 1:
            raise ValueError(f"window must be >= 1 round, got {window}")
        if not 0.0 <= lower_below <= raise_above <= 1.0:
            raise ValueError(
                f"need 0 <= lower_below <= raise_above <= 1, got lower_below={lower_below}, "
                f"raise_above={raise_above}"
            )
        if draft_cost < 0 or verify_base <= 0 or verify_slope < 0:
            raise ValueError(
                f"costs must satisfy draft_cost >= 0, verify_base > 0, verify_slope >= 0, got "
                f"{draft_cost}, {verify_base}, {verify_slope}"
            )
        self.min_lookahead, self.max_lookahead = min_lookahead, max_lookahead
        self.policy, self.window = policy, window
        self.raise_above, self.lower_below = raise_above, lower_below
        self.draft_cost, self.verify_base, self.verify_slope = draft_cost, verify_base, verify_slope
        self._lookahead = initial_lookahead
        self.history = deque(maxlen=window)

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
        if num_drafted < 1:
            raise ValueError(f"num_drafted must be >= 1, got {num_drafted}")
        if not 0 <= num_accepted <= num_drafted:
            raise ValueError(f"num_accepted must be in [0, {num_drafted}], got {num_accepted}")
        self.history.append((num_drafted, num_accepted, draft_time_s, verify_time_s))
        if self.policy == "threshold":
            new_k = self.threshold_step()
        elif self.policy == "heuristic":
            new_k = self.heuristic_step(num_drafted, num_accepted)
        else:
            new_k = self.goodput_step()
        if not self.min_lookahead <= new_k <= self.max_lookahead:
            raise RuntimeError(
                f"the {self.policy} policy returned K={new_k}, outside [{self.min_lookahead}, "
                f"{self.max_lookahead}]: clamp it to the bounds"
            )
        self._lookahead = int(new_k)
        return self._lookahead

    def threshold_step(self) -> int:
        """The threshold policy: the next K from the per-round acceptance n/K in `history`.

        Until `history` holds `window` rounds, keep K. Then, with m the mean of n/K over them:
        m > raise_above -> K + 1; m < lower_below -> K - 1; else keep K; clamp to the bounds.
        When K changes, clear `history`: rounds drafted at the old K say little about the new
        one, and the next move waits for `window` fresh rounds (no run-away on stale evidence).
        """
        if len(self.history) < self.window:
            return self._lookahead
        mean_acceptance = sum(n / k for k, n, _, _ in self.history) / len(self.history)
        new_k = self._lookahead
        if mean_acceptance > self.raise_above:
            new_k = min(new_k + 1, self.max_lookahead)
        elif mean_acceptance < self.lower_below:
            new_k = max(new_k - 1, self.min_lookahead)
        if new_k != self._lookahead:
            self.history.clear()
        return new_k

    def heuristic_step(self, num_drafted: int, num_accepted: int) -> int:
        """The heuristic policy (Hugging Face's assistant model), from this round alone.

        K + 2 if the round accepted every draft (num_accepted == num_drafted), else K - 1;
        clamped to [min_lookahead, max_lookahead].
        """
        step = 2 if num_accepted == num_drafted else -1
        return min(max(self._lookahead + step, self.min_lookahead), self.max_lookahead)

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
        trials = sum(n + (n < k) for k, n, _, _ in self.history)
        alpha = sum(n for _, n, _, _ in self.history) / trials

        def v(k: int) -> float:
            return self.verify_base + self.verify_slope * k

        c = self.draft_cost
        if all(d is not None and t is not None for _, _, d, t in self.history):
            step_s = sum(t for _, _, _, t in self.history) / sum(v(k) for k, _, _, _ in self.history)
            if step_s > 0:
                draft_step_s = sum(d for _, _, d, _ in self.history) / sum(k for k, *_ in self.history)
                c = draft_step_s / step_s
        return best_lookahead(alpha, c, v, self.min_lookahead, self.max_lookahead)


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
