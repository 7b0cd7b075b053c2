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
    if num_tokens < 1:
        return []
    length = len(history)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n < 1 or length <= n:
            continue
        suffix = history[-n:]
        # Walk back from the latest earlier start: the most recent context is the most relevant.
        for i in range(length - n - 1, -1, -1):
            if history[i : i + n] == suffix:
                extended = list(history)
                for t in range(num_tokens):
                    extended.append(extended[i + n + t])
                return extended[length:]
    return []


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
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if self.vocab_size is None:
            raise ValueError(
                "NgramDrafter.vocab_size is None: set vocab_size, or wrap the drafter in a "
                "DrafterDecoder (it copies V from the target)"
            )
        unseen = mx.array(unseen_tokens).reshape(-1).tolist()
        if not unseen:
            raise ValueError("draft needs at least one unseen token to append to the history")
        self.history.extend(unseen)
        proposal = find_ngram_continuation(self.history, self.max_ngram, self.min_ngram, num_tokens)
        if not proposal:
            proposal = [self.history[-1]]  # nothing to look up: a cheap guess, one token
        draft_tokens = mx.array(proposal, dtype=mx.int32)
        # A deterministic proposal is a draw from a one-hot q: verification stays exact.
        q_draft = (mx.arange(self.vocab_size)[None] == draft_tokens[:, None]).astype(mx.float32)
        self.history.extend(proposal[:-1])
        return draft_tokens, q_draft


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
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        target_vocab = model_vocab_size(target_model)
        if drafter.vocab_size is None:
            drafter.vocab_size = target_vocab  # a model-free drafter learns V from its target
        elif drafter.vocab_size != target_vocab:
            raise ValueError(
                f"drafter vocab {drafter.vocab_size} != target vocab {target_vocab}: the drafter "
                "must propose token ids of the target's tokenizer"
            )
        self.drafter, self.target_model = drafter, target_model
        self.lookahead, self.vocab_size = lookahead, target_vocab
        self.reset()
        for role, cache in (("drafter", self.draft_cache), ("target", self.target_cache)):
            stuck = [type(c).__name__ for c in cache if not c.is_trimmable()]
            if stuck:
                raise ValueError(
                    f"the {role}'s cache has layers that cannot be trimmed ({stuck[0]}): "
                    "rejected drafts must be rolled back; use trimmable caches such as KVCache"
                )

    def reset(self) -> None:
        """Reset the drafter and give the target a fresh, empty cache."""
        self.drafter.reset()
        self.target_cache = make_prompt_cache(self.target_model)

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
        draft_tokens, q_draft = self.drafter.draft(prompt_tokens, num_tokens, temperature, key)
        k = draft_tokens.shape[0]
        if not 1 <= k <= num_tokens or tuple(q_draft.shape) != (k, self.vocab_size):
            raise ValueError(
                f"the drafter returned {k} tokens and q_draft of shape {tuple(q_draft.shape)} "
                f"for num_tokens={num_tokens}: expected 1..{num_tokens} tokens and q [k', "
                f"{self.vocab_size}]"
            )
        return draft_tokens, q_draft
