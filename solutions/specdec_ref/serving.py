"""Week 4 Day 5 — serving: continuous batching, one speculative round at a time.

A server gets requests at any moment, each with its own prompt, max_tokens, temperature, seed
and stop strings. Continuous batching keeps one batched speculative decoder running: between two
rounds, waiting requests join the batch (`admit`), and a row leaves as soon as it is done (EOS,
max_tokens, a stop string, or the client went away). `Scheduler.step()` is one such round; the
kit's HTTP server (`specdec.kit.server`) calls it in a loop from one background thread and turns
its `Event`s into HTTP responses. Shapes: `B` batch, `L` sequence, `K` draft length, `V` vocabulary.

Per row, between rounds, the Week 3 cache invariant holds (C = the row's prompt + output): the
target cache holds C[:-1], the draft cache holds C[:-2]. A row that joins must arrive in that
state, so every round feeds the target 1 unseen token per row and the draft 2.

Provided code lives in `specdec.kit.serving` and is re-exported here: `Request`, `Event`,
`PAD_ID`, `join_caches`, `draft_rows`, the sampling rules (`RejectionSampling`, and the
coupled rule `CoupledSampling` of Week 5 Day 1 for seeded requests), and `SchedulerBase` — the
scheduler's `__init__`, `submit`, `next_lookahead`, `round_keys`, `sampling_logits`,
`draft_noise`, `verify_row`, `emit`, `finish`, `keep_rows` and `record_round`. Read them first.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import mlx.core as mx

from specdec.kit.serving import (  # noqa: F401 — provided code, re-exported for both trees
    COUPLED, PAD_ID, REJECTION, CoupledSampling, Event, RejectionSampling, Request, SchedulerBase,
    draft_rows, join_caches)

from .batched import SHARED_PADDING_LIMIT, filter_rows, make_batch_cache, rollback_rows  # noqa: F401
# The provided half (emit, sampling_logits, the rules) looks these up here: this tree's own.
from .sampling import make_probs, sample_token  # noqa: F401
from .verify import verify_speculation  # noqa: F401


# Task 1: stop strings -----------------------------------------------------------------------------
def find_stop(text: str, stop: Sequence[str]) -> tuple[int, bool]:
    """How much of a completion's text may be sent, given its stop strings.

    text: everything decoded so far. stop: non-empty strings (ValueError naming an empty one).
    Returns (end, stopped):
      - some stop string occurs in text: (the index where the earliest occurrence starts, True);
        the completion is text[:end] — the stop string itself is never returned;
      - otherwise (len(text) - h, False), h the length of the longest suffix of text that is a
        proper prefix of some stop string: those h characters are held back, because the next
        tokens may complete the stop string (streaming must never send what a stop string cuts).
    With no stop strings, (len(text), False).
    """
    for s in stop:
        if not s:
            raise ValueError("stop contains an empty string: every stop string needs >= 1 character")
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    if found:
        return min(found), True
    held = 0
    for s in stop:
        for h in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:h]):
                held = h
                break
    return len(text) - held, False


# Task 2: a new row ------------------------------------------------------------------------------
def prefill_request(draft_model, target_model, prompt: list[int]) -> tuple[Optional[list], list]:
    """Prefill one request alone, into caches ready to join the running batch.

    prompt: P, non-empty token ids (ValueError otherwise). draft_model may be None (plain serving).
    Returns (draft_cache, target_cache), each a per-layer list of one-row `BatchKVCache`
    (`make_batch_cache(model, left_padding)`), in the Week 3 invariant state:
      - the target cache holds P[:-1] (empty for a 1-token prompt): one target call on P[:-1]
        when it is not empty;
      - the draft cache holds P[:-2]: one draft call when P[:-2] is not empty. A 1-token prompt
        has no second-to-last token, so the next round feeds its draft [PAD_ID, P[0]]: make that
        cache with left_padding [1], so the mask hides the padding slot and P[0] sits at RoPE
        position 0 (offset -1 before the call). draft_cache is None when draft_model is None.
    Evaluate the caches (`mx.eval` of each layer's state) before returning: prefill work is done
    here, not in the next round.
    """
    if len(prompt) == 0:
        raise ValueError("prompt is empty: a request needs at least one token")
    target_cache = make_batch_cache(target_model, [0])
    if len(prompt) > 1:
        target_model(mx.array([prompt[:-1]], dtype=mx.int32), cache=target_cache)
        mx.eval([layer.state for layer in target_cache])
    draft_cache = None
    if draft_model is not None:
        draft_cache = make_batch_cache(draft_model, [1 if len(prompt) == 1 else 0])
        if len(prompt) > 2:
            draft_model(mx.array([prompt[:-2]], dtype=mx.int32), cache=draft_cache)
            mx.eval([layer.state for layer in draft_cache])
    return draft_cache, target_cache


class Scheduler(SchedulerBase):
    """Continuous batching over one batched speculative decoder.

        scheduler = Scheduler(target, draft, lookahead=4, max_batch=8, decode=tokenizer.decode)
        scheduler.submit(Request(prompt, max_tokens=32))
        while scheduler.has_work:
            for event in scheduler.step(): ...

    Attributes: target_model, draft_model (None: plain serving, K = 0 every round), lookahead,
    max_batch, eos_token_ids (a set), decode (token ids -> str, needed for stop strings; None:
    events carry no text), controller (None, or an object with a `lookahead` property and
    `update(num_drafted, num_accepted, draft_time_s, verify_time_s)`, e.g. Week 4 Day 3's
    FallbackController: it then picks K each round), waiting (a deque of Requests), rows (the
    running Requests, in cache row order), draft_cache / target_cache (per-layer BatchKVCaches
    over `rows`, None while no row runs), stats (one SpecStats for everything served).
    Everything but `admit`, `commit_round` and `step` is provided by `SchedulerBase`
    (specdec.kit.serving).
    """

    # Task 3: admission --------------------------------------------------------------------------
    def admit(self) -> list[Event]:
        """Move waiting requests into the running batch, oldest first, while len(rows) < max_batch.

        For each request taken from `waiting`:
          - cancelled already: not prefilled; its Event has finish_reason "cancelled";
          - `prefill_request(draft_model, target_model, prompt)`; if that raises, the request
            alone fails (finish_reason "error", `request.error` the exception's message) and
            admission goes on with the next one — one bad request never stops the server;
          - otherwise its one-row caches join the running ones (`join_caches`, draft and
            target), it is appended to `rows`, and gets its key: mx.random.key(request.seed).
        Returns the Events of the requests that ended here (empty when all joined).
        """
        events = []
        while self.waiting and len(self.rows) < self.max_batch:
            request = self.waiting.popleft()
            if request.cancelled:
                events.append(self.finish(request, "cancelled"))
                continue
            try:
                draft_cache, target_cache = prefill_request(self.draft_model, self.target_model, request.prompt)
            except Exception as error:  # noqa: BLE001 — the request fails, the server does not
                events.append(self.finish(request, "error", f"{type(error).__name__}: {error}"))
                continue
            self.target_cache = join_caches(self.target_cache, target_cache)
            self.draft_cache = join_caches(self.draft_cache, draft_cache)
            request.key = mx.random.key(request.seed)
            self.rows.append(request)
        return events

    # Task 4: a round's bookkeeping ------------------------------------------------------------
    def commit_round(self, K: int, target_logits: mx.array, draft_tokens: Optional[mx.array] = None,
                     q_draft: Optional[mx.array] = None) -> tuple[list[Event], list[int]]:
        """Settle a round whose model calls have run: each row's verdict and tokens, then the
        batch back in the invariant state. The batched twin of Week 2 Day 4's `commit_round`.

        K: this round's draft length (0: a plain round). target_logits: float [B, K + 1, V], B =
        len(rows), the target's raw logits over each row's last unseen token and its K drafts.
        draft_tokens: int [B, K] and q_draft: float [B, K, V], from `draft_rows`; None (both)
        when K = 0. Per row b, in row order:
          - (n, tokens) = `self.verify_row(request, target_logits[b], draft_tokens[b],
            q_draft[b])`, or `self.verify_row(request, target_logits[b])` when K = 0 (n = 0, one
            token). verify_row handles greedy rows, top_p, rejection sampling and the coupled
            rule of seeded requests: never call verify_speculation or sample_token yourself;
          - `emit(request, tokens, target_logits[b])`, its Event appended if not None;
          - `request.stats.record_round(K, n, emitted)` and `self.stats.record_round(K, n,
            emitted)`, where emitted = how many tokens emit appended to request.output (fewer
            than n + 1 when EOS or max_tokens cut the round short).
          One failing request never fails another: if verifying or emitting a row raises, that
          request alone ends (`finish(request, "error", "<ExceptionType>: <message>")`, its Event
          returned) and leaves with the finished rows; the others go on.
        Then the rows whose request finished leave (`keep_rows`), and every kept row b rolls back
        K - n_b entries of both caches (`rollback_rows`, after `keep_rows`, so that the list and
        the caches hold the same rows; nothing when K = 0): each row's target cache holds C[:-1]
        and its draft cache C[:-2] again (C = prompt + output). When every remaining row pads
        >= SHARED_PADDING_LIMIT columns, `filter_rows(cache, all rows)` slices that padding off.
        Returns (events, accepted): this round's Events, and n_b for every row b the round
        started with (0 for a failed row), in row order — what `record_round` takes.
        """
        events, keep, drops, accepted = [], [], [], []
        for b, r in enumerate(self.rows):
            try:
                if K > 0:
                    n, new_tokens = self.verify_row(r, target_logits[b], draft_tokens[b], q_draft[b])
                else:
                    n, new_tokens = self.verify_row(r, target_logits[b])
                before = len(r.output)
                event = self.emit(r, new_tokens, target_logits[b])
            except Exception as error:  # noqa: BLE001 — the request fails, its batch-mates do not
                events.append(self.finish(r, "error", f"{type(error).__name__}: {error}"))
                accepted.append(0)
                continue
            emitted = len(r.output) - before
            r.stats.record_round(K, n, emitted)
            self.stats.record_round(K, n, emitted)
            accepted.append(n)
            if event is not None:
                events.append(event)
            if r.finish_reason is None:
                keep.append(b)
                drops.append(K - n)
        self.keep_rows(keep)
        if self.rows:
            for cache in (self.draft_cache, self.target_cache):
                if cache is None:
                    continue
                if K > 0:
                    rollback_rows(cache, drops)
                if min(cache[0].left_padding.tolist()) >= SHARED_PADDING_LIMIT:
                    filter_rows(cache, list(range(len(self.rows))))
        return events, accepted

    # Task 5: one step -------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One scheduler step: admit, drop cancelled rows, run one round, commit it, record it.

        1. events = `admit()`; then every running row whose request is cancelled leaves (its
           Event: finish_reason "cancelled") — `keep_rows`. No rows left: return events.
        2. K = `next_lookahead()`. Each row's unseen tokens are the last two of C = prompt +
           output, [PAD_ID, C[0]] when C has one token: the draft gets both [B, 2], the target
           the last [B, 1].
        3. Randomness is the row's own, decided by its sampling rule (`request.sampling`,
           provided): never by the round, its row or the admission order.
           K > 0: `draft_rows` with per-row temperatures and noises, noise b =
           `self.draft_noise(request, K)` (None for a greedy row), evaluated; then one target
           call on [last unseen token, drafts] [B, K + 1] -> target_logits [B, K + 1, V].
           K = 0 (a plain round): the draft, if any, is fed the first of the two unseen tokens
           [B, 1] (so it keeps holding C[:-2]); one target call on the last [B, 1].
        4. (round_events, accepted) = `commit_round(K, target_logits, draft_tokens, q_draft)`
           (None, None when K = 0).
        5. `record_round(K, accepted, draft seconds, verify seconds)`: draft seconds from the
           start of step 3 to the drafts evaluated (the plain round's draft feed included),
           verify seconds from there to the end of commit_round (`time.perf_counter`).
        Returns the events of this step: admission's, the cancellations', the round's. At
        temperature 0 every request's output is exactly its solo greedy output, whatever joined
        or left its batch and when; a request with the coupled rule (`sampling=COUPLED`) gets
        exactly the tokens of plain seeded decoding (`coupling.seeded_generate` with its seed,
        temperature and top_p), whatever K each round used, its drafts and its batch-mates.
        """
        events = self.admit()
        live = [b for b, r in enumerate(self.rows) if not r.cancelled]
        for b, r in enumerate(self.rows):
            if r.cancelled:
                events.append(self.finish(r, "cancelled"))
        self.keep_rows(live)
        if not self.rows:
            return events

        K = self.next_lookahead()
        sequences = [r.prompt + r.output for r in self.rows]
        unseen = mx.array([([PAD_ID] + s)[-2:] for s in sequences], dtype=mx.int32)  # [B, 2]
        noises = [self.draft_noise(r, K) for r in self.rows]  # [K, V] per sampled row, else None

        start = time.perf_counter()
        draft_tokens = q_draft = None
        if K > 0:
            temperatures = [r.temperature for r in self.rows]
            draft_tokens, q_draft = draft_rows(
                self.draft_model, self.draft_cache, unseen, K, temperatures, noises)
            mx.eval(draft_tokens, q_draft)
            inputs = mx.concatenate([unseen[:, 1:], draft_tokens], axis=1)
        else:
            if self.draft_cache is not None:
                self.draft_model(unseen[:, :1], cache=self.draft_cache)
                mx.eval([layer.state for layer in self.draft_cache])
            inputs = unseen[:, 1:]
        drafted = time.perf_counter()
        target_logits = self.target_model(inputs, cache=self.target_cache)[:, -(K + 1):]
        mx.eval(target_logits)
        round_events, accepted = self.commit_round(K, target_logits, draft_tokens, q_draft)
        self.record_round(K, accepted, drafted - start, time.perf_counter() - drafted)
        return events + round_events
