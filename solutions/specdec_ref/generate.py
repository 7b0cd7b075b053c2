"""Week 1 Day 2 — the autoregressive loop: prefill the prompt, then decode one token per call.

Models follow mlx-lm: `model(tokens[None], cache=cache) -> logits[1, L, V]`, where `cache` is a
list of per-layer KV caches from `mlx_lm.models.cache.make_prompt_cache(model)`.
"""

from typing import Iterator, Optional, Sequence

import mlx.core as mx

from mlx_lm.models.cache import make_prompt_cache

from .sampling import make_probs, sample_token


def prefill(model, prompt_tokens: mx.array, cache: list) -> mx.array:
    """Run the whole prompt through the model in one call, filling the KV cache.

    prompt_tokens: int [L], L >= 1 (ValueError if empty). cache: the model's KV caches; their
    offset grows by L. Returns float32 [V]: the logits for the token after the prompt.
    """
    if prompt_tokens.size == 0:
        raise ValueError(
            "prompt_tokens is empty: the model needs at least one token to predict the next one"
        )
    logits = model(prompt_tokens[None], cache=cache)  # [1, L, V]
    # Only the last position predicts a new token; the others were needed to fill the cache.
    return logits[0, -1].astype(mx.float32)


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
    if temperature > 0 and key is None:
        raise ValueError(f"temperature={temperature} samples: pass key=mx.random.key(seed)")
    if cache is None:
        cache = make_prompt_cache(model)
    eos = set(eos_token_ids)

    def choose(logits: mx.array) -> mx.array:
        # Lazy: builds the graph for the next token, computes nothing yet.
        nonlocal key
        if temperature == 0:
            return mx.argmax(logits, axis=-1)
        key, subkey = mx.random.split(key)
        return sample_token(make_probs(logits, temperature), subkey)

    if max_tokens <= 0:
        return
    token = choose(prefill(model, prompt_tokens, cache))
    mx.async_eval(token)
    for n in range(max_tokens):
        token_id = token.item()  # the one host sync per token
        last = n + 1 == max_tokens or token_id in eos
        if not last:
            # Queue the next step before handing this token out: the model computes
            # while the caller prints. Never queue a step whose token nobody will use.
            token = choose(model(token.reshape(1, 1), cache=cache)[0, -1])
            mx.async_eval(token)
        yield token_id
        if last:
            return
