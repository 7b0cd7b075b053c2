"""Week 1 Day 1 — from logits to tokens: temperature, top-k, top-p, and seeded sampling.

Shapes: `V` vocabulary; `...` any leading axes. Every function normalises over the last axis.
Randomness is explicit: sampling takes a PRNG `key` (`mx.random.key(seed)`), never global state.
"""

import mlx.core as mx


def logits_to_probs(logits: mx.array, temperature: float = 1.0) -> mx.array:
    """Probabilities from logits at a temperature.

    logits: float [..., V]. temperature: >= 0.
    Returns float32 [..., V], each row summing to 1: `softmax(logits / temperature)`.
    temperature == 0 means greedy: a one-hot row at `argmax(logits)` (the lowest index on ties,
    as `mx.argmax`). Logits of -inf get probability 0. Raises ValueError if temperature < 0.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.astype(mx.float32)
    if temperature == 0:
        hot = mx.argmax(logits, axis=-1, keepdims=True)
        return (mx.arange(logits.shape[-1]) == hot).astype(mx.float32)
    return mx.softmax(logits / temperature, axis=-1)


def top_k_filter(probs: mx.array, k: int) -> mx.array:
    """Keep the k most probable tokens of each row and renormalise.

    probs: float [..., V], rows summing to 1. k: int; k <= 0 or k >= V leaves probs unchanged.
    Returns float32 [..., V]: tokens whose probability is below the row's k-th largest
    probability get 0; the rest are rescaled to sum to 1 (ties with the k-th value are kept).
    """
    probs = probs.astype(mx.float32)  # the contract promises float32 whatever comes in
    V = probs.shape[-1]
    if k <= 0 or k >= V:
        return probs
    # The k-th largest value of each row; mx.partition puts it at index V - k.
    kth = mx.partition(probs, V - k, axis=-1)[..., V - k : V - k + 1]
    kept = mx.where(probs >= kth, probs, 0.0)
    return kept / kept.sum(axis=-1, keepdims=True)


def top_p_filter(probs: mx.array, top_p: float) -> mx.array:
    """Nucleus filtering: keep the smallest set of most probable tokens with mass >= top_p.

    probs: float [..., V], rows summing to 1. top_p: in (0, 1]; 1 leaves probs unchanged.
    Returns float32 [..., V]: sort a row by decreasing probability and keep tokens until the
    kept mass first reaches top_p (the most probable token is always kept); zero the others and
    renormalise. Raises ValueError if top_p is not in (0, 1].
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs = probs.astype(mx.float32)
    if top_p == 1:
        return probs
    order = mx.argsort(-probs, axis=-1)
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    # Keep a token if the mass *before* it is still short of top_p: the first token always is.
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    kept = mx.where(keep, probs, 0.0)
    return kept / kept.sum(axis=-1, keepdims=True)


def sample_token(probs: mx.array, key: mx.array) -> mx.array:
    """Draw one token per row from a categorical distribution, with an explicit PRNG key.

    probs: float [..., V], rows summing to 1. key: from `mx.random.key(seed)`.
    Returns int32 [...]: token ids. Tokens of probability 0 are never drawn; a one-hot row always
    returns its hot index. The same key and probs always give the same tokens.
    """
    # categorical takes unnormalised log-probabilities; log(0) = -inf is never drawn.
    return mx.random.categorical(mx.log(probs), axis=-1, key=key).astype(mx.int32)


def make_probs(
    logits: mx.array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> mx.array:
    """The sampling distribution used everywhere in the course: temperature, then top-k, top-p.

    Provided (not a task): it only chains your three functions.
    """
    probs = logits_to_probs(logits, temperature)
    if temperature > 0 and top_k > 0:
        probs = top_k_filter(probs, top_k)
    if temperature > 0 and top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return probs
