"""Week 2 Day 5 — theory you can check: acceptance rate, tokens per round, expected speedup.

Book: book/src/week2-05-theory.md. Grade with
    pytest tests/test_week_2_day_5.py --impl student -k task_2
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from specdec.kit.models import MarkovLM
from specdec.kit.stats import SpecStats
from support import raises


def dirichlet_rows(seed: int, shape: tuple[int, ...], concentration: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(shape[-1], concentration), size=shape[:-1]).astype(np.float32)


def truncated_geometric(alpha: float, k: int) -> np.ndarray:
    """P(n = j), j = 0..K: drafts are accepted one after another, each with probability alpha."""
    return np.array([alpha**j * (1 - alpha) for j in range(k)] + [alpha**k])


def constant_alpha_pair(vocab_size: int = 8, seed: int = 0) -> tuple[MarkovLM, MarkovLM, float]:
    """A (draft, target) Markov pair whose acceptance rate is the same after every token.

    p(x | s) = a[(x - s) mod V] and q(x | s) = b[(x - s) mod V]: every row is the same pair of
    base vectors shifted by s, so sum_x min(p(x|s), q(x|s)) = sum_i min(a_i, b_i) for every s.
    """
    rng = np.random.default_rng(seed)
    a = rng.dirichlet(np.ones(vocab_size))
    b = 0.55 * a + 0.45 * np.roll(a[::-1], 2)  # overlaps a by ~0.76 for seed 0
    shift = (np.arange(vocab_size)[None, :] - np.arange(vocab_size)[:, None]) % vocab_size
    p_target, q_draft = a[shift], b[shift]  # [V, V], row s = the distribution after token s
    alpha = float(np.minimum(a, b).sum())
    return MarkovLM(mx.array(q_draft)), MarkovLM(mx.array(p_target)), alpha


# Task 1: acceptance_rate --------------------------------------------------------------------------
def test_task_1_acceptance_rate_examples(impl):
    cases = [
        ([0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], 0.5),
        ([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], 1.0),  # q = p: every draft accepted
        ([1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], 0.0),  # disjoint supports: none accepted
        ([0.7, 0.2, 0.1, 0.0], [0.2, 0.2, 0.2, 0.4], 0.2 + 0.2 + 0.1),
    ]
    for p, q, alpha in cases:
        got = impl.theory.acceptance_rate(mx.array(p), mx.array(q))
        assert got.shape == () and got.dtype == mx.float32, (
            f"acceptance_rate of two [V] rows must be a float32 scalar, got shape {got.shape} {got.dtype}"
        )
        assert got.item() == pytest.approx(alpha, abs=1e-6), (
            f"alpha = sum_x min(p(x), q(x)): for p={p}, q={q} expected {alpha}, got {got.item()}"
        )


def test_task_1_acceptance_rate_is_one_minus_tv_batched(impl):
    p = dirichlet_rows(0, (3, 5, 16))
    q = dirichlet_rows(1, (3, 5, 16))
    got = impl.theory.acceptance_rate(mx.array(p), mx.array(q))
    assert got.shape == (3, 5) and got.dtype == mx.float32, (
        "acceptance_rate reduces the last axis only: [3, 5, V] -> [3, 5] float32, "
        f"got {got.shape} {got.dtype}"
    )
    one_minus_tv = 1.0 - 0.5 * np.abs(p - q).sum(-1)
    assert np.allclose(np.array(got), one_minus_tv, atol=1e-5), (
        "acceptance_rate must equal 1 - TV(p, q), TV = 0.5 * sum_x |p(x) - q(x)|, row by row"
    )
    swapped = impl.theory.acceptance_rate(mx.array(q), mx.array(p))
    assert np.allclose(np.array(swapped), np.array(got), atol=1e-6), "alpha is symmetric in p and q"


def test_task_1_acceptance_rate_matches_verification(impl, ref):
    """alpha is the probability that speculative sampling accepts one draft token."""
    p, q = dirichlet_rows(2, (12,)), dirichlet_rows(3, (12,))
    alpha = impl.theory.acceptance_rate(mx.array(p), mx.array(q)).item()
    p_logits = mx.log(mx.array(p))[None].astype(mx.float32)
    target_logits = mx.concatenate([p_logits, p_logits])  # [K + 1 = 2, V]
    q_draft = mx.array(q)[None]
    num_trials = 3000
    keys = mx.random.split(mx.random.key(99), num_trials)
    accepted = 0
    for i in range(num_trials):
        key_draft, key_verify = mx.random.split(keys[i])
        draft = mx.random.categorical(mx.log(q_draft), key=key_draft).astype(mx.int32)
        n, _ = ref.verify.verify_speculation(draft, target_logits, q_draft, 1.0, key_verify)
        accepted += n
    # Binomial(3000, alpha): 4 standard errors, a two-sided false-alarm rate below 1e-4.
    tolerance = 4 * math.sqrt(alpha * (1 - alpha) / num_trials)
    assert abs(accepted / num_trials - alpha) < tolerance, (
        f"verify_speculation accepted {accepted}/{num_trials} single drafts, but "
        f"acceptance_rate(p, q) = {alpha:.4f}: alpha must be sum_x min(p(x), q(x))"
    )


# Task 2: expected_tokens_per_round ----------------------------------------------------------------
def test_task_2_expected_tokens_per_round_values(impl):
    E = impl.theory.expected_tokens_per_round
    for alpha, k, want in [(0.5, 1, 1.5), (0.5, 3, 1.875), (0.8, 4, 3.3616), (0.6, 2, 1.96)]:
        assert E(alpha, k) == pytest.approx(want, rel=1e-9), (
            f"E = (1 - alpha^(K+1)) / (1 - alpha): for alpha={alpha}, K={k} expected {want}, "
            f"got {E(alpha, k)}"
        )
    for k in range(9):
        assert E(1.0, k) == pytest.approx(k + 1), (
            f"alpha = 1 accepts all K drafts plus the bonus token: E = K + 1 = {k + 1}, got {E(1.0, k)} "
            "(the formula divides 0 by 0 there: handle alpha = 1 on its own)"
        )
        assert E(0.0, k) == pytest.approx(1.0), f"alpha = 0: only the target's token, E = 1, got {E(0.0, k)}"
        assert E(1 - 1e-6, k) == pytest.approx(k + 1, rel=1e-4), "E must be continuous at alpha = 1"
    assert E(0.7, 0) == pytest.approx(1.0), "K = 0 is plain decoding: one token per target call"
    for bad_alpha, bad_k in [(-0.1, 3), (1.5, 3), (0.5, -1)]:
        with raises(ValueError, f"expected_tokens_per_round(alpha={bad_alpha}, k={bad_k}) must be "
                    "refused: alpha is a probability in [0, 1] and K >= 0"):
            E(bad_alpha, bad_k)


def test_task_2_expected_tokens_per_round_matches_simulation(impl):
    """The geometric model: each draft survives with probability alpha, the round stops at the first miss."""
    num_rounds = 200_000
    for alpha, k in [(0.3, 2), (0.75, 4), (0.9, 8)]:
        formula = impl.theory.expected_tokens_per_round(alpha, k)
        u = mx.random.uniform(shape=(num_rounds, k), key=mx.random.key(k))
        num_accepted = mx.cumprod((u < alpha).astype(mx.int32), axis=1).sum(axis=1)
        simulated = (num_accepted + 1).astype(mx.float32).mean().item()
        probs = truncated_geometric(alpha, k)
        std = math.sqrt((probs * (np.arange(k + 1) + 1.0 - formula) ** 2).sum())
        # 5 standard errors: a false-alarm rate below 1e-6 for each (alpha, K).
        assert abs(simulated - formula) < 5 * std / math.sqrt(num_rounds), (
            f"alpha={alpha}, K={k}: {num_rounds} simulated rounds commit {simulated:.4f} tokens on "
            f"average, expected_tokens_per_round says {formula:.4f}"
        )


@pytest.mark.parametrize("k", [2, 5])
def test_task_2_formula_matches_a_measured_run(impl, ref, k):
    """Constant alpha across contexts: the loop's tokens per round must follow the formula."""
    draft, target, alpha = constant_alpha_pair()
    formula = impl.theory.expected_tokens_per_round(alpha, k)
    # The setup: sum_x min(p(x|s), q(x|s)) is the same after every token s.
    per_state = ref.theory.acceptance_rate(target.transitions[0], draft.transitions[0])
    assert np.allclose(np.array(per_state), alpha, atol=1e-5), "test setup: alpha must be constant"

    stats = SpecStats()
    decoder = ref.draft.SpeculativeDecoder(draft, target, k)
    generated = ref.speculative.speculative_generate(
        decoder, mx.array([0]), 3000, temperature=1.0, key=mx.random.key(100 + k), stats=stats
    )
    for _ in generated:
        pass
    # Only full rounds: the last ones draft fewer tokens so as not to overshoot max_tokens.
    full = [n + 1 for n, kk in zip(stats.accepted_per_round, stats.lookahead_per_round) if kk == k]
    measured = float(np.mean(full))
    probs = truncated_geometric(alpha, k)
    std = math.sqrt((probs * (np.arange(k + 1) + 1.0 - formula) ** 2).sum())
    # 4 standard errors: a two-sided false-alarm rate below 1e-4 (normal approximation).
    tolerance = 4 * std / math.sqrt(len(full))
    assert abs(measured - formula) < tolerance, (
        f"alpha={alpha:.4f}, K={k}: the loop committed {measured:.3f} tokens per round over "
        f"{len(full)} rounds, expected_tokens_per_round says {formula:.3f} (tolerance {tolerance:.3f})"
    )


# Task 3: expected_speedup -------------------------------------------------------------------------
def test_task_3_expected_speedup_values(impl, use_ref):
    use_ref("theory.expected_tokens_per_round")
    S = impl.theory.expected_speedup
    cases = [
        (0.8, 4, 0.05, 1.1, 3.3616 / 1.3),
        (0.0, 3, 0.1, 1.2, 1 / 1.5),  # a useless draft only adds cost
        (1.0, 4, 0.0, 1.0, 5.0),  # free drafts, perfect agreement, free verification: K + 1
        (0.6, 0, 0.2, 1.25, 1 / 1.25),  # K = 0: one token per verify call
        (0.2, 8, 0.3, 1.5, ((1 - 0.2**9) / 0.8) / (8 * 0.3 + 1.5)),  # speculation can be a slowdown
    ]
    for alpha, k, c, v, want in cases:
        got = S(alpha, k, c, v)
        assert got == pytest.approx(want, rel=1e-9), (
            f"speedup = E / (K*c + v): alpha={alpha}, K={k}, c={c}, v={v} -> expected {want:.6f}, "
            f"got {got}"
        )
    assert S(0.2, 8, 0.3, 1.5) < 1, "a bad draft with many tokens makes decoding slower"
    bad_arguments = [
        (0.5, 3, -0.1, 1.0), (0.5, 3, 0.1, 0.0), (0.5, 3, 0.1, -1.0), (1.2, 3, 0.1, 1.0),
        (0.5, -2, 0.1, 1.0),
    ]
    for bad in bad_arguments:
        with raises(ValueError, f"expected_speedup(alpha, k, c, v) = expected_speedup{bad} must be "
                    "refused: c >= 0, v > 0, alpha in [0, 1] and K >= 0"):
            S(*bad)
