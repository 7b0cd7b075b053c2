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

    def goodput(self, k: int, alpha: Optional[float] = None) -> Optional[float]:
        """G(K) = E(alpha, K) / (K c + v(K)) in tokens per plain step; G(0) = 1.

        E from Week 2 Day 5's `expected_tokens_per_round`; v(K) is `verify_cost(k)` (provided).
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

        alpha as in `goodput` (read `alpha()` once, not once per K). None when cap == 0 or
        goodput is unknown.
        """
        alpha = self.alpha() if alpha is None else alpha
        best = None
        for k in range(1, self.cap + 1):
            g = self.goodput(k, alpha)
            if g is None:
                return None
            if best is None or g > best[1]:
                best = (k, g)
        return best

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
        counts = tuple(num_accepted) if isinstance(num_accepted, (list, tuple)) else (num_accepted,)
        if num_drafted < 0:
            raise ValueError(f"update({num_drafted}, ...): num_drafted is the K drafted, never "
                             "negative (a plain round is update(0, 0, ...))")
        if not counts:
            raise ValueError(f"update({num_drafted}, []): no accepted count was reported; pass one "
                             "count per row (an int for a single stream)")
        if not all(0 <= n <= num_drafted for n in counts):
            raise ValueError(f"update({num_drafted}, {list(counts)}): every count must be in "
                             f"[0, num_drafted] = [0, {num_drafted}]: a row accepts at most the K drafted")
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
        if not self.draft_ok or self.cap == 0:
            return 0
        if len(self.plain_times) < self.calibration_rounds:
            return 0
        refined = self.refinements()
        if refined is not None:
            return refined
        start = min(self.initial_lookahead, self.cap)
        best = self.best_lookahead()
        if best is None:
            if self.speculating:
                return start
            if self.until_probe <= 0:
                self.probing = True
                return start
            return 0
        k_best, g_best = best
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
        if K > 0 and controller.needs_draft_step:
            draft_model = getattr(decoder, "draft_model", None)
            K = min(first_draft_step(controller, draft_model, [[committed[-1]]], stats), max_tokens - emitted - 1)
            mark = time.perf_counter()
        if K > 0 and cannot_roll_back(decoder, controller):
            K = 0

        if K == 0:  # a plain round
            if pending is None:
                pending = plain_step(committed[cache_length(decoder.target_cache):])
            token = pending.item()
            pending = None
            now = time.perf_counter()
            if prefilled:
                controller.update(0, 0, None, now - mark)
            else:
                controller.observe_prefill(len(committed), now - mark)
                prefilled = True
            count_round(stats, 0, 0, 1, 0.0, now - mark)
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

        # A speculative round; after a fault (handled by the provided helpers) the loop goes on.
        draft_len, target_len = cache_length(decoder.draft_cache), cache_length(decoder.target_cache)
        key_draft = key_verify = None
        if temperature > 0:
            key, key_draft, key_verify = mx.random.split(key, 3)
        draft_unseen = committed[draft_len:]
        start = time.perf_counter()
        try:
            draft_tokens, q_draft = decoder.draft_generation(
                mx.array(draft_unseen, dtype=mx.int32), K, temperature, key_draft)
            K = draft_tokens.shape[0]
        except Exception as error:  # the draft's fault: the target is untouched
            draft_fault(decoder, controller, error, draft_len)
            continue
        # Build the target's graph while the drafts are still being computed (no host sync in
        # between), then wait for the drafts alone: their seconds for the controller, the
        # graph-building time moved to the verify side.
        built = time.perf_counter()
        try:
            target_inputs = mx.concatenate(
                [mx.array(committed[target_len:], dtype=mx.int32), draft_tokens])
            logits = decoder.target_model(target_inputs[None], cache=decoder.target_cache)
            build_s = time.perf_counter() - built
            try:
                mx.eval(draft_tokens, q_draft) if temperature > 0 else mx.eval(draft_tokens)
            except Exception as error:  # computing the drafts failed: the target's call has not run
                drafts_failed(decoder, controller, error, draft_len, target_len)
                continue
            drafted = time.perf_counter() - build_s
            num_accepted, tokens = verify_speculation(
                draft_tokens, logits[0, -(K + 1):], q_draft, temperature, key_verify)
        except Exception as error:
            target_fault(decoder, controller, error, draft_len, target_len)
            continue
        verified = time.perf_counter()
        try:
            commit_round(decoder, draft_tokens.tolist(), num_accepted, tokens[-1])
        except ValueError as error:
            commit_failed(decoder, controller, error, len(committed) + num_accepted)
        out = until_eos(tokens, eos)
        committed += out
        emitted += len(out)
        caught_up = len(draft_unseen) > 2  # the draft also prefilled: its time is not K steps
        controller.update(K, num_accepted, None if caught_up else drafted - start, verified - drafted)
        if over_memory_limit(memory_limit_mb):
            controller.memory_pressure()
        count_round(stats, K, num_accepted, len(out), drafted - start, verified - drafted)
        prefilled = True
        yield from ((token, i < num_accepted) for i, token in enumerate(out))
        if out[-1] in eos:
            return
        mark = time.perf_counter()


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

    def halve() -> None:
        nonlocal key
        key = finish_in_halves(batched_fallback_decode, rows, sequence, outputs, max_tokens, controller,
                               key, temperature, draft_model=draft_model, target_model=target_model,
                               eos_token_ids=eos_token_ids, stats=stats, memory_limit_mb=memory_limit_mb)

    def next_row_key(b: int) -> mx.array:
        row_keys[b], subkey = mx.random.split(row_keys[b])
        return subkey

    mark = time.perf_counter()
    while rows:
        wanted = max(max_tokens - len(outputs[r]) for r in rows)
        K = min(controller.lookahead, wanted - 1)
        if K > 0 and controller.needs_draft_step:
            K = min(first_draft_step(controller, draft_model, [[sequence(r)[-1]] for r in rows], stats), wanted - 1)
            mark = time.perf_counter()
        key_draft = None
        if sampling and K > 0:
            key, key_draft = mx.random.split(key)
        start = drafted = time.perf_counter()
        columns = target_cache[0].size()  # to give back what a failed round wrote
        try:
            if K > 0:
                fed, fresh = window_rows([sequence(r) for r in rows], draft_lag, draft_cache is not None)
                if fresh:
                    draft_inputs, draft_padding = left_pad(fed)
                    draft_cache = make_batch_cache(draft_model, draft_padding)
                else:
                    draft_inputs = mx.array(fed, dtype=mx.int32)
                try:
                    draft_tokens, q_draft = draft_batch(
                        draft_model, draft_cache, draft_inputs, K, temperature, key_draft)
                    mx.eval(draft_tokens, q_draft)
                except Exception as error:
                    if is_out_of_memory(error) or isinstance(error, NotImplementedError):
                        raise
                    draft_lost(controller, error)
                    draft_cache = None
                    continue
                drafted = time.perf_counter()
                inputs = mx.concatenate([target_inputs, draft_tokens], axis=1)
            else:
                inputs = target_inputs
            target_logits = target_model(inputs, cache=target_cache)[:, -(K + 1):]
            if K == 0:  # every row's next token, with one host sync for the batch
                last = target_logits[:, -1]
                if sampling:
                    probs = make_probs(last, temperature)
                    subkeys = [next_row_key(b) for b in range(len(rows))]
                    plain_tokens = mx.stack([sample_token(probs[b], k) for b, k in enumerate(subkeys)]).tolist()
                else:
                    plain_tokens = mx.argmax(last, axis=-1).tolist()
            else:
                mx.eval(target_logits)
        except Exception as error:
            target_cache, halving = batch_fault(error, controller, target_cache, columns, prefilled,
                                                rollback_rows, len(rows))
            if target_cache is None:  # the prompts' call failed: start the target cache again
                target_cache = make_batch_cache(target_model, left_padding)
            draft_cache = None  # made again from the committed tokens at the next draft round
            if halving:
                halve()
                return outputs
            continue

        keep, drops, done, accepted, emitted = [], [], [], [], []
        before = [len(outputs[r]) for r in rows]
        for b, r in enumerate(rows):
            if K == 0:
                n, new_tokens = 0, [plain_tokens[b]]
            else:
                key_verify = next_row_key(b) if sampling else None
                n, new_tokens = verify_speculation(
                    draft_tokens[b], target_logits[b], q_draft[b], temperature, key_verify)
            out = until_eos(new_tokens, eos, max_tokens - len(outputs[r]))
            outputs[r] += out
            done.append(out[-1] in eos)
            accepted.append(n)
            emitted.append(len(out))
            if len(outputs[r]) < max_tokens and not done[-1]:
                keep.append(b)
                drops.append(K - n)
        after = [len(outputs[r]) for r in rows]
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
        # round costs a batch (plain rounds pay no rollback).
        verified = time.perf_counter()
        if K == 0:
            if prefilled:
                controller.update(0, 0, None, verified - mark)
            else:
                controller.observe_prefill(inputs.shape[1], verified - mark)
            draft_lag += 1
        else:
            d = shortest_row_progress(before, after, done, max_tokens, K)
            caught_up = draft_inputs.shape[1] > 2
            controller.update(K, [d - 1], None if caught_up else drafted - start, verified - drafted)
            draft_lag = 2  # the draft holds C[:-2] of every row (see batched.py)
        prefilled = True
        count_round(stats, K, accepted, emitted, drafted - start, verified - drafted)
        if not keep:
            break
        if K > 0:  # only a rollback adds padding
            compact_padding(caches, filter_rows, SHARED_PADDING_LIMIT)
        if over_memory_limit(memory_limit_mb) and not controller.memory_pressure() and len(rows) > 1:
            halve()
            return outputs
        target_inputs = mx.array([[outputs[r][-1]] for r in rows], dtype=mx.int32)
        mark = time.perf_counter()
    return outputs
