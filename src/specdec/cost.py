"""Week 1 Day 3 — the cost of a forward pass as a function of the tokens in one call.

On memory-bound hardware (Apple silicon, or a CPU with a good BLAS) a forward over k tokens
costs about as much as one over a single token: t(k) / t(1) stays close to 1 for small k.
This is what speculative decoding exploits: verifying K drafts is one forward over K + 1 tokens,
so it costs v(K) = t(K + 1) / t(1) single-token steps.
"""

from typing import Sequence

import mlx.core as mx


def time_forward(model, num_tokens: int, context_len: int = 64, repeats: int = 5) -> float:
    """Median seconds of one forward over `num_tokens` new tokens after `context_len` cached ones.

    Builds the model's KV caches (`make_prompt_cache`) and fills them with `context_len`
    arbitrary token ids (e.g. `mx.arange(context_len) % V`). Then, `repeats` times: feed
    `num_tokens` tokens with the cache, `mx.eval` the logits (inside the timed region: MLX is
    lazy), and trim the caches back to `context_len` so every repeat sees the same context.
    One untimed warm-up call comes first. Returns the median of the timed calls, in seconds.
    Raises ValueError if num_tokens < 1 or repeats < 1.
    """
    raise NotImplementedError("Week 1 Day 3 Task 1: time_forward — see book/src/week1-03-forward-cost.md")


def verify_cost_curve(
    model, ks: Sequence[int], context_len: int = 64, repeats: int = 5
) -> dict[int, float]:
    """The cost curve: {k: time_forward(model, k) / time_forward(model, 1)} for each k in ks.

    k counts the tokens in one call, so verifying K drafts costs v(K) = curve[K + 1].
    The ratio for k = 1 is 1 by definition. Uses `time_forward` with the same context_len and
    repeats.
    """
    raise NotImplementedError(
        "Week 1 Day 3 Task 2: verify_cost_curve — see book/src/week1-03-forward-cost.md"
    )
