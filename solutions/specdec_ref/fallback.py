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

import math
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
        accepted = trials = 0
        for k, row_counts in self.rounds:
            for n in row_counts:
                accepted += n
                trials += n + (n < k)
        return accepted / trials if trials else None

    def step_time(self) -> Optional[float]:
        """s: the median of `plain_times` (robust to a noisy round), or None if there are none."""
        if not self.plain_times:
            return None
        times = sorted(self.plain_times)
        mid = len(times) // 2
        return times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2

    def draft_cost(self) -> Optional[float]:
        """c = (seconds per drafted token) / s.

        From `draft_times` (sum of seconds / sum of K) when it holds anything, else from
        `draft_step_s`; None if neither is known or s is unknown.
        """
        s = self.step_time()
        if s is None or s <= 0:
            return None
        if self.draft_times:
            per_token = sum(t for _, t in self.draft_times) / sum(k for k, _ in self.draft_times)
        elif self.draft_step_s is not None:
            per_token = self.draft_step_s
        else:
            return None
        return per_token / s

    def verify_line(self) -> Optional[tuple[float, float]]:
        """(a, b) with v(K) = a + b K in plain steps, or None if it cannot be fitted yet.

        The least-squares line through the point (0, 1) and one point (K_r, seconds_r / s) per
        entry of `verify_times`; when `verify_times` is empty, through (0, 1) and the prefill
        prior (num_tokens - 1, seconds / s) instead (a call over L tokens is a verify call over
        L - 1 drafts; a one-token prefill gives b = 0). None without either, or without s.
        b is never negative (a wider call is not cheaper): clamp it to 0, a = mean y - b mean x.
        """
        s = self.step_time()
        if s is None or s <= 0:
            return None
        points = [(0, 1.0)]
        if self.verify_times:
            points += [(kr, t / s) for kr, t in self.verify_times]
        elif self.prefill is not None:
            num_tokens, seconds = self.prefill
            points.append((num_tokens - 1, seconds / s))
        else:
            return None
        n = len(points)
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in points)
        b = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx if sxx > 0 else 0.0
        b = max(b, 0.0)
        return mean_y - b * mean_x, b

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
        return _verify_cost(k, _measured_verify(self), self.verify_line())

    def goodput(self, k: int, alpha: Optional[float] = None) -> Optional[float]:
        """G(K) = E(alpha, K) / (K c + v(K)) in tokens per plain step; G(0) = 1.

        alpha defaults to `alpha()`. None when alpha, c or v(K) is unknown (for K > 0).
        """
        if k == 0:
            return 1.0
        alpha = self.alpha() if alpha is None else alpha
        c, v = self.draft_cost(), self.verify_cost(k)
        if alpha is None or c is None or v is None:
            return None
        return expected_tokens_per_round(alpha, k) / (k * c + v)

    def best_lookahead(self, alpha: Optional[float] = None) -> Optional[tuple[int, float]]:
        """(K, G(K)) maximising `goodput` over K in [1, cap]; ties go to the smaller K.

        None when cap == 0 or goodput is unknown. (It runs every round: estimate alpha, c and
        the line once, not once per K; v(K) as `verify_cost` says.)
        """
        alpha = self.alpha() if alpha is None else alpha
        c, line = self.draft_cost(), self.verify_line()
        if alpha is None or c is None or line is None or self.cap == 0:
            return None
        measured = _measured_verify(self)
        best = None
        for k in range(1, self.cap + 1):
            g = expected_tokens_per_round(alpha, k) / (k * c + _verify_cost(k, measured, line))
            if best is None or g > best[1]:
                best = (k, g)
        return best

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
        counts = tuple(num_accepted) if isinstance(num_accepted, (list, tuple)) else (num_accepted,)
        if num_drafted < 0 or not counts or not all(0 <= n <= num_drafted for n in counts):
            raise ValueError(
                f"a round drafted {num_drafted} and accepted {list(counts)}: need num_drafted >= 0 "
                "and every count in [0, num_drafted] (a plain round is update(0, 0, ...))"
            )
        if num_drafted == 0:
            if verify_time_s is not None:
                self.plain_times.append(verify_time_s)
            self.until_probe -= 1
        else:
            self.rounds.append((num_drafted, counts))
            if draft_time_s is not None:
                self.draft_times.append((num_drafted, draft_time_s))
            if verify_time_s is not None:
                self.verify_times.append((num_drafted, verify_time_s))
        self._lookahead = self.decide()
        return self._lookahead

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
        if not self.draft_ok or self.cap == 0:
            return 0
        if len(self.plain_times) < self.calibration_rounds:
            return 0
        if not self.could_win():
            self.speculating = self.probing = False
            self.probe_interval = self.until_probe = self.probe_every * self.max_backoff
            self.rounds.clear()
            return 0
        start = min(self.initial_lookahead, self.cap)
        best = self.best_lookahead()
        if best is None:  # no alpha yet (or c unknown: the loop times a draft step first)
            if self.speculating:
                return start
            if self.until_probe <= 0:
                self.probing = True
                return start
            return 0
        k_best, g_best = best
        if self.speculating and sum(len(counts) for _, counts in self.rounds) < MIN_ROUNDS:
            # Too little evidence to act on alpha, unless even a generous reading of it loses.
            # (A batch of tied rows moves by its worst row: its first rounds often count 0, and
            # where a round costs more than two plain steps each of them is a loss.) alpha <=
            # the generous alpha, and G grows with alpha: if that G* < 1, so is g_best, and the
            # controller leaves below.
            accepted = sum(sum(counts) for _, counts in self.rounds)
            trials = accepted + sum(n < k for k, counts in self.rounds for n in counts)
            if self.best_lookahead(alpha=(accepted + 1) / (trials + 1))[1] >= 1.0:
                return start
        if self.speculating:
            if g_best < 1.0:  # plain is faster: never keep a slow-down
                self.speculating = False
                self.rounds.clear()
                self.until_probe = max(self.probe_interval, self.probe_wait())
                return 0
            return k_best
        if self.probing:
            self.probing = False
            if g_best > 1.0 + self.margin:
                self.speculating, self.probe_interval = True, self.probe_every
                return k_best
            self.probe_interval = min(2 * self.probe_interval, self.probe_every * self.max_backoff)
            self.until_probe = max(self.probe_interval, self.probe_wait())
            self.rounds.clear()
            return 0
        if g_best > 1.0 + self.margin:
            self.speculating = True
            return k_best
        if self.until_probe <= 0:
            self.probing = True
            return k_best
        return 0

    # Task 5: faults --------------------------------------------------------------------------------
    def report(self, message: str) -> None:
        """Record a survived fault in `faults` and issue it as a FallbackWarning (provided)."""
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


# The loops -----------------------------------------------------------------------------------------
def _measured_verify(controller) -> dict[int, float]:
    """{K: mean seconds / s} over the controller's `verify_times` (empty while s is unknown).

    Module-level (not a method) so that the reference's methods also work on a student's class."""
    s, sums = controller.step_time(), {}
    if not s:
        return {}
    for k, t in controller.verify_times:
        sums.setdefault(k, []).append(t / s)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _verify_cost(k: int, measured: dict[int, float], line) -> Optional[float]:
    """v(K) as `FallbackController.verify_cost` says, from measured means and the fitted line."""
    if k in measured:
        return max(1.0, measured[k])
    larger = [kr for kr in measured if kr > k]
    if larger:  # the nearest larger K measured: an upper bound, never an optimistic guess
        return max(1.0, measured[min(larger)])
    return None if line is None else max(1.0, line[0] + line[1] * k)


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


def _draft_fault(decoder, controller, error: Exception, draft_len: int) -> None:
    """The draft failed mid-round: an allocation failure puts its cache back and lowers K;
    anything else ends drafting for the request (reported through the controller)."""
    if is_out_of_memory(error):
        if not _restore(decoder.draft_cache, draft_len):
            decoder.draft_cache = make_prompt_cache(decoder.draft_model)
        controller.memory_pressure()
        return
    _draft_lost(controller, error)


def _draft_lost(controller, error: Exception) -> None:
    """The draft raised something other than an allocation failure: plain from now on."""
    controller.disable_draft(f"the draft model raised {type(error).__name__}: {error}; "
                             "continuing on the target model alone")


def _target_fault(decoder, controller, error: Exception, draft_len: int, target_len: int) -> None:
    """The target's call failed: an allocation failure puts both caches back (or rebuilds them
    from the committed tokens) and lowers K for the retry; anything else propagates."""
    if not is_out_of_memory(error):
        raise error
    if not (_restore(decoder.target_cache, target_len) and _restore(decoder.draft_cache, draft_len)):
        decoder.reset()
    controller.memory_pressure()


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
    prompt_tokens = mx.array(prompt_tokens, dtype=mx.int32).reshape(-1)
    if prompt_tokens.size == 0:
        raise ValueError("the prompt is empty: decoding needs at least one token")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=mx.random.key(seed)")
    decoder.reset()
    eos = set(eos_token_ids)
    committed = prompt_tokens.tolist()
    emitted, pending, prefilled = 0, None, False

    def plain_step(tokens: list[int]) -> mx.array:
        nonlocal key
        logits = decoder.target_model(mx.array(tokens, dtype=mx.int32)[None], cache=decoder.target_cache)
        if temperature == 0:
            token = mx.argmax(logits[0, -1])
        else:
            key, subkey = mx.random.split(key)
            token = sample_token(make_probs(logits[0, -1], temperature), subkey)
        mx.async_eval(token)
        return token

    mark = time.perf_counter()
    while emitted < max_tokens:
        K = min(controller.lookahead, max_tokens - emitted - 1)
        if K > 0 and controller.needs_draft_step:  # a drafter without a model costs ~nothing
            draft_model = getattr(decoder, "draft_model", None)
            seconds = 0.0 if draft_model is None else _time_draft_step(
                draft_model, mx.array([[committed[-1]]], dtype=mx.int32))
            if stats is not None:
                stats.draft_calls += 1
                stats.draft_time_s += seconds
            K = min(controller.observe_draft_step(seconds), max_tokens - emitted - 1)
            mark = time.perf_counter()
        if K > 0 and not all(c.is_trimmable() for c in decoder.draft_cache + decoder.target_cache):
            controller.disable_draft("a KV cache can no longer roll back (a sliding window that "
                                     "wrapped?): finishing this request with plain decoding")
            K = 0

        if K <= 0:  # a plain round
            if pending is None:
                pending = plain_step(committed[_offset(decoder.target_cache):])
            token = pending.item()
            pending = None
            now = time.perf_counter()
            if prefilled:
                controller.update(0, 0, None, now - mark)
            else:
                controller.observe_prefill(len(committed), now - mark)
                prefilled = True
            if stats is not None:
                stats.record_round(0, 0, 1)
                stats.verify_time_s += now - mark
            mark = now
            committed.append(token)
            emitted += 1
            last = emitted == max_tokens or token in eos
            if not last and (controller.lookahead == 0 or emitted + 1 == max_tokens):
                pending = plain_step([token])  # queue the next plain step before handing this out
            yield token, False
            if last:
                return
            continue

        # A speculative round; on memory pressure the caches go back and the round runs again.
        draft_len, target_len = _offset(decoder.draft_cache), _offset(decoder.target_cache)
        key_draft = key_verify = None
        if temperature > 0:
            key, key_draft, key_verify = mx.random.split(key, 3)
        draft_unseen = committed[draft_len:]
        start = time.perf_counter()
        try:
            draft_tokens, q_draft = decoder.draft_generation(
                mx.array(draft_unseen, dtype=mx.int32), K, temperature, key_draft)
            K = draft_tokens.shape[0]
        except NotImplementedError:
            raise
        except Exception as error:  # the draft's fault: the target is untouched
            _draft_fault(decoder, controller, error, draft_len)
            continue
        # Build the target's graph while the drafts are still being computed (no host sync in
        # between, as in speculative_generate), then wait for the drafts alone: their seconds
        # for the controller, the graph-building time moved to the verify side.
        built = time.perf_counter()
        try:
            target_inputs = mx.concatenate(
                [mx.array(committed[target_len:], dtype=mx.int32), draft_tokens])
            logits = decoder.target_model(target_inputs[None], cache=decoder.target_cache)
        except Exception as error:
            _target_fault(decoder, controller, error, draft_len, target_len)
            continue
        build_s = time.perf_counter() - built
        try:
            if temperature > 0:
                mx.eval(draft_tokens, q_draft)
            else:
                mx.eval(draft_tokens)  # greedy verification never reads q
        except Exception as error:  # computing the drafts failed: the target's call has not run
            if not _restore(decoder.target_cache, target_len):
                decoder.target_cache = make_prompt_cache(decoder.target_model)  # re-prefilled next round
            _draft_fault(decoder, controller, error, draft_len)
            continue
        drafted = time.perf_counter() - build_s
        try:
            num_accepted, tokens = verify_speculation(
                draft_tokens, logits[0, -(K + 1):], q_draft, temperature, key_verify)
        except Exception as error:
            _target_fault(decoder, controller, error, draft_len, target_len)
            continue
        verified = time.perf_counter()
        try:
            commit_round(decoder, draft_tokens.tolist(), num_accepted, tokens[-1])
        except ValueError as error:
            controller.disable_draft(f"{error}: finishing this request with plain decoding")
            if _offset(decoder.target_cache) != len(committed) + num_accepted:
                decoder.target_cache = make_prompt_cache(decoder.target_model)  # re-prefilled next round
        out = []
        for i, token in enumerate(tokens):
            out.append((token, i < num_accepted))
            if token in eos:
                break
        committed += [t for t, _ in out]
        emitted += len(out)
        caught_up = len(draft_unseen) > 2  # the draft also prefilled: its time is not K steps
        controller.update(K, num_accepted, None if caught_up else drafted - start, verified - drafted)
        if _over_limit(memory_limit_mb):
            controller.memory_pressure()
        if stats is not None:
            stats.record_round(K, num_accepted, len(out))
            stats.draft_calls += K
            stats.draft_time_s += drafted - start
            stats.verify_time_s += verified - drafted
        prefilled = True
        yield from out
        if out[-1][0] in eos:
            return
        mark = time.perf_counter()


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
    tokens, left_padding = left_pad(batch_prompts)
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=mx.random.key(seed)")
    if model_vocab_size(draft_model) != model_vocab_size(target_model):
        raise ValueError(
            f"draft vocab {model_vocab_size(draft_model)} != target vocab "
            f"{model_vocab_size(target_model)}: the draft must share the target's tokenizer"
        )
    sampling, eos = temperature > 0, set(eos_token_ids)
    outputs: list[list[int]] = [[] for _ in batch_prompts]
    if max_tokens <= 0:
        return outputs
    target_cache = make_batch_cache(target_model, left_padding)
    draft_cache, draft_lag = None, 0  # the draft has not seen each row's last draft_lag tokens
    rows = list(range(len(batch_prompts)))
    row_keys = list(mx.random.split(key, len(rows))) if sampling else [None] * len(rows)
    target_inputs, prefilled = tokens, False

    def sequence(r: int) -> list[int]:
        return list(batch_prompts[r]) + outputs[r]

    def finish_in_halves() -> None:
        """Lower the batch size: each half of the live rows is finished by its own call."""
        nonlocal key
        controller.report(f"memory pressure at K = 0: finishing {len(rows)} rows in two halves")
        for half in (rows[: len(rows) // 2], rows[len(rows) // 2 :]):
            half_key = None
            if sampling:
                key, half_key = mx.random.split(key)
            need = max(max_tokens - len(outputs[r]) for r in half)
            more = batched_fallback_decode(
                [sequence(r) for r in half], draft_model, target_model, controller, need,
                temperature, half_key, eos_token_ids, stats, memory_limit_mb)
            for r, extra in zip(half, more):
                outputs[r] += extra[: max_tokens - len(outputs[r])]

    def plain_batch_tokens(last_logits: mx.array) -> list[int]:
        """Every live row's next token from its last logits [B, V]: argmax, or a sample with
        the row's own key (split per round)."""
        if not sampling:
            return mx.argmax(last_logits, axis=-1).tolist()
        subkeys = []
        for b in range(len(rows)):
            row_keys[b], subkey = mx.random.split(row_keys[b])
            subkeys.append(subkey)
        probs = make_probs(last_logits, temperature)
        return mx.stack([sample_token(probs[b], k) for b, k in enumerate(subkeys)]).tolist()

    mark = time.perf_counter()
    while rows:
        K = min(controller.lookahead, max(max_tokens - len(outputs[r]) for r in rows) - 1)
        if K > 0 and controller.needs_draft_step:
            seconds = _time_draft_step(draft_model, mx.array([[sequence(r)[-1]] for r in rows], dtype=mx.int32))
            if stats is not None:
                stats.draft_calls += 1
                stats.draft_time_s += seconds
            K = min(controller.observe_draft_step(seconds), max(max_tokens - len(outputs[r]) for r in rows) - 1)
            mark = time.perf_counter()
        key_draft = None
        if sampling and K > 0:
            key, key_draft = mx.random.split(key)
        start = drafted = time.perf_counter()
        columns = target_cache[0].size()  # to give back what a failed round wrote
        try:
            if K > 0:
                if draft_cache is None or draft_lag > DRAFT_WINDOW:  # first round, or a long
                    # plain stretch: the draft starts (again) from each row's newest tokens
                    draft_inputs, draft_padding = left_pad([sequence(r)[-DRAFT_WINDOW:] for r in rows])
                    draft_cache = make_batch_cache(draft_model, draft_padding)
                else:
                    draft_inputs = mx.array([sequence(r)[-draft_lag:] for r in rows], dtype=mx.int32)
                try:
                    draft_tokens, q_draft = draft_batch(
                        draft_model, draft_cache, draft_inputs, K, temperature, key_draft)
                    mx.eval(draft_tokens, q_draft)
                except NotImplementedError:
                    raise
                except Exception as error:
                    if is_out_of_memory(error):
                        raise
                    _draft_lost(controller, error)
                    draft_cache = None
                    continue
                drafted = time.perf_counter()
                inputs = mx.concatenate([target_inputs, draft_tokens], axis=1)
            else:
                inputs = target_inputs
            target_logits = target_model(inputs, cache=target_cache)[:, -(K + 1):]
            if K == 0:  # every row's next token, with one host sync for the batch
                plain_tokens = plain_batch_tokens(target_logits[:, -1])
            else:
                mx.eval(target_logits)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            # Nothing was committed: give back what this round wrote, then retry smaller.
            written = target_cache[0].size() - columns
            if written and prefilled:
                rollback_rows(target_cache, [written] * len(rows))
            elif written:
                target_cache = make_batch_cache(target_model, left_padding)
            draft_cache = None  # rebuilt from the committed tokens at the next draft round
            if not controller.memory_pressure():
                if len(rows) == 1:
                    raise
                finish_in_halves()
                return outputs
            continue

        keep, drops = [], []
        # The batch ends when its shortest row does: track how far the minimum length moves.
        behind, lowest = min(len(outputs[r]) for r in rows), max_tokens
        for b, r in enumerate(rows):
            if K == 0:
                n, new_tokens = 0, [plain_tokens[b]]
            else:
                key_verify = None
                if sampling:
                    row_keys[b], key_verify = mx.random.split(row_keys[b])
                n, new_tokens = verify_speculation(
                    draft_tokens[b], target_logits[b], q_draft[b], temperature, key_verify)
            out = []
            for token in new_tokens[: max_tokens - len(outputs[rows[b]])]:
                out.append(token)
                if token in eos:
                    break
            outputs[r] += out
            lowest = min(lowest, max_tokens if out[-1] in eos else len(outputs[r]))  # EOS: done
            if stats is not None:
                stats.record_round(K, n, len(out))
            if len(outputs[r]) < max_tokens and out[-1] not in eos:
                keep.append(b)
                drops.append(K - n)
        caches = [target_cache] + ([draft_cache] if draft_cache is not None else [])
        if keep and len(keep) < len(rows):
            for cache in caches:
                filter_rows(cache, keep)
            rows = [rows[b] for b in keep]
            row_keys = [row_keys[b] for b in keep]
        if keep and K > 0:
            for cache in caches:
                rollback_rows(cache, drops)
        # Timed after the rollback: moving every row's KV entries is part of what a speculative
        # round costs a batch (plain rounds pay no rollback), and a controller that does not see
        # it keeps speculating where it loses.
        verified = time.perf_counter()
        if K == 0:
            if prefilled:
                controller.update(0, 0, None, verified - mark)
            else:
                controller.observe_prefill(inputs.shape[1], verified - mark)
            draft_lag += 1
        else:
            caught_up = draft_inputs.shape[1] > 2
            progress = min(lowest - behind, K + 1)  # 1 .. K + 1 tokens for the batch's last row
            controller.update(K, [progress - 1], None if caught_up else drafted - start, verified - drafted)
            draft_lag = 2  # the draft holds C[:-2] of every row (see batched.py)
        prefilled = True
        if stats is not None:
            stats.draft_calls += K
            stats.draft_time_s += drafted - start
            stats.verify_time_s += verified - drafted
        if not keep:
            break
        if K > 0:  # only a rollback adds padding
            for cache in caches:
                if min(cache[0].left_padding.tolist()) >= SHARED_PADDING_LIMIT:
                    filter_rows(cache, list(range(len(rows))))
        if _over_limit(memory_limit_mb) and not controller.memory_pressure() and len(rows) > 1:
            finish_in_halves()
            return outputs
        target_inputs = mx.array([[outputs[r][-1]] for r in rows], dtype=mx.int32)
        mark = time.perf_counter()
    return outputs
