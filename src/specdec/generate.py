"""Week 1 Day 2 — the autoregressive loop: prefill the prompt, then decode one token per call.

Models follow mlx-lm: `model(tokens[None], cache=cache) -> logits[1, L, V]`, where `cache` is a
list of per-layer KV caches from `mlx_lm.models.cache.make_prompt_cache(model)`.
"""

from typing import Iterator, Optional, Sequence

import mlx.core as mx

from .sampling import make_probs, sample_token


def prefill(model, prompt_tokens: mx.array, cache: list) -> mx.array:
    """Run the whole prompt through the model in one call, filling the KV cache.

    prompt_tokens: int [L], L >= 1 (ValueError if empty). cache: the model's KV caches; their
    offset grows by L. Returns float32 [V]: the logits for the token after the prompt.
    """
    raise NotImplementedError(
        "Week 1 Day 2 Task 1: prefill — see book/src/week1-02-autoregressive-loop.md"
    )


def generate_tokens(
    model,
    prompt_tokens: mx.array,
    max_tokens: int,
    temperature: float = 0.0,
    key: Optional[mx.array] = None,
    eos_token_ids: Sequence[int] = (),
    cache: Optional[list] = None,
) -> Iterator[int]:
    """Stream tokens from `model`: one prefill call, then one single-token call per new token.

    prompt_tokens: int [L], L >= 1. max_tokens: >= 0 tokens to produce at most.
    temperature: 0 is greedy (argmax); > 0 samples from `make_probs(logits, temperature)` and
    needs `key` (split it once per token; ValueError without one).
    eos_token_ids: generation stops right *after* yielding one of these. cache: KV caches to use
    (fresh ones from `make_prompt_cache` if None).
    Yields python ints as soon as each is known (a streaming generator).
    """
    raise NotImplementedError(
        "Week 1 Day 2 Task 2: generate_tokens — see book/src/week1-02-autoregressive-loop.md"
    )
