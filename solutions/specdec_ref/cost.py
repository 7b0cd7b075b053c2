"""Week 1 Day 3 — the cost of a forward pass as a function of the tokens in one call.

On memory-bound hardware (Apple silicon, or a CPU with a good BLAS) a forward over k tokens
costs about as much as one over a single token: t(k) / t(1) stays close to 1 for small k.
This is what speculative decoding exploits: verifying K drafts is one forward over K + 1 tokens,
so it costs v(K) = t(K + 1) / t(1) single-token steps.
"""

import statistics
import time
from typing import Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from specdec.kit.models import model_vocab_size


def time_forward(model, num_tokens: int, context_len: int = 64, repeats: int = 5) -> float:
    """Median seconds of one forward over `num_tokens` new tokens after `context_len` cached ones.

    Builds the model's KV caches (`make_prompt_cache`) and fills them with `context_len`
    arbitrary token ids (e.g. `mx.arange(context_len) % V`). Then, `repeats` times: feed
    `num_tokens` tokens with the cache, `mx.eval` the logits (inside the timed region: MLX is
    lazy), and trim the caches back to `context_len` so every repeat sees the same context.
    One untimed warm-up call comes first. Returns the median of the timed calls, in seconds.
    Raises ValueError if num_tokens < 1 or repeats < 1.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1 (tokens in the timed call), got {num_tokens}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (timed calls to take the median of), got {repeats}")
    vocab_size = model_vocab_size(model)
    cache = make_prompt_cache(model)
    if context_len > 0:
        context = mx.arange(context_len) % vocab_size
        mx.eval(model(context[None], cache=cache))
    new_tokens = (mx.arange(num_tokens) % vocab_size)[None]  # [1, num_tokens]
    mx.eval(new_tokens)

    def one_call() -> float:
        start = time.perf_counter()
        mx.eval(model(new_tokens, cache=cache))  # MLX is lazy: without eval nothing runs
        elapsed = time.perf_counter() - start
        trim_prompt_cache(cache, num_tokens)  # back to context_len for the next repeat
        return elapsed

    one_call()  # warm-up: first-call allocations and kernel setup are not the steady state
    return statistics.median(one_call() for _ in range(repeats))


def verify_cost_curve(
    model, ks: Sequence[int], context_len: int = 64, repeats: int = 5
) -> dict[int, float]:
    """The cost curve: {k: time_forward(model, k) / time_forward(model, 1)} for each k in ks.

    k counts the tokens in one call, so verifying K drafts costs v(K) = curve[K + 1].
    The ratio for k = 1 is 1 by definition. Uses `time_forward` with the same context_len and
    repeats.
    """
    t1 = time_forward(model, 1, context_len, repeats)
    return {
        k: 1.0 if k == 1 else time_forward(model, k, context_len, repeats) / t1 for k in ks
    }
