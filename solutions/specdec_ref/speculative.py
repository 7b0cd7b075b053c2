"""Week 2 Day 4 — the full speculative decoding loop.

One round: the draft proposes K tokens; the target scores [unseen committed tokens, d_1..d_K]
in one call; verification keeps n drafts plus one target token; both caches are rolled back to
the committed sequence. Repeat until max_tokens or EOS.
"""

import time
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from specdec.kit.stats import SpecStats

from .verify import verify_speculation


def commit_round(decoder, draft_tokens: list[int], num_accepted: int, new_token: int) -> list[int]:
    """Roll both caches back to the committed sequence after one verified round.

    Before the call (K = len(draft_tokens), S = the committed sequence before this round):
      - the target cache holds S + draft_tokens (the target scored all K drafts);
      - the draft cache holds S + draft_tokens[:-1] (see `draft_generation`).
    The round committed draft_tokens[:num_accepted] + [new_token]. Afterwards the target cache
    holds S + draft_tokens[:num_accepted] — everything committed except new_token, which no
    model has seen yet — and so does the draft cache, except when all K were accepted: it then
    holds S + draft_tokens[:-1], lacking the last draft it never fed. Trim each cache by the
    right amount (never re-run a model).
    Returns the tokens the draft must be fed next round: [new_token], or
    [draft_tokens[-1], new_token] when all K were accepted (the draft never saw its last one).
    Raises ValueError if a cache cannot be trimmed by the amount needed (for example a
    sliding-window cache that has wrapped): continuing would silently corrupt the output.
    """
    K = len(draft_tokens)
    # The target scored all K drafts: drop the rejected ones.
    _trim(decoder.target_cache, K - num_accepted, "target")
    if num_accepted == K:
        # The draft never fed its own last proposal: it is the first token of the next round.
        return [draft_tokens[-1], new_token]
    _trim(decoder.draft_cache, K - 1 - num_accepted, "draft")
    return [new_token]


def _trim(cache: list, num_tokens: int, role: str) -> None:
    """Trim every layer by num_tokens, or fail loudly: a half-rolled-back cache is a wrong answer."""
    if num_tokens == 0 or not cache:
        return
    if not can_trim_prompt_cache(cache) or trim_prompt_cache(cache, num_tokens) != num_tokens:
        raise ValueError(
            f"the {role} cache cannot drop its last {num_tokens} tokens (a sliding-window cache "
            "that has wrapped?): speculative decoding needs trimmable KV caches"
        )


def speculative_generate(
    decoder,
    prompt_tokens: mx.array,
    max_tokens: int,
    temperature: float = 0.0,
    key: Optional[mx.array] = None,
    eos_token_ids: Sequence[int] = (),
    stats: Optional[SpecStats] = None,
    on_round: Optional[Callable[[int, int], None]] = None,
) -> Iterator[tuple[int, bool]]:
    """Stream tokens from the target's distribution, K drafts at a time.

    decoder: a `SpeculativeDecoder` (its caches are `reset()` first; `decoder.lookahead` is
        read at the start of every round, so it may change between rounds).
    prompt_tokens: int [L], L >= 1 (ValueError if empty). max_tokens: yield at most this many.
    temperature: 0 gives exactly the target's greedy output; > 0 needs `key` and gives samples
        distributed exactly as the target's (split the key per round for drafting and verifying).
    eos_token_ids: stop right after yielding one of these, even inside an accepted block.
    stats: if given, filled in place: `stats.record_round(K, n, emitted)` once per target call,
        with this round's K, verification's n (even drafts EOS cut off) and the tokens yielded
        in this round (not the running total); add the draft forward calls to
        `stats.draft_calls`. on_round: if given, called once per round as
        on_round(num_drafted, num_accepted), the last round cut short by EOS or max_tokens
        included — Week 3's adaptive lookahead hooks in here.
    max_tokens=0 yields nothing and runs no round (no model call).
    Yields (token, from_draft) as soon as a round is verified: from_draft is True for accepted
    draft tokens and False for the target's correction or bonus token.
    Each round: draft K tokens, one target call on the tokens it has not seen + the K drafts
    (the first call is also the prompt's prefill), `verify_speculation`, then `commit_round`.
    A drafter may return fewer than the K tokens asked for (at least one; Week 3's n-gram
    drafter does): use the number of drafts it returned.
    """
    prompt_tokens = mx.array(prompt_tokens, dtype=mx.int32).reshape(-1)
    if prompt_tokens.size == 0:
        raise ValueError("the prompt is empty: speculative decoding needs at least one token")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=mx.random.key(seed)")
    decoder.reset()
    eos = set(eos_token_ids)
    draft_unseen, target_unseen = prompt_tokens, prompt_tokens
    emitted = 0
    while emitted < max_tokens:
        if decoder.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {decoder.lookahead}")
        # A round commits up to K + 1 tokens: never draft what max_tokens would cut off.
        K = max(1, min(decoder.lookahead, max_tokens - emitted - 1))
        key_draft = key_verify = None
        if temperature > 0:
            key, key_draft, key_verify = mx.random.split(key, 3)

        start = time.perf_counter()
        draft_tokens, q_draft = decoder.draft_generation(draft_unseen, K, temperature, key_draft)
        K = draft_tokens.shape[0]  # a drafter may propose fewer tokens than asked (shapes are known lazily)

        # One target call scores every draft (and, on the first round, prefills the prompt).
        # Python builds the target's graph while the drafts are still being computed: no host
        # sync between drafting and verifying (mlx-lm's loop does the same).
        built = time.perf_counter()
        target_inputs = mx.concatenate([target_unseen, draft_tokens])
        logits = decoder.target_model(target_inputs[None], cache=decoder.target_cache)
        target_logits = logits[0, -(K + 1) :]
        build_s = time.perf_counter() - built
        if stats is not None:
            # The draft/verify split (adaptive K's goodput policy reads it): wait for the drafts
            # only, then move the target's graph-building time over to the verify side.
            mx.eval(draft_tokens)
        drafted = time.perf_counter() - build_s
        num_accepted, tokens = verify_speculation(
            draft_tokens, target_logits, q_draft, temperature, key_verify
        )
        verified = time.perf_counter()

        new_token = tokens[-1]
        draft_unseen = mx.array(
            commit_round(decoder, draft_tokens.tolist(), num_accepted, new_token), dtype=mx.int32
        )
        target_unseen = mx.array([new_token], dtype=mx.int32)

        # What the caller gets: cut at max_tokens, and right after an EOS.
        out = []
        for i, token in enumerate(tokens[: max_tokens - emitted]):
            out.append((token, i < num_accepted))
            if token in eos:
                break
        emitted += len(out)
        if stats is not None:
            stats.record_round(K, num_accepted, len(out))
            stats.draft_calls += K
            stats.draft_time_s += drafted - start
            stats.verify_time_s += verified - drafted
        if on_round is not None:
            on_round(K, num_accepted)
        yield from out
        if out and out[-1][0] in eos:
            return
