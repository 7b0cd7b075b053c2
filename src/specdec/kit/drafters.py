"""The provided half of Week 3 Day 3's `drafters.py`, shared by the student tree and the reference.

Both trees' `drafters.py` import these and re-export them, so `specdec.drafters.TokenHistory`
and `specdec_ref.drafters.TokenHistory` are this one class. What stays in each tree is the
exercise: `find_ngram_continuation`, `NgramDrafter.draft` and `DrafterDecoder`.

Shapes: `K` draft length, `V` vocabulary, `L` tokens fed.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Protocol

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from specdec.kit.models import model_vocab_size


class Drafter(Protocol):
    """What a decoder needs from a drafter (a `typing.Protocol`: any class with these works).

    Attributes:
        vocab_size  V, or None while unknown (a `DrafterDecoder` fills it in from the target)
        cache       list of trimmable per-layer caches ([] for a drafter that keeps no state).
                    Same invariant as Week 2's draft cache: after `draft`, it holds everything
                    fed so far plus draft_tokens[:-1]; `commit_round` trims the rejected drafts.
    """

    vocab_size: Optional[int]
    cache: list

    def reset(self) -> None:
        """Forget everything: a new prompt starts."""
        ...

    def draft(
        self,
        unseen_tokens: mx.array,
        num_tokens: int,
        temperature: float = 0.0,
        key: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array]:
        """Feed unseen_tokens (int [L], L >= 1) and propose 1 <= k' <= num_tokens tokens.

        Returns (draft_tokens int32 [k'], q_draft float32 [k', V]), q_draft[i] the distribution
        draft_tokens[i] was drawn from, as in Week 2's `draft_generation`.
        """
        ...


class ModelDrafterBase:
    """A draft model behind the `Drafter` interface, drafting with Week 2's loop.

    Each tree's `ModelDrafter` subclasses this and sets `decoder_class` to its own Week 2
    `SpeculativeDecoder`, so the student's `ModelDrafter` runs the student's `draft_generation`.
    """

    decoder_class: type = None  # the tree's SpeculativeDecoder (Week 2 Day 1)

    def __init__(self, draft_model):
        """Wrap `draft_model`; vocab_size comes from `model_vocab_size`."""
        self.draft_model = draft_model
        self.vocab_size = model_vocab_size(draft_model)
        self.reset()

    def reset(self) -> None:
        """A fresh, empty KV cache."""
        self.cache = make_prompt_cache(self.draft_model)

    def draft(
        self,
        unseen_tokens: mx.array,
        num_tokens: int,
        temperature: float = 0.0,
        key: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array]:
        """Week 2 Day 1's `SpeculativeDecoder.draft_generation`, on this drafter's model and cache."""
        if self.decoder_class is None:
            raise TypeError("ModelDrafterBase has no decoder_class: use specdec.drafters.ModelDrafter "
                            "(or specdec_ref.drafters.ModelDrafter), which sets it")
        # draft_generation only reads the draft model and its cache: lend it ours.
        view = SimpleNamespace(
            draft_model=self.draft_model, draft_cache=self.cache, vocab_size=self.vocab_size
        )
        return self.decoder_class.draft_generation(view, unseen_tokens, num_tokens, temperature, key)


class TokenHistory:
    """The n-gram drafter's "KV cache": the token ids it was fed, trimmable like mlx-lm's caches.

    `commit_round` trims it exactly as it trims a model's cache, so after each round it holds the
    committed sequence minus the tokens the next `draft` call will feed.
    """

    def __init__(self):
        """Start empty."""
        self.tokens: list[int] = []

    @property
    def offset(self) -> int:
        """How many tokens it holds (mlx-lm caches call this `offset`)."""
        return len(self.tokens)

    def is_trimmable(self) -> bool:
        """Always: dropping the last n tokens is a list slice."""
        return True

    def trim(self, n: int) -> int:
        """Drop the last n tokens (at most all of them); return how many were dropped."""
        n = min(max(n, 0), len(self.tokens))
        del self.tokens[len(self.tokens) - n :]
        return n


class NgramDrafterBase:
    """`NgramDrafter`'s constructor, `reset` and `history`; each tree's `NgramDrafter` adds `draft`.

    Attributes: max_ngram, min_ngram, vocab_size (V or None), cache = [TokenHistory()].
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, vocab_size: Optional[int] = None):
        """Raises ValueError unless 1 <= min_ngram <= max_ngram."""
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}"
            )
        self.max_ngram, self.min_ngram, self.vocab_size = max_ngram, min_ngram, vocab_size
        self.reset()

    def reset(self) -> None:
        """An empty history."""
        self.cache = [TokenHistory()]

    @property
    def history(self) -> list[int]:
        """The tokens in the cache: `cache[0].tokens`, the list `draft` extends."""
        return self.cache[0].tokens


class DrafterDecoderBase:
    """`DrafterDecoder`'s `draft_cache` property; each tree's `DrafterDecoder` adds the rest."""

    @property
    def draft_cache(self) -> list:
        """The drafter's cache list, `drafter.cache` (what `commit_round` trims)."""
        return self.drafter.cache
