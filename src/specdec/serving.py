"""Week 4 Day 4 — serving: continuous batching, one speculative round at a time.

A server gets requests at any moment, each with its own prompt, max_tokens, temperature, seed
and stop strings. Continuous batching keeps one batched speculative decoder running: between two
rounds, waiting requests join the batch (`admit`), and a row leaves as soon as it is done (EOS,
max_tokens, a stop string, or the client went away). `Scheduler.step()` is one such round; the
kit's HTTP server (`specdec.kit.server`) calls it in a loop from one background thread and turns
its `Event`s into HTTP responses. Shapes: `B` batch, `L` sequence, `K` draft length, `V` vocabulary.

Per row, between rounds, the Week 3 cache invariant holds (C = the row's prompt + output): the
target cache holds C[:-1], the draft cache holds C[:-2]. A row that joins must arrive in that
state, so every round feeds the target 1 unseen token per row and the draft 2.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import mlx.core as mx

from specdec.kit.models import model_vocab_size
from specdec.kit.stats import SpecStats

from .batched import SHARED_PADDING_LIMIT, filter_rows, make_batch_cache, rollback_rows
from .sampling import make_probs, sample_token
from .verify import verify_speculation

PAD_ID = 0  # the token fed in a padding slot; the cache's left_padding masks it


@dataclass
class Request:
    """One completion request, and its progress (provided).

    prompt: token ids, non-empty. max_tokens >= 1. temperature >= 0 (0 = greedy). seed: the
    request's own randomness (used when temperature > 0), so a request's tokens never depend on
    which other requests share its batch. stop: strings that end the completion (not returned).
    Progress, written by the scheduler: output (token ids so far, EOS included), text_sent (how
    many characters of the decoded output were emitted), finish_reason (None while running, else
    "stop" | "length" | "cancelled" | "error"), error (a message when finish_reason is "error"),
    stats (this request's SpecStats: one record_round per round it took part in), key (its PRNG
    key while it runs). `cancel()` (any thread) asks the scheduler to drop it at the next step.
    """

    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int = 0
    stop: Sequence[str] = ()
    request_id: str = ""
    output: list[int] = field(default_factory=list)
    text_sent: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    cancelled: bool = False
    stats: SpecStats = field(default_factory=SpecStats)
    key: Optional[mx.array] = None

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Event:
    """What one step produced for one request (provided): new token ids, the new text (stop
    strings and a possible stop-string prefix held back), and finish_reason once it is done."""

    request: Request
    tokens: list[int]
    text: str = ""
    finish_reason: Optional[str] = None


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
    raise NotImplementedError("Week 4 Day 4 Task 1: find_stop — see book/src/week4-04-serving.md")


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
    raise NotImplementedError("Week 4 Day 4 Task 2: prefill_request — see book/src/week4-04-serving.md")


def join_caches(running: Optional[list], new: Optional[list]) -> Optional[list]:
    """Append the rows of `new` below those of `running`, layer by layer (provided).

    `BatchKVCache.extend` right-aligns both to the longer one (more left padding for the
    shorter), so every row's newest entry stays in the last used column. running None: new.
    """
    if running is None:
        return new
    for layer, other in zip(running, new):
        layer.extend(other)
    return running


def draft_rows(
    draft_model, cache: list, inputs: mx.array, num_tokens: int,
    temperatures: list[float], keys: list[Optional[mx.array]],
) -> tuple[mx.array, mx.array]:
    """Week 3's `draft_batch` with one temperature and one key per row (provided).

    inputs: int [B, U]. Row b is greedy (temperature 0, q one-hot) or sampled from
    make_probs(logits, temperatures[b]) with Gumbel noise drawn from keys[b] only, so a row's
    drafts never depend on its batch-mates. Returns (draft_tokens int32 [B, K], q_draft [B, K, V]).
    """
    sampled = [t > 0 for t in temperatures]
    noise = None
    if any(sampled):
        V = model_vocab_size(draft_model)
        noise = mx.stack([
            mx.random.gumbel((num_tokens, V), key=k) if s else mx.zeros((num_tokens, V))
            for s, k in zip(sampled, keys)
        ], axis=1)  # [K, B, V]
        scale = mx.array([t if t > 0 else 1.0 for t in temperatures])[:, None]
        is_sampled = mx.array(sampled)[:, None]
    tokens, probs = [], []
    for i in range(num_tokens):
        logits = draft_model(inputs, cache=cache)[:, -1].astype(mx.float32)  # [B, V]
        greedy = mx.argmax(logits, axis=-1)
        q = (mx.arange(logits.shape[-1]) == greedy[:, None]).astype(mx.float32)
        if noise is not None:
            soft = mx.softmax(logits / scale, axis=-1)
            q = mx.where(is_sampled, soft, q)
            greedy = mx.argmax(mx.log(q) + noise[i], axis=-1)  # Gumbel-max: a sample of q
        token = greedy.astype(mx.int32)
        tokens.append(token)
        probs.append(q)
        mx.async_eval(token)
        inputs = token[:, None]
    return mx.stack(tokens, axis=1), mx.stack(probs, axis=1)


class Scheduler:
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
    """

    def __init__(
        self,
        target_model,
        draft_model=None,
        lookahead: int = 4,
        max_batch: int = 8,
        eos_token_ids: Sequence[int] = (),
        decode: Optional[Callable[[list[int]], str]] = None,
        controller=None,
    ):
        """Check the arguments (ValueError naming the value): lookahead >= 0 (0 = plain
        decoding), max_batch >= 1, draft and target vocabularies equal (provided)."""
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 (0 = plain decoding), got {lookahead}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if draft_model is not None and model_vocab_size(draft_model) != model_vocab_size(target_model):
            raise ValueError(
                f"draft vocab {model_vocab_size(draft_model)} != target vocab "
                f"{model_vocab_size(target_model)}: the draft must share the target's tokenizer")
        self.target_model, self.draft_model = target_model, draft_model
        self.lookahead, self.max_batch = lookahead, max_batch
        self.eos_token_ids, self.decode, self.controller = set(eos_token_ids), decode, controller
        self.waiting: deque = deque()
        self.rows: list[Request] = []
        self.draft_cache: Optional[list] = None
        self.target_cache: Optional[list] = None
        self.stats = SpecStats()

    def submit(self, request: Request) -> Request:
        """Queue a request (provided; safe to call from another thread than `step`).

        ValueError naming the field: empty prompt, max_tokens < 1, temperature < 0, an empty
        stop string, stop strings without a `decode` function.
        """
        if len(request.prompt) == 0:
            raise ValueError("prompt is empty: a request needs at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if request.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {request.temperature}")
        if any(not s for s in request.stop):
            raise ValueError("stop contains an empty string: every stop string needs >= 1 character")
        if request.stop and self.decode is None:
            raise ValueError("stop strings need text: give the Scheduler a decode function")
        self.waiting.append(request)
        return request

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.rows)

    def next_lookahead(self) -> int:
        """K for the next round (provided): 0 without a draft model or when the controller says
        0 (a plain round); else the controller's (or the fixed) lookahead, capped at r - 1 where
        r is the most tokens a running row still needs, and at least 1."""
        if self.draft_model is None or not self.rows:
            return 0
        wanted = self.controller.lookahead if self.controller is not None else self.lookahead
        if wanted <= 0:
            return 0
        need = max(r.max_tokens - len(r.output) for r in self.rows)
        return max(1, min(wanted, need - 1))

    def emit(self, request: Request, new_tokens: list[int]) -> Optional[Event]:
        """Hand a round's tokens to a request (provided): cut at EOS and max_tokens, decode,
        cut at a stop string (`find_stop`), set finish_reason. Returns its Event (None if
        nothing new)."""
        out = []
        for token in new_tokens[: request.max_tokens - len(request.output)]:
            out.append(token)
            if token in self.eos_token_ids:
                break
        request.output += out
        finish = None
        if out and out[-1] in self.eos_token_ids:
            finish = "stop"
        elif len(request.output) >= request.max_tokens:
            finish = "length"
        text = ""
        if self.decode is not None:
            body = request.output[:-1] if finish == "stop" else request.output
            full = self.decode(body)
            end, stopped = find_stop(full, request.stop)
            if stopped:
                finish = "stop"
            elif finish is not None:
                end = len(full)  # done: nothing is held back any more
            else:
                end = min(end, len(full.rstrip("\ufffd")))  # an unfinished UTF-8 character waits
            text = full[request.text_sent:end]
            request.text_sent = max(request.text_sent, end)
        request.finish_reason = finish
        if not out and finish is None and not text:
            return None
        return Event(request, out, text, finish)

    def finish(self, request: Request, reason: str, error: Optional[str] = None) -> Event:
        """End a request outside a round (cancelled, failed); its final Event (provided)."""
        request.finish_reason, request.error = reason, error
        return Event(request, [], "", reason)

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only rows `keep` (indices into self.rows) in `rows` and both caches (provided)."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.draft_cache, self.target_cache = [], None, None
            return
        for cache in (self.draft_cache, self.target_cache):
            if cache is not None:
                filter_rows(cache, keep)
        self.rows = [self.rows[b] for b in keep]

    def record_round(self, K: int, accepted: list[int], draft_time_s: float, verify_time_s: float) -> None:
        """Tell the controller (if any) how the round went (provided). Per-row SpecStats are
        the step's job; this adds the batched call counts and times to `self.stats`."""
        self.stats.draft_calls += K
        self.stats.draft_time_s += draft_time_s
        self.stats.verify_time_s += verify_time_s
        if self.controller is not None:
            if K == 0:
                self.controller.update(0, 0, None, verify_time_s)
            else:
                self.controller.update(K, accepted, draft_time_s, verify_time_s)

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
        raise NotImplementedError("Week 4 Day 4 Task 3: Scheduler.admit — see book/src/week4-04-serving.md")

    # Task 4: one round ----------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One scheduler step: admit, drop cancelled rows, run one round, emit, evict.

        1. events = `admit()`; then every running row whose request is cancelled leaves (its
           Event: finish_reason "cancelled") — `keep_rows`. No rows left: return events.
        2. K = `next_lookahead()`. Each row's unseen tokens are the last two of C = prompt +
           output, [PAD_ID, C[0]] when C has one token: the draft gets both [B, 2], the target
           the last [B, 1].
        3. Keys: a row with temperature > 0 splits its own key three ways each round — (its next
           key, a draft key, a verify key); greedy rows use none.
           K > 0: `draft_rows` (per-row temperatures and draft keys), one target call on
           [unseen, drafts], then per row `verify_speculation` on its K + 1 logits with its own
           temperature and verify key. K = 0 (plain round): the draft, if any, is fed the first
           of the two unseen tokens [B, 1] (so it keeps holding C[:-2]); one target call; each
           row takes argmax (greedy) or `sample_token(make_probs(logits, t), verify key)`.
        4. Per row: `request.stats.record_round(K, n, emitted)` and the batch stats too
           (`self.stats.record_round`), `emit(request, tokens)` (append its Event if not None);
           rows whose request finished leave (`keep_rows`); the others roll back K - n_i
           entries of both caches (`rollback_rows`, after `keep_rows`). When every row pads
           >= SHARED_PADDING_LIMIT columns, `filter_rows(cache, all rows)` slices them off.
        5. `record_round(K, [n_i], draft seconds, verify seconds)`.
        Returns the events of this step. At temperature 0 every request's output is exactly
        its solo greedy output, whatever joined or left its batch and when.
        """
        raise NotImplementedError("Week 4 Day 4 Task 4: Scheduler.step — see book/src/week4-04-serving.md")
