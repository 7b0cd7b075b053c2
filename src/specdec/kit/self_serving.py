"""Batched speculation without a draft model: Medusa heads, EAGLE and prompt lookup in Week 4
Day 5's scheduler (provided code, not a task).

The scheduler drafts for every row with one batched call of a draft model per drafted position
(`draft_rows`), and keeps per row (C = prompt + output) the target's cache at C[:-1] and the
draft's at C[:-2], so a round feeds the draft the last two committed tokens. Week 5's learned
drafters have no model of their own: they read the target's features. Two small pieces fit
them into that scheduler with its `admit`, `commit_round` and `step` unchanged — the exercise's
code runs as it is:

- a *draft model* adapter, `HeadsDraftModel`, `EagleDraftModel` or `NgramDraftModel` (Week 3
  Day 3's lookup in each row's own text, no features): the scheduler calls it as it
  calls a draft model, `adapter(inputs [B, U], cache=...) -> logits [B, U, V]` (only the last
  column is read), on a one-layer `BatchKVCache` that the scheduler joins, rolls back and
  filters with the rest. Its logits come from the heads, or the EAGLE layer, at each row's
  features;
- `self_draft_scheduler(Scheduler)`: a subclass of the tree's `Scheduler` whose target is a
  `FeatureModel`. It keeps each row's features of positions n - 2 and n - 1 (n = len(C)): the
  admission reads them from the prefill, `commit_round` from the round's target call (the
  feature of the last accepted position and the one before it).

    fm = FeatureModel(target)                              # or FeatureModel(target, layer.taps)
    scheduler = self_draft_scheduler(Scheduler)(HeadsDraftModel(heads, fm), max_batch=8)
    scheduler.submit(Request(prompt, max_tokens=64)); ...  # as any Scheduler

Medusa: the adapter's cache only counts positions (its keys are one number wide); head k's
guess for draft k + 1 comes from the hidden state at n - 2, the position whose prediction was
C[-1]. A row whose prompt is one token long has no such state in its first round: it drafts
C[-1] again (a guess that costs nothing; verification is exact whatever the drafts).
EAGLE: the cache entry of position j pairs token j with the feature of position j - 1 (zeros
for j = 0), and every entry the row keeps must hold the target's *true* feature. A round feeds
(C[-2], f[n-3]), (C[-1], f[n-2]) and then its own drafts with its own predicted features; after
the target call, `commit_round` trims the draft cache back to C (K - 1 entries) and re-feeds
d_1..d_{K-1} with the target's features of that call, before the exercise's `commit_round`
rolls each row back to C'[:-2] as it does for any draft model.
Shapes: `B` batch, `U` tokens fed, `K` drafts, `V` vocabulary, `D` hidden size.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from specdec.kit.features import FeatureModel, check_eagle_fits, hidden_size_of
from specdec.kit.models import model_vocab_size
from specdec.kit.self_drafters import check_heads_fit

_NEG = -1e30  # the logit of a token a one-hot guess rules out (finite: softmax stays exact)


class _SelfDraftModel:
    """What the adapters share: the phases of a scheduler step, and what the scheduler tells them
    (each row's features or text, this round's K)."""

    layers = (None,)  # make_batch_cache(adapter, ...) gives one BatchKVCache
    reads_features = True  # the target must be a FeatureModel, whose features the rows keep

    def __init__(self, target):
        if self.reads_features and not isinstance(target, FeatureModel):
            raise TypeError(f"{type(self).__name__} reads the target's features from a FeatureModel, "
                            f"got {type(target).__name__}: pass specdec.kit.features.FeatureModel(target)")
        self.target = target
        self.vocab_size = model_vocab_size(target)
        self.phase = "prefill"  # "prefill" | "first" (a round's first call) | "drafting"
        self.round_k = 0  # this round's K (the scheduler's next_lookahead)
        self.row_features = None  # () -> (features [B, 2, D], known [B]) of the running rows
        self.row_texts = None  # () -> each running row's prompt + output

    # The scheduler subclass sets the phase; the scheduler's own code calls __call__. Each
    # adapter defines _prefill / _first / _next, the three kinds of call, and (reads_features)
    # features_of_call() -> the target's features of its last call [B, U, D] as it reads them.
    def refeed(self, cache: list, draft_tokens: mx.array, features: mx.array) -> None:
        """After a round's target call: make the cache entries of the drafts true (EAGLE)."""

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        inputs = mx.array(inputs, dtype=mx.int32)
        if self.phase == "prefill":
            return self._prefill(inputs, cache)
        if self.phase == "first":
            self.phase = "drafting"
            return self._first(inputs, cache)
        return self._next(inputs, cache)


class _CountingDraftModel(_SelfDraftModel):
    """An adapter that makes no model call: its cache only counts positions (keys one number
    wide), and a round's drafts for every row are decided at its first call (`_propose`)."""

    max_drafts: Optional[int] = None

    def _count(self, inputs: mx.array, cache: list) -> None:
        """Advance the position-counting cache by the U tokens fed."""
        B, U = inputs.shape
        blank = mx.zeros((B, 1, U, 1), dtype=mx.float32)
        cache[0].update_and_fetch(blank, blank)

    def _prefill(self, inputs, cache):
        self._count(inputs, cache)
        return mx.zeros((*inputs.shape, 1))  # prefill_request never reads it

    def _first(self, inputs, cache):
        self._count(inputs, cache)
        self._logits = self._propose(inputs)  # [B, K', V]
        self._drafted = 1
        return mx.broadcast_to(self._logits[:, :1], (inputs.shape[0], inputs.shape[1], self.vocab_size))

    def _next(self, inputs, cache):
        self._count(inputs, cache)
        if self._drafted >= self._logits.shape[1]:
            raise ValueError(f"{type(self).__name__} proposed {self._logits.shape[1]} drafts this round "
                             "and was asked for more: cap K with the scheduler's next_lookahead")
        k, self._drafted = self._drafted, self._drafted + 1
        return self._logits[:, k : k + 1]

    def _one_hot_logits(self, tokens: mx.array) -> mx.array:
        """Logits [..., V] whose softmax (at any temperature) is one-hot on `tokens` [...]."""
        return mx.where(mx.arange(self.vocab_size) == tokens[..., None], 0.0, _NEG)


class HeadsDraftModel(_CountingDraftModel):
    """Medusa heads as the scheduler's draft model: min(K, num_heads) drafts, no model call.

    `HeadsDraftModel(heads, fm)`: heads are Week 5 Day 2's `MedusaHeads` (hidden [..., D],
    lm_head -> logits [..., K, V]); fm the `FeatureModel` of the target (the scheduler verifies
    with it). `max_drafts` = heads.num_heads caps the scheduler's K.
    """

    def __init__(self, heads: Any, target: FeatureModel):
        super().__init__(target)
        check_heads_fit(heads, target)
        self.heads, self.max_drafts = heads, int(heads.num_heads)

    def features_of_call(self) -> mx.array:
        return self.target.hidden

    def _propose(self, inputs: mx.array) -> mx.array:
        features, known = self.row_features()
        logits = self.heads(features[:, 1], self.target.lm_head).astype(mx.float32)  # [B, K, V]
        guess = self._one_hot_logits(inputs[:, -1:])  # [B, 1, V]: no hidden state yet, repeat C[-1]
        return mx.where(known[:, None, None], logits, guess)


class NgramDraftModel(_CountingDraftModel):
    """Prompt lookup (Week 3 Day 3) as the scheduler's draft model: no model call, no weights.

    `NgramDraftModel(target, find, max_ngram=3, min_ngram=1)`: find is the tree's
    `drafters.find_ngram_continuation`; each row proposes find(its prompt + output, max_ngram,
    min_ngram, K), or its last token K times when the text has no match (one-hot q either way).
    """

    reads_features = False

    def __init__(self, target: Any, find: Any, max_ngram: int = 3, min_ngram: int = 1):
        super().__init__(target)
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.find, self.max_ngram, self.min_ngram = find, max_ngram, min_ngram

    def _propose(self, inputs: mx.array) -> mx.array:
        K = max(1, self.round_k)
        proposals = []
        for text in self.row_texts():
            found = self.find(text, self.max_ngram, self.min_ngram, K)
            proposals.append(found if len(found) == K else [text[-1]] * K)
        return self._one_hot_logits(mx.array(proposals, dtype=mx.int32))  # [B, K, V]


class EagleDraftModel(_SelfDraftModel):
    """An EAGLE layer as the scheduler's draft model: one layer call per drafted position.

    `EagleDraftModel(layer, fm)`: layer is Week 5 Day 3's `EagleLayer`; fm a `FeatureModel` of the
    target with the layer's taps (ValueError otherwise). `max_drafts` is unbounded (None).
    """

    max_drafts = None

    def __init__(self, layer: Any, target: FeatureModel):
        super().__init__(target)
        check_eagle_fits(layer, target)
        self.layer = layer
        self.embed = target.model.model.embed_tokens
        self._h: Optional[mx.array] = None

    def features_of_call(self) -> mx.array:
        return self.layer.fuse_features(self.target.features)

    def _step(self, features, inputs, cache) -> mx.array:
        self._h = self.layer(features, self.embed(inputs), cache=cache[0])[:, -1:]  # [B, 1, D]
        return self.target.lm_head(self._h)

    def _prefill(self, inputs, cache):
        # prefill_request fed the target P[:-1] just before: its features are positions 0..P-2.
        known = self.features_of_call()  # [1, P - 1, D]
        features = mx.concatenate([mx.zeros_like(known[:, :1]), known[:, : inputs.shape[1] - 1]], axis=1)
        self.layer(features, self.embed(inputs), cache=cache[0])
        return mx.zeros((*inputs.shape, 1))  # prefill_request never reads it

    def _first(self, inputs, cache):
        features, _ = self.row_features()
        U = inputs.shape[1]  # 2 in a drafting round, 1 in a plain round (it feeds C[-2] only)
        logits = self._step(features[:, :U], inputs, cache)
        return mx.broadcast_to(logits, (inputs.shape[0], U, self.vocab_size))

    def _next(self, inputs, cache):
        return self._step(self._h, inputs, cache)

    def refeed(self, cache: list, draft_tokens: mx.array, features: mx.array) -> None:
        if cache is None or draft_tokens.shape[1] == 0:
            return
        cache[0].trim(draft_tokens.shape[1])  # the drafts fed with predicted features go
        self.layer(features, self.embed(draft_tokens), cache=cache[0])
        mx.eval(cache[0].state)


def self_draft_scheduler(Scheduler: type) -> type:
    """A subclass of `Scheduler` (either tree's) that drafts with a `HeadsDraftModel`, an
    `EagleDraftModel` or an `NgramDraftModel`: `self_draft_scheduler(Scheduler)(adapter, lookahead=..., max_batch=...,
    ...)` takes the adapter in place of (target, draft) and verifies with `adapter.target`.
    Everything else — requests, events, the controller, greedy and sampled exactness — is the
    scheduler's own."""

    class SelfDraftScheduler(Scheduler):
        def __init__(self, adapter: _SelfDraftModel, **kwargs):
            super().__init__(adapter.target, adapter, **kwargs)
            self.features: dict[int, tuple[mx.array, bool]] = {}  # id(request) -> ([2, D], known)
            adapter.row_features = self.row_features
            adapter.row_texts = lambda: [r.prompt + r.output for r in self.rows]

        def row_features(self) -> tuple[mx.array, mx.array]:
            """(features [B, 2, D], known bool [B]) of the running rows, in row order."""
            states = [self.features[id(r)] for r in self.rows]
            return mx.stack([f for f, _ in states]), mx.array([k for _, k in states])

        def next_lookahead(self) -> int:
            K = super().next_lookahead()
            cap = self.draft_model.max_drafts
            self.draft_model.round_k = K if cap is None else min(K, cap)
            return self.draft_model.round_k

        def admit(self):
            """The tree's admit, one row at a time, so each new row's prefill features are read."""
            if not self.draft_model.reads_features:
                self.draft_model.phase = "prefill"
                events = super().admit()
                self.draft_model.phase = "first"
                return events
            events, cap, fm = [], self.max_batch, self.target_model
            blank = mx.zeros((2, hidden_size_of(fm)))  # features of positions -2 and -1
            self.draft_model.phase = "prefill"
            try:
                while self.waiting and len(self.rows) < cap:
                    before, calls = len(self.rows), fm.calls
                    self.max_batch = before + 1
                    events += super().admit()
                    if len(self.rows) > before:
                        request = self.rows[-1]
                        known = len(request.prompt) >= 2 and fm.calls > calls
                        features = blank
                        if known:  # the prefill's features of positions 0..P-2
                            features = mx.concatenate([blank, self.draft_model.features_of_call()[0]])[-2:]
                        mx.eval(features)
                        self.features[id(request)] = (features, known)
            finally:
                self.max_batch = cap
                self.draft_model.phase = "first"
            return events

        def commit_round(self, K, target_logits, draft_tokens=None, q_draft=None):
            if not self.draft_model.reads_features:
                events, accepted = super().commit_round(K, target_logits, draft_tokens, q_draft)
                if self.draft_cache is not None:  # a counting cache: nothing else evaluates it
                    mx.eval(self.draft_cache[0].state)
                return events, accepted
            rows, (old, _) = list(self.rows), self.row_features()
            new = self.draft_model.features_of_call()  # [B, K + 1, D]: positions n-1 .. n+K-1
            if K > 1:
                self.draft_model.refeed(self.draft_cache, draft_tokens[:, : K - 1], new[:, : K - 1])
            events, accepted = super().commit_round(K, target_logits, draft_tokens, q_draft)
            # Row b's features of positions n-2 .. n+K-1 are [old[b, 1], new[b]]; it keeps the
            # two at its new n'-2 and n'-1, n' = n + accepted[b] + 1.
            at = mx.array(accepted)[:, None] + mx.arange(2)[None]  # [B, 2]
            kept = mx.take_along_axis(mx.concatenate([old[:, 1:], new], axis=1), at[..., None], axis=1)
            running = {id(r) for r in self.rows}
            self.features = {id(r): (kept[b], True) for b, r in enumerate(rows) if id(r) in running}
            # The Medusa cache's keys feed nothing that is evaluated: evaluate them here, or
            # their graph would grow round after round.
            mx.eval([f for f, _ in self.features.values()],
                    [] if self.draft_cache is None else self.draft_cache[0].state)
            return events, accepted

        def step(self):
            self.draft_model.phase = "first"
            return super().step()

    SelfDraftScheduler.__name__ = SelfDraftScheduler.__qualname__ = f"SelfDraft{Scheduler.__name__}"
    return SelfDraftScheduler


def decode_plain(Scheduler: type, target: Any, prompts: list[list[int]], max_tokens: int,
                 eos_token_ids=()) -> list[list[int]]:
    """Greedy batched decoding of `prompts` through the tree's `Scheduler` with no draft (every
    round plain): the like-for-like baseline of `decode_batch`, whose requests are prefilled
    one by one instead of padded together as `batched_plain_decode` does."""
    from specdec.kit.serving import Request

    scheduler = Scheduler(target, None, lookahead=0, max_batch=max(1, len(prompts)),
                          eos_token_ids=eos_token_ids)
    requests = [scheduler.submit(Request(list(p), max_tokens=max_tokens)) for p in prompts]
    while scheduler.has_work:
        scheduler.step()
    return [r.output for r in requests]


def decode_batch(Scheduler: type, adapter: _SelfDraftModel, prompts: list[list[int]], max_tokens: int,
                 lookahead: int = 4, temperature: float = 0.0, seeds: Optional[list[int]] = None,
                 eos_token_ids=(), controller=None, stats=None, sampling=None) -> list[list[int]]:
    """Batched decoding of `prompts` (all at once) through `self_draft_scheduler(Scheduler)`:
    what `specdec generate|bench --batch N --drafter ngram|medusa|eagle` runs. Row i samples with
    seed seeds[i] (default i) under `sampling` (default the scheduler's, rejection sampling);
    `controller` picks K each round (None: K = lookahead, capped by the heads); `stats` (a
    SpecStats) receives the scheduler's. Returns each prompt's tokens; RuntimeError if one fails.
    """
    from specdec.kit.serving import Request

    scheduler = self_draft_scheduler(Scheduler)(
        adapter, lookahead=lookahead, max_batch=max(1, len(prompts)), eos_token_ids=eos_token_ids,
        controller=controller)
    if stats is not None:
        scheduler.stats = stats
    seeds = seeds if seeds is not None else list(range(len(prompts)))
    extra = {} if sampling is None else {"sampling": sampling}
    requests = [scheduler.submit(Request(list(prompt), max_tokens=max_tokens, temperature=temperature,
                                         seed=seed, **extra)) for prompt, seed in zip(prompts, seeds)]
    while scheduler.has_work:
        scheduler.step()
    failed = [r for r in requests if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"row {requests.index(failed[0])} failed: {failed[0].error}")
    return [r.output for r in requests]
