"""Provided code of Week 4 Day 5 (serving), imported by both trees' `serving.py`.

`Request`, `Event`, `join_caches`, `draft_rows`, the per-request sampling rules (`SamplingRule`:
`RejectionSampling`, `CoupledSampling`), and `SchedulerBase`: the scheduler's `__init__`,
`submit`, `next_lookahead`, `emit`, `finish`, `keep_rows`, `record_round`, `round_keys`,
`sampling_logits`, `draft_noise` and `verify_row`. The exercise module's
`Scheduler(SchedulerBase)` adds the tasks (`admit`, `commit_round`, `step`); `emit`, `sampling_logits` and the
rules call the exercise tree's own `find_stop`, `make_probs`, `sample_token`,
`verify_speculation` and `coupling` functions (looked up in the module that defines the
scheduler class, or in its package, so a test that stands the reference in for a task is
honoured).
Shapes: `B` batch, `K` draft length, `V` vocabulary.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import mlx.core as mx

from specdec.kit.models import model_vocab_size
from specdec.kit.stats import SpecStats

PAD_ID = 0  # the token fed in a padding slot; the cache's left_padding masks it
TOP_LOGPROBS_MAX = 20  # the most alternatives a request may ask for per token (OpenAI's bound)


def fold_in(key: mx.array, data: int) -> mx.array:
    """A new key from `key` and an integer (provided; JAX's fold_in, which MLX lacks): the key
    XOR a pseudo-random hash of `data`, then one split. Distinct data give unrelated keys."""
    salt = mx.random.split(mx.random.key(data), 1)[0]  # uint32 [2], a hash of data
    return mx.random.split(mx.bitwise_xor(key, salt), 1)[0]


class SamplingRule:
    """How a sampled row draws its tokens (provided): the seam where a request's randomness is
    decided. The scheduler asks a row's rule (`request.sampling`) for the Gumbel noise of its K
    drafts, `draft_noise(scheduler, request, K, V) -> float [K, V]`, and for its verdict on a
    round, `verify(scheduler, request, target_logits [K + 1, V], draft_tokens [K] | None,
    q_draft [K, V] | None) -> (n, tokens)`. `name` is reported in each response's `speculative`
    object; `k_invariant` says whether the row's tokens are the same for every K (if not,
    `next_lookahead` must not cap K by the batch-mates' needs)."""

    name = "?"
    k_invariant = False

    def draft_noise(self, scheduler: "SchedulerBase", request: "Request", num_tokens: int,
                    vocab_size: int) -> mx.array:
        raise NotImplementedError(f"{type(self).__name__} must define draft_noise")

    def verify(self, scheduler: "SchedulerBase", request: "Request", target_logits: mx.array,
               draft_tokens: Optional[mx.array], q_draft: Optional[mx.array]) -> tuple[int, list[int]]:
        raise NotImplementedError(f"{type(self).__name__} must define verify")


class RejectionSampling(SamplingRule):
    """Exact speculative (rejection) sampling, the default rule (provided).

    This rule gives each sampled row its keys for one round, `round_keys(request)
    -> (draft_key, verify_key)`, derived from the request's own key (`mx.random.key(seed)`, set
    at admission) and its progress (`len(request.output)`) only — never from the round number,
    the admission order, the row index or the batch-mates. A seeded request thus replays the
    same numbers whenever it reaches the same point with the same K: its text depends on K (and
    so on the controller), so it is not `k_invariant`. It accepts the most drafts (1 - TV per
    token).
    """

    name = "rejection"
    k_invariant = False

    def round_keys(self, request: "Request") -> tuple[mx.array, mx.array]:
        if request.key is None:
            raise ValueError(f"request {request.request_id or '(no id)'} has no key: admit() sets "
                             "request.key = mx.random.key(request.seed) before its first round")
        draft_key, verify_key = mx.random.split(fold_in(request.key, len(request.output)))
        return draft_key, verify_key

    def draft_noise(self, scheduler: "SchedulerBase", request: "Request", num_tokens: int,
                    vocab_size: int) -> mx.array:
        """Gumbel noise float [K, V] for a sampled row's K drafts, from this round's draft key."""
        return mx.random.gumbel((num_tokens, vocab_size), key=self.round_keys(request)[0])

    def verify(self, scheduler: "SchedulerBase", request: "Request", target_logits: mx.array,
               draft_tokens: Optional[mx.array], q_draft: Optional[mx.array]) -> tuple[int, list[int]]:
        """(n, tokens) of a sampled row: the tree's `verify_speculation` (K > 0) or one
        `sample_token` (K = 0) on `scheduler.sampling_logits(request, target_logits)`, with this
        round's verify key."""
        verify_key = self.round_keys(request)[1]
        logits = scheduler.sampling_logits(request, target_logits)  # [K + 1, V]
        if draft_tokens is not None and draft_tokens.shape[0] > 0:
            verify_speculation = _tree_function(scheduler, "verify_speculation")
            return verify_speculation(draft_tokens, logits, q_draft, request.temperature, verify_key)
        make_probs, sample_token = (_tree_function(scheduler, f) for f in ("make_probs", "sample_token"))
        return 0, [sample_token(make_probs(logits[-1], request.temperature), verify_key).item()]


class CoupledSampling(SamplingRule):
    """The coupled (drafter-invariant) rule of Week 5 Day 1, for seeded requests (provided).

    The token at absolute position t (prompt included, 0-based) is the target's Gumbel-max
    sample with the noise `coupling.gumbel_noise(seed, [t], V)`: the row's drafts use the same
    noise (`draft_noise`), and `coupling.verify_coupled` keeps a draft exactly when it equals the
    target's own token. Every emitted token is then the token of plain seeded decoding,
    `coupling.seeded_generate(target, prompt, max_tokens, seed, temperature, top_p=top_p)`,
    whatever the drafts, K, the controller, the row or the batch-mates (up to the float
    differences of batched and solo model calls, which can flip a near-tie). It accepts fewer
    drafts than rejection sampling: at least (1 - TV) / (1 + TV) per token. Needs
    0 <= seed < 2**32 (ValueError otherwise, from `gumbel_noise`).
    """

    name = "coupled"
    k_invariant = True

    def draft_noise(self, scheduler: "SchedulerBase", request: "Request", num_tokens: int,
                    vocab_size: int) -> mx.array:
        """Gumbel noise float [K, V] of the positions of the row's next K tokens."""
        t = len(request.prompt) + len(request.output)
        coupling = _tree_module(scheduler, "coupling")
        return coupling.gumbel_noise(request.seed, range(t, t + num_tokens), vocab_size)

    def verify(self, scheduler: "SchedulerBase", request: "Request", target_logits: mx.array,
               draft_tokens: Optional[mx.array], q_draft: Optional[mx.array]) -> tuple[int, list[int]]:
        """(n, tokens) of the tree's `verify_coupled` on the raw target logits [K + 1, V], with
        the noise of positions t .. t + K and the row's temperature and top_p (K = 0: no
        drafts, one token: the plain seeded one)."""
        coupling = _tree_module(scheduler, "coupling")
        t = len(request.prompt) + len(request.output)
        K = target_logits.shape[0] - 1
        noise = coupling.gumbel_noise(request.seed, range(t, t + K + 1), target_logits.shape[-1])
        if draft_tokens is None:
            draft_tokens = mx.zeros((0,), dtype=mx.int32)
        return coupling.verify_coupled(draft_tokens, target_logits, noise, request.temperature,
                                       0, request.top_p)


REJECTION = RejectionSampling()
COUPLED = CoupledSampling()


@dataclass
class Request:
    """One completion request, and its progress (provided).

    prompt: token ids, non-empty. max_tokens >= 1. temperature: finite, >= 0 (0 = greedy).
    top_p: in (0, 1] (1 = no nucleus filter). seed: the request's own randomness (used when
    temperature > 0), so a request's tokens never depend on which other requests share its
    batch. stop: strings that end the completion (not returned). logprobs: None, or how many
    top alternatives (0..20) to report with the log-probability of each emitted token.
    sampling: the per-request sampling rule: `REJECTION` (exact rejection sampling, the default)
    or `COUPLED` (`CoupledSampling`: the text of plain seeded decoding whatever K or the drafts;
    the server picks it for a request that gives its seed and samples).
    Progress, written by the scheduler: output (token ids so far, EOS included), text_sent (how
    many characters of the decoded output were emitted), finish_reason (None while running, else
    "stop" | "length" | "cancelled" | "error"), error (a message when finish_reason is "error"),
    stats (this request's SpecStats: one record_round per round it took part in), key (its PRNG
    key while it runs), token_logprobs / top_logprobs (one entry per output token when logprobs
    is set: the target's log-probability of that token, and {token id: log-probability} of the
    target's most likely tokens). `cancel()` (any thread) asks the scheduler to drop it at the
    next step.
    """

    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int = 0
    stop: Sequence[str] = ()
    request_id: str = ""
    top_p: float = 1.0
    logprobs: Optional[int] = None
    sampling: SamplingRule = REJECTION
    output: list[int] = field(default_factory=list)
    text_sent: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    cancelled: bool = False
    stats: SpecStats = field(default_factory=SpecStats)
    key: Optional[mx.array] = None
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)

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


def join_caches(running: Optional[list], new: Optional[list]) -> Optional[list]:
    """Append the rows of `new` below those of `running`, layer by layer (provided).

    `BatchKVCache.extend` right-aligns both to the longer one (more left padding for the
    shorter), so every row's newest entry stays in the last used column. running None: new.
    """
    if running is None:
        return new
    for layer, other in zip(running, new):
        layer.extend(other)
    # Evaluated here: a lazy join would be paid by the next round's target call, and the
    # controller would time it as that round's cost (a first plain round twice its true cost).
    mx.eval([layer.state for layer in running])
    return running


def draft_rows(
    draft_model, cache: list, inputs: mx.array, num_tokens: int,
    temperatures: list[float], noises: list[Optional[mx.array]],
) -> tuple[mx.array, mx.array]:
    """Week 3's `draft_batch` with one temperature and one noise per row (provided).

    inputs: int [B, U]. Row b is greedy (temperature 0, q one-hot; noises[b] unused, may be
    None) or sampled from make_probs(logits, temperatures[b]) by Gumbel-max with noises[b],
    float [K, V] (its rule's `draft_noise`), so a row's drafts never depend on its batch-mates.
    Returns (draft_tokens int32 [B, K], q_draft [B, K, V]).
    """
    sampled = [t > 0 for t in temperatures]
    noise = None
    if any(sampled):
        missing = [b for b, (s, n) in enumerate(zip(sampled, noises)) if s and n is None]
        if missing:
            raise ValueError(f"row {missing[0]} samples (temperature {temperatures[missing[0]]}) but "
                             "has no noise: pass self.draft_noise(request, K) for every row")
        V = model_vocab_size(draft_model)
        noise = mx.stack([
            n.astype(mx.float32) if s else mx.zeros((num_tokens, V))
            for s, n in zip(sampled, noises)
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


def _tree_function(obj, name: str) -> Callable:
    """`name` as defined in the module of obj's class (or of a base class): the tree's own."""
    for cls in type(obj).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and module.__name__ != __name__ and hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"no {name} in the modules of {type(obj).__name__}: subclass SchedulerBase "
                         f"in a module that defines or imports {name}")


def _tree_module(obj, name: str):
    """The exercise module `name` of the tree that obj's class (or a base class) comes from."""
    for cls in type(obj).__mro__:
        package = getattr(sys.modules.get(cls.__module__), "__package__", None)
        if package and cls.__module__ != __name__:
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
    raise AttributeError(f"no exercise module {name!r} next to {type(obj).__name__}: subclass "
                         "SchedulerBase in a tree (specdec or specdec_ref) that has it")


class SchedulerBase:
    """The provided half of the Week 4 Day 5 `Scheduler` (the exercise adds admit, commit_round
    and step)."""

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

        ValueError naming the field: empty prompt, max_tokens < 1, temperature not a finite
        number >= 0, top_p not in (0, 1], logprobs not None or in [0, 20], a seed outside
        [0, 2**32) for the coupled rule at temperature > 0, an empty stop string, stop strings
        without a `decode` function.
        """
        if len(request.prompt) == 0:
            raise ValueError("prompt is empty: a request needs at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if not (math.isfinite(request.temperature) and request.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {request.temperature}")
        if not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {request.top_p}")
        if request.logprobs is not None and not 0 <= request.logprobs <= TOP_LOGPROBS_MAX:
            raise ValueError(f"logprobs must be None or in [0, {TOP_LOGPROBS_MAX}], got {request.logprobs}")
        if any(not s for s in request.stop):
            raise ValueError("stop contains an empty string: every stop string needs >= 1 character")
        if request.temperature > 0 and request.sampling.k_invariant and not 0 <= request.seed < 2**32:
            raise ValueError(f"seed {request.seed} is out of range for the {request.sampling.name} rule, "
                             "whose noise is keyed by (seed, position): pick 0 <= seed < 2**32")
        if request.stop and self.decode is None:
            raise ValueError("stop strings need text: give the Scheduler a decode function")
        self.waiting.append(request)
        return request

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.rows)

    def next_lookahead(self) -> int:
        """K for the next round (provided): 0 without a draft model or when the controller says
        0 (a plain round); else the controller's (or the fixed) lookahead, at least 1, and
        capped at r - 1 where r is the most tokens a running row still needs — unless a running
        row samples (temperature > 0) with a rule whose draws depend on K (rejection sampling):
        K must not depend on its batch-mates, so such a batch is not capped (a few draft tokens
        are wasted at its end). Coupled rows give the same tokens for every K."""
        if self.draft_model is None or not self.rows:
            return 0
        wanted = self.controller.lookahead if self.controller is not None else self.lookahead
        if wanted <= 0:
            return 0
        if any(r.temperature > 0 and not r.sampling.k_invariant for r in self.rows):
            return wanted
        need = max(r.max_tokens - len(r.output) for r in self.rows)
        return max(1, min(wanted, need - 1))

    def round_keys(self, request: Request) -> tuple[mx.array, mx.array]:
        """(draft key, verify key) of a sampled row for this round (provided): what the
        rejection rule draws with (`RejectionSampling.round_keys`), derived from its seed and
        its progress only."""
        return REJECTION.round_keys(request)

    def draft_noise(self, request: Request, num_tokens: int) -> Optional[mx.array]:
        """The Gumbel noise of a row's drafts this round (provided): float [K, V] from its
        sampling rule (`request.sampling.draft_noise`), None for a greedy row (temperature 0)
        or K = 0. Pass one per row to `draft_rows`."""
        if request.temperature <= 0 or num_tokens <= 0:
            return None
        return request.sampling.draft_noise(self, request, num_tokens, model_vocab_size(self.target_model))

    def verify_row(self, request: Request, target_logits: mx.array,
                   draft_tokens: Optional[mx.array] = None,
                   q_draft: Optional[mx.array] = None) -> tuple[int, list[int]]:
        """One row's verdict on its round (provided): (n, tokens), n accepted drafts and the
        n + 1 tokens to emit (python ints).

        target_logits: float [K + 1, V], this row's raw target logits (`target_logits[b]`).
        draft_tokens: int [K] and q_draft: float [K, V], this row's rows of `draft_rows`; None
        (both) in a plain round (K = 0). A greedy row (temperature 0): the tree's
        `verify_speculation` at temperature 0, or the argmax when K = 0. A sampled row: its
        sampling rule's `verify` (`request.sampling`): rejection sampling (the tree's
        `verify_speculation` / `sample_token` with the keys of `round_keys`, on
        `sampling_logits`), or the coupled rule (`coupling.verify_coupled`).
        """
        if request.temperature > 0:
            return request.sampling.verify(self, request, target_logits, draft_tokens, q_draft)
        if draft_tokens is not None and draft_tokens.shape[0] > 0:
            verify_speculation = _tree_function(self, "verify_speculation")
            return verify_speculation(draft_tokens, target_logits, q_draft, 0.0, None)
        return 0, [mx.argmax(target_logits[-1]).item()]

    def sampling_logits(self, request: Request, logits: mx.array) -> mx.array:
        """The target logits a sampled row verifies or samples with (provided).

        logits: float [..., V]. With top_p < 1 the tokens outside the nucleus of
        make_probs(logits, temperature) get -inf, so `make_probs` of the result (what
        `verify_speculation` and a plain round use) is exactly the nucleus distribution; else
        logits unchanged. Speculative sampling is exact for any target distribution, so top-p
        needs nothing else.
        """
        if request.temperature <= 0 or request.top_p >= 1:
            return logits
        make_probs = _tree_function(self, "make_probs")
        probs = make_probs(logits.astype(mx.float32), request.temperature, top_p=request.top_p)
        return mx.where(probs > 0, logits, -mx.inf)

    def emit(self, request: Request, new_tokens: list[int], logits: Optional[mx.array] = None) -> Optional[Event]:
        """Hand a round's tokens to a request (provided): cut at EOS and max_tokens, decode,
        cut at a stop string (`find_stop`), set finish_reason. Returns its Event (None if
        nothing new).

        logits: float [>= len(new_tokens), V], this round's target logits for this row, where
        row j is the distribution new_tokens[j] was verified (or sampled) against — in a round
        of K drafts, `target_logits[b]` ([K + 1, V]). Needed when `request.logprobs` is set
        (ValueError otherwise): it records each emitted token's log-probability under the
        target (temperature 1, before top-p) and its top `request.logprobs` alternatives.
        """
        out = []
        for token in new_tokens[: request.max_tokens - len(request.output)]:
            out.append(token)
            if token in self.eos_token_ids:
                break
        if request.logprobs is not None and out:
            if logits is None:
                raise ValueError("this request asks for logprobs: step must pass the row's target "
                                 "logits to emit(request, new_tokens, logits)")
            logprobs = logits[: len(out)].astype(mx.float32)
            logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)  # [n, V]
            chosen = logprobs[mx.arange(len(out)), mx.array(out)].tolist()
            request.token_logprobs += [float(x) for x in chosen]
            if request.logprobs > 0:
                top = mx.argsort(-logprobs, axis=-1)[:, : request.logprobs]
                values = mx.take_along_axis(logprobs, top, axis=-1)
                for ids, vals in zip(top.tolist(), values.tolist()):
                    request.top_logprobs.append(dict(zip(ids, vals)))
            else:
                request.top_logprobs += [{} for _ in out]
        request.output += out
        finish = None
        if out and out[-1] in self.eos_token_ids:
            finish = "stop"
        elif len(request.output) >= request.max_tokens:
            finish = "length"
        text = ""
        if self.decode is not None:
            find_stop = _tree_function(self, "find_stop")
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
        filter_rows = _tree_function(self, "filter_rows")
        for cache in (self.draft_cache, self.target_cache):
            if cache is not None:
                filter_rows(cache, keep)
        self.rows = [self.rows[b] for b in keep]

    def record_round(self, K: int, accepted: list[int], draft_time_s: float, verify_time_s: float) -> None:
        """Tell the controller (if any) how the round went (provided). Per-row SpecStats are
        commit_round's job; this adds the batched call counts and times to `self.stats`."""
        self.stats.draft_calls += K
        self.stats.draft_time_s += draft_time_s
        self.stats.verify_time_s += verify_time_s
        if self.controller is not None:
            if K == 0:
                self.controller.update(0, 0, None, verify_time_s)
            else:
                self.controller.update(K, accepted, draft_time_s, verify_time_s)
