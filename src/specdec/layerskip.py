"""Week 5 Day 4 — self-speculation: the target drafts for itself with some of its layers skipped.

A decoder layer adds its output to the residual stream, h <- h + f_j(h), so skipping layer j
means h passes through it unchanged. The target with a set S of layers skipped is a cheaper
model with the same tokenizer, embedding and head: a draft model that needs no training.

Shapes: `B` batch, `L` tokens, `V` vocabulary. N is the target's number of layers.
"""

from typing import Iterable

import mlx.core as mx

from specdec.kit.layers import attention_mask, decoder_parts
from specdec.kit.models import model_vocab_size

from .drafters import ModelDrafter


class LayerSkipModel:
    """The target with the layers in `skip` skipped, called like any mlx-lm model.

    `LayerSkipModel(target, skip)`; attributes:
        target  the full model (shared: no weight is copied)
        skip    tuple of skipped layer indices, sorted, no duplicates
        kept    tuple of the other indices, sorted (at least one)
        layers  list of the kept decoder blocks, so `make_prompt_cache(skipped)` gives one
                KV cache per kept layer (cache[i] belongs to layer kept[i])
        vocab_size  V, the target's
    """

    def __init__(self, target, skip: Iterable[int]):
        """Check `skip` and keep the pieces of the target's forward (`decoder_parts`).

        Raises ValueError naming the value and the valid range when an index is not an int in
        0..N-1 ("layer 7 is out of range: the target has 6 layers, 0..5"), and when every
        layer would be skipped (nothing would be left to run: keep at least one).
        """
        raise NotImplementedError(
            "Week 5 Day 4 Task 1: LayerSkipModel.__init__ — see book/src/week5-04-layer-skipping.md"
        )

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """logits float [B, L, V] for tokens int [B, L], running only the kept layers.

        embed -> kept layers in order (a skipped layer leaves h unchanged) -> norm -> head.
        cache: None, or one KV cache per kept layer (`make_prompt_cache(self)`); the mask
        comes from the first kept layer's cache (`attention_mask`).
        """
        raise NotImplementedError(
            "Week 5 Day 4 Task 1: LayerSkipModel.__call__ — see book/src/week5-04-layer-skipping.md"
        )


def greedy_agreement(target, skipped, tokens: mx.array) -> float:
    """How often the skipped model's greedy token equals the target's, on given text.

    tokens: int [L], L >= 2, held-out text. One forward of each model over tokens[None] (no
    cache); compare argmax at every position 0..L-1. Returns the fraction that agree, in [0, 1]:
    the greedy acceptance rate alpha of this draft when it is fed the committed text (teacher
    forcing). Raises ValueError if L < 2.
    """
    raise NotImplementedError(
        "Week 5 Day 4 Task 2: greedy_agreement — see book/src/week5-04-layer-skipping.md"
    )


def choose_layers_to_skip(target, tokens: mx.array, num_skip: int) -> list[tuple[tuple[int, ...], float]]:
    """Greedy search: skip one more layer at a time, the one that keeps agreement highest.

    Step s (s = 1..num_skip) tries adding each not-yet-skipped layer j to the previous step's
    set S and keeps the j with the highest `greedy_agreement(target, LayerSkipModel(target,
    S + {j}), tokens)`; ties go to the lowest j. Returns the path [(skip_s, alpha_s)] for
    s = 1..num_skip, skip_s a sorted tuple of s indices (so a cost budget picks one step).
    Raises ValueError unless 1 <= num_skip <= N - 1.
    """
    raise NotImplementedError(
        "Week 5 Day 4 Task 3: choose_layers_to_skip — see book/src/week5-04-layer-skipping.md"
    )


def shareable_layers(num_layers: int, skip: Iterable[int]) -> list[int]:
    """The layers whose draft KV cache would equal the target's, position for position.

    A layer's K and V are functions of its input h. Below the first skipped layer the draft
    computes exactly the target's h, so those layers' K/V for the committed prefix are the
    target's own; from the first skipped layer up, h differs and so do K/V. Returns
    [0, 1, ..., min(skip) - 1] (every layer when skip is empty).
    """
    raise NotImplementedError(
        "Week 5 Day 4 Task 4: shareable_layers — see book/src/week5-04-layer-skipping.md"
    )


class LayerSkipDrafter(ModelDrafter):
    """Self-speculation behind the `Drafter` interface: Week 2's loop on a `LayerSkipModel`.

    `LayerSkipDrafter(target, skip)`: draft_model = LayerSkipModel(target, skip), so `cache`
    is the draft's own KV cache for its kept layers (the target's cache is never touched) and
    `draft` is `ModelDrafter.draft`. Attributes: skip and kept, as the model's.
    """

    def __init__(self, target, skip: Iterable[int]):
        """Build the skipped model (its ValueErrors pass through) and a fresh cache."""
        raise NotImplementedError(
            "Week 5 Day 4 Task 4: LayerSkipDrafter.__init__ — see book/src/week5-04-layer-skipping.md"
        )
