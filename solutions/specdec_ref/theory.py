"""Week 2 Day 5 — theory you can check: acceptance rate, tokens per round, expected speedup.

alpha: the probability that one draft token is accepted. K: draft length. c: the cost of one
draft step relative to one target step. v: the cost of one target call over K + 1 tokens
relative to one target step (v(K) from Week 1 Day 3).
"""

import mlx.core as mx


def acceptance_rate(p_target: mx.array, q_draft: mx.array) -> mx.array:
    """alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q), over the last axis.

    p_target, q_draft: float [..., V], rows summing to 1. Returns float32 [...].
    """
    p_target, q_draft = p_target.astype(mx.float32), q_draft.astype(mx.float32)
    # The overlap of the two distributions: the mass a draft token keeps after verification.
    return mx.minimum(p_target, q_draft).sum(axis=-1)


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """E = (1 - alpha^(K+1)) / (1 - alpha): tokens committed per target call (K + 1 if alpha = 1).

    Raises ValueError if alpha is not in [0, 1] or k < 0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a probability in [0, 1], got {alpha}")
    if k < 0:
        raise ValueError(f"k (the draft length) must be >= 0, got {k}")
    if alpha == 1.0:
        return float(k + 1)  # every draft accepted, plus the bonus token (the limit of the sum)
    # 1 + alpha + ... + alpha^K: a round's (i+1)-th token exists iff its first i drafts were
    # accepted, which happens with probability alpha^i.
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, k: int, c: float, v: float) -> float:
    """Expected speedup over plain decoding: E / (K * c + v).

    One round costs K draft steps (K * c target steps) plus one verify call (v target steps) and
    commits E tokens; plain decoding commits one token per target step.
    Raises ValueError if c < 0 or v <= 0 (and as expected_tokens_per_round for alpha, k).
    """
    if c < 0:
        raise ValueError(f"c (draft step cost / target step cost) must be >= 0, got {c}")
    if v <= 0:
        raise ValueError(f"v (verify call cost / target step cost) must be > 0, got {v}")
    tokens = expected_tokens_per_round(alpha, k)
    # Plain decoding spends one target step per token; a round spends K*c + v for E tokens.
    return tokens / (k * c + v)
