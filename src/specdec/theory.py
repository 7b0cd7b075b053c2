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
    raise NotImplementedError("Week 2 Day 5 Task 1: acceptance_rate — see book/src/week2-05-theory.md")


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """E = (1 - alpha^(K+1)) / (1 - alpha): tokens committed per target call (K + 1 if alpha = 1).

    Raises ValueError if alpha is not in [0, 1] or k < 0.
    """
    raise NotImplementedError(
        "Week 2 Day 5 Task 2: expected_tokens_per_round — see book/src/week2-05-theory.md"
    )


def expected_speedup(alpha: float, k: int, c: float, v: float) -> float:
    """Expected speedup over plain decoding: E / (K * c + v).

    One round costs K draft steps (K * c target steps) plus one verify call (v target steps) and
    commits E tokens; plain decoding commits one token per target step.
    Raises ValueError if c < 0 or v <= 0 (and as expected_tokens_per_round for alpha, k).
    """
    raise NotImplementedError("Week 2 Day 5 Task 3: expected_speedup — see book/src/week2-05-theory.md")
