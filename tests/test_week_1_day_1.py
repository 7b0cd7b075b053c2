"""Week 1 Day 1 — sampling: logits -> probabilities -> filtered probabilities -> tokens.

Chapter: book/src/week1-01-sampling.md. Grade one task with
    pytest tests/test_week_1_day_1.py --impl student -k task_2
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from scipy import stats

CHAPTER = "see book/src/week1-01-sampling.md"


def np_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Exact softmax over the last axis, in float64, stable against large logits."""
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def assert_probs(got: mx.array, expected: np.ndarray, what: str, atol: float = 1e-6) -> None:
    assert got.dtype == mx.float32, f"{what}: expected float32 probabilities, got {got.dtype}"
    assert tuple(got.shape) == expected.shape, (
        f"{what}: expected shape {expected.shape} (same as the input), got {tuple(got.shape)}"
    )
    np.testing.assert_allclose(
        np.array(got), expected, atol=atol, rtol=0, err_msg=f"{what} — {CHAPTER}"
    )


# Task 1: logits_to_probs ------------------------------------------------------------------------
def test_task_1_softmax_matches_exact(impl):
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.standard_normal((3, 7))).astype(np.float32)
    for temperature in (1.0, 0.5, 2.0, 10.0):
        got = impl.sampling.logits_to_probs(mx.array(logits), temperature)
        assert_probs(
            got,
            np_softmax(logits, temperature),
            f"logits_to_probs(T={temperature}) must be softmax(logits / T) over the last axis",
        )


def test_task_1_any_leading_axes_and_dtype(impl):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 3, 5)).astype(np.float16)
    got = impl.sampling.logits_to_probs(mx.array(logits), 0.7)
    assert_probs(
        got,
        np_softmax(logits.astype(np.float32), 0.7),
        "float16 logits [2, 3, 5] must give float32 probabilities [2, 3, 5]",
        atol=1e-5,
    )
    single = impl.sampling.logits_to_probs(mx.array([0.0, 1.0, 2.0]), 1.0)  # a single row [V]
    assert_probs(single, np_softmax(np.array([0.0, 1.0, 2.0]), 1.0), "a 1-D logits row [V]")


def test_task_1_temperature_scaling(impl):
    logits = mx.array([2.0, 1.0, 0.0, -1.0])
    entropies = []
    for temperature in (0.25, 1.0, 4.0):
        p = np.array(impl.sampling.logits_to_probs(logits, temperature), dtype=np.float64)
        entropies.append(-(p * np.log(p)).sum())
    assert entropies[0] < entropies[1] < entropies[2], (
        f"a higher temperature must flatten the distribution (entropies {entropies} for "
        f"T = 0.25, 1, 4 should increase) — {CHAPTER}"
    )


def test_task_1_zero_temperature_is_one_hot_argmax(impl):
    ninf = -math.inf
    logits = mx.array([[1.0, 3.0, 3.0, 0.0], [ninf, -1.0, -2.0, ninf], [0.5, -9.0, 0.2, 0.4]])
    expected = np.array([[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=np.float32)
    assert_probs(
        impl.sampling.logits_to_probs(logits, 0.0),
        expected,
        "temperature 0 means greedy: a one-hot row at argmax (the lowest index on ties)",
        atol=0,
    )


def test_task_1_minus_infinity_gets_zero(impl):
    ninf = -math.inf
    logits = np.array([[0.0, ninf, 1.0, ninf], [ninf, ninf, 5.0, ninf]], dtype=np.float32)
    for temperature in (1.0, 0.5):
        got = np.array(impl.sampling.logits_to_probs(mx.array(logits), temperature))
        assert np.isfinite(got).all(), f"-inf logits must give probability 0, not NaN: {got}"
        expected = np.zeros_like(logits)
        expected[0, [0, 2]] = np_softmax(logits[0, [0, 2]], temperature)
        expected[1, 2] = 1.0
        assert_probs(mx.array(got), expected, f"-inf logits get probability 0 (T={temperature})")


def test_task_1_negative_temperature_raises(impl):
    with pytest.raises(ValueError):
        impl.sampling.logits_to_probs(mx.array([1.0, 2.0]), -0.5)


# Task 2: top_k_filter ---------------------------------------------------------------------------
def test_task_2_keeps_k_largest_and_renormalises(impl):
    probs = mx.array([[0.1, 0.4, 0.2, 0.3], [0.7, 0.05, 0.15, 0.1]])
    expected = {
        1: [[0, 1, 0, 0], [1, 0, 0, 0]],
        2: [[0, 0.4 / 0.7, 0, 0.3 / 0.7], [0.7 / 0.85, 0, 0.15 / 0.85, 0]],
        3: [[0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9], [0.7 / 0.95, 0, 0.15 / 0.95, 0.1 / 0.95]],
    }
    for k, rows in expected.items():
        assert_probs(
            impl.sampling.top_k_filter(probs, k),
            np.array(rows, dtype=np.float32),
            f"top_k_filter(k={k}) keeps each row's k most probable tokens, rescaled to sum to 1",
        )


def test_task_2_k_out_of_range_is_identity(impl):
    probs = np.array([[0.1, 0.4, 0.2, 0.3]], dtype=np.float32)
    for k in (0, -1, 4, 100):
        assert_probs(
            impl.sampling.top_k_filter(mx.array(probs), k),
            probs,
            f"k={k}: k <= 0 or k >= V leaves the probabilities unchanged",
        )


def test_task_2_ties_with_kth_are_kept(impl):
    probs = mx.array([0.3, 0.2, 0.3, 0.2])
    assert_probs(
        impl.sampling.top_k_filter(probs, 1),
        np.array([0.5, 0, 0.5, 0], dtype=np.float32),
        "k=1 with two tokens tied for first: ties with the k-th value are kept",
    )
    assert_probs(
        impl.sampling.top_k_filter(probs, 3),
        np.array([0.3, 0.2, 0.3, 0.2], dtype=np.float32),
        "k=3 where the 3rd and 4th values tie: both are kept",
    )


# Task 3: top_p_filter ---------------------------------------------------------------------------
# Binary fractions make every cumulative sum exact in float32: sorted 1/2, 1/4, 1/8, 3/32, 1/32
# have running masses 0.5, 0.75, 0.875, 0.96875, 1.
NUCLEUS_PROBS = np.array([3 / 32, 1 / 2, 1 / 32, 1 / 4, 1 / 8], dtype=np.float32)


def np_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Plain-loop nucleus filter for one row (no ties in the test rows)."""
    kept, mass = np.zeros_like(probs), 0.0
    for i in np.argsort(-probs):
        kept[i] = probs[i]
        mass += probs[i]
        if mass >= top_p:
            break
    return kept / kept.sum()


def test_task_3_keeps_smallest_nucleus(impl):
    for top_p, size in [(0.6, 2), (0.8, 3), (0.9, 4), (0.99, 5)]:
        expected = np_top_p(NUCLEUS_PROBS, top_p)
        assert (expected > 0).sum() == size  # the test's own arithmetic
        assert_probs(
            impl.sampling.top_p_filter(mx.array(NUCLEUS_PROBS), top_p),
            expected,
            f"top_p={top_p} keeps the {size} most probable tokens (the first whose mass "
            "reaches top_p), renormalised",
        )


def test_task_3_boundaries(impl):
    cases = [
        (0.5, "mass exactly 0.5 after the first token: stop there"),
        (0.75, "mass exactly 0.75 after two tokens: the third is not needed"),
        (0.75 + 1e-6, "just above 0.75: a third token is needed"),
        (0.3, "the most probable token alone exceeds top_p: it is kept"),
        (1e-9, "a tiny top_p still keeps the most probable token"),
        (1.0, "top_p = 1 leaves the probabilities unchanged"),
    ]
    for top_p, why in cases:
        assert_probs(
            impl.sampling.top_p_filter(mx.array(NUCLEUS_PROBS), top_p),
            np_top_p(NUCLEUS_PROBS, top_p),
            f"top_p={top_p}: {why}",
        )


def test_task_3_rows_are_independent(impl):
    other = np.array([0.05, 0.3, 0.15, 0.1, 0.4], dtype=np.float32)
    rows = np.stack([NUCLEUS_PROBS, NUCLEUS_PROBS[::-1], other])
    expected = np.stack([np_top_p(r, 0.8) for r in rows])
    assert_probs(
        impl.sampling.top_p_filter(mx.array(rows), 0.8),
        expected,
        "each row of a batch [3, V] gets its own nucleus (sort and cumulate along the last axis)",
    )


def test_task_3_invalid_top_p_raises(impl):
    for top_p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            impl.sampling.top_p_filter(mx.array(NUCLEUS_PROBS), top_p)


# Task 4: sample_token ---------------------------------------------------------------------------
def test_task_4_same_key_same_tokens(impl, key):
    probs = mx.broadcast_to(mx.array([0.1, 0.2, 0.3, 0.4]), (64, 4))
    first = impl.sampling.sample_token(probs, key)
    again = impl.sampling.sample_token(probs, key)
    assert first.dtype == mx.int32, f"token ids must be int32, got {first.dtype}"
    assert tuple(first.shape) == (64,), f"[64, V] probabilities give [64] tokens, got {first.shape}"
    assert mx.array_equal(first, again).item(), "the same key and probs must give the same tokens"
    other = impl.sampling.sample_token(probs, mx.random.key(99))
    assert not mx.array_equal(first, other).item(), (
        "different keys gave the same 64 draws: sample_token must use the key it is given"
    )


def test_task_4_one_hot_rows(impl, key):
    V = 10
    hot = np.array([3, 0, 9, 3, 7])
    probs = np.eye(V, dtype=np.float32)[hot]
    tokens = impl.sampling.sample_token(mx.array(probs), key)
    assert np.array(tokens).tolist() == hot.tolist(), "a one-hot row always returns its hot index"
    single = impl.sampling.sample_token(mx.array(probs[2]), key)
    assert tuple(single.shape) == () and single.item() == 9, (
        f"a single row [V] gives one token of shape (), got shape {tuple(single.shape)}"
    )


def test_task_4_batched_rows(impl, key):
    # Each of the [2, 3] rows puts all its mass on two tokens; draws must land in the right pair.
    support = np.array([[[0, 1], [2, 3], [4, 5]], [[6, 7], [8, 9], [0, 9]]])
    probs = np.zeros((2, 3, 10), dtype=np.float32)
    for idx in np.ndindex(2, 3):
        probs[idx][support[idx]] = [0.3, 0.7]
    tokens = np.array(impl.sampling.sample_token(mx.array(probs), key))
    assert tokens.shape == (2, 3), f"probs [2, 3, V] must give tokens [2, 3], got {tokens.shape}"
    for idx in np.ndindex(2, 3):
        assert tokens[idx] in support[idx], (
            f"row {idx} has support {support[idx].tolist()} but drew {tokens[idx]}: "
            "each row is sampled from its own distribution"
        )


def test_task_4_zero_probability_never_drawn(impl, key):
    p = np.array([0.0, 0.5, 0.0, 1e-3, 0.0, 0.499], dtype=np.float32)
    draws = np.array(impl.sampling.sample_token(mx.broadcast_to(mx.array(p), (20_000, 6)), key))
    drawn = sorted(set(draws.tolist()))
    assert set(drawn) <= {1, 3, 5}, f"tokens of probability 0 were drawn: {drawn}"
    assert 3 in drawn, "a token of probability 1e-3 should appear in 20,000 draws (about 20 times)"


def test_task_4_draws_follow_the_distribution(impl, key):
    p = np.array([0.05, 0.1, 0.15, 0.2, 0.5])
    N = 20_000
    # One call on N identical rows: N independent draws, fast.
    draws = np.array(impl.sampling.sample_token(mx.broadcast_to(mx.array(p), (N, 5)), key))
    counts = np.bincount(draws, minlength=5)
    # Chi-square goodness of fit. For a correct sampler the p-value is uniform, so a threshold of
    # 1e-3 is a false-alarm rate of 0.1% over seeds (and this seed is fixed, so no flakiness).
    pvalue = stats.chisquare(counts, N * p).pvalue
    assert pvalue > 1e-3, (
        f"{N} draws from p={p.tolist()} gave counts {counts.tolist()} (expected "
        f"{(N * p).tolist()}), chi-square p-value {pvalue:.2e}: the draws do not follow probs"
    )
