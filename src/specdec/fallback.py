"""Week 4 Days 3-4 — fallback: speculation that never loses.

Day 3 (book/src/week4-03-fallback.md): the controller, `FallbackController` (Tasks 1-2).
Day 4 (book/src/week4-04-fallback-loops.md): the loops that run its decisions,
`fallback_generate` and `batched_fallback_decode` (Tasks 1-2 of that day).

Speculative decoding only pays when E(alpha, K) / (K * c + v(K)) > 1 (Week 2 Day 5). On a GPU
where a tiny draft costs as much per call as the target, with a slow BLAS where a K-token verify
costs K plain steps, or at batch 8, it loses. A `FallbackController` picks K in {0, 1, ..., K_max}
every round from estimates measured on this machine, where K = 0 means a plain round: one target
call, one token. It leaves speculation as soon as its best predicted goodput falls below 1
(plain would be faster), comes back only above 1 + margin (hysteresis), and probes now and then
while plain.

Costs are in plain steps: s = seconds per plain token (timed plain rounds), c = draft seconds per
drafted token / s, v(K) = verify seconds / s fitted as a + b K through v(0) = 1. Before any round
has measured them, two priors stand in: the target's prompt call is a verify call over L tokens
(v(L - 1)), and one draft call timed on its own gives c before the draft pays for the prompt.

Provided (read it: specdec/kit/fallback_policy.py): the controller's base class `ControllerBase`
(its state, the priors, measured-beats-fitted `verify_cost`, `could_win`, the probe budget
`probe_wait`, the generous alpha before MIN_ROUNDS, `memory_pressure`, `disable_draft`) and the
loops' fault handling (a draft that raises: continue on the target alone; memory pressure: lower
K, then the batch, and retry the round; the batched draft's DRAFT_WINDOW; the shortest-row rule).
You write the estimates, `update` and `decide` (Day 3), and the two loops with K = 0 rounds
(Day 4). Nothing emitted is lost or repeated.
"""

import time
from typing import Iterator, Optional, Sequence

import mlx.core as mx
from specdec.kit.errors import FallbackWarning  # noqa: F401  (re-exported: the loops' warnings)
from specdec.kit.fallback_policy import (  # noqa: F401  (DRAFT_WINDOW, MIN_ROUNDS: re-exported)
    DRAFT_WINDOW, MIN_ROUNDS, ControllerBase, batch_fault, cache_length, cannot_roll_back,
    commit_failed, compact_padding, count_round, draft_fault, draft_lost, drafts_failed,
    finish_in_halves, first_draft_step, is_out_of_memory, over_memory_limit, shortest_row_progress,
    target_fault, until_eos, window_rows)
from specdec.kit.models import model_vocab_size
from specdec.kit.stats import SpecStats

from .batched import SHARED_PADDING_LIMIT, draft_batch, filter_rows, left_pad, make_batch_cache, rollback_rows
from .sampling import make_probs, sample_token
from .speculative import commit_round
from .theory import expected_tokens_per_round
from .verify import verify_speculation


class FallbackController(ControllerBase):
    """Chooses K in {0, ..., max_lookahead} each round; K = 0 is a plain round.

    The provided base class (`ControllerBase`, specdec/kit/fallback_policy.py) holds the
    constructor, FallbackController(max_lookahead=8, window=16, margin=0.05, probe_every=32,
    initial_lookahead=4, calibration_rounds=2, max_backoff=8, probe_budget=0.02), and the
    attributes it sets (read its docstring: rounds, draft_times, verify_times, plain_times,
    prefill, draft_step_s, speculating, probing, cap, draft_ok, until_probe, probe_interval,
    faults), the loop-facing members (lookahead, needs_draft_step, observe_prefill,
    observe_draft_step, report, disable_draft, memory_pressure), verify_cost, could_win,
    probe_wait and refinements. This class adds the estimates (Task 1) and the decisions (Task 2).
    """

    # Day 3 Task 1: estimates ----------------------------------------------------------------------
    def alpha(self) -> Optional[float]:
        """Truncation-aware acceptance over `rounds`: sum(n) / sum(n + [n < K]), per row.

        A round (row) that drafted K and accepted n ran n + 1 trials if n < K and K if n == K.
        None when no trial has run (no speculative round in `rounds`).
        """
        raise NotImplementedError("Week 4 Day 3 Task 1: FallbackController.alpha — see book/src/week4-03-fallback.md")

    def step_time(self) -> Optional[float]:
        """s: the median of `plain_times` (robust to a noisy round), or None if there are none."""
        raise NotImplementedError("Week 4 Day 3 Task 1: FallbackController.step_time — see book/src/week4-03-fallback.md")

    def draft_cost(self) -> Optional[float]:
        """c = (seconds per drafted token) / s.

        From `draft_times` (sum of seconds / sum of K) when it holds anything, else from
        `draft_step_s`; None if neither is known or s is unknown.
        """
        raise NotImplementedError("Week 4 Day 3 Task 1: FallbackController.draft_cost — see book/src/week4-03-fallback.md")

    def verify_line(self) -> Optional[tuple[float, float]]:
        """(a, b) with v(K) = a + b K in plain steps, or None if it cannot be fitted yet.

        The least-squares line through the point (0, 1) and one point (K_r, seconds_r / s) per
        entry of `verify_times`; when `verify_times` is empty, through (0, 1) and the prefill
        prior (num_tokens - 1, seconds / s) instead (a call over L tokens is a verify call over
        L - 1 drafts; a one-token prefill gives b = 0). None without either, or without s.
        b is never negative (a wider call is not cheaper): clamp it to 0, a = mean y - b mean x.
        """
        raise NotImplementedError("Week 4 Day 3 Task 1: FallbackController.verify_line — see book/src/week4-03-fallback.md")

    def goodput(self, k: int, alpha: Optional[float] = None) -> Optional[float]:
        """G(K) = E(alpha, K) / (K c + v(K)) in tokens per plain step; G(0) = 1.

        E from Week 2 Day 5's `expected_tokens_per_round`; v(K) is `verify_cost(k)` (provided).
        alpha defaults to `alpha()`. None when alpha, c or v(K) is unknown (for K > 0).
        """
        raise NotImplementedError("Week 4 Day 3 Task 1: FallbackController.goodput — see book/src/week4-03-fallback.md")

    def best_lookahead(self, alpha: Optional[float] = None) -> Optional[tuple[int, float]]:
        """(K, G(K)) maximising `goodput` over K in [1, cap]; ties go to the smaller K.

        alpha as in `goodput` (read `alpha()` once, not once per K). None when cap == 0 or
        goodput is unknown.
        """
        raise NotImplementedError("Week 4 Day 3 Task 1: FallbackController.best_lookahead — see book/src/week4-03-fallback.md")

    # Day 3 Task 2: hysteresis and probing ---------------------------------------------------------
    def update(
        self,
        num_drafted: int,
        num_accepted,
        draft_time_s: Optional[float] = None,
        verify_time_s: Optional[float] = None,
    ) -> int:
        """Record one round, then `decide`; returns the new K (also `self.lookahead`).

        num_drafted: the K drafted (0 for a plain round). num_accepted: an int, or a non-empty
        list with one count per row for a batched round; each in [0, num_drafted].
        Raises ValueError, saying which rule broke, when num_drafted < 0, when the list is
        empty (a round reports at least one count), or when a count is outside [0, num_drafted].
        A plain round appends verify_time_s (its seconds, if not None) to `plain_times` and
        counts down `until_probe`. A speculative round appends (K, tuple of counts) to `rounds`
        and the times that are not None to `draft_times` / `verify_times`.
        """
        raise NotImplementedError("Week 4 Day 3 Task 2: FallbackController.update — see book/src/week4-03-fallback.md")

    def decide(self) -> int:
        """The next K, and the mode change behind it, by the first rule that applies:

          1. no draft (`draft_ok` False) or cap == 0: 0.
          2. fewer than `calibration_rounds` timed plain rounds: 0 (measure the unit s first).
          3. `refinements()` (provided) returns a K: that K.
          4. no (K*, G*) = best_lookahead() yet (no alpha, or c unknown): speculating -> the
             tentative K = min(initial_lookahead, cap) (the loop times a draft step first when
             c is unknown); plain -> a probe at that K once until_probe <= 0 (probing = True),
             else 0.
          5. speculating: G* < 1 -> leave for plain mode: 0; else K*. (The margin only delays
             the return, never the exit.)
          6. just probed (`probing`; set probing = False): G* > 1 + margin -> speculating again
             at K*, probe_interval back to probe_every; else a failed probe: 0, probe_interval
             doubled (at most probe_every * max_backoff).
          7. plain: G* > 1 + margin -> speculating at K*; until_probe <= 0 -> a probe at K*
             (probing = True); else 0.
        Leaving for plain (rule 5) and a failed probe (rule 6) both set until_probe =
        max(probe_interval, probe_wait()) (`probe_wait`, provided, is the probe budget) and
        clear `rounds`: alpha evidence from text that stopped paying says nothing about the
        text the next probe will see.
        """
        raise NotImplementedError("Week 4 Day 3 Task 2: FallbackController.decide — see book/src/week4-03-fallback.md")


# Day 4 Task 1: the single-stream loop -------------------------------------------------------------
def fallback_generate(
    decoder,
    controller,
    prompt_tokens: mx.array,
    max_tokens: int,
    temperature: float = 0.0,
    key: Optional[mx.array] = None,
    eos_token_ids: Sequence[int] = (),
    stats: Optional[SpecStats] = None,
    memory_limit_mb: Optional[float] = None,
) -> Iterator[tuple[int, bool]]:
    """`speculative_generate` where every round's K comes from `controller`, K = 0 meaning plain.

    decoder: a `SpeculativeDecoder` (caches `reset()` first). controller: a FallbackController,
    or anything with its loop-facing members: lookahead, update, needs_draft_step,
    observe_prefill, observe_draft_step, memory_pressure, disable_draft, report.
    Yields (token, from_draft) as speculative_generate does; max_tokens, temperature, key,
    eos_token_ids, stats as there (ValueError for an empty prompt or temperature > 0 without key).
    Each round: K = min(controller.lookahead, tokens still wanted - 1): a round never drafts
    a token it could not emit.
      K = 0: one target call on the tokens its cache has not seen; one token (argmax, or sampled
        with a fresh split of the key). While the next round is plain too, queue its call with
        mx.async_eval before yielding (as generate_tokens does): the next token's call is
        already built when the consumer gets this one. Its seconds (from the previous round's
        end) go to controller.update(0, 0, None, seconds), or observe_prefill(L, seconds) for
        the prompt's own call; stats.record_round(0, 0, 1).
      K > 0: if controller.needs_draft_step, first `first_draft_step` (provided: it times one
        draft call; its draft_model is the decoder's, or None for a decoder without one, such
        as Week 3's n-gram DrafterDecoder) and re-read K. Draft with `decoder.draft_generation`
        on every committed token the draft cache has not seen (after plain rounds: all of
        them, in one call), one target call, verify_speculation, commit_round;
        controller.update(K, n, draft seconds, verify seconds), the draft seconds None when
        the draft caught up on more than 2 tokens (they are not K draft steps).
    Faults (each reported through the controller, none lost or repeated in the output):
      - the draft raises (not NotImplementedError) -> `draft_fault` (provided): plain from then on;
      - an allocation failure in the target's call (K > 0) -> `target_fault` (provided: both
        caches back to their lengths before the round, memory_pressure()), and the round
        again; at K = 0 it propagates. memory_limit_mb: after a round, `over_memory_limit`
        -> controller.memory_pressure();
      - a cache that cannot roll back (before a round: not `is_trimmable()`; or commit_round's
        ValueError) -> controller.disable_draft(reason naming the rollback); a target cache
        left holding rejected drafts is made again (make_prompt_cache) and so re-filled from
        the committed tokens by the next plain round.
    """
    raise NotImplementedError("Week 4 Day 4 Task 1: fallback_generate — see book/src/week4-04-fallback-loops.md")


# Day 4 Task 2: the batched loop -------------------------------------------------------------------
def batched_fallback_decode(
    batch_prompts: list[list[int]],
    draft_model,
    target_model,
    controller,
    max_tokens: int = 100,
    temperature: float = 0.0,
    key: Optional[mx.array] = None,
    eos_token_ids: Sequence[int] = (),
    stats: Optional[SpecStats] = None,
    memory_limit_mb: Optional[float] = None,
) -> list[list[int]]:
    """`batched_speculative_decode` with one K per round for the whole batch, from `controller`.

    Arguments and result as batched_speculative_decode (lookahead replaced by controller; the
    same ValueErrors). Row i is exactly the target's greedy output at temperature 0 and
    distributed as the target's at temperature > 0 (each row samples with its own keys, never
    reused; any split order that gives every draw a fresh key is correct).
    Each round, with r = the most tokens a live row still needs: K = min(controller.lookahead,
    r - 1).
      K = 0: one target call on [B, unseen] (the left-padded prompts on the first round, else
        each row's newest token); every row gets one token. update(0, 0, None, seconds), or
        observe_prefill(L, seconds) for the prompts' call; stats.record_round(0, 0, 1) per row.
      K > 0: (needs_draft_step: `first_draft_step` on each row's newest token, [B, 1], first.)
        The draft is fed `window_rows(...)` (provided: at the first draft round, or after a
        plain stretch longer than DRAFT_WINDOW, each row's last DRAFT_WINDOW tokens, left-padded
        into a new draft cache; else the m + 2 tokens every row's draft lags after m plain
        rounds, in one [B, m + 2] call). `draft_batch`, one target call, `verify_speculation`
        per row, `rollback_rows` on both caches; update(K, [d - 1], draft seconds (None when
        the draft was fed more than 2 tokens a row), verify seconds), d from
        `shortest_row_progress` (provided: how far the batch's shortest row moved).
    Rows that finish leave both caches (`filter_rows`). Faults: the draft raises -> `draft_lost`
    (provided), plain from then on; anything raised in a round -> `batch_fault` (provided: an
    allocation failure gives back what the round wrote and lowers K, or says to halve the batch:
    then `finish_in_halves`); memory_limit_mb exceeded after a round -> memory_pressure(), and
    `finish_in_halves` when it returns False with B > 1.
    """
    raise NotImplementedError("Week 4 Day 4 Task 2: batched_fallback_decode — see book/src/week4-04-fallback-loops.md")
