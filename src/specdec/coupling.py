"""Week 5 Day 1 — drafter-invariant speculative sampling: a seed means the same text.

Exact rejection sampling (Week 2 Day 3) makes speculative output *distributed* as the target's,
but which tokens one seed gives depends on the draft, on K, on the batch and on the controller.
Here the target samples the token at position t as argmax(log p_t + g_t) (Gumbel-max), with
noise g_t that depends only on (seed, t); the draft proposes argmax(log q_t + g_t) with the
*same* noise, and a draft is accepted exactly when it equals the target's own token. Every
emitted token is then the plain seeded token, whatever proposed the drafts (Daliri, Musco and
Suresh 2024). Shapes: `B` batch, `L` tokens fed, `K` draft length, `V` vocabulary. A position
t is absolute: the index of the token in its row's sequence, prompt included (0-based).
"""

import time
from typing import Iterator, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from specdec.kit.models import model_vocab_size
from specdec.kit.stats import SpecStats

from .batched import SHARED_PADDING_LIMIT, filter_rows, left_pad, make_batch_cache, rollback_rows
from .sampling import make_probs
from .speculative import commit_round


def gumbel_noise(seed: int, positions: Sequence[int], vocab_size: int) -> mx.array:
    """Standard Gumbel noise for absolute positions: float32 [N, V], N = len(positions).

    Row j depends only on (seed, positions[j]) (and V): never on the other positions asked for,
    on their order, or on who asks (round, K, row, batch) — and never on global random state.
    Different seeds or positions give independent rows, each V independent Gumbel(0, 1) draws.
    Raises ValueError unless 0 <= seed < 2**32 and 0 <= t < 2**32 for every position t.
    """
    raise NotImplementedError(
        "Week 5 Day 1 Task 1: gumbel_noise — see book/src/week5-01-drafter-invariant-sampling.md"
    )


def gumbel_sample(probs: mx.array, noise: mx.array) -> mx.array:
    """Gumbel-max sampling: argmax(log probs + noise) over the last axis.

    probs: float [..., V], rows summing to 1, from `make_probs(logits, temperature, top_k,
    top_p)`: a token that temperature 0, top-k or top-p filtered out has probability 0, log 0 =
    -inf, and is never chosen. noise: float [..., V] standard Gumbel (`gumbel_noise`).
    Returns int32 [...]. With independent noise per call the token is distributed exactly as
    probs (the law of `sample_token`); a one-hot row returns its hot index whatever the noise.
    """
    raise NotImplementedError(
        "Week 5 Day 1 Task 2: gumbel_sample — see book/src/week5-01-drafter-invariant-sampling.md"
    )


def seeded_generate(
    model,
    prompt_tokens: mx.array,
    max_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Plain seeded decoding: the text a seed means, which every coupled loop must reproduce.

    prompt_tokens: int [L], L >= 1 (ValueError if empty). One prefill call, then one call per
    token. The token at absolute position t (t = L + j for the j-th output) is
    gumbel_sample(make_probs(logits_t, temperature, top_k, top_p), gumbel_noise(seed, [t], V)[0]).
    Stops after max_tokens tokens, or right after yielding one of eos_token_ids. Yields ints.
    """
    raise NotImplementedError(
        "Week 5 Day 1 Task 2: seeded_generate — see book/src/week5-01-drafter-invariant-sampling.md"
    )


def coupled_draft(
    draft_model,
    cache: list,
    inputs: mx.array,
    noise: mx.array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> mx.array:
    """Propose K = noise.shape[-2] tokens per row with the target's noise: one draft call each.

    inputs: int [B, U], U >= 1, every row's unseen tokens, right-aligned (B = 1 for a single
    stream on a plain cache; a `BatchKVCache` for several rows). noise: float [B, K, V], row b's
    noise for the positions of its K drafts. Draft i of row b is
    gumbel_sample(make_probs(draft logits, temperature, top_k, top_p), noise[b, i]).
    Returns int32 [B, K]. Cache: grows by U + K - 1 — inputs, then the drafts except the last
    (as Week 2's `draft_generation`: if accepted, the next round feeds it).
    """
    raise NotImplementedError(
        "Week 5 Day 1 Task 3: coupled_draft — see book/src/week5-01-drafter-invariant-sampling.md"
    )


def verify_coupled(
    draft_tokens: mx.array,
    target_logits: mx.array,
    noise: mx.array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[int, list[int]]:
    """The coupled accept rule: keep a draft exactly when the target's own token agrees.

    draft_tokens: int [K] (from any drafter). target_logits: float [K + 1, V], row i for the
    position of d_(i+1), row K the bonus position. noise: float [K + 1, V], the noise of those
    K + 1 positions. The target's token at row i is y_i = gumbel_sample(make_probs(
    target_logits[i], temperature, top_k, top_p), noise[i]). Returns (n, tokens): n in [0, K] the
    longest prefix with d_i == y_i; tokens = [y_0, ..., y_n] (python ints, length n + 1): the
    accepted drafts, then the target's token at the first disagreement, or the bonus y_K.
    """
    raise NotImplementedError(
        "Week 5 Day 1 Task 3: verify_coupled — see book/src/week5-01-drafter-invariant-sampling.md"
    )


def coupled_generate(
    decoder,
    prompt_tokens: mx.array,
    max_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    controller=None,
    stats: Optional[SpecStats] = None,
) -> Iterator[tuple[int, bool]]:
    """Speculative decoding whose output is `seeded_generate`'s, token for token.

    decoder: a `SpeculativeDecoder` or a `DrafterDecoder` (caches `reset()` first). With a draft
    model, draft with `coupled_draft` on the round's noise; any other drafter (n-gram: it keeps
    no model) is asked for its proposals with `decoder.draft_generation(unseen, K, 0.0)`; its q
    is never needed. controller: None (K = decoder.lookahead every round) or an object with
    `lookahead` and `update(K, n, draft_s, verify_s)` (a FallbackController; K = 0 is a plain
    round: one target call, one token, update(0, 0, None, seconds)); a plain first round goes to
    its `observe_prefill(L, seconds)` when it has one; draft seconds are None in a round where
    the draft caught up on more than 2 tokens (prefill time is not K draft steps).
    Each round: t = len(committed); K = min(chosen K, tokens still wanted - 1); noise =
    gumbel_noise(seed, [t .. t + K], V); the draft catches up on every committed token its cache
    lacks; one target call; `verify_coupled`; `commit_round`. Yields (token, from_draft) as
    `speculative_generate`; stops at max_tokens or right after an EOS. stats: as there
    (record_round per round, plain rounds as record_round(0, 0, 1)).
    """
    raise NotImplementedError(
        "Week 5 Day 1 Task 4: coupled_generate — see book/src/week5-01-drafter-invariant-sampling.md"
    )


def batched_coupled_decode(
    batch_prompts: list[list[int]],
    seeds: Sequence[int],
    draft_model,
    target_model,
    max_tokens: int = 100,
    lookahead: int = 4,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    controller=None,
    stats: Optional[SpecStats] = None,
) -> list[list[int]]:
    """Batched coupled decoding: row i is `seeded_generate(batch_prompts[i], seed=seeds[i])`.

    B >= 1 non-empty prompts (`left_pad`), one seed per row (ValueError if the counts differ),
    whatever the batch-mates. Caches: `make_batch_cache` for both models; per round the target
    holds each row's committed sequence C minus its last token, the draft C minus its last
    `lag` tokens (lag = 2, plus one per plain round since the last speculative one — the same
    for every row, so the draft's catch-up inputs are rectangular [B, lag]). K = controller's
    lookahead (None: `lookahead`), at most r - 1 (r = the most tokens a live row still wants);
    K = 0 is a plain batched round (a plain first round also feeds the draft the padded prompts,
    so that its cache is never empty). The first round prefills the padded prompts.
    Speculative round: row b's noise for its positions t_b .. t_b + K (t_b = the length of its
    committed sequence), `coupled_draft`, one target call on [newest token, drafts],
    `verify_coupled` per row, `rollback_rows` by K - n_b on both caches. Rows leave at EOS or
    max_tokens (`filter_rows`). controller.update(K, [n_b ...], ...) per speculative round
    (draft seconds None while the draft catches up on more than 2 tokens), update(0, 0, None,
    seconds) per plain one — observe_prefill(L, seconds) instead for a plain first round, when
    the controller has it. stats: one record_round per live row per round. Returns B lists of ints, in the order of batch_prompts.
    """
    raise NotImplementedError(
        "Week 5 Day 1 Task 5: batched_coupled_decode — see book/src/week5-01-drafter-invariant-sampling.md"
    )
