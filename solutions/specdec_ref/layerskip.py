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
        self.target, self.parts = target, decoder_parts(target)
        num_layers = len(self.parts.layers)
        skip = list(skip)
        for j in skip:
            if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < num_layers:
                raise ValueError(f"layer {j!r} is out of range: the target has {num_layers} "
                                 f"layers, 0..{num_layers - 1}")
        self.skip = tuple(sorted(set(skip)))
        self.kept = tuple(j for j in range(num_layers) if j not in self.skip)
        if not self.kept:
            raise ValueError(f"skip={list(self.skip)} skips all {num_layers} layers: keep at "
                             "least one")
        self.layers = [self.parts.layers[j] for j in self.kept]
        self.vocab_size = model_vocab_size(target)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """logits float [B, L, V] for tokens int [B, L], running only the kept layers.

        embed -> kept layers in order (a skipped layer leaves h unchanged) -> norm -> head.
        cache: None, or one KV cache per kept layer (`make_prompt_cache(self)`); the mask
        comes from the first kept layer's cache (`attention_mask`).
        """
        h = self.parts.embed(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = attention_mask(h, cache[0])
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, cache=layer_cache)
        return self.parts.head(self.parts.norm(h))


def greedy_agreement(target, skipped, tokens: mx.array) -> float:
    """How often the skipped model's greedy token equals the target's, on given text.

    tokens: int [L], L >= 2, held-out text. One forward of each model over tokens[None] (no
    cache); compare argmax at every position 0..L-1. Returns the fraction that agree, in [0, 1]:
    the greedy acceptance rate alpha of this draft when it is fed the committed text (teacher
    forcing). Raises ValueError if L < 2.
    """
    tokens = mx.array(tokens, dtype=mx.int32).reshape(-1)
    if tokens.size < 2:
        raise ValueError(f"greedy_agreement needs at least 2 tokens of text, got {tokens.size}")
    want = mx.argmax(target(tokens[None]), axis=-1)
    got = mx.argmax(skipped(tokens[None]), axis=-1)
    return (want == got).astype(mx.float32).mean().item()


def choose_layers_to_skip(target, tokens: mx.array, num_skip: int) -> list[tuple[tuple[int, ...], float]]:
    """Greedy search: skip one more layer at a time, the one that keeps agreement highest.

    Step s (s = 1..num_skip) tries adding each not-yet-skipped layer j to the previous step's
    set S and keeps the j with the highest `greedy_agreement(target, LayerSkipModel(target,
    S + {j}), tokens)`; ties go to the lowest j. Returns the path [(skip_s, alpha_s)] for
    s = 1..num_skip, skip_s a sorted tuple of s indices (so a cost budget picks one step).
    Raises ValueError unless 1 <= num_skip <= N - 1.
    """
    num_layers = len(decoder_parts(target).layers)
    if not 1 <= num_skip <= num_layers - 1:
        raise ValueError(f"num_skip={num_skip} is out of range: the target has {num_layers} "
                         f"layers, so skip 1..{num_layers - 1}")
    skip, path = (), []
    for _ in range(num_skip):
        scores = [(greedy_agreement(target, LayerSkipModel(target, skip + (j,)), tokens), -j)
                  for j in range(num_layers) if j not in skip]
        alpha, neg_j = max(scores)
        skip = tuple(sorted(skip + (-neg_j,)))
        path.append((skip, alpha))
    return path


def shareable_layers(num_layers: int, skip: Iterable[int]) -> list[int]:
    """The layers whose draft KV cache would equal the target's, position for position.

    A layer's K and V are functions of its input h. Below the first skipped layer the draft
    computes exactly the target's h, so those layers' K/V for the committed prefix are the
    target's own; from the first skipped layer up, h differs and so do K/V. Returns
    [0, 1, ..., min(skip) - 1] (every layer when skip is empty).
    """
    skip = list(skip)
    return list(range(min(skip) if skip else num_layers))


class LayerSkipDrafter(ModelDrafter):
    """Self-speculation behind the `Drafter` interface: Week 2's loop on a `LayerSkipModel`.

    `LayerSkipDrafter(target, skip)`: draft_model = LayerSkipModel(target, skip), so `cache`
    is the draft's own KV cache for its kept layers (the target's cache is never touched) and
    `draft` is `ModelDrafter.draft`. Attributes: skip and kept, as the model's.
    """

    def __init__(self, target, skip: Iterable[int]):
        """Build the skipped model (its ValueErrors pass through) and a fresh cache."""
        # ModelDrafter.__init__, named (not super()): a student class may borrow this method.
        ModelDrafter.__init__(self, LayerSkipModel(target, skip))
        self.skip, self.kept = self.draft_model.skip, self.draft_model.kept
