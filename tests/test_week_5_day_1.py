"""Week 5 Day 1 — drafter-invariant speculative sampling.

Chapter: book/src/week5-01-drafter-invariant-sampling.md

Task 1: gumbel_noise (noise keyed by seed and absolute position only)
Task 2: gumbel_sample, seeded_generate (Gumbel-max; plain seeded decoding, the ground truth)
Task 3: coupled_draft, verify_coupled (same noise for draft and target; accept iff they agree)
Task 4: coupled_generate (single stream: any drafter, any K, a controller with K = 0 rounds)
Task 5: batched_coupled_decode (rows with their own seeds, any batch-mates)

Grade one task with
    pytest tests/test_week_5_day_1.py --impl student -k task_3

The promise is exact, so most checks compare tokens: a coupled loop must give `seeded_generate`'s
tokens for the same seed, whatever the drafter, K, batch or controller. The statistical checks
(fixed seeds, so a run's outcome never changes) and their false-alarm rates:
  - laws (Gumbel noise, Gumbel-max samples, the seeded decoder's marginals): Kolmogorov-Smirnov or
    chi-square p-value > P_MIN = 1e-4; a correct implementation drawing other (equally valid)
    randomness fails one such check with probability 1e-4, all nine of this file together < 0.1 %;
  - acceptance >= (1 - TV) / (1 + TV): every drafted position that is reached is accepted with at
    least that probability given the past (its noise is fresh), so the accepted count minus the sum
    of the bounds is a sub-martingale; by Azuma-Hoeffding it falls below -sqrt(N ln(1 / P_MIN) / 2)
    with probability at most P_MIN. A draft with its own noise accepts about sum_x p(x) q(x)
    instead (20 % against a bound of 55 % on the Markov pair here): far beyond that margin.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from scipy import stats as scipy_stats

from specdec.kit.models import MarkovLM, markov_pair
from specdec.kit.stats import SpecStats
from support import BATCHED_FOUNDATIONS, CallCounter, raises

CHAPTER = "book/src/week5-01-drafter-invariant-sampling.md"
P_MIN = 1e-4
AZUMA = math.log(1 / P_MIN) / 2  # margin = sqrt(N * AZUMA) for N trials

SAMPLING = ("sampling.logits_to_probs", "sampling.top_k_filter", "sampling.top_p_filter",
            "sampling.sample_token")
TASK_1 = ("coupling.gumbel_noise",)
TASK_2 = TASK_1 + ("coupling.gumbel_sample", "coupling.seeded_generate")
TASK_3 = TASK_2 + ("coupling.coupled_draft", "coupling.verify_coupled")
LOOP = SAMPLING + TASK_3 + ("speculative.commit_round",)

NOISE_BY_ROUND = (
    "is the noise keyed by the round, K, the row or the batch instead of (seed, absolute position "
    "t)? The token at index t of the sequence (prompt included) must use gumbel_noise(seed, [t])")
BONUS_POSITION = (
    "the token after n accepted drafts must be the target's coupled token at position n: "
    "gumbel_sample(p_n, noise[n]), row n of the logits AND of the noise (bonus/replacement from the "
    "wrong position?)")
DRAFT_NOISE = (
    "the draft must use the target's noise: draft i is gumbel_sample(q_i, noise[i]), the row of "
    "the position it proposes for (draft noise different from the target's?)")


def _log(probs):
    """log with log 0 = -inf and no warning: filtered tokens are never chosen."""
    with np.errstate(divide="ignore"):
        return np.log(probs)


def numpy_gumbel(seed: int, shape) -> mx.array:
    """Independent standard Gumbel noise that does not come from the code under test."""
    return mx.array(np.random.default_rng(seed).gumbel(size=shape).astype(np.float32))


def chi2_pvalue(samples, probs) -> float:
    """Chi-square p-value that `samples` were drawn from `probs`; 0 if an impossible token shows."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum()
    counts = np.bincount(np.asarray(samples), minlength=probs.size).astype(np.float64)
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    rare, common = (probs > 0) & (expected < 5), expected >= 5
    observed = np.append(counts[common], counts[rare].sum())
    wanted = np.append(expected[common], expected[rare].sum())
    keep = wanted > 0
    if keep.sum() < 2:
        return 1.0
    return float(scipy_stats.chisquare(observed[keep], wanted[keep]).pvalue)


def first_difference(got, want) -> str:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"first difference at output token {i}: got {a}, plain seeded decoding gives {b}"
    return f"got {len(got)} tokens, plain seeded decoding gives {len(want)}"


@pytest.fixture
def exact_arithmetic():
    """Run the test on the CPU device (a no-op on a CPU-only machine).

    The promise is token-for-token equality between a K + 1-token verify call and 1-token plain
    steps. On the CPU their float32 logits differ in the last bits (~1e-6), so a Gumbel near-tie
    flips a token about once in a million. A GPU may run float32 matmuls in TF32 (~1e-3 of the
    logits' scale, tests/support.py), which would flip one token in a few hundred on the tiny
    llama: the chapter states that limit, and these tests check the rule where arithmetic is exact
    enough to state it. The Markov pair's logits are table lookups, exact on every backend: its
    tests run wherever the suite runs.
    """
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


def seeded(ref, model, prompt, max_tokens, seed, temperature=1.0, top_k=0, top_p=1.0, eos=()):
    """The ground truth, always from the reference."""
    return list(ref.coupling.seeded_generate(model, mx.array(prompt, dtype=mx.int32), max_tokens,
                                             seed, temperature, top_k, top_p, eos))


# Task 1 -----------------------------------------------------------------------------------------
def test_task_1_noise_depends_only_on_seed_and_position(impl):
    V = 16
    noise = impl.coupling.gumbel_noise(7, [3, 9, 4], V)
    assert noise.shape == (3, V) and noise.dtype == mx.float32, (
        f"gumbel_noise(seed, 3 positions, V={V}) must be float32 [3, {V}], got {noise.dtype} "
        f"{tuple(noise.shape)}")
    for j, t in enumerate([3, 9, 4]):
        alone = impl.coupling.gumbel_noise(7, [t], V)[0]
        assert np.array_equal(np.array(noise[j]), np.array(alone)), (
            f"row {j} (position {t}) changed with the other positions asked for: the noise of a "
            f"position must depend only on (seed, position) — a round asks for [t .. t + K], a plain "
            f"step for [t] alone, and both must see the same noise ({CHAPTER}, Task 1)")
    mx.random.seed(0)
    first = np.array(impl.coupling.gumbel_noise(7, [3], V))
    mx.random.seed(1)
    assert np.array_equal(first, np.array(impl.coupling.gumbel_noise(7, [3], V))), (
        "gumbel_noise changed with mx.random.seed: it must not read global random state, only seed "
        "and position (build its key from them)")
    rows = {(s, t): np.array(impl.coupling.gumbel_noise(s, [t], V)[0])
            for s, t in [(0, 0), (0, 1), (1, 0), (1, 5), (2, 4), (0, 6), (5, 1), (6, 0)]}
    for (a, b) in [((0, 0), (0, 1)), ((0, 0), (1, 0)), ((1, 5), (2, 4)), ((0, 6), (1, 5)),
                   ((5, 1), (6, 0))]:
        assert not np.allclose(rows[a], rows[b]), (
            f"(seed, position) {a} and {b} got the same noise: every pair needs its own stream "
            "(a key like seed + position collides; use the two numbers as two key words)")


def test_task_1_noise_is_standard_gumbel(impl):
    noise = np.array(impl.coupling.gumbel_noise(11, range(100), 64), dtype=np.float64)
    pvalue = scipy_stats.kstest(noise.reshape(-1), "gumbel_r").pvalue
    assert pvalue > P_MIN, (
        f"gumbel_noise values do not look like standard Gumbel(0, 1) draws (Kolmogorov-Smirnov "
        f"p-value {pvalue:.2g}; mean {noise.mean():.3f}, should be near 0.577): use "
        f"-log(-log(u)) for uniform u in (0, 1), or mx.random.gumbel ({CHAPTER}, Task 1)")
    # Neighbouring positions must be independent: correlation ~ N(0, 1/n); |z| > 4.5 has p < 1e-5.
    a, b = noise[:-1].reshape(-1), noise[1:].reshape(-1)
    z = np.corrcoef(a, b)[0, 1] * math.sqrt(a.size)
    assert abs(z) < 4.5, (
        f"the noise of neighbouring positions is correlated (z = {z:.1f}): each position needs "
        "independent noise")


def test_task_1_noise_range_errors(impl):
    for seed, positions in [(-1, [0]), (2**32, [0]), (0, [-1])]:
        with raises(ValueError, f"gumbel_noise(seed={seed}, positions={positions}) must be refused: "
                    "0 <= seed < 2**32 and 0 <= t < 2**32"):
            impl.coupling.gumbel_noise(seed, positions, 8)


# Task 2 -----------------------------------------------------------------------------------------
LOGITS = [1.2, 0.4, -0.3, 2.0, 0.0, -1.0, 0.9, 0.5]


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.7), (0.8, 4, 0.9)])
def test_task_2_gumbel_sample_has_sample_tokens_law(impl, ref, use_ref, temperature, top_k, top_p):
    use_ref(*SAMPLING)
    N, V = 4000, len(LOGITS)
    probs = ref.sampling.make_probs(mx.array(LOGITS), temperature, top_k, top_p)
    noise = numpy_gumbel(17, (N, V))
    tokens = impl.coupling.gumbel_sample(mx.broadcast_to(probs, (N, V)), noise)
    assert tokens.shape == (N,) and tokens.dtype == mx.int32, (
        f"gumbel_sample on [N, V] must return int32 [N], got {tokens.dtype} {tuple(tokens.shape)}")
    want = np.argmax(_log(np.array(probs)) + np.array(noise), axis=-1)
    assert np.array_equal(np.array(tokens), want), (
        f"gumbel_sample must return argmax(log probs + noise) row by row (T={temperature}, "
        f"top_k={top_k}, top_p={top_p}): add the noise to the LOG-probabilities ({CHAPTER}, Task 2)")
    pvalue = chi2_pvalue(np.array(tokens), np.array(probs))
    assert pvalue > P_MIN, (
        f"gumbel_sample's tokens are not distributed as probs (chi-square p-value {pvalue:.2g}; a "
        "filtered token with probability 0 must never be chosen): Gumbel-max gives exactly the "
        "law of sample_token")


def test_task_2_gumbel_sample_one_hot_ignores_noise(impl, ref, use_ref):
    use_ref(*SAMPLING)
    probs = ref.sampling.make_probs(mx.array([LOGITS] * 50), 0.0)  # temperature 0: one-hot rows
    tokens = impl.coupling.gumbel_sample(probs, numpy_gumbel(3, (50, len(LOGITS))) * 10)
    assert set(np.array(tokens).tolist()) == {3}, (
        "at temperature 0 make_probs is one-hot at the argmax: gumbel_sample must return the hot "
        "index whatever the noise (log 0 = -inf for every other token)")


def markov_seeded_tokens(target, prompt, max_tokens, seed, temperature, top_k, top_p, noise_fn):
    """seeded_generate's definition, computed from the Markov chain's known rows."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        t = len(tokens)  # the absolute position of the token being generated
        logits = mx.log(target.next_token_probs(tokens[-1], t - 1))
        probs = np.array(make_probs_ref(logits, temperature, top_k, top_p))
        noise = np.array(noise_fn(seed, [t], target.vocab_size)[0])
        tokens.append(int(np.argmax(_log(probs) + noise)))
    return tokens[len(prompt):]


def make_probs_ref(logits, temperature, top_k, top_p):
    from specdec_ref.sampling import make_probs
    return make_probs(logits, temperature, top_k, top_p)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 4, 0.9), (0.0, 0, 1.0)])
def test_task_2_seeded_generate_follows_its_definition(impl, ref, use_ref, markov_models,
                                                       temperature, top_k, top_p):
    use_ref(*SAMPLING, *TASK_1, "coupling.gumbel_sample")
    _, target = markov_models
    prompt = [1, 2, 3, 1]
    for seed in range(4):
        got = list(impl.coupling.seeded_generate(target, mx.array(prompt), 12, seed, temperature,
                                                 top_k, top_p))
        want = markov_seeded_tokens(target, prompt, 12, seed, temperature, top_k, top_p,
                                    ref.coupling.gumbel_noise)
        assert got == want, (
            f"seed {seed}, T={temperature}, top_k={top_k}, top_p={top_p}: {first_difference(got, want)}. "
            f"The token at absolute position t (t = len(prompt) + j) is gumbel_sample(make_probs("
            f"logits_t, T, top_k, top_p), gumbel_noise(seed, [t], V)[0]) ({CHAPTER}, Task 2)")


def test_task_2_seeded_generate_marginal_law(impl, use_ref, markov_models):
    """Over seeds, plain seeded decoding is distributed as the target: the first token as p(. | last
    prompt token), the second as the mixture sum_x p(x) p(. | x)."""
    use_ref(*SAMPLING, *TASK_1, "coupling.gumbel_sample")
    _, target = markov_models
    prompt, N = [4, 7], 2500
    pairs = np.array([list(impl.coupling.seeded_generate(target, mx.array(prompt), 2, seed, 1.0))
                      for seed in range(N)])
    p1 = np.array(target.next_token_probs(7, 1), dtype=np.float64)
    rows = np.array(target.transitions[2 % target.period], dtype=np.float64)
    p2 = p1 @ rows
    for name, samples, law in [("first", pairs[:, 0], p1), ("second", pairs[:, 1], p2)]:
        pvalue = chi2_pvalue(samples, law)
        assert pvalue > P_MIN, (
            f"over {N} seeds the {name} generated token is not distributed as the target's law "
            f"(chi-square p-value {pvalue:.2g}): seeded decoding must sample each position from "
            f"make_probs with fresh, independent noise per (seed, position) ({CHAPTER}, Task 2)")


def test_task_2_seeded_generate_stops(impl, use_ref, markov_models):
    use_ref(*SAMPLING, *TASK_1, "coupling.gumbel_sample")
    _, target = markov_models
    full = list(impl.coupling.seeded_generate(target, mx.array([1, 2]), 10, 5, 1.0))
    assert len(full) == 10, f"max_tokens=10 must give 10 tokens, got {len(full)}"
    cut = list(impl.coupling.seeded_generate(target, mx.array([1, 2]), 10, 5, 1.0,
                                             eos_token_ids=[full[3]]))
    stop = full.index(full[3])
    assert cut == full[: stop + 1], (
        f"with eos_token_ids=[{full[3]}] decoding must stop right after yielding it: expected "
        f"{full[: stop + 1]}, got {cut}")
    counted = CallCounter(target)
    assert list(impl.coupling.seeded_generate(counted, mx.array([1]), 0, 5)) == [] and counted.calls == 0, (
        "max_tokens=0 yields nothing and calls no model")
    with raises(ValueError, "an empty prompt must be refused: the model needs a token to read"):
        list(impl.coupling.seeded_generate(target, mx.array([], dtype=mx.int32), 3, 0))


# Task 3 -----------------------------------------------------------------------------------------
def coupled_target_tokens(ref, logits, noise, temperature, top_k=0, top_p=1.0):
    probs = np.array(ref.sampling.make_probs(logits, temperature, top_k, top_p))
    return np.argmax(_log(probs) + np.array(noise), axis=-1).tolist()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.2, 0, 0.8)])
def test_task_3_verify_coupled_accepts_exactly_agreement(impl, ref, use_ref, temperature, top_k, top_p):
    use_ref(*SAMPLING, *TASK_2)
    V, rng = 7, np.random.default_rng(5)
    for case in range(24):
        K = case % 5  # K = 0 included: one token, the target's own
        logits = mx.array(rng.normal(size=(K + 1, V)).astype(np.float32) * 2)
        noise = numpy_gumbel(100 + case, (K + 1, V))
        y = coupled_target_tokens(ref, logits, noise, temperature, top_k, top_p)
        cut = int(rng.integers(0, K + 1))  # drafts agree with y before `cut`, differ at it
        drafts = list(y[:K])
        if cut < K:
            drafts[cut] = (y[cut] + 1 + int(rng.integers(0, V - 1))) % V
        n, tokens = impl.coupling.verify_coupled(mx.array(drafts, dtype=mx.int32), logits, noise,
                                                 temperature, top_k, top_p)
        want_n = cut if cut < K else K
        assert n == want_n, (
            f"drafts {drafts}, the target's coupled tokens {y}: n must be {want_n}, the longest "
            f"prefix where draft == target token (accept iff they agree), got {n} ({CHAPTER}, Task 3)")
        assert list(tokens) == y[: want_n + 1], (
            f"drafts {drafts}, the target's coupled tokens y = {y}, n = {want_n}: tokens must be "
            f"y[:n + 1] = {y[: want_n + 1]}, got {list(tokens)}: {BONUS_POSITION}")


def test_task_3_coupled_draft_uses_the_noise(impl, ref, use_ref, markov_models):
    use_ref(*SAMPLING, *TASK_2)
    draft, _ = markov_models
    V, K, prompt = draft.vocab_size, 5, [3, 1, 4]
    noise = numpy_gumbel(9, (1, K, V))
    cache = make_prompt_cache(draft)
    got = impl.coupling.coupled_draft(draft, cache, mx.array([prompt]), noise, 0.9)
    assert got.shape == (1, K) and got.dtype == mx.int32, (
        f"coupled_draft must return int32 [B, K] = [1, {K}], got {got.dtype} {tuple(got.shape)}")
    tokens = list(prompt)
    for i in range(K):
        q = make_probs_ref(mx.log(draft.next_token_probs(tokens[-1], len(tokens) - 1)), 0.9, 0, 1.0)
        tokens.append(int(np.argmax(_log(np.array(q)) + np.array(noise[0, i]))))
    assert np.array(got)[0].tolist() == tokens[len(prompt):], (
        f"drafts {np.array(got)[0].tolist()}, expected {tokens[len(prompt):]}: {DRAFT_NOISE} "
        f"({CHAPTER}, Task 3)")
    assert cache[0].offset == len(prompt) + K - 1, (
        f"after coupled_draft the draft cache must hold the {len(prompt)} inputs and the first K - 1 "
        f"= {K - 1} drafts ({len(prompt) + K - 1} tokens; the last is fed next round), got "
        f"{cache[0].offset}")
    # Two rows of different lengths in a BatchKVCache: each row as if alone.
    rows = [[3, 1, 4], [2, 7]]
    batch_noise = numpy_gumbel(10, (2, K, V))
    padded = mx.array([[3, 1, 4], [0, 2, 7]], dtype=mx.int32)
    got = impl.coupling.coupled_draft(draft, [BatchKVCache([0, 1])], padded, batch_noise, 0.9)
    for b, row in enumerate(rows):
        alone = impl.coupling.coupled_draft(draft, make_prompt_cache(draft), mx.array([row]),
                                            batch_noise[b : b + 1], 0.9)
        assert np.array(got)[b].tolist() == np.array(alone)[0].tolist(), (
            f"row {b} of a batched coupled_draft differs from the same row drafted alone: each row "
            f"uses its own noise noise[b] and its own logits [:, -1]")


@pytest.mark.parametrize("mix", [0.3, 0.6, 0.9])
def test_task_3_acceptance_respects_the_bound(impl, ref, use_ref, mix):
    """One drafted position, a target p and a draft q with known TV: accepted at least
    (1 - TV) / (1 + TV) of the time (Azuma margin, false alarm P_MIN). Negative control: a draft with
    independent noise accepts sum_x p(x) q(x), which the same check rejects."""
    use_ref(*SAMPLING, *TASK_2)
    V, N = 10, 3000
    rng = np.random.default_rng(int(mix * 10))
    p = rng.dirichlet(np.full(V, 0.8))
    q = (1 - mix) * p + mix * rng.dirichlet(np.full(V, 0.8))
    tv = 0.5 * np.abs(p - q).sum()
    bound = (1 - tv) / (1 + tv)
    draft = MarkovLM(mx.array(np.tile(q, (V, 1)).astype(np.float32)))  # q after every token
    noise = numpy_gumbel(int(mix * 100), (N, 2, V))
    drafts = impl.coupling.coupled_draft(draft, [BatchKVCache([0] * N)], mx.zeros((N, 1), mx.int32),
                                         noise[:, :1], 1.0)
    target_logits = mx.log(mx.array(np.tile(p, (2, 1)).astype(np.float32)))
    accepted = sum(impl.coupling.verify_coupled(drafts[i], target_logits, noise[i], 1.0)[0]
                   for i in range(N))
    margin = math.sqrt(N * AZUMA)
    assert accepted >= N * bound - margin, (
        f"TV = {tv:.3f}: {accepted} of {N} drafts accepted ({accepted / N:.3f}), below the coupling "
        f"bound (1 - TV)/(1 + TV) = {bound:.3f} minus the margin {margin / N:.3f}: {DRAFT_NOISE} "
        f"({CHAPTER}, Task 3)")
    # Negative control: the check has the power to catch a draft with its own noise.
    independent = np.argmax(np.log(q) + np.random.default_rng(1).gumbel(size=(N, V)), axis=-1)
    target_tokens = np.argmax(np.log(p) + np.array(noise[:, 0]), axis=-1)
    control = int((independent == target_tokens).sum())
    assert control < N * bound - margin, "negative control: independent noise must fail the bound"


# Task 4 -----------------------------------------------------------------------------------------
class ScriptedController:
    """A controller whose K comes from a script (cycled), recording every update it gets."""

    def __init__(self, script):
        self.script, self.round, self.updates = list(script), 0, []

    @property
    def lookahead(self) -> int:
        return self.script[self.round % len(self.script)]

    def update(self, num_drafted, num_accepted, draft_time_s=None, verify_time_s=None) -> int:
        self.updates.append((num_drafted, num_accepted))
        self.round += 1
        return self.lookahead


def decoders(ref, draft, target, K):
    """Every single-stream drafter of the course: the draft model two ways, and n-gram lookup."""
    return {
        "SpeculativeDecoder": ref.draft.SpeculativeDecoder(draft, target, K),
        "ModelDrafter": ref.drafters.DrafterDecoder(ref.drafters.ModelDrafter(draft), target, K),
        "NgramDrafter": ref.drafters.DrafterDecoder(ref.drafters.NgramDrafter(), target, K),
    }


def run_coupled(impl, decoder, prompt, max_tokens, seed, temperature=0.8, top_k=0, top_p=1.0,
                controller=None, stats=None, eos=()):
    return [t for t, _ in impl.coupling.coupled_generate(
        decoder, mx.array(prompt, dtype=mx.int32), max_tokens, seed, temperature, top_k, top_p,
        eos, controller, stats)]


@pytest.mark.parametrize("pair", ["markov", "llama"])
def test_task_4_output_is_plain_seeded_decoding(impl, ref, use_ref, exact_arithmetic, pair,
                                               markov_models, llama_models):
    use_ref(*LOOP)
    draft, target = markov_models if pair == "markov" else llama_models
    prompt = [1, 2, 3, 1, 2]
    seeds, ks = (range(12), range(1, 9)) if pair == "markov" else (range(3), (1, 2, 3, 5, 8))
    for seed in seeds:
        want = seeded(ref, target, prompt, 20, seed, 0.8)
        for K in ks:
            for name, decoder in decoders(ref, draft, target, K).items():
                got = run_coupled(impl, decoder, prompt, 20, seed)
                assert got == want, (
                    f"{pair} pair, {name}, K={K}, seed {seed}, T=0.8: {first_difference(got, want)}. "
                    f"A coupled loop must emit plain seeded decoding's tokens whatever the drafter "
                    f"and K: {NOISE_BY_ROUND} ({CHAPTER}, Task 4)")


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.6, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 0.9),
                                                       (0.0, 0, 1.0)])
def test_task_4_every_sampling_setting(impl, ref, use_ref, exact_arithmetic, llama_models,
                                       temperature, top_k, top_p):
    use_ref(*LOOP)
    draft, target = llama_models
    for seed in (3, 4):
        want = seeded(ref, target, [5, 9, 2], 16, seed, temperature, top_k, top_p)
        got = run_coupled(impl, ref.draft.SpeculativeDecoder(draft, target, 4), [5, 9, 2], 16, seed,
                          temperature, top_k, top_p)
        assert got == want, (
            f"T={temperature}, top_k={top_k}, top_p={top_p}, seed {seed}: {first_difference(got, want)}: "
            f"pass temperature, top_k and top_p to both the draft and the verification; or {NOISE_BY_ROUND}")


@pytest.mark.parametrize("script", [[0, 0, 3, 0, 1, 8, 2, 0, 5], [4, 0], [0]])
def test_task_4_controller_switches_including_plain(impl, ref, use_ref, markov_models, script):
    use_ref(*LOOP)
    draft, target = markov_models
    prompt = [2, 5, 1]
    for seed in range(6):
        want = seeded(ref, target, prompt, 30, seed, 0.8)
        for name, decoder in decoders(ref, draft, target, 4).items():
            controller, stats = ScriptedController(script), SpecStats()
            got = run_coupled(impl, decoder, prompt, 30, seed, controller=controller, stats=stats)
            assert got == want, (
                f"{name}, controller script {script}, seed {seed}: {first_difference(got, want)}. "
                f"Rounds of K = 0 are plain rounds (one target call, the token at position t with "
                f"noise (seed, t)); the draft catches up after them: {NOISE_BY_ROUND}")
            ks = [k for k, _ in controller.updates]
            assert stats.lookahead_per_round == ks, (
                f"stats must record each round's K as given to controller.update: stats {ks}")
            for i, (k, n) in enumerate(controller.updates):
                assert k <= script[i % len(script)] and 0 <= n <= k, (
                    f"round {i}: update({k}, {n}) with the script's K = {script[i % len(script)]}: "
                    "K is the controller's (capped by the tokens left), 0 <= n <= K, n = 0 when K = 0")


def test_task_4_follows_the_controller_k(impl, ref, use_ref, markov_models):
    use_ref(*LOOP)
    draft, target = markov_models
    controller = ScriptedController([0, 3, 0, 0, 2])
    stats = SpecStats()
    out = run_coupled(impl, ref.draft.SpeculativeDecoder(draft, target, 7), [1, 2], 40, 0,
                      controller=controller, stats=stats)
    assert len(out) == 40, f"max_tokens=40 must give 40 tokens (no EOS here), got {len(out)}"
    ks = [k for k, _ in controller.updates]
    want = [[0, 3, 0, 0, 2][i % 5] for i in range(len(ks))]
    assert ks[:-2] == want[:-2], (
        f"K per round must be controller.lookahead read at the start of each round (0 = a plain "
        f"round), capped only by the tokens still wanted: got {ks[:12]}..., script gives {want[:12]}...")
    plain = [i for i, k in enumerate(ks) if k == 0]
    assert all(stats.accepted_per_round[i] == 0 for i in plain), "a plain round accepts nothing"


def test_task_4_real_fallback_controller(impl, ref, use_ref, exact_arithmetic, llama_models):
    """Whatever K the real controller picks from this machine's timings, the text is the same."""
    use_ref(*LOOP)
    draft, target = llama_models
    want = seeded(ref, target, [7, 1, 3], 40, 21, 0.8)
    for max_lookahead in (1, 4):
        controller = ref.fallback.FallbackController(max_lookahead=max_lookahead, calibration_rounds=2)
        got = run_coupled(impl, ref.draft.SpeculativeDecoder(draft, target, 4), [7, 1, 3], 40, 21,
                          controller=controller)
        assert got == want, f"with a FallbackController: {first_difference(got, want)}"


def test_task_4_acceptance_respects_the_bound(impl, ref, use_ref, markov_models):
    """Every reached draft position is accepted with probability >= (1 - TV)/(1 + TV) of its own
    (state, position) given the past; summed over positions with an Azuma margin (P_MIN)."""
    use_ref(*LOOP)
    draft, target = markov_models
    P, Q = np.array(target.transitions, np.float64), np.array(draft.transitions, np.float64)
    tv = 0.5 * np.abs(P - Q).sum(-1)
    bound = (1 - tv) / (1 + tv)  # [period, V]
    prompt, K = [1, 2], 4
    reached = accepted = 0
    expected = 0.0
    for seed in range(50):
        stats = SpecStats()
        out = run_coupled(impl, ref.draft.SpeculativeDecoder(draft, target, K), prompt, 40, seed,
                          temperature=1.0, stats=stats)
        sequence, t = prompt + out, len(prompt)
        for k, n in zip(stats.lookahead_per_round, stats.accepted_per_round):
            for i in range(min(n + 1, k)):  # the positions this round reached
                pos = t + i
                expected += bound[(pos - 1) % target.period, sequence[pos - 1]]
                reached += 1
            accepted += n
            t += n + 1
    margin = math.sqrt(reached * AZUMA)
    assert accepted >= expected - margin, (
        f"{accepted} of {reached} reached draft positions accepted, but the coupling bound "
        f"(1 - TV)/(1 + TV) promises at least {expected:.0f} - {margin:.0f} (false alarm {P_MIN}): "
        f"{DRAFT_NOISE} ({CHAPTER}, Task 4)")


def test_task_4_stops_and_refuses(impl, ref, use_ref, markov_models):
    use_ref(*LOOP)
    draft, target = markov_models
    full = seeded(ref, target, [1, 2], 20, 8, 0.8)
    eos = full[6]
    got = run_coupled(impl, ref.draft.SpeculativeDecoder(draft, target, 5), [1, 2], 20, 8, eos=[eos])
    assert got == full[: full.index(eos) + 1], (
        f"decoding must stop right after yielding EOS {eos}, even inside an accepted block: got {got}")
    counted = CallCounter(target)
    assert run_coupled(impl, ref.draft.SpeculativeDecoder(draft, counted, 3), [1], 0, 0) == [] \
        and counted.calls == 0, "max_tokens=0 yields nothing and runs no round"
    with raises(ValueError, "an empty prompt must be refused"):
        run_coupled(impl, ref.draft.SpeculativeDecoder(draft, target, 3), [], 5, 0)


# Task 5 -----------------------------------------------------------------------------------------
POOL = [[1, 2, 3, 1, 2], [7], [4, 4, 9, 2], [3, 1], [5, 6, 7, 8, 9, 10, 11], [2, 2], [9, 1, 3],
        [6, 0, 6, 0]]


@pytest.mark.parametrize("pair", ["markov", "llama"])
def test_task_5_each_row_is_its_plain_seeded_decoding(impl, ref, use_ref, exact_arithmetic, pair,
                                                      markov_models, llama_models):
    use_ref(*LOOP, *BATCHED_FOUNDATIONS)
    draft, target = markov_models if pair == "markov" else llama_models
    truth = {}
    for B in range(1, 9):
        for order in ("forward", "reversed"):
            idx = list(range(B)) if order == "forward" else list(range(8 - B, 8))[::-1]
            prompts, seeds = [POOL[i] for i in idx], [40 + i for i in idx]
            K = (1, 3, 8)[B % 3]
            outputs = impl.coupling.batched_coupled_decode(prompts, seeds, draft, target, 18, K, 0.8)
            for i, out in zip(idx, outputs):
                if i not in truth:
                    truth[i] = seeded(ref, target, POOL[i], 18, 40 + i, 0.8)
                assert list(out) == truth[i], (
                    f"{pair} pair, batch of {B} ({order}), K={K}, row with prompt {POOL[i]} and seed "
                    f"{40 + i}: {first_difference(list(out), truth[i])}. A row's text depends only on "
                    f"its prompt and seed, never on its batch-mates: {NOISE_BY_ROUND} ({CHAPTER}, Task 5)")


@pytest.mark.parametrize("script", [[0, 0, 3, 0, 1, 8, 2, 0, 5], [3, 0], [0, 4]])
def test_task_5_controller_switches_including_plain(impl, ref, use_ref, markov_models, script):
    use_ref(*LOOP, *BATCHED_FOUNDATIONS)
    draft, target = markov_models
    prompts, seeds = POOL[:5], [11, 12, 13, 14, 15]
    controller, stats = ScriptedController(script), SpecStats()
    outputs = impl.coupling.batched_coupled_decode(prompts, seeds, draft, target, 25, 4, 0.8,
                                                   controller=controller, stats=stats)
    for prompt, seed, out in zip(prompts, seeds, outputs):
        want = seeded(ref, target, prompt, 25, seed, 0.8)
        assert list(out) == want, (
            f"controller script {script}, prompt {prompt}, seed {seed}: {first_difference(list(out), want)}. "
            f"K = 0 rounds are plain batched rounds; afterwards the draft catches up on the tokens it "
            f"missed: {NOISE_BY_ROUND}")
    for k, counts in controller.updates:
        assert (k == 0 and counts == 0) or (isinstance(counts, (list, tuple)) and len(counts) >= 1
                                            and all(0 <= n <= k for n in counts)), (
            f"controller.update({k}, {counts}): a speculative round reports one count per live row, "
            "a plain round update(0, 0, ...)")


def test_task_5_real_fallback_controller(impl, ref, use_ref, exact_arithmetic, llama_models):
    """Whatever K (0 included) the real controller picks from this machine's timings, each row's
    text is the same."""
    use_ref(*LOOP, *BATCHED_FOUNDATIONS)
    draft, target = llama_models
    prompts, seeds = POOL[:4], [5, 6, 7, 8]
    controller = ref.fallback.FallbackController(max_lookahead=4, calibration_rounds=2)
    outputs = impl.coupling.batched_coupled_decode(prompts, seeds, draft, target, 30, 4, 0.8,
                                                   controller=controller)
    for prompt, seed, out in zip(prompts, seeds, outputs):
        want = seeded(ref, target, prompt, 30, seed, 0.8)
        assert list(out) == want, f"with a FallbackController: {first_difference(list(out), want)}"


def test_task_5_eos_seeds_and_errors(impl, ref, use_ref, markov_models):
    use_ref(*LOOP, *BATCHED_FOUNDATIONS)
    draft, target = markov_models
    prompts, seeds = POOL[:3], [1, 2, 3]
    eos = seeded(ref, target, prompts[0], 20, 1, 0.8)[4]
    outputs = impl.coupling.batched_coupled_decode(prompts, seeds, draft, target, 20, 3, 0.8,
                                                   eos_token_ids=[eos])
    for prompt, seed, out in zip(prompts, seeds, outputs):
        want = seeded(ref, target, prompt, 20, seed, 0.8, eos=[eos])
        assert list(out) == want, (
            f"with EOS {eos}: a row stops right after yielding it, the others go on: "
            f"{first_difference(list(out), want)}")
    with raises(ValueError, "2 seeds for 3 prompts must be refused: one seed per row"):
        impl.coupling.batched_coupled_decode(prompts, [1, 2], draft, target, 5)
    assert impl.coupling.batched_coupled_decode(prompts, seeds, draft, target, 0) == [[], [], []], (
        "max_tokens=0 returns one empty list per row")
