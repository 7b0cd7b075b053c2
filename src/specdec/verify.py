"""Week 2 Days 2–3 — verifying K draft tokens with one target call.

The target is called once on [last committed token, d_1 .. d_K] and returns K + 1 rows of
logits: row i (0-based) is the target's distribution for the position of d_{i+1}; row K is the
position after d_K (the "bonus" token). Shapes: `K` draft length, `V` vocabulary.
"""

from typing import Optional

import mlx.core as mx

from .sampling import make_probs, sample_token


def verify_greedy(draft_tokens: mx.array, target_logits: mx.array) -> tuple[int, list[int]]:
    """Greedy verification: accept the longest prefix of drafts the target agrees with.

    draft_tokens: int [K]. target_logits: float [K + 1, V].
    Returns (n, tokens): n in [0, K] is the length of the longest prefix with
    draft_tokens[i] == argmax(target_logits[i]); tokens (python ints, length n + 1) are the
    accepted drafts followed by argmax(target_logits[n]) — the target's correction at the first
    mismatch, or the bonus token when all K were accepted.
    """
    raise NotImplementedError(
        "Week 2 Day 2 Task 1: verify_greedy — see book/src/week2-02-parallel-verification.md"
    )


def residual_distribution(p_target: mx.array, q_draft: mx.array) -> mx.array:
    """The distribution to resample from after a rejection: normalise(max(0, p - q)).

    p_target, q_draft: float [..., V], rows summing to 1. Returns float32 [..., V], rows summing
    to 1. Where p == q the residual is all zero (and a rejection cannot happen); return p_target
    for such rows instead of dividing by zero.
    """
    raise NotImplementedError(
        "Week 2 Day 3 Task 1: residual_distribution — see book/src/week2-03-speculative-sampling.md"
    )


def verify_speculation(
    draft_tokens: mx.array,
    target_logits: mx.array,
    q_draft: mx.array,
    temperature: float = 1.0,
    key: Optional[mx.array] = None,
) -> tuple[int, list[int]]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): exact for any draft.

    draft_tokens: int [K], drawn from q_draft. target_logits: float [K + 1, V].
    q_draft: float32 [K, V], the draft's probabilities (as returned by `draft_generation`).
    temperature: applied to the target as `make_probs(target_logits, temperature)` — the same
    transform that made q_draft, so p and q are comparable. key: PRNG key, required when
    temperature > 0; all randomness comes from it.
    For i = 0 .. K-1: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)) (reject if
    q_i(d_i) == 0). On the first rejection, sample the replacement from
    residual_distribution(p_i, q_i) and stop. If all K are accepted, sample a bonus token from
    p_K. Returns (n, tokens) as `verify_greedy` does: n accepted drafts, tokens of length n + 1.
    At temperature 0 this must agree with `verify_greedy`.
    """
    raise NotImplementedError(
        "Week 2 Day 3 Task 2: verify_speculation — see book/src/week2-03-speculative-sampling.md"
    )
