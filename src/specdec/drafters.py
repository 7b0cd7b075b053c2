"""Week 3 Day 3 — drafting without a draft model: prompt lookup (n-gram) drafting.

Verification is exact for *any* proposal as long as we hand it the distribution q the proposal
came from. So the drafter can be anything: a small model, or a lookup in the text so far. Both
sit behind one interface, `Drafter`, and `DrafterDecoder` turns any drafter plus a target model
into the decoder Week 2's `speculative_generate` expects.

Shapes: `K` draft length, `V` vocabulary, `L` tokens fed.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

# Provided code lives once, in the kit; re-exported here (specdec.drafters.TokenHistory, ...).
from specdec.kit.drafters import (
    Drafter,
    DrafterDecoderBase,
    ModelDrafterBase,
    NgramDrafterBase,
    TokenHistory,
)
from specdec.kit.models import model_vocab_size

from .draft import SpeculativeDecoder

class ModelDrafter(ModelDrafterBase):
    """A draft model behind the `Drafter` interface: Week 2's drafting loop (provided).

    `ModelDrafter(draft_model)`: vocab_size from the model, cache = its KV cache; `draft` runs
    this tree's `SpeculativeDecoder.draft_generation` (the code is in `specdec.kit.drafters`).
    """

    decoder_class = SpeculativeDecoder


def find_ngram_continuation(
    history: list[int], max_ngram: int, min_ngram: int, num_tokens: int
) -> list[int]:
    """Prompt lookup: what followed the last time the text ended the way it ends now?

    For n = max_ngram down to min_ngram: let s = history[-n:] (skip n if len(history) <= n).
    Find the most recent start i < len(history) - n with history[i : i + n] == s (the suffix
    itself, i = len(history) - n, does not count). On the first n that matches, copy forward
    from j = i + n: out[t] = (history + out)[j + t] for t = 0 .. num_tokens - 1 — an
    overlapping copy, so a match close to the end repeats the last tokens periodically and
    always yields num_tokens tokens. No match for any n (or num_tokens < 1): return [].
    history: python ints. Returns python ints, len == num_tokens or 0.
    """
    raise NotImplementedError(
        "Week 3 Day 3 Task 1: find_ngram_continuation — see book/src/week3-03-ngram-drafting.md"
    )


class NgramDrafter(NgramDrafterBase):
    """Drafts by prompt lookup in the committed text; no model, no weights.

    `NgramDrafter(max_ngram=3, min_ngram=1, vocab_size=None)`. Provided (`NgramDrafterBase` in
    `specdec.kit.drafters`): the constructor (ValueError unless 1 <= min_ngram <= max_ngram),
    `reset()` (an empty history) and the property `history` (the token list in `cache[0]`).
    Attributes: max_ngram, min_ngram, vocab_size (V or None), cache = [TokenHistory()].
    Proposals are deterministic, so q_draft is one-hot on each proposed token.
    """

    def draft(
        self,
        unseen_tokens: mx.array,
        num_tokens: int,
        temperature: float = 0.0,
        key: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array]:
        """Append unseen_tokens (int [L], L >= 1) to `history`, then propose.

        Proposal: `find_ngram_continuation(history, max_ngram, min_ngram, num_tokens)`, or, when
        it finds nothing, the single token [history[-1]] (repeat the last token: k' = 1).
        temperature and key are ignored: the proposal is deterministic at any temperature.
        Returns (draft_tokens int32 [k'], q_draft float32 [k', V]) with q_draft one-hot:
        q_draft[i, draft_tokens[i]] = 1. Afterwards `history` also holds draft_tokens[:-1] (the
        cache invariant; `commit_round` trims the rejected ones).
        Raises ValueError if num_tokens < 1, if unseen_tokens is empty, or if vocab_size is None
        ("set vocab_size, or wrap the drafter in a DrafterDecoder").
        """
        raise NotImplementedError(
            "Week 3 Day 3 Task 2: NgramDrafter.draft — see book/src/week3-03-ngram-drafting.md"
        )


class DrafterDecoder(DrafterDecoderBase):
    """Any `Drafter` plus a target model, as the decoder `speculative_generate` expects.

    Attributes: drafter, target_model, lookahead (K), vocab_size (V), target_cache; the
    property `draft_cache` is `drafter.cache` (so `commit_round` trims the drafter's state;
    provided by `DrafterDecoderBase` in `specdec.kit.drafters`).
    """

    def __init__(self, drafter: "Drafter", target_model, lookahead: int = 4):
        """Check the pair and create fresh caches with `self.reset()`.

        V = model_vocab_size(target_model). If drafter.vocab_size is None, set it to V; if it
        differs from V, raise ValueError ("drafter vocab X != target vocab Y: ..."). Also raise
        ValueError if lookahead < 1, or if a layer of the target's or the drafter's cache is
        not trimmable (checked after reset).
        """
        raise NotImplementedError(
            "Week 3 Day 3 Task 3: DrafterDecoder.__init__ — see book/src/week3-03-ngram-drafting.md"
        )

    def reset(self) -> None:
        """Reset the drafter and give the target a fresh, empty cache."""
        raise NotImplementedError(
            "Week 3 Day 3 Task 3: DrafterDecoder.reset — see book/src/week3-03-ngram-drafting.md"
        )

    def draft_generation(
        self,
        prompt_tokens: mx.array,
        num_tokens: int,
        temperature: float = 0.0,
        key: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array]:
        """`drafter.draft(prompt_tokens, num_tokens, temperature, key)`, checked.

        Returns its (draft_tokens int32 [k'], q_draft float32 [k', V]); raises ValueError if k'
        is not in [1, num_tokens] or q_draft's shape is not [k', V].
        """
        raise NotImplementedError(
            "Week 3 Day 3 Task 3: DrafterDecoder.draft_generation — see book/src/week3-03-ngram-drafting.md"
        )
