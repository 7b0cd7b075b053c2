"""The provided half of Week 5 Day 4: an mlx-lm model taken apart into the pieces a forward runs.

A llama-family mlx-lm model (llama, mistral, qwen2, ... — anything laid out as
`model.model.embed_tokens`, `model.model.layers`, `model.model.norm` and a head) computes

    h = embed_tokens(tokens); h = layer_j(h, mask, cache_j) for every j; logits = head(norm(h))

`decoder_parts` hands back those pieces through the model's public attributes (no fork of the
model code), so an exercise can run any subset of the layers. Both trees import it.

Shapes: `B` batch, `L` tokens fed, `V` vocabulary, `D` hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask


@dataclass
class DecoderParts:
    """The pieces of one forward pass, in the order it runs them.

    embed   tokens int [B, L] -> h float [B, L, D]
    layers  the decoder blocks, `layer(h, mask, cache=c) -> h` (mlx-lm's TransformerBlock call)
    norm    the final norm, h -> h
    head    h [B, L, D] -> logits [B, L, V]: `lm_head`, or the embedding read as a linear map
            (`embed_tokens.as_linear`) when the model ties its word embeddings
    """

    embed: Callable[[mx.array], mx.array]
    layers: list
    norm: Callable[[mx.array], mx.array]
    head: Callable[[mx.array], mx.array]


def decoder_parts(model: Any) -> DecoderParts:
    """Take an mlx-lm llama-family model apart. Raises TypeError naming what is missing."""
    inner = getattr(model, "model", None)
    missing = [name for name in ("embed_tokens", "layers", "norm") if not hasattr(inner, name)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not laid out like an mlx-lm llama-family model: "
            f"model.model.{missing[0]} is missing (layer skipping needs model.model.embed_tokens, "
            ".layers and .norm)")
    if getattr(inner, "swa_idx", None) is not None:
        raise TypeError(f"{type(model).__name__} mixes sliding-window layers: layer skipping "
                        "here supports full-attention models only")
    args = getattr(model, "args", None)
    if hasattr(model, "lm_head"):
        head = model.lm_head
    elif getattr(args, "tie_word_embeddings", True):
        head = inner.embed_tokens.as_linear
    else:
        raise TypeError(f"{type(model).__name__} has neither lm_head nor tied embeddings")
    return DecoderParts(inner.embed_tokens, list(inner.layers), inner.norm, head)


def attention_mask(h: mx.array, cache: Any = None):
    """The causal mask for feeding h [B, L, D] after what `cache` holds (None: nothing held).

    mlx-lm's own rule (`create_attention_mask`): one mask serves every full-attention layer of a
    forward, since all their caches hold the same number of tokens. Pass the cache of the first
    layer you run.
    """
    return create_attention_mask(h, cache)
