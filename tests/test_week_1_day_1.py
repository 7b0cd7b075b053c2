"""Week 1 Day 1 — sampling: logits -> probabilities -> filtered probabilities -> tokens.

Chapter: book/src/week1-01-sampling.md. Grade one task with
    pytest tests/test_week_1_day_1.py --impl student -k task_2
"""

import math

import mlx.core as mx
import numpy as np
from scipy import stats

from support import raises

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
    with raises(ValueError, "temperature -0.5 must be refused: the contract is temperature >= 0 "
                "(0 means greedy)"):
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


def test_task_2_returns_float32_whatever_comes_in(impl):
    probs = np.array([[0.1, 0.4, 0.2, 0.3]], dtype=np.float16)
    for k in (2, 0, 4):  # filtering, and the two unchanged cases
        got = impl.sampling.top_k_filter(mx.array(probs), k)
        assert got.dtype == mx.float32, (
            f"top_k_filter(float16 probs, k={k}) must return float32 (the contract promises float32 "
            f"whatever comes in, even when nothing is filtered), got {got.dtype}"
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


def top_p_diagnosis(probs: np.ndarray, top_p: float, got: np.ndarray) -> str:
    """Name the classic top-p mistake whose kept tokens match `got`'s (rows of `probs`), if any."""
    probs, got = np.atleast_2d(probs).astype(np.float64), np.atleast_2d(got)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    cumsum = np.cumsum(sorted_probs, axis=-1)

    def kept(keep_sorted):
        mask = np.zeros_like(keep_sorted)
        np.put_along_axis(mask, order, keep_sorted, axis=-1)
        return mask

    if np.isnan(got).any():
        return ("a row came out NaN (0 / 0): it kept no token at all. The most probable token has "
                "mass 0 before it and is always kept: keep a token iff the mass BEFORE it (the "
                "cumsum minus the token itself) is < top_p")
    got_kept = got > 0
    right = kept(cumsum - sorted_probs < top_p)
    mistakes = [
        (kept(cumsum < top_p) | kept(cumsum <= top_p),
         "you dropped the token whose mass crosses top_p. A token is kept iff the mass BEFORE it "
         "is < top_p (the inclusive cumsum minus the token itself), so the token that makes the "
         "kept mass reach top_p is kept too"),
        (kept(cumsum - sorted_probs <= top_p),
         "you kept one token too many: when the mass before a token is exactly top_p, the nucleus "
         "is already complete. Compare the mass before with <, not <="),
        (np.cumsum(probs, axis=-1) - probs < top_p,
         "the running mass was taken in token order: sort each row by decreasing probability "
         "(argsort(-probs)) before the cumsum, and scatter the mask back with put_along_axis"),
    ]
    if np.array_equal(got_kept, right):
        if not np.allclose(got.sum(-1), 1.0, atol=1e-5):
            return "the right tokens are kept, but not renormalised: divide by the kept mass"
        return "the right tokens are kept, with the wrong values: keep p / (kept mass)"
    for mask, why in mistakes:
        if np.array_equal(got_kept, mask) and not np.array_equal(mask, right):
            return why
    return (f"kept tokens {np.argwhere(got_kept).tolist()}, expected {np.argwhere(right).tolist()} "
            "([row, token] pairs)")


def assert_top_p(impl, probs: np.ndarray, top_p: float, what: str) -> None:
    got = impl.sampling.top_p_filter(mx.array(probs), top_p)
    expected = np.stack([np_top_p(row, top_p) for row in np.atleast_2d(probs)]).reshape(probs.shape)
    hint = top_p_diagnosis(probs, top_p, np.array(got, dtype=np.float64)) if got.shape == probs.shape else ""
    assert_probs(got, expected, f"{what}. Diagnosis: {hint}" if hint else what)


def test_task_3_keeps_smallest_nucleus(impl):
    for top_p, size in [(0.6, 2), (0.8, 3), (0.9, 4), (0.99, 5)]:
        assert (np_top_p(NUCLEUS_PROBS, top_p) > 0).sum() == size  # the test's own arithmetic
        assert_top_p(
            impl, NUCLEUS_PROBS, top_p,
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
        assert_top_p(impl, NUCLEUS_PROBS, top_p, f"top_p={top_p}: {why}")


def test_task_3_rows_are_independent(impl):
    other = np.array([0.05, 0.3, 0.15, 0.1, 0.4], dtype=np.float32)
    rows = np.stack([NUCLEUS_PROBS, NUCLEUS_PROBS[::-1], other])
    assert_top_p(
        impl, rows, 0.8,
        "each row of a batch [3, V] gets its own nucleus (sort and cumulate along the last axis)",
    )


def test_task_3_invalid_top_p_raises(impl):
    for top_p in (0.0, -0.1, 1.5):
        with raises(ValueError, f"top_p={top_p} must be refused: top_p is in (0, 1]"):
            impl.sampling.top_p_filter(mx.array(NUCLEUS_PROBS), top_p)


def test_task_3_returns_float32_whatever_comes_in(impl):
    probs = NUCLEUS_PROBS.astype(np.float16)  # binary fractions: exact in float16 too
    for top_p in (0.8, 1.0):  # filtering, and the unchanged case
        got = impl.sampling.top_p_filter(mx.array(probs), top_p)
        assert got.dtype == mx.float32, (
            f"top_p_filter(float16 probs, top_p={top_p}) must return float32 (the contract "
            f"promises float32 whatever comes in, even when nothing is filtered), got {got.dtype}"
        )


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
