"""Week 5 Day 2 — Medusa heads: the target drafts for itself, in the forward pass that verifies.

K small heads read the target's last hidden state h_t (`specdec.kit.features`). Head k
(k = 1..K, stored as `heads.blocks[k - 1]`) is one residual block h + SiLU(W_k h + b_k) followed
by the target's own LM head, and guesses the token k + 1 places ahead: the LM head itself gives
token t + 1, head k gives token t + 1 + k. Drafting costs no model call: the hidden state comes
out of the forward pass that verified the previous round.
Shapes: `B` batch, `L` sequence, `D` hidden size, `K` heads, `V` vocabulary, `N` tree nodes.
"""

import time
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from specdec.kit.features import feature_model
from specdec.kit.stats import SpecStats

from .sampling import make_probs, sample_token
from .tree import commit_tree_path, tree_forward, verify_tree_greedy
from .verify import verify_speculation


class MedusaHeads(nn.Module):
    """K Medusa heads for a target of hidden size D; they share the target's LM head."""

    def __init__(self, hidden_size: int, num_heads: int):
        """hidden_size D >= 1, num_heads K >= 1 (ValueError otherwise, naming the value).

        Keeps `hidden_size`, `num_heads`, and `blocks`: K `nn.Linear(D, D)` (with bias), whose
        weights and biases start at zero, so that a fresh head k is exactly the LM head.
        """
        nn.Module.__init__(self)  # not super(): tests graft this method onto your class
        if hidden_size < 1 or num_heads < 1:
            raise ValueError(f"hidden_size={hidden_size} and num_heads={num_heads} must be >= 1")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.blocks = [nn.Linear(hidden_size, hidden_size) for _ in range(num_heads)]
        for block in self.blocks:  # zero init: each head starts as a copy of the LM head
            block.weight, block.bias = mx.zeros_like(block.weight), mx.zeros_like(block.bias)

    def __call__(self, hidden: mx.array, lm_head: Callable[[mx.array], mx.array]) -> mx.array:
        """Every head's logits from the target's hidden states.

        hidden: float [..., D], final-normed hidden states of the target. lm_head: the target's
        LM head, [..., D] -> [..., V]. Returns float [..., K, V]: entry [..., k - 1, :] is
        lm_head(h + silu(W_k h + b_k)), head k's logits for the token k + 1 places after h.
        ValueError, naming both sizes, if hidden's last axis is not D.
        """
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden size {hidden.shape[-1]} != the heads' hidden size {self.hidden_size}: "
                "the heads must be trained for this target"
            )
        residual = [hidden + nn.silu(block(hidden)) for block in self.blocks]
        return lm_head(mx.stack(residual, axis=-2))  # [..., K, D] -> [..., K, V]


def medusa_loss(
    heads: "MedusaHeads", hidden: mx.array, target_logprobs: mx.array, lm_head: Callable
) -> mx.array:
    """Self-distillation loss of each head against the frozen target's own predictions.

    hidden: float [B, L, D], the target's hidden states on a text. target_logprobs: float
    [B, L, V], the target's next-token log-probs on that text (row t: the law of token t + 1).
    Head k at position t predicts token t + 1 + k, whose target law is target_logprobs[:, t + k]:
    loss_k = mean over b and t in [0, L - k) of the cross-entropy
    -sum_v exp(target_logprobs[b, t + k, v]) * log softmax(head k's logits at [b, t])[v].
    Returns float32 [K]. ValueError if L <= K (head K would have no position to learn from).
    """
    B, L, _ = hidden.shape
    if L <= heads.num_heads:
        raise ValueError(f"sequence length {L} <= num_heads {heads.num_heads}: feed longer texts")
    logprobs = nn.log_softmax(heads(hidden, lm_head).astype(mx.float32), axis=-1)  # [B, L, K, V]
    p_target = mx.exp(target_logprobs.astype(mx.float32))
    losses = []
    for k in range(1, heads.num_heads + 1):
        cross = -(p_target[:, k:] * logprobs[:, : L - k, k - 1]).sum(axis=-1)  # [B, L - k]
        losses.append(cross.mean())
    return mx.stack(losses)


def medusa_tree(head_logits: mx.array, widths: Sequence[int]) -> tuple[list[int], list[int]]:
    """The draft tree of one position: every node at level d gets head d's top widths[d - 1].

    head_logits: float [K, V], the heads' logits at the last verified position. widths: one int
    >= 1 per level, at most K levels (ValueError otherwise). Level d (d = 1, 2, ...) reads head
    d; its tokens, most likely first, hang below *every* node of level d - 1 (the heads do not
    see the path, so each level is the same top list). Returns (tokens, parents) flattened in
    level order, children of one node consecutive and in the order of their parents (as
    `build_draft_tree` does), parent -1 for level 1. All widths 1: the chain of argmaxes.
    """
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1 or len(widths) > head_logits.shape[0]:
        raise ValueError(
            f"widths {widths} must be 1 to {head_logits.shape[0]} ints >= 1: one per head"
        )
    # One sort and one host sync for all levels; stable, so ties keep the lower id first.
    ranked = mx.argsort(-head_logits[: len(widths)], axis=-1)[:, : max(widths)].tolist()
    tokens, parents, level = [], [], [-1]
    for d, width in enumerate(widths):
        next_level = []
        for parent in level:
            for token in ranked[d][:width]:
                next_level.append(len(tokens))
                tokens.append(token)
                parents.append(parent)
        level = next_level
    return tokens, parents


def medusa_generate(
    target_model,
    heads: "MedusaHeads",
    prompt_tokens: mx.array,
    max_tokens: int,
    eos_token_ids: Sequence[int] = (),
    stats: Optional[SpecStats] = None,
    widths: Sequence[int] = (1, 1, 1),
) -> Iterator[tuple[int, bool]]:
    """Greedy decoding with Medusa heads: exactly the target's greedy output, one call a round.

    target_model: an mlx-lm llama-family model (or a `FeatureModel`). prompt_tokens: int [L],
    L >= 1 (ValueError if empty). widths: the tree's widths (`medusa_tree`), 1 to K levels.
    Round 1 is the prefill: one call on the prompt, no drafts. Every later round feeds the last
    new token with `medusa_tree` of the heads at the last verified hidden state hanging off it,
    in ONE `tree_forward` call of the feature model; then `verify_tree_greedy`,
    `commit_tree_path`, and the hidden state of the last accepted node (or of the fed token
    when none is) drafts the next round. No other model call: drafting is the heads alone.
    Each round uses the first max(0, min(len(widths), remaining - 1)) levels, remaining =
    max_tokens - tokens yielded so far (0 levels: a plain round). Fresh cache per call.
    eos_token_ids: stop right after yielding one of these. stats: record_round(num_nodes,
    len(path), emitted) once per target call (draft_calls stays 0).
    Yields (token, from_draft): True for accepted tree tokens, False for the target's token.
    """
    prompt_tokens = mx.array(prompt_tokens, dtype=mx.int32).reshape(-1).tolist()
    if not prompt_tokens:
        raise ValueError("the prompt is empty: Medusa decoding needs at least one token")
    fm = feature_model(target_model)
    cache, eos = make_prompt_cache(fm.model), set(eos_token_ids)
    unseen, hidden, emitted = prompt_tokens, None, 0
    while emitted < max_tokens:
        start = time.perf_counter()
        levels = min(len(widths), max_tokens - emitted - 1) if hidden is not None else 0
        tokens, parents = [], []
        if levels > 0:
            tokens, parents = medusa_tree(heads(hidden, fm.lm_head), widths[:levels])
        drafted = time.perf_counter()
        U = len(unseen)  # unseen tokens as a chain, the tree hanging off the last one
        chained = list(range(-1, U - 1)) + [U - 1 if p == -1 else p + U for p in parents]
        logits = tree_forward(fm, cache, unseen + tokens, chained)
        path, new_tokens = verify_tree_greedy(tokens, parents, logits[U - 1 :])
        commit_tree_path(cache, len(tokens), path)
        hidden = fm.hidden[0, U + path[-1] if path else U - 1]
        unseen = new_tokens[-1:]
        out = []
        for i, token in enumerate(new_tokens[: max_tokens - emitted]):
            out.append((token, i < len(path)))
            if token in eos:
                break
        emitted += len(out)
        if stats is not None:
            stats.record_round(len(tokens), len(path), len(out))
            stats.draft_time_s += drafted - start
            stats.verify_time_s += time.perf_counter() - drafted
        yield from out
        if out and out[-1][0] in eos:
            return


def medusa_sample_generate(
    target_model,
    heads: "MedusaHeads",
    prompt_tokens: mx.array,
    max_tokens: int,
    key: mx.array,
    temperature: float = 1.0,
    num_drafts: Optional[int] = None,
    eos_token_ids: Sequence[int] = (),
    stats: Optional[SpecStats] = None,
) -> Iterator[tuple[int, bool]]:
    """Sampled decoding with Medusa heads: every token distributed exactly as the target's.

    A chain of num_drafts (default K, at most K; ValueError otherwise) drafts per round: draft
    i is drawn from q_i = make_probs(head i's logits, temperature) at the last verified hidden
    state (independently of the other drafts: head i never sees them), then the round's ONE
    target call scores [last new token, drafts] and `verify_speculation(drafts, logits, q,
    temperature, key)` accepts a prefix and draws the correction or bonus. The cache drops
    the rejected drafts; the hidden state at the last accepted one drafts next round. Round 1
    is the prefill (no drafts; its token is sample_token(make_probs(logits, temperature))).
    Rounds draft at most remaining - 1 tokens, as `medusa_generate` does.
    key: all randomness; the round's keys come from mx.random.split, so one key gives one text.
    temperature 0 is greedy (one-hot drafts), temperature > 0 needs nothing else.
    stats, eos_token_ids, yields: as `medusa_generate` (chain: num_nodes = drafts).
    """
    prompt_tokens = mx.array(prompt_tokens, dtype=mx.int32).reshape(-1).tolist()
    if not prompt_tokens:
        raise ValueError("the prompt is empty: Medusa decoding needs at least one token")
    num_drafts = heads.num_heads if num_drafts is None else num_drafts
    if not 1 <= num_drafts <= heads.num_heads:
        raise ValueError(f"num_drafts={num_drafts} must be in [1, {heads.num_heads}]: one per head")
    fm = feature_model(target_model)
    cache, eos = make_prompt_cache(fm.model), set(eos_token_ids)
    unseen, hidden, emitted = prompt_tokens, None, 0
    while emitted < max_tokens:
        key, key_draft, key_verify = mx.random.split(key, 3)
        levels = min(num_drafts, max_tokens - emitted - 1) if hidden is not None else 0
        drafts, q_draft = [], None
        if levels > 0:
            q_draft = make_probs(heads(hidden, fm.lm_head)[:levels], temperature)  # [n, V]
            drafts = sample_token(q_draft, key_draft).tolist()
        logits = fm(mx.array(unseen + drafts)[None], cache=cache)[0, len(unseen) - 1 :]
        if levels > 0:
            n, new_tokens = verify_speculation(mx.array(drafts), logits, q_draft, temperature,
                                               key_verify)
        else:
            p_next = make_probs(logits[-1], temperature)
            n, new_tokens = 0, [sample_token(p_next, key_verify).item()]
        trim_prompt_cache(cache, len(drafts) - n)
        hidden = fm.hidden[0, len(unseen) - 1 + n]
        unseen = new_tokens[-1:]
        out = []
        for i, token in enumerate(new_tokens[: max_tokens - emitted]):
            out.append((token, i < n))
            if token in eos:
                break
        emitted += len(out)
        if stats is not None:
            stats.record_round(len(drafts), n, len(out))
        yield from out
        if out and out[-1][0] in eos:
            return
