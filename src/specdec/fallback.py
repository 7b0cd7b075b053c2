"""Week 4 Day 3 — fallback: speculation that never loses.

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
The loops (`fallback_generate`, `batched_fallback_decode`) survive faults: a draft that raises
(continue on the target alone), memory pressure (lower K, then the batch, and retry the round),
a cache that cannot roll back (finish with plain decoding). Nothing emitted is lost or repeated.
"""

import time
import warnings
from collections import deque
from typing import Iterator, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from specdec.kit.models import model_vocab_size
from specdec.kit.stats import SpecStats
from specdec.kit.errors import FallbackWarning

from .batched import SHARED_PADDING_LIMIT, draft_batch, filter_rows, left_pad, make_batch_cache, rollback_rows
from .sampling import make_probs, sample_token
from .speculative import commit_round
from .theory import expected_tokens_per_round
from .verify import verify_speculation

MIN_ROUNDS = 4  # counts of evidence before alpha alone may end speculation (a round reporting
# one count per row, as a serving engine's does, brings B)
DRAFT_WINDOW = 64  # the batched draft catches up on at most this many newest tokens per row


class FallbackController:
    """Chooses K in {0, ..., max_lookahead} each round; K = 0 is a plain round.

    Attributes (set by `__init__`; the estimates and decisions read them):
        max_lookahead, window, margin, probe_every, initial_lookahead, calibration_rounds,
        max_backoff, probe_budget   the constructor arguments
        rounds        deque(maxlen=window) of (K, accepted) per speculative round, accepted a
                      tuple of per-row counts (one entry for a single stream): alpha's evidence
        draft_times   deque(maxlen=window) of (K, seconds): timed drafting of K tokens
        verify_times  deque(maxlen=window) of (K, seconds): timed verify calls over K drafts
        plain_times   deque(maxlen=window) of seconds: timed plain rounds
        prefill       (num_tokens, seconds) of the target's prompt call, or None
        draft_step_s  seconds of one draft call timed on its own, or None
        speculating   True while in speculative mode (False: plain mode)
        cap           the largest K allowed now (memory pressure lowers it)
        draft_ok      False once the draft failed: plain for good
        until_probe   plain rounds left before the next probe; probe_interval its current period
        probing       True while the current K > 0 round is a probe from plain mode
        faults        list of strings, one per fault survived (also issued as FallbackWarning)
        _lookahead    the next K (read it through `lookahead`)
    """

    def __init__(
        self,
        max_lookahead: int = 8,
        window: int = 16,
        margin: float = 0.05,
        probe_every: int = 32,
        initial_lookahead: int = 4,
        calibration_rounds: int = 2,
        max_backoff: int = 8,
        probe_budget: float = 0.02,
    ):
        """Check the arguments; start in speculative mode with K = 0 until calibrated.

        Raises ValueError, naming the value and the fix, when: max_lookahead < 1; window < 1;
        not 0 <= margin < 1; probe_every < 1; initial_lookahead < 1; calibration_rounds < 1;
        max_backoff < 1; not 0 < probe_budget <= 1. initial_lookahead is clamped to max_lookahead.
        K is 0 until `calibration_rounds` plain rounds are timed (the unit s of every cost).
        """
        raise NotImplementedError("Week 4 Day 3 Task 1: FallbackController.__init__ — see book/src/week4-03-fallback.md")

    @property
    def lookahead(self) -> int:
        """The K for the next round, 0 <= K <= cap; 0 means plain decoding (provided)."""
        return self._lookahead

    @property
    def needs_draft_step(self) -> bool:
        """True when c is unknown: time one draft call (`observe_draft_step`) before drafting (provided)."""
        return self.draft_step_s is None and not self.draft_times

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """The target's prompt call over num_tokens tokens took `seconds` (a prior for v) (provided)."""
        self.prefill = (num_tokens, seconds)

    def observe_draft_step(self, seconds: float) -> int:
        """One draft call timed on its own (a prior for c); decide again and return K (provided)."""
        self.draft_step_s = seconds
        self._lookahead = self.decide()
        return self._lookahead

    # Task 1: estimates --------------------------------------------------------------------------
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

    def verify_cost(self, k: int) -> Optional[float]:
        """v(K) in plain steps: 1.0 for K = 0; the mean of seconds / s over the `verify_times`
        entries with this K when there are any (measured beats fitted: the cost curve is rarely
        a straight line); else, when some larger K' was measured, the smallest such K''s
        measured mean (a shorter verify costs at most that much, and a speculative round's fixed
        costs — per-row verification, rollback — make the line through (0, 1) too optimistic
        below what was measured); else max(1, a + b K) from `verify_line`; None if that is
        unknown. Never below 1."""
        raise NotImplementedError("Week 4 Day 3 Task 1: FallbackController.verify_cost — see book/src/week4-03-fallback.md")

    def goodput(self, k: int, alpha: Optional[float] = None) -> Optional[float]:
        """G(K) = E(alpha, K) / (K c + v(K)) in tokens per plain step; G(0) = 1.

        alpha defaults to `alpha()`. None when alpha, c or v(K) is unknown (for K > 0).
        """
        raise NotImplementedError("Week 4 Day 3 Task 1: FallbackController.goodput — see book/src/week4-03-fallback.md")

    def best_lookahead(self, alpha: Optional[float] = None) -> Optional[tuple[int, float]]:
        """(K, G(K)) maximising `goodput` over K in [1, cap]; ties go to the smaller K.

        None when cap == 0 or goodput is unknown. (It runs every round: estimate alpha, c and
        the line once, not once per K; v(K) as `verify_cost` says.)
        """
        raise NotImplementedError("Week 4 Day 3 Task 1: FallbackController.best_lookahead — see book/src/week4-03-fallback.md")

    # Task 2: hysteresis and probing ----------------------------------------------------------------
    def update(
        self,
        num_drafted: int,
        num_accepted,
        draft_time_s: Optional[float] = None,
        verify_time_s: Optional[float] = None,
    ) -> int:
        """Record one round, then `decide`; returns the new K (also `self.lookahead`).

        num_drafted: the K drafted (0 for a plain round). num_accepted: an int, or a list with
        one count per row for a batched round; each in [0, num_drafted] (ValueError otherwise).
        A plain round appends verify_time_s (its seconds, if not None) to `plain_times` and
        counts down `until_probe`. A speculative round appends (K, counts) to `rounds` and the
        times that are not None to `draft_times` / `verify_times`.
        """
        raise NotImplementedError("Week 4 Day 3 Task 2: FallbackController.update — see book/src/week4-03-fallback.md")

    def could_win(self) -> bool:
        """Could any K beat plain by the margin with a perfect draft (alpha = 1)?

        True while c or v is unknown. Costs belong to the machine and the models, not to the
        text: when even alpha = 1 cannot give G* = G(K*) > 1 + margin, probing is pointless.
        Before the first speculative round (`verify_times` empty) the draft has not seen the
        prompt yet: its first round also prefills it, about c * (prefill seconds) / s plain steps
        (the draft costs c target steps per step, so about c target prefills per prefill). Then
        it is also False when the best conceivable saving over the next `probe_every` tokens,
        probe_every * (1 - 1 / G*), does not pay for that catch-up.
        """
        raise NotImplementedError("Week 4 Day 3 Task 2: FallbackController.could_win — see book/src/week4-03-fallback.md")

    def probe_wait(self) -> int:
        """Plain rounds to wait before a probe, so that one that fails costs at most
        `probe_budget` of the plain time before it; 0 while c, v(K) or s is unknown.

        The probe runs at K = min(initial_lookahead, cap) after m plain rounds. If it fails, it
        wasted the draft's catch-up on those m tokens, about c p m plain steps (p = prefill
        seconds / (prefill tokens * s), the target's cost per prompt token in plain steps; p = 0
        without a prefill), and the round beyond the one token a plain step makes,
        K c + v(K) - 1. The wait is the smallest m with c p m + K c + v(K) - 1 <= probe_budget * m:
        ceil((K c + v(K) - 1) / (probe_budget - c p)), at most the longest backoff
        probe_every * max_backoff — which is also the wait when probe_budget <= c p (the
        catch-up alone is over budget).
        """
        raise NotImplementedError("Week 4 Day 3 Task 2: FallbackController.probe_wait — see book/src/week4-03-fallback.md")

    def decide(self) -> int:
        """The next K, and the mode change behind it.

          - no draft (`draft_ok` False) or cap == 0: 0.
          - fewer than `calibration_rounds` timed plain rounds: 0 (measure the unit first).
          - c or v unknown: the tentative K = min(initial_lookahead, cap) (the loop then times a
            draft step) — unless `could_win()` is False: plain mode, 0.
          - `could_win()` False: plain mode, 0, and no probe before the longest backoff:
            probe_interval = until_probe = probe_every * max_backoff, set again every round the
            verdict stands (costs drift slowly with the context and the load; a verdict near the
            margin that flips back on that drift would only buy probes that lose); clear `rounds`.
          - no alpha yet (`rounds` empty): speculating -> min(initial_lookahead, cap);
            plain -> a probe at that K once until_probe <= 0 (probing = True), else 0.
          - speculating with fewer than MIN_ROUNDS counts (a round counts once per count it
            reported): keep min(initial_lookahead, cap) (one early round must not set K), unless
            even a generous alpha loses: with `accepted` and `trials` summed over `rounds` as
            `alpha` counts them, best_lookahead(alpha=(accepted + 1) / (trials + 1)) (one more
            accepted trial than observed) gives G < 1 — then leave for plain mode as below.
          - speculating: (K*, G*) = best_lookahead(); leave for plain mode (return 0, set
            until_probe = max(probe_interval, probe_wait())) when G* < 1; else K*.
          - just probed (`probing`): G* > 1 + margin -> speculate at K*, probe_interval back to
            probe_every; else plain, probe_interval doubled (at most probe_every * max_backoff),
            until_probe = max(probe_interval, probe_wait()).
          - plain: G* > 1 + margin -> speculate at K*; until_probe <= 0 -> probe at K*
            (probing = True); else 0.
        Whenever it returns 0 after a drop or a failed probe, clear `rounds`: alpha evidence from
        text that stopped paying says nothing about the text the next probe will see.
        """
        raise NotImplementedError("Week 4 Day 3 Task 2: FallbackController.decide — see book/src/week4-03-fallback.md")

    # Task 5: faults --------------------------------------------------------------------------------
    def report(self, message: str) -> None:
        """Record a survived fault in `faults` and issue it as a FallbackWarning (provided)."""
        self.faults.append(message)
        warnings.warn(message, FallbackWarning, stacklevel=3)

    def disable_draft(self, reason: str) -> None:
        """The draft can no longer be used: `report(reason)`, plain decoding from now on (K = 0)."""
        raise NotImplementedError("Week 4 Day 3 Task 3: FallbackController.disable_draft — see book/src/week4-03-fallback.md")

    def memory_pressure(self) -> bool:
        """Lower the cap after an allocation failure or a memory limit; True if K could go down.

        cap = min(cap, max(lookahead, 1)) // 2 (so K = 4 retries at 2, then 1, then 0) and the
        next K is at most the new cap; `report` it. Returns False, changing nothing and
        reporting nothing, when cap is already 0 (only a smaller batch can help now).
        """
        raise NotImplementedError("Week 4 Day 3 Task 3: FallbackController.memory_pressure — see book/src/week4-03-fallback.md")


# The loops -----------------------------------------------------------------------------------------
def is_out_of_memory(error: BaseException) -> bool:
    """Is this an allocation failure? MemoryError, or a RuntimeError from MLX's allocator (provided).

    MLX reports them as RuntimeError("[metal::malloc] Unable to allocate ...") and friends.
    """
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("malloc", "out of memory", "bad_alloc", "unable to allocate")
    )


def _offset(cache: list) -> int:
    return int(cache[0].offset) if cache else 0


def _restore(cache: list, length: int) -> bool:
    """Trim a cache back to `length` tokens; False if it cannot be trimmed."""
    extra = _offset(cache) - length
    return extra == 0 or trim_prompt_cache(cache, extra) == extra


def _over_limit(memory_limit_mb: Optional[float]) -> bool:
    return memory_limit_mb is not None and mx.get_active_memory() / 2**20 > memory_limit_mb


def _time_draft_step(draft_model, token_rows: mx.array) -> float:
    """One draft call on int [B, 1] with a throwaway cache: c's prior, before any prompt prefill."""
    cache = make_prompt_cache(draft_model) if token_rows.shape[0] == 1 else make_batch_cache(
        draft_model, [0] * token_rows.shape[0])
    start = time.perf_counter()
    mx.eval(draft_model(token_rows, cache=cache))
    return time.perf_counter() - start


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
    Each round: K = min(controller.lookahead, tokens still wanted - 1).
      K = 0: one target call on the tokens its cache has not seen; one token (argmax, or sampled
        with a fresh split of the key). While the next round is plain too, queue its call with
        mx.async_eval before yielding (as generate_tokens does). Its seconds (from the previous
        round's end) go to controller.update(0, 0, None, seconds), or observe_prefill(L, seconds)
        for the prompt's own call; stats.record_round(0, 0, 1).
      K > 0: if controller.needs_draft_step, first time one draft call on a throwaway cache
        (observe_draft_step; 0 seconds for a decoder without a draft_model, such as Week 3's
        n-gram DrafterDecoder) and re-read K. Draft with `decoder.draft_generation` on every
        committed token the draft cache has not seen (after plain rounds: all of them, in one
        call), one target call, verify_speculation, commit_round; controller.update(K, n,
        draft seconds (None if the draft caught up on more than 2 tokens), verify seconds).
    Faults (each reported through the controller, none lost or repeated in the output):
      - the draft raises (not NotImplementedError) -> controller.disable_draft, plain from then on;
      - an allocation failure (`is_out_of_memory`) in a K > 0 round -> both caches back to their
        lengths before the round, controller.memory_pressure(), the round again; at K = 0 it
        propagates. memory_limit_mb: after a round, active memory above it -> memory_pressure();
      - a cache that cannot roll back (before a round, or commit_round's ValueError) ->
        disable_draft; a target cache left holding rejected drafts is rebuilt from the committed
        tokens by the next plain round.
    """
    raise NotImplementedError("Week 4 Day 3 Task 4: fallback_generate — see book/src/week4-03-fallback.md")


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
    distributed as the target's at temperature > 0 (one key per row, split per round).
    Each round, with r = the most tokens a live row still needs: K = min(controller.lookahead,
    r - 1).
      K = 0: one target call on [B, unseen] (the left-padded prompts on the first round, else
        each row's newest token); every row gets one token. update(0, 0, None, seconds), or
        observe_prefill(L, seconds) for the prompts' call; stats.record_round(0, 0, 1) per row.
      K > 0: (needs_draft_step: time one draft call on [B, 1] first.) The draft cache is made
        at the first draft round from each live row's last DRAFT_WINDOW committed tokens
        (`left_pad`): a small draft predicts from recent text, and B rows' whole prompts would
        cost it several plain steps. After m plain rounds every row's draft lags by the same
        m + 2 tokens, fed in one [B, m + 2] call — unless m + 2 > DRAFT_WINDOW: then the cache is
        made again from the window. `draft_batch`, one target call, `verify_speculation` per
        row, `rollback_rows` on both caches; update(K, [d - 1], draft seconds, verify seconds),
        where d is how far the batch's shortest row moved: min over the live rows of their
        lengths after the round (a row that stopped at EOS counts as max_tokens: it is done)
        minus the fewest tokens any live row held before it, at most K + 1. The batch ends when
        its last row does, so that is the progress a round buys: one count per round, whatever
        the batch size.
    Rows that finish leave both caches (`filter_rows`). Faults as in `fallback_generate`; an
    allocation failure at K = 0 (memory_pressure() returns False) with B > 1 lowers the batch:
    each half of the live rows is finished by its own call on (prompt + tokens so far).
    """
    raise NotImplementedError("Week 4 Day 3 Task 5: batched_fallback_decode — see book/src/week4-03-fallback.md")
