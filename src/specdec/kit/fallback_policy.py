"""Provided (Week 4 Days 3-4): the fallback controller's refinements, and the loops' fault handling.

Read this; you do not write it. The exercise (`fallback.py`) is the controller's core on Day 3 —
the estimates, goodput and the best K, hysteresis, probing with backoff — and the two loops with
K = 0 rounds on Day 4. Everything here is what a run on the course's machine lost without,
measured in the chapters (book/src/week4-03-fallback.md, book/src/week4-04-fallback-loops.md,
"Each rule of the controller is there because ..."):

`ControllerBase`, the base class of both trees' `FallbackController`:
  - the constructor: its checks and every attribute the estimates and decisions read;
  - the loop-facing members: `lookahead`, `needs_draft_step`, `observe_prefill`,
    `observe_draft_step`, `report`, `disable_draft`, `memory_pressure` (halving the cap);
  - `verify_cost`: measured beats fitted (`measured_verify`: the measured means);
  - `could_win`: could any K win at alpha = 1, and pay for the draft's catch-up on the prompt;
  - `probe_wait`: the probe budget;
  - `refinements`: the rules `decide` applies before its own (a cost verdict that holds off
    probes; before MIN_ROUNDS counts, the generous reading `early_lookahead`: an unlucky
    first round steps K down rather than ending speculation).
The loops' helpers: `is_out_of_memory`, `cache_length`, `restore_cache`, `over_memory_limit`,
`first_draft_step`, `until_eos`, `count_round` (stats), `cannot_roll_back`, `draft_fault`, `drafts_failed`,
`target_fault`, `commit_failed`, `draft_lost` (single stream and batch), `window_rows`
(DRAFT_WINDOW), `shortest_row_progress` (the shortest-row rule), `compact_padding`,
`batch_fault` and `finish_in_halves` (a batch under memory pressure).
Both trees import this module, so a fix here reaches the reference and your code alike.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache, trim_prompt_cache

from specdec.kit.errors import FallbackWarning

MIN_ROUNDS = 4  # counts of evidence before alpha alone may end speculation (a round reporting
# one count per row, as a serving engine's does, brings B)
DRAFT_WINDOW = 64  # the batched draft catches up on at most this many newest tokens per row


class ControllerBase:
    """The provided half of `FallbackController`: state, priors, refinements, faults.

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
        speculating   True while in speculative mode (False: plain mode); True at the start
        cap           the largest K allowed now (memory pressure lowers it); max_lookahead at first
        draft_ok      False once the draft failed: plain for good
        until_probe   plain rounds left before the next probe; probe_interval its current
                      period; both start at probe_every
        probing       True while the current K > 0 round is a probe from plain mode
        faults        list of strings, one per fault survived (also issued as FallbackWarning)
        _lookahead    the next K (read it through `lookahead`); 0 at the start
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
        problems = []
        if max_lookahead < 1:
            problems.append(f"max_lookahead must be >= 1, got {max_lookahead}")
        if window < 1:
            problems.append(f"window must be >= 1 round, got {window}")
        if not 0.0 <= margin < 1.0:
            problems.append(f"margin must be in [0, 1), got {margin} (0.05 is a good start)")
        if probe_every < 1:
            problems.append(f"probe_every must be >= 1 token, got {probe_every}")
        if initial_lookahead < 1:
            problems.append(f"initial_lookahead must be >= 1, got {initial_lookahead}")
        if calibration_rounds < 1:
            problems.append(f"calibration_rounds must be >= 1, got {calibration_rounds}")
        if max_backoff < 1:
            problems.append(f"max_backoff must be >= 1 (1 = no backoff), got {max_backoff}")
        if not 0.0 < probe_budget <= 1.0:
            problems.append(f"probe_budget must be in (0, 1], got {probe_budget} (0.02: a failed "
                            "probe may cost 2% of the plain time before it)")
        if problems:
            raise ValueError("; ".join(problems))
        self.max_lookahead, self.window, self.margin = max_lookahead, window, margin
        self.probe_every, self.max_backoff, self.probe_budget = probe_every, max_backoff, probe_budget
        self.initial_lookahead = min(initial_lookahead, max_lookahead)
        self.calibration_rounds = calibration_rounds
        self.rounds = deque(maxlen=window)
        self.draft_times = deque(maxlen=window)
        self.verify_times = deque(maxlen=window)
        self.plain_times = deque(maxlen=window)
        self.prefill: Optional[tuple[int, float]] = None
        self.draft_step_s: Optional[float] = None
        self.speculating, self.probing, self.draft_ok = True, False, True
        self.cap = max_lookahead
        self.probe_interval = self.until_probe = probe_every
        self.faults: list[str] = []
        self._lookahead = 0

    # What the loops call ----------------------------------------------------------------------------
    @property
    def lookahead(self) -> int:
        """The K for the next round, 0 <= K <= cap; 0 means plain decoding."""
        return self._lookahead

    @property
    def needs_draft_step(self) -> bool:
        """True when c is unknown: time one draft call (`observe_draft_step`) before drafting."""
        return self.draft_step_s is None and not self.draft_times

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """The target's prompt call over num_tokens tokens took `seconds` (a prior for v)."""
        self.prefill = (num_tokens, seconds)

    def observe_draft_step(self, seconds: float) -> int:
        """One draft call timed on its own (a prior for c); decide again and return K."""
        self.draft_step_s = seconds
        self._lookahead = self.decide()
        return self._lookahead

    def report(self, message: str) -> None:
        """Record a survived fault in `faults` and issue it as a FallbackWarning."""
        self.faults.append(message)
        warnings.warn(message, FallbackWarning, stacklevel=3)

    def disable_draft(self, reason: str) -> None:
        """The draft can no longer be used: `report(reason)`, plain decoding from now on (K = 0)."""
        self.report(reason)
        self.draft_ok = False
        self.speculating = self.probing = False
        self._lookahead = 0

    def memory_pressure(self) -> bool:
        """Lower the cap after an allocation failure or a memory limit; True if K could go down.

        cap = min(cap, max(lookahead, 1)) // 2 (so K = 4 retries at 2, then 1, then 0) and the
        next K is at most the new cap; `report` it. Returns False, changing nothing and
        reporting nothing, when cap is already 0 (only a smaller batch can help now).
        """
        if self.cap == 0:
            return False
        self.cap = min(self.cap, max(self._lookahead, 1)) // 2
        self._lookahead = min(self._lookahead, self.cap)
        self.report(f"memory pressure: lookahead lowered to at most {self.cap}")
        return True

    # Refinements of the estimates and decisions -------------------------------------------------------
    def verify_cost(self, k: int) -> Optional[float]:
        """v(K) in plain steps: 1.0 for K = 0; the mean of seconds / s over the `verify_times`
        entries with this K when there are any (measured beats fitted: the cost curve is rarely
        a straight line); else, when some larger K' was measured, the smallest such K''s
        measured mean (a shorter verify costs at most that much, and a speculative round's fixed
        costs — per-row verification, rollback — make the line through (0, 1) too optimistic
        below what was measured); else max(1, a + b K) from `verify_line`; None if that is
        unknown. Never below 1."""
        if k == 0:
            return 1.0
        means = self.measured_verify()
        if k in means:
            return max(1.0, means[k])
        larger = [kr for kr in means if kr > k]
        if larger:  # the nearest larger K measured: an upper bound, never an optimistic guess
            return max(1.0, means[min(larger)])
        line = self.verify_line()
        return None if line is None else max(1.0, line[0] + line[1] * k)

    def measured_verify(self) -> dict[int, float]:
        """{K: the mean of seconds / s over the `verify_times` entries with this K}: v(K) where it
        was measured, in plain steps; empty while s is unknown."""
        s, times = self.step_time(), {}
        if s:
            for kr, t in self.verify_times:
                times.setdefault(kr, []).append(t / s)
        return {kr: sum(ts) / len(ts) for kr, ts in times.items()}

    def early_lookahead(self, alpha: float) -> Optional[tuple[int, float]]:
        """(K, G(K)) maximising `goodput(K, alpha)` over 1 <= K <= min(initial_lookahead, cap),
        ties to the smaller K, with every K not measured yet priced by the line:
        v(K) = max(1, a + b K) from `verify_line`, not the larger K's measurement `verify_cost`
        would use (its G is goodput(K, alpha) * (K c + verify_cost(K)) / (K c + v(K))). The
        first rounds' reading of the costs is as generous as their reading of alpha. None while
        the goodput, c or the line is unknown."""
        c, line = self.draft_cost(), self.verify_line()
        if c is None or line is None:
            return None
        measured, best = self.measured_verify(), None
        for k in range(1, min(self.initial_lookahead, self.cap) + 1):
            g = self.goodput(k, alpha)
            if g is None:
                return None
            if k not in measured:  # re-priced: the line instead of a larger K's measurement
                g *= (k * c + self.verify_cost(k)) / (k * c + max(1.0, line[0] + line[1] * k))
            if best is None or g > best[1]:
                best = (k, g)
        return best

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
        best = self.best_lookahead(alpha=1.0)
        if best is None:
            return True
        if best[1] <= 1.0 + self.margin:
            return False
        if self.verify_times or self.prefill is None:
            return True
        catch_up = self.draft_cost() * self.prefill[1] / self.step_time()  # in plain steps
        return self.probe_every * (1.0 - 1.0 / best[1]) > catch_up

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
        k = min(self.initial_lookahead, self.cap)
        c, s = self.draft_cost(), self.step_time()
        v = self.verify_cost(k) if k > 0 else None
        if c is None or v is None or not s:
            return 0
        longest = self.probe_every * self.max_backoff
        p = self.prefill[1] / (self.prefill[0] * s) if self.prefill else 0.0
        room = self.probe_budget - c * p  # what each plain round may spend on the probe's round
        if room <= 0:
            return longest
        return min(longest, math.ceil((k * c + v - 1.0) / room))

    def refinements(self) -> Optional[int]:
        """The rules `decide` applies after calibration and before its own; None: `decide` goes on.

          - `could_win()` False: plain mode (speculating = probing = False), no probe before the
            longest backoff: probe_interval = until_probe = probe_every * max_backoff, set again
            every round the verdict stands (costs drift slowly with the context and the load; a
            verdict near the margin that flips back on that drift would only buy probes that
            lose); `rounds` cleared. Returns 0.
          - speculating with some but fewer than MIN_ROUNDS counts (a round counts once per count
            it reported): too little evidence to leave on, or to set K from. Read it generously,
            on alpha and on cost: with `accepted` and `trials` summed over `rounds` as `alpha`
            counts them, (K, G) = early_lookahead((accepted + 1) / (trials + 1)) (one more
            accepted trial than observed; a K not measured yet priced by the line). G >= 1:
            that K (an unlucky round steps K down instead of ending speculation; never above
            min(initial_lookahead, cap)). G < 1 (or unknown): None, and `decide`'s own rules
            go on: its G* reads a smaller alpha and costs no lower, so up to the initial K it
            is below 1 too, and it leaves for plain mode.
        """
        if not self.could_win():
            self.speculating = self.probing = False
            self.probe_interval = self.until_probe = self.probe_every * self.max_backoff
            self.rounds.clear()
            return 0
        if self.speculating and self.rounds and sum(len(counts) for _, counts in self.rounds) < MIN_ROUNDS:
            # (A batch of tied rows moves by its worst row: its first rounds often count 0, and
            # where a round costs more than two plain steps each of them is a loss.)
            accepted = sum(sum(counts) for _, counts in self.rounds)
            trials = accepted + sum(n < k for k, counts in self.rounds for n in counts)
            early = self.early_lookahead((accepted + 1) / (trials + 1))
            if early is not None and early[1] >= 1.0:
                return early[0]
        return None


# The loops' helpers ----------------------------------------------------------------------------------
def is_out_of_memory(error: BaseException) -> bool:
    """Is this an allocation failure? MemoryError, or a RuntimeError from MLX's allocator.

    MLX reports them as RuntimeError("[metal::malloc] Unable to allocate ...") and friends.
    """
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("malloc", "out of memory", "bad_alloc", "unable to allocate")
    )


def cache_length(cache: list) -> int:
    """Tokens a (single-stream) prompt cache holds: its first layer's offset (0 for no layers)."""
    return int(cache[0].offset) if cache else 0


def restore_cache(cache: list, length: int) -> bool:
    """Trim a cache back to `length` tokens; False if it cannot be trimmed."""
    extra = cache_length(cache) - length
    return extra == 0 or trim_prompt_cache(cache, extra) == extra


def over_memory_limit(memory_limit_mb: Optional[float]) -> bool:
    """True when a limit is set and MLX's active memory is above it."""
    return memory_limit_mb is not None and mx.get_active_memory() / 2**20 > memory_limit_mb


def first_draft_step(controller, draft_model, token_rows: list[list[int]], stats=None) -> int:
    """c's prior: time one draft call on int [B, 1] with a throwaway cache, before the draft pays
    for any prompt; `controller.observe_draft_step(seconds)`, and return its new K.

    draft_model None (a drafter without a model, such as Week 3's n-gram one) costs 0 seconds.
    The call is added to stats.draft_calls / draft_time_s when stats is given.
    """
    seconds = 0.0
    if draft_model is not None:
        rows = mx.array(token_rows, dtype=mx.int32)
        cache = make_prompt_cache(draft_model) if rows.shape[0] == 1 else [
            BatchKVCache([0] * rows.shape[0]) for _ in draft_model.layers]
        start = time.perf_counter()
        mx.eval(draft_model(rows, cache=cache))
        seconds = time.perf_counter() - start
    if stats is not None:
        stats.draft_calls += 1
        stats.draft_time_s += seconds
    return controller.observe_draft_step(seconds)


def draft_lost(controller, error: Exception) -> None:
    """The draft raised something other than an allocation failure: plain from now on."""
    controller.disable_draft(f"the draft model raised {type(error).__name__}: {error}; "
                             "continuing on the target model alone")


def draft_fault(decoder, controller, error: Exception, draft_len: int) -> None:
    """The draft failed mid-round (single stream): an allocation failure puts its cache back to
    draft_len tokens and lowers K; anything else ends drafting for the request."""
    if isinstance(error, NotImplementedError):
        raise error
    if is_out_of_memory(error):
        if not restore_cache(decoder.draft_cache, draft_len):
            decoder.draft_cache = make_prompt_cache(decoder.draft_model)
        controller.memory_pressure()
        return
    draft_lost(controller, error)


def target_fault(decoder, controller, error: Exception, draft_len: int, target_len: int) -> None:
    """The target's call failed (single stream): an allocation failure puts both caches back
    (or rebuilds them from the committed tokens) and lowers K for the retry; anything else
    propagates."""
    if not is_out_of_memory(error):
        raise error
    if not (restore_cache(decoder.target_cache, target_len) and restore_cache(decoder.draft_cache, draft_len)):
        decoder.reset()
    controller.memory_pressure()


def until_eos(tokens: list[int], eos: set, limit: Optional[int] = None) -> list[int]:
    """tokens[:limit], cut right after the first token in `eos` (a round's output: nothing after
    the end of the text is emitted)."""
    out = []
    for token in tokens[:limit]:
        out.append(token)
        if token in eos:
            break
    return out


def count_round(stats, k: int, accepted, emitted, draft_s: float, verify_s: float) -> None:
    """Add one round to `stats` (nothing when stats is None): record_round(K, n, emitted) once,
    or once per row when accepted and emitted are lists; K draft calls; the seconds."""
    if stats is None:
        return
    rows = zip(accepted, emitted) if isinstance(accepted, list) else [(accepted, emitted)]
    for n, out in rows:
        stats.record_round(k, n, out)
    stats.draft_calls += k
    stats.draft_time_s += draft_s
    stats.verify_time_s += verify_s


def cannot_roll_back(decoder, controller) -> bool:
    """True (and the draft disabled, with a reason naming the rollback) when a cache of the
    decoder can no longer be trimmed (a sliding window that wrapped): speculation must stop."""
    if all(c.is_trimmable() for c in decoder.draft_cache + decoder.target_cache):
        return False
    controller.disable_draft("a KV cache can no longer roll back (a sliding window that "
                             "wrapped?): finishing this request with plain decoding")
    return True


def drafts_failed(decoder, controller, error: Exception, draft_len: int, target_len: int) -> None:
    """Computing the drafts failed after the target's call was built (not run): the target cache
    goes back to target_len tokens (or starts again), then `draft_fault`."""
    if not restore_cache(decoder.target_cache, target_len):
        decoder.target_cache = make_prompt_cache(decoder.target_model)  # re-filled next round
    draft_fault(decoder, controller, error, draft_len)


def commit_failed(decoder, controller, error: ValueError, committed_len: int) -> None:
    """commit_round could not roll a cache back: plain decoding from now on; a target cache left
    holding rejected drafts (not committed_len tokens) starts again, re-filled next round."""
    controller.disable_draft(f"{error}: finishing this request with plain decoding")
    if cache_length(decoder.target_cache) != committed_len:
        decoder.target_cache = make_prompt_cache(decoder.target_model)


def compact_padding(caches: list, filter_rows: Callable, limit: int) -> None:
    """Drop the columns every row pads once there are `limit` of them (`filter_rows` keeping
    every row): they only cost attention time."""
    for cache in caches:
        if min(cache[0].left_padding.tolist()) >= limit:
            filter_rows(cache, list(range(cache[0].left_padding.shape[0])))


def window_rows(sequences: list[list[int]], draft_lag: int, have_cache: bool) -> tuple[list[list[int]], bool]:
    """What a batched draft is fed before it drafts: (rows of tokens, fresh).

    fresh True: make the draft cache again from each row's last DRAFT_WINDOW tokens (no cache
    yet, or a lag longer than the window: a small draft predicts from recent text, and B whole
    prompts would cost it several plain steps). Else each row's last draft_lag tokens, which
    the draft has not seen (equal lengths: every row lags by the same count).
    """
    if not have_cache or draft_lag > DRAFT_WINDOW:
        return [seq[-DRAFT_WINDOW:] for seq in sequences], True
    return [seq[-draft_lag:] for seq in sequences], False


def shortest_row_progress(before: list[int], after: list[int], done: list[bool], max_tokens: int,
                          k: int) -> int:
    """How far a batched round moved the batch's shortest row, d in [1, K + 1].

    before / after: each live row's token count before and after the round; done: the rows
    that stopped at EOS (they count as max_tokens: finished rows never hold the batch back).
    d = min over rows of (max_tokens if done else after) - min(before), at most K + 1. The
    batch ends when its last row does, so that is the progress the round bought.
    """
    lowest = min(max_tokens if stop else n for n, stop in zip(after, done))
    return min(lowest - min(before), k + 1)


def batch_fault(error: Exception, controller, target_cache: list, columns: int, prefilled: bool,
                rollback_rows: Callable, num_rows: int) -> tuple[Optional[list], bool]:
    """An exception in a batched round, before anything was committed: (target_cache, halve).

    Not an allocation failure: re-raised. Else give back what the round wrote to the target
    cache (`rollback_rows` by the columns written past `columns`, or None when the prompts'
    own call wrote them: make the cache again from the prompts), then `memory_pressure()`.
    halve is True when K could not go lower: finish the live rows in two halves
    (`finish_in_halves`); with a single row left nothing can shrink, and the error is re-raised.
    The caller makes its draft cache again at the next draft round.
    """
    if not is_out_of_memory(error):
        raise error
    written = target_cache[0].size() - columns
    if written and prefilled:
        rollback_rows(target_cache, [written] * num_rows)
    elif written:
        target_cache = None
    if controller.memory_pressure():
        return target_cache, False
    if num_rows == 1:
        raise error
    return target_cache, True


def finish_in_halves(decode: Callable, rows: list[int], sequence: Callable, outputs: list[list[int]],
                     max_tokens: int, controller, key, temperature: float, **kwargs):
    """Lower the batch size: each half of the live rows is finished by its own `decode` call
    (the caller's batched_fallback_decode) on (prompt + tokens so far); returns the key left.

    sequence(r): row r's prompt and tokens so far. Each half gets its own split of `key` when
    sampling; outputs[r] grows by at most max_tokens - len(outputs[r]) tokens.
    """
    controller.report(f"memory pressure at K = 0: finishing {len(rows)} rows in two halves")
    for half in (rows[: len(rows) // 2], rows[len(rows) // 2 :]):
        half_key = None
        if temperature > 0:
            key, half_key = mx.random.split(key)
        need = max(max_tokens - len(outputs[r]) for r in half)
        more = decode([sequence(r) for r in half], controller=controller, max_tokens=need,
                      temperature=temperature, key=half_key, **kwargs)
        for r, extra in zip(half, more):
            outputs[r] += extra[: max_tokens - len(outputs[r])]
    return key
