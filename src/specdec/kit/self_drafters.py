"""Drafts the target makes itself, behind Week 3 Day 3's `Drafter` interface (provided code).

Week 5 Day 2 decodes with Medusa heads in a loop of its own (`medusa_generate`). Here the same
heads become a `Drafter`, so that `DrafterDecoder(MedusaDrafter(heads, fm), fm)` runs in every
loop of the course unchanged: `speculative_generate` (greedy and exact sampling), Week 4's
`fallback_generate` with its controller, and Week 5 Day 1's coupled rule.

    fm = feature_model(target)                       # logits as usual, hidden states kept
    drafter = MedusaDrafter(heads, fm)
    decoder = DrafterDecoder(drafter, fm, lookahead=3)
    for token, from_draft in speculative_generate(decoder, prompt, 64): ...

Drafting makes no model call: the drafts come from the heads at the target's hidden state of
the last verified position, read from `fm.hidden` of the target's previous call. Which row of
that call is the last verified position follows from how `commit_round` trimmed the drafter's
cache (`PositionCache`: it counts positions, as a KV cache would).
Layer skipping needs nothing new: Day 4's `LayerSkipDrafter` already is a `Drafter`.
Shapes: `K` drafts, `V` vocabulary, `D` hidden size, `L` tokens fed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx

from specdec.kit.features import FeatureModel, hidden_size_of


class PositionCache:
    """A drafter's "KV cache" that only counts positions, trimmable like mlx-lm's caches.

    A Medusa drafter keeps no keys or values, but it must know how many tokens of the sequence
    it has been fed: `commit_round` trims it like any draft cache, so after a round `offset` is
    the committed length minus what the next `draft` call will feed.
    """

    def __init__(self):
        self.offset = 0

    def is_trimmable(self) -> bool:
        """Always: dropping positions is a subtraction."""
        return True

    def trim(self, n: int) -> int:
        """Drop the last n positions (at most all of them); return how many were dropped."""
        n = min(max(n, 0), self.offset)
        self.offset -= n
        return n


def check_heads_fit(heads: Any, target: Any) -> None:
    """ValueError, naming both sizes, if the Medusa heads read another hidden size than the
    target's."""
    hidden = hidden_size_of(target)
    if int(heads.hidden_size) != hidden:
        raise ValueError(
            f"the Medusa heads read hidden size {heads.hidden_size}, but the target's hidden "
            f"size is {hidden}: load heads trained for this target (--heads DIR), or train "
            "them with scripts/train_heads.py")


def one_hot(tokens: mx.array, vocab_size: int) -> mx.array:
    """float32 [k, V], row i one-hot on tokens[i]: the q of a deterministic proposal."""
    return (mx.arange(vocab_size)[None] == tokens[:, None]).astype(mx.float32)


@dataclass
class _Round:
    """What the drafter proposed last: the target call that verifies it is the next one."""

    calls: int  # fm.calls when the drafts were made
    draft_start: int  # absolute position of the first draft
    num_drafts: int


class MedusaDrafter:
    """Medusa heads as a `Drafter`: proposals from the target's own hidden state, no model call.

    `MedusaDrafter(heads, feature_target)`: heads are Week 5 Day 2's `MedusaHeads` (any module
    called as heads(hidden [D], lm_head) -> logits [K, V] with `num_heads` and `hidden_size`);
    feature_target is the `FeatureModel` the decoder verifies with (pass the same object to
    `DrafterDecoder`: the drafter reads its `.hidden` after each call).
    Attributes: heads, target (the FeatureModel), vocab_size (V), cache = [PositionCache()].

    `draft(unseen, num_tokens, temperature, key)` proposes min(num_tokens, K) tokens: head k's
    argmax (temperature 0) or a draw from q_k = softmax(head k's logits / temperature), all from
    the hidden state h of the token before unseen[-1] (the last verified position: the target
    predicted unseen[-1] from h, head k guesses the token k places after it). Before the target
    has run on this sequence there is no h: the drafter proposes unseen[-1] again (one token,
    one-hot q), a guess that costs nothing. Verification is exact whatever the drafts are.
    """

    def __init__(self, heads: Any, feature_target: FeatureModel):
        if not isinstance(feature_target, FeatureModel):
            raise TypeError(
                f"MedusaDrafter reads hidden states from a FeatureModel, got "
                f"{type(feature_target).__name__}: pass fm = specdec.kit.features.feature_model"
                "(target), and give the same fm to the DrafterDecoder")
        check_heads_fit(heads, feature_target)
        self.heads, self.target = heads, feature_target
        self.vocab_size: Optional[int] = None
        self.reset()

    def reset(self) -> None:
        """A new sequence: no positions, and no hidden state of this sequence yet."""
        self.cache = [PositionCache()]
        self._calls_at_reset = self.target.calls
        self._last: Optional[_Round] = None

    def _hidden_at(self, position: int) -> Optional[mx.array]:
        """The target's hidden state [D] at absolute `position`, from its last call, or None.

        The last call was either the verification of our last drafts (its inputs end with them)
        or another call (a plain round, the prompt's prefill), whose inputs end at `position`.
        """
        fm = self.target
        if fm.hidden is None or fm.calls == self._calls_at_reset or position < 0:
            return None
        last = self._last
        if last is not None and fm.calls == last.calls + 1:
            end = last.draft_start + last.num_drafts  # one past the call's last input
        else:
            end = position + 1
        row = fm.hidden.shape[1] - (end - position)
        if fm.hidden.shape[0] != 1 or not 0 <= row < fm.hidden.shape[1]:
            return None  # a call of another shape: guess this round, read the next one
        return fm.hidden[0, row]

    def draft(
        self,
        unseen_tokens: mx.array,
        num_tokens: int,
        temperature: float = 0.0,
        key: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array]:
        """Feed unseen_tokens (int [L], L >= 1) and propose 1 <= k' <= min(num_tokens, K) tokens.

        Returns (draft_tokens int32 [k'], q_draft float32 [k', V]). Afterwards the cache counts
        every position fed plus draft_tokens[:-1] (the `Drafter` invariant).
        Raises ValueError if num_tokens < 1, unseen_tokens is empty, vocab_size is None, or
        temperature > 0 without a key.
        """
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if self.vocab_size is None:
            raise ValueError("MedusaDrafter.vocab_size is None: wrap the drafter in a "
                             "DrafterDecoder (it copies V from the target)")
        unseen = mx.array(unseen_tokens, dtype=mx.int32).reshape(-1)
        if unseen.size == 0:
            raise ValueError("draft needs at least one unseen token")
        if temperature > 0 and key is None:
            raise ValueError("sampled drafts (temperature > 0) need a PRNG key")
        cache = self.cache[0]
        hidden = self._hidden_at(cache.offset + unseen.size - 2)
        cache.offset += unseen.size
        if hidden is None:  # nothing verified yet on this sequence: repeat the last token
            draft_tokens = unseen[-1:]
            q_draft = one_hot(draft_tokens, self.vocab_size)
        else:
            k = min(num_tokens, self.heads.num_heads)
            logits = self.heads(hidden, self.target.lm_head)[:k].astype(mx.float32)  # [k, V]
            if temperature > 0:
                draft_tokens = mx.random.categorical(logits / temperature, key=key).astype(mx.int32)
                q_draft = mx.softmax(logits / temperature, axis=-1)
            else:
                draft_tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
                q_draft = one_hot(draft_tokens, self.vocab_size)
        k = draft_tokens.shape[0]
        self._last = _Round(self.target.calls, cache.offset, k)
        cache.offset += k - 1
        return draft_tokens, q_draft
