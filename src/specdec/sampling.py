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
    raise NotImplementedError(
        "Week 1 Day 1 Task 1: logits_to_probs — see book/src/week1-01-sampling.md"
    )


def top_k_filter(probs: mx.array, k: int) -> mx.array:
    """Keep the k most probable tokens of each row and renormalise.

    probs: float [..., V], rows summing to 1. k: int; k <= 0 or k >= V leaves probs unchanged.
    Returns float32 [..., V]: tokens whose probability is below the row's k-th largest
    probability get 0; the rest are rescaled to sum to 1 (ties with the k-th value are kept).
    """
    raise NotImplementedError(
        "Week 1 Day 1 Task 2: top_k_filter — see book/src/week1-01-sampling.md"
    )


def top_p_filter(probs: mx.array, top_p: float) -> mx.array:
    """Nucleus filtering: keep the smallest set of most probable tokens with mass >= top_p.

    probs: float [..., V], rows summing to 1. top_p: in (0, 1]; 1 leaves probs unchanged.
    Returns float32 [..., V]: sort a row by decreasing probability and keep tokens until the
    kept mass first reaches top_p (the most probable token is always kept); zero the others and
    renormalise. Raises ValueError if top_p is not in (0, 1].
    """
    raise NotImplementedError(
        "Week 1 Day 1 Task 3: top_p_filter — see book/src/week1-01-sampling.md"
    )


def sample_token(probs: mx.array, key: mx.array) -> mx.array:
    """Draw one token per row from a categorical distribution, with an explicit PRNG key.

    probs: float [..., V], rows summing to 1. key: from `mx.random.key(seed)`.
    Returns int32 [...]: token ids. Tokens of probability 0 are never drawn; a one-hot row always
    returns its hot index. The same key and probs always give the same tokens.
    """
    raise NotImplementedError(
        "Week 1 Day 1 Task 4: sample_token — see book/src/week1-01-sampling.md"
    )


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
