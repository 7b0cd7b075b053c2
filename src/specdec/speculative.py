"""Week 2 Day 4 — the full speculative decoding loop.

One round: the draft proposes K tokens; the target scores [unseen committed tokens, d_1..d_K]
in one call; verification keeps n drafts plus one target token; both caches are rolled back to
the committed sequence. Repeat until max_tokens or EOS.
"""

from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

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
    raise NotImplementedError(
        "Week 2 Day 4 Task 1: commit_round — see book/src/week2-04-full-loop.md"
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
    raise NotImplementedError(
        "Week 2 Day 4 Task 2: speculative_generate — see book/src/week2-04-full-loop.md"
    )
