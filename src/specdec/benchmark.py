"""Week 4 Day 6 — benchmarking you can defend: timed sweeps, and the theory next to them.

A speed-up is a ratio of two medians measured the same way: same prompts, same output lengths,
warm-up first, then the Week 2 Day 5 prediction E / (K c + v(K)) at the measured alpha, c and
v(K) beside it. `specdec.kit.suite` runs these functions over every setting and writes the report.
Shapes: `K` draft length, `V` vocabulary.
"""

import statistics
import time
from typing import Callable, Sequence

import mlx.core as mx

from .cost import time_forward
from .theory import expected_speedup


def time_decode(
    decode: Callable,
    prompts: Sequence,
    max_tokens: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Time `decode(prompt, max_tokens)` on every prompt: tokens/s per prompt and their median.

    decode: callable(prompt, max_tokens) -> the generated tokens (a list); it must finish its
        work before returning (MLX is lazy: unevaluated arrays are not timed work).
    prompts: a non-empty sequence of prompts, in whatever form `decode` takes.
    max_tokens: >= 1, the output length every timed call must produce.
    warmup: >= 0 untimed calls on prompts[0] first (kernels, allocator caches).
    clock: seconds, read once before and once after each timed call (inject a fake in tests).
    Equal lengths: a timed call that returns a number of tokens other than max_tokens raises
    ValueError naming the prompt's index and length (benchmark with EOS ignored); so does a
    clock that did not advance.
    Returns {"tokens_per_s": median of per_prompt, "per_prompt": [tokens/s per prompt],
             "seconds": [seconds per prompt], "outputs": [list of tokens per prompt]}.
    Raises ValueError if prompts is empty, max_tokens < 1 or warmup < 0.
    """
    raise NotImplementedError("Week 4 Day 6 Task 1: time_decode — see book/src/week4-06-benchmarking.md")


def measure_costs(
    draft_model, target_model, ks: Sequence[int], context_len: int = 64, repeats: int = 5
) -> dict:
    """The measured costs the theory needs: c and v(K) for each K in ks.

    Uses `time_forward` (Week 1 Day 3) with this context_len and repeats: t_target(1) once,
    t_draft(1) once, and t_target(K + 1) for each K.
    Returns {"c": t_draft(1) / t_target(1), "v": {K: t_target(K + 1) / t_target(1)},
             "target_step_s": t_target(1), "draft_step_s": t_draft(1)}.
    Raises ValueError if ks is empty or holds a K < 1.
    """
    raise NotImplementedError("Week 4 Day 6 Task 2: measure_costs — see book/src/week4-06-benchmarking.md")


def compare_to_theory(alpha: float, k: int, c: float, v: float, measured_speedup: float) -> dict:
    """The Week 2 Day 5 prediction next to a measured speed-up.

    alpha: the measured per-token acceptance (`SpecStats.alpha_estimate`); k: K; c, v: measured
    (`measure_costs`); measured_speedup: speculative tokens/s over plain tokens/s (> 0).
    Returns {"predicted": expected_speedup(alpha, k, c, v), "measured": measured_speedup,
             "relative_error": (measured - predicted) / predicted} (positive: faster than
    predicted). Raises ValueError if measured_speedup <= 0 (and as `expected_speedup` does).
    """
    raise NotImplementedError("Week 4 Day 6 Task 2: compare_to_theory — see book/src/week4-06-benchmarking.md")


def sample_match_acceptance(p_target: mx.array, q_draft: mx.array) -> mx.array:
    """Acceptance of "sample and match" verification: sum_x p(x) q(x), over the last axis.

    mlx-lm's `speculative_generate_step` samples the target's own token and accepts the draft
    only if the two are equal: draft ~ q and target ~ p independently, so a draft survives with
    probability sum_x q(x) p(x). Exact rejection sampling keeps sum_x min(p(x), q(x)) >= that.
    p_target, q_draft: float [..., V], rows summing to 1. Returns float32 [...].
    """
    raise NotImplementedError("Week 4 Day 6 Task 2: sample_match_acceptance — see book/src/week4-06-benchmarking.md")
