"""Week 5 Day 3 — EAGLE: a one-layer drafter that runs in the target's feature space.

Medusa guesses token t + 1 + k from the hidden state at t alone. EAGLE drafts autoregressively,
like a draft model, but one level down: a single decoder layer reads the target's *feature*
f_{t-1} (its hidden state before token t) and the embedding of token t, and predicts the next
feature; the target's own LM head turns that guess into a token. The next draft step feeds the
drafter its own predicted feature — which is why EAGLE-3 trains by unrolling on its own outputs
(the "training-time test") and why, after verification, the drafter's cache must be re-fed
with the target's true features. Features come from `specdec.kit.features.FeatureModel`: the
final-normed hidden state, or (EAGLE-3) low, middle and high layers fused by one Linear.
Shapes: `B` batch, `L` tokens, `D` hidden size, `F` feature layers, `U` unroll steps, `K`
drafts, `V` vocabulary.
"""

from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

from specdec.kit.features import EagleDrafterBase
from specdec.kit.layers import attention_mask

from .sampling import make_probs, sample_token


class EagleLayer(nn.Module):
    """The EAGLE drafter network: fuse, input norms, fc, one llama decoder layer, a norm; the
    LM head is the target's."""

    def __init__(self, args, taps: Sequence[int] = ()):
        """args: the target's model args (hidden_size, num_attention_heads, num_key_value_heads,
        intermediate_size, rms_norm_eps, rope_theta, vocab_size). taps: the target layers read,
        as `FeatureModel(target, taps)` keeps them; () means its final-normed hidden state.

        Keeps `hidden_size` D, `taps` (a tuple), `num_features` F = max(1, len(taps)) and:
          fuse          nn.Linear(F * D, D, bias=False) when F > 1, else None (one feature as is)
          embed_norm, feature_norm   nn.RMSNorm(D, eps=args.rms_norm_eps) each: the two inputs
                        on one scale (a target's embeddings can be 100x smaller than its features)
          fc            nn.Linear(2 * D, D, bias=False): [embedding, feature] -> the layer's input
          layer         one mlx-lm `llama.TransformerBlock` of the target's sizes
          norm          nn.RMSNorm(D, eps=args.rms_norm_eps)
        """
        nn.Module.__init__(self)  # not super(): tests graft this method onto your class
        D = int(args.hidden_size)
        self.hidden_size, self.taps = D, tuple(int(j) for j in taps)
        self.num_features = max(1, len(self.taps))
        self.fuse = nn.Linear(self.num_features * D, D, bias=False) if self.num_features > 1 else None
        self.embed_norm = nn.RMSNorm(D, eps=float(args.rms_norm_eps))
        self.feature_norm = nn.RMSNorm(D, eps=float(args.rms_norm_eps))
        self.fc = nn.Linear(2 * D, D, bias=False)
        block_args = llama.ModelArgs(
            model_type="llama", hidden_size=D, num_hidden_layers=1,
            intermediate_size=int(args.intermediate_size),
            num_attention_heads=int(args.num_attention_heads),
            num_key_value_heads=int(getattr(args, "num_key_value_heads", None) or args.num_attention_heads),
            rms_norm_eps=float(args.rms_norm_eps), vocab_size=int(args.vocab_size),
            rope_theta=float(getattr(args, "rope_theta", 10000.0)))
        self.layer = llama.TransformerBlock(block_args)
        self.norm = nn.RMSNorm(D, eps=float(args.rms_norm_eps))

    def fuse_features(self, features: mx.array) -> mx.array:
        """The target's features [..., F * D] -> the drafter's feature [..., D].

        `fuse(features)` when F > 1, the features unchanged when F = 1. ValueError, naming
        both sizes, if the last axis is not F * D.
        """
        if features.shape[-1] != self.num_features * self.hidden_size:
            raise ValueError(
                f"features of width {features.shape[-1]} != F * D = "
                f"{self.num_features * self.hidden_size} ({self.num_features} features of width "
                f"{self.hidden_size}): read the target through FeatureModel(target, "
                f"taps={list(self.taps)})")
        return features if self.fuse is None else self.fuse(features)

    def __call__(self, features: mx.array, embeddings: mx.array, cache=None) -> mx.array:
        """One step of the drafter on L positions: the predicted next features.

        features: float [B, L, D], row i the feature of the position *before* token i (fused
        target features, or the drafter's own earlier outputs). embeddings: float [B, L, D],
        the target's embeddings of the tokens. cache: a KVCache for `layer`, or None.
        Returns float [B, L, D]: norm(layer(fc(concat([embed_norm(embeddings),
        feature_norm(features)], -1)), causal mask after what the cache holds)) — its guess of
        each token's own feature, so that lm_head of row i gives the law of the token after i.
        """
        x = self.fc(mx.concatenate([self.embed_norm(embeddings), self.feature_norm(features)], -1))
        return self.norm(self.layer(x, attention_mask(x, cache), cache=cache))


def eagle_loss(
    drafter: "EagleLayer",
    features: mx.array,
    tokens: mx.array,
    target_logprobs: mx.array,
    embed: Callable[[mx.array], mx.array],
    lm_head: Callable[[mx.array], mx.array],
    unroll: int = 1,
    decay: float = 0.8,
) -> tuple[mx.array, mx.array]:
    """EAGLE-3's training-time test: U steps, each fed the previous step's own predictions.

    features: float [B, L, F * D], the frozen target's features on a text; tokens: int [B, L]
    that text; target_logprobs: float [B, L, V], row t the target's law of token t + 1.
    Step u = 1..U runs `drafter(inputs_u, embed(tokens))` (no cache) with inputs_u[:, 0] = 0
    and, for t >= 1, inputs_1[:, t] = fuse_features(features)[:, t - 1] and inputs_u[:, t] =
    out_{u-1}[:, t - 1]: the feature before token t is the target's at step 1 and the
    drafter's own prediction after that (gradients flow through it). loss_u = mean over b
    and all t of -sum_v exp(target_logprobs[b, t, v]) * log softmax(lm_head(out_u[b, t]))[v].
    Returns (total, per_step): per_step float32 [U]; total = sum_u decay**(u - 1) * loss_u.
    ValueError if unroll < 1.
    """
    if unroll < 1:
        raise ValueError(f"unroll={unroll} must be >= 1: step 1 is plain teacher forcing")
    emb = embed(tokens)
    p_target = mx.exp(target_logprobs.astype(mx.float32))
    previous = drafter.fuse_features(features)
    per_step = []
    for _ in range(unroll):
        inputs = mx.concatenate([mx.zeros_like(previous[:, :1]), previous[:, :-1]], axis=1)
        previous = drafter(inputs, emb)
        logprobs = nn.log_softmax(lm_head(previous).astype(mx.float32), axis=-1)
        per_step.append(-(p_target * logprobs).sum(axis=-1).mean())
    per_step = mx.stack(per_step)
    weights = decay ** mx.arange(unroll, dtype=mx.float32)
    return (weights * per_step).sum(), per_step


def eagle_draft(
    drafter: "EagleLayer",
    cache,
    features: mx.array,
    tokens: mx.array,
    embed: Callable[[mx.array], mx.array],
    lm_head: Callable[[mx.array], mx.array],
    num_tokens: int,
    temperature: float = 0.0,
    key: Optional[mx.array] = None,
) -> tuple[mx.array, mx.array]:
    """Feed (feature, token) pairs, then draft num_tokens K >= 1 tokens in feature space.

    features: float [L, D], row i the (fused) feature before tokens[i]; tokens: int [L], L >= 1.
    One drafter call on all L pairs; its last output h gives q_1 = make_probs(lm_head(h),
    temperature) and draft d_1 (argmax at temperature 0, else sample_token(q_1, keys[0]) with
    keys = mx.random.split(key, K)). Draft i + 1 feeds the pair (h, d_i) — the drafter's own
    feature, no target — for the next h. Cache (`cache` is the drafter's KVCache): afterwards
    it holds the L pairs and d_1..d_{K-1}, as Week 2's draft cache does.
    Returns (draft_tokens int32 [K], q_draft float32 [K, V]). ValueError if K < 1, L = 0, or
    temperature > 0 without a key.
    """
    tokens = mx.array(tokens, dtype=mx.int32).reshape(-1)
    if num_tokens < 1 or tokens.size == 0:
        raise ValueError(f"num_tokens={num_tokens} must be >= 1 and tokens ({tokens.size}) non-empty")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=mx.random.key(seed)")
    keys = mx.random.split(key, num_tokens) if temperature > 0 else [None] * num_tokens
    h = drafter(features[None], embed(tokens[None]), cache=cache)[0, -1]
    drafts, q_draft = [], []
    for i in range(num_tokens):
        logits = lm_head(h)
        q = make_probs(logits, temperature)
        token = (mx.argmax(logits) if temperature == 0 else sample_token(q, keys[i])).astype(mx.int32)
        drafts.append(token)
        q_draft.append(q)
        if i + 1 < num_tokens:
            h = drafter(h[None, None], embed(token.reshape(1, 1)), cache=cache)[0, -1]
    return mx.stack(drafts), mx.stack(q_draft)


class EagleDrafter(EagleDrafterBase):
    """An EagleLayer behind Week 3's `Drafter` interface, over a target it reads features from.

        drafter = EagleDrafter(target, layer)
        decoder = DrafterDecoder(drafter, drafter.target_model, lookahead=4)

    Provided (`EagleDrafterBase` in `specdec.kit.features`): the constructor (a bare target is
    wrapped in `FeatureModel(target, layer.taps)`) and `reset()`. Attributes: layer,
    target_model (the FeatureModel the decoder must verify with), vocab_size, cache ([KVCache]
    of the layer), tokens (the token of each cache entry), num_true (how many leading cache
    entries were fed the target's true features), calls_at_reset.
    """

    def draft(
        self,
        unseen_tokens: mx.array,
        num_tokens: int,
        temperature: float = 0.0,
        key: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array]:
        """The Drafter protocol's `draft`, with EAGLE's re-feed rule.

        The committed text is tokens[:n_cached] + unseen_tokens, n_cached = the cache's offset
        (`commit_round` has trimmed the cache); n = its length. Cache entry j pairs token j with
        the feature of position j - 1 (zeros for j = 0). Of the target's features, positions
        0 .. known - 1 are true: known = min(target_model.num_known, n - 1), or 0 while the
        target has not been called since `reset`.
        THE RE-FEED RULE: entries from num_true on were fed features the drafter predicted
        itself (its accepted drafts, or zeros). Trim the cache back to start = min(num_true,
        n_cached, known + 1) and feed entries start .. n - 1 again, in `eagle_draft`'s one
        call: entry j with fuse_features(target_model.known_features(j - 1, j)) when 1 <= j <=
        known, zeros otherwise. Afterwards num_true = min(n, known + 1) and tokens = the
        committed text + drafts[:-1]. Draft num_tokens tokens, or ONE when some committed
        entry still lacks its true feature (the first round: nothing to draft from yet).
        ValueError if num_tokens < 1, if unseen_tokens is empty, or if the cache holds entries
        but the target was never called since reset (verify with `self.target_model`).
        """
        unseen = mx.array(unseen_tokens, dtype=mx.int32).reshape(-1).tolist()
        if not unseen or num_tokens < 1:
            raise ValueError(f"draft needs unseen tokens ({len(unseen)}) and num_tokens >= 1 "
                             f"({num_tokens})")
        fm, cache = self.target_model, self.cache[0]
        called = fm.calls > self.calls_at_reset
        if cache.offset and not called:
            raise ValueError("the target was never called since the drafter's reset: verify with "
                             "DrafterDecoder(drafter, drafter.target_model, ...) so features arrive")
        committed = self.tokens[: cache.offset] + unseen
        n, D = len(committed), self.layer.hidden_size
        known = min(fm.num_known if called else 0, n - 1)
        start = min(self.num_true, cache.offset, known + 1)
        cache.trim(cache.offset - start)  # the rule: entries fed predicted features go
        rows = [mx.zeros((1, D))] if start == 0 else []  # entry 0: no position before it
        if known > max(start - 1, 0):
            rows.append(self.layer.fuse_features(fm.known_features(max(start - 1, 0), known)))
        if n > known + 1:
            rows.append(mx.zeros((n - known - 1, D)))  # not computed by the target yet
        drafts, q_draft = eagle_draft(
            self.layer, cache, mx.concatenate(rows), mx.array(committed[start:]),
            fm.model.model.embed_tokens, fm.lm_head, num_tokens if known + 1 >= n else 1,
            temperature, key)
        self.num_true = min(n, known + 1)
        self.tokens = committed + drafts[:-1].tolist()
        return drafts, q_draft
