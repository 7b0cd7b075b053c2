"""Week 2 Day 2 — greedy parallel verification: `verify_greedy`.

Book: book/src/week2-02-parallel-verification.md. Grade with
    pytest tests/test_week_2_day_2.py --impl student -k task_1

Row i of target_logits [K + 1, V] is the target's choice for the position of draft i; row K is
the bonus position after the last draft.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from specdec.kit.models import tiny_llama_pair
from support import mlx_lm_greedy

V = 16
CHAPTER = "book/src/week2-02-parallel-verification.md"


def logits_with_argmax(choices, seed):
    """Random logits [len(choices), V] whose row i has its (clear) maximum at choices[i]."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(choices), V)).astype(np.float32)
    logits[np.arange(len(choices)), choices] += 8.0
    return mx.array(logits)


def check_output(n, tokens, K):
    assert type(n) is int and 0 <= n <= K, f"n must be a python int in [0, K={K}], got {n!r}"
    assert isinstance(tokens, list) and len(tokens) == n + 1, (
        f"tokens must be a list of n + 1 = {n + 1} tokens (n accepted drafts, then one target "
        f"token), got {tokens!r}"
    )
    assert all(type(t) is int for t in tokens), (
        f"tokens must be python ints (use .tolist() / .item()), got types {[type(t).__name__ for t in tokens]}"
    )


def target_round_logits(target, prompt, draft_tokens):
    """One verification call: the target reads [last prompt token, d_1 .. d_K] -> [K + 1, V]."""
    cache = make_prompt_cache(target)
    target(mx.array(prompt[:-1])[None], cache=cache)  # the target has seen all but the last token
    inputs = mx.array([prompt[-1], *draft_tokens])
    return target(inputs[None], cache=cache)[0]


# Task 1: verify_greedy ---------------------------------------------------------------------------
@pytest.mark.parametrize("K", range(1, 9))
def test_task_1_all_drafts_accepted_adds_the_bonus_token(impl, K):
    rng = np.random.default_rng(K)
    drafts = rng.integers(0, V, size=K).tolist()
    bonus = int(rng.integers(0, V))
    n, tokens = impl.verify.verify_greedy(mx.array(drafts, dtype=mx.int32), logits_with_argmax(drafts + [bonus], K))
    check_output(n, tokens, K)
    assert (n, tokens) == (K, drafts + [bonus]), (
        f"the target agrees with all K={K} drafts {drafts}: expected n={K} and the drafts followed "
        f"by the bonus token argmax(target_logits[K]) = {bonus}, got n={n}, tokens={tokens}"
    )


@pytest.mark.parametrize("K", range(1, 9))
def test_task_1_stops_at_the_first_mismatch(impl, K):
    rng = np.random.default_rng(100 + K)
    for first_mismatch in range(K):
        drafts = rng.integers(0, V, size=K).tolist()
        # The target agrees everywhere except at `first_mismatch`, where it picks another token.
        choices = drafts + [int(rng.integers(0, V))]
        correction = (drafts[first_mismatch] + 1 + int(rng.integers(0, V - 1))) % V
        choices[first_mismatch] = correction
        logits = logits_with_argmax(choices, seed=K * 10 + first_mismatch)
        n, tokens = impl.verify.verify_greedy(mx.array(drafts, dtype=mx.int32), logits)
        check_output(n, tokens, K)
        expected = drafts[:first_mismatch] + [correction]
        assert (n, tokens) == (first_mismatch, expected), (
            f"drafts {drafts}, target choices {choices}: the longest agreeing prefix has "
            f"n={first_mismatch} tokens, then comes the target's correction {correction}, so "
            f"expected (n, tokens) = ({first_mismatch}, {expected}), got ({n}, {tokens}). Drafts after "
            f"the first mismatch never count, even when the target agrees with them (see {CHAPTER})"
        )


def test_task_1_first_draft_rejected(impl):
    drafts = [5, 6, 7]
    choices = [9, 6, 7, 2]  # disagrees at once; agreeing later must not matter
    n, tokens = impl.verify.verify_greedy(mx.array(drafts, dtype=mx.int32), logits_with_argmax(choices, 0))
    check_output(n, tokens, 3)
    assert (n, tokens) == (0, [9]), (
        f"the target rejects the first draft: expected n=0 and only its own token [9], got ({n}, {tokens})"
    )


def test_task_1_verified_round_equals_target_greedy(impl):
    """With real models, one target call + verify_greedy commits the target's own greedy tokens."""
    K = 5
    for noise, prompt in ((0.0, [7, 19, 3, 44]), (0.05, [12, 1, 60, 33, 8])):
        draft, target = tiny_llama_pair(seed=0, noise=noise)
        greedy = mlx_lm_greedy(target, prompt, K + 1)

        # Drafts we control: the target's own greedy tokens with position j corrupted (j = K: none).
        for j in range(K + 1):
            drafts = list(greedy[:K])
            if j < K:
                drafts[j] = (drafts[j] + 1) % 64
            logits = target_round_logits(target, prompt, drafts)
            n, tokens = impl.verify.verify_greedy(mx.array(drafts, dtype=mx.int32), logits)
            check_output(n, tokens, K)
            assert (n, tokens) == (j, greedy[: j + 1]), (
                f"drafts {drafts} differ from the target's greedy tokens {greedy} first at position "
                f"{j}: expected n={j} and tokens {greedy[: j + 1]}, got n={n}, tokens {tokens}. "
                "Row i of the target's output is its prediction for draft i (it read the token "
                "before it)"
            )

        # Drafts from the draft model itself: whatever is accepted, the round is a greedy prefix.
        drafts = mlx_lm_greedy(draft, prompt, K)
        n, tokens = impl.verify.verify_greedy(
            mx.array(drafts, dtype=mx.int32), target_round_logits(target, prompt, drafts)
        )
        check_output(n, tokens, K)
        assert tokens == greedy[: n + 1], (
            f"a verified round must commit exactly the target's greedy continuation: expected "
            f"{greedy[: n + 1]}, got {tokens} (draft noise {noise})"
        )
        if noise == 0.0:
            assert n == K, "an identical draft is always right: all K drafts must be accepted"
