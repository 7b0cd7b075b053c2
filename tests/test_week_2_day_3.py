"""Week 2 Day 3 — speculative sampling: `residual_distribution` and `verify_speculation`.

Book: book/src/week2-03-speculative-sampling.md. Grade one task with
    pytest tests/test_week_2_day_3.py --impl student -k task_2

How the statistical tests work. The target's rows p_0 .. p_K and the draft's rows q_0 .. q_(K-1)
are fixed here (they do not depend on earlier tokens), and the drafts are sampled from q with
explicit keys. Speculative sampling then promises exactly:
  - the first emitted token is distributed as p_0, whatever q is;
  - when the first draft was accepted (n >= 1), it is distributed as min(p_0, q_0) / alpha_0, and
    the second emitted token is distributed as p_1, independently of the first;
  - the bonus token (n = K) is distributed as p_K;
  - the number of accepted drafts n has P(n >= i) = alpha_0 * ... * alpha_(i-1), where
    alpha_i = sum_x min(p_i(x), q_i(x)) is the acceptance rate of position i.
  - after a rejection at position i (n = i < K), the replacement token is distributed as the
    residual normalise(max(0, p_i - q_i)) — never as p_i or q_i themselves.
Each is checked with a seeded chi-square (or binomial) test that fails when its p-value is below
P_MIN = 1e-4, and each failure message names the rule it suspects (the accept test min(1, p/q),
the residual, the bonus from p_K, the temperature, the key handling). False alarms: a correct
implementation that uses its randomness differently from the reference fails a given check with
probability 1e-4, so all checks of this file together (about 35) with probability < 0.5 %.
The seeds are fixed, so a run's outcome never changes. Power: with N trials, an output distribution at total
variation distance d from the truth gives a chi-square statistic of at least 4 N d^2 (about 40
for N = 4000 and d = 0.05): such a bug fails. The negative controls below prove it on two classic
mistakes.
"""

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import binomtest, chisquare

from support import raises

P_MIN = 1e-4  # chi-square / binomial p-value below which a check fails
CHAPTER = "book/src/week2-03-speculative-sampling.md"

# Earlier tasks this day builds on: always the reference's here (isolation).
SAMPLING = (
    "sampling.logits_to_probs",
    "sampling.top_k_filter",
    "sampling.top_p_filter",
    "sampling.sample_token",
    "sampling.make_probs",
)
EARLIER = (*SAMPLING, "verify.verify_greedy", "verify.residual_distribution")

# A generic case, V = 6, K = 3: alpha = (0.70, 0.80, 0.75).
P_GENERIC = [
    [0.30, 0.25, 0.15, 0.12, 0.10, 0.08],
    [0.05, 0.10, 0.40, 0.20, 0.15, 0.10],
    [0.15, 0.15, 0.15, 0.15, 0.20, 0.20],
    [0.40, 0.05, 0.05, 0.20, 0.10, 0.20],  # the bonus row p_K
]
Q_GENERIC = [
    [0.10, 0.40, 0.25, 0.05, 0.15, 0.05],
    [0.20, 0.10, 0.30, 0.10, 0.20, 0.10],
    [0.30, 0.05, 0.10, 0.25, 0.10, 0.20],
]


def normalise(x):
    x = np.asarray(x, dtype=np.float64)
    return x / x.sum(axis=-1, keepdims=True)


def chi2_pvalue(samples, probs):
    """Chi-square p-value that `samples` (ints) were drawn from `probs` [V]; 0 if any sample
    falls where probs == 0 (an impossible token)."""
    probs = normalise(probs)
    counts = np.bincount(np.asarray(samples, dtype=np.int64), minlength=probs.size).astype(np.float64)
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    # Chi-square needs expected counts of about 5 or more: pool the rare tokens into one cell.
    rare = (probs > 0) & (expected < 5)
    common = (probs > 0) & ~rare
    observed_cells = np.append(counts[common], counts[rare].sum())
    expected_cells = np.append(expected[common], expected[rare].sum())
    keep = expected_cells > 0
    if keep.sum() < 2:  # one possible outcome: nothing to test beyond the support check
        return 1.0
    return chisquare(observed_cells[keep], expected_cells[keep]).pvalue


# What each law's failure points at, in the book's words.
SUSPECT_ACCEPT = (
    "the accept test: accept d_(i+1) with probability min(1, p_i(d) / q_i(d)), i.e. iff "
    "u * q_i(d) < p_i(d) with a fresh uniform u, using row i of both p and q"
)
SUSPECT_RESIDUAL = (
    "the replacement after a rejection: sample it from residual_distribution(p_n, q_n) = "
    "normalise(max(0, p_n - q_n)) at the rejected position n, not from p_n or q_n"
)
SUSPECT_FIRST = f"{SUSPECT_ACCEPT}; or {SUSPECT_RESIDUAL}"
SUSPECT_WALK = (
    "the walk: n is the index of the FIRST rejection (K if none), and drafts after it never count"
)
SUSPECT_KEYS = (
    "the key handling: every draft's accept test needs its own uniform, and the replacement its "
    "own draw — split the key (one part for the K uniforms, one for the new token)"
)
SUSPECT_BONUS = "the bonus token: when all K drafts are accepted, sample it from p_K (the last row)"


def assert_distributed(samples, probs, what, suspect=None):
    pvalue = chi2_pvalue(samples, probs)
    observed = np.bincount(np.asarray(samples, dtype=np.int64), minlength=len(probs)) / max(len(samples), 1)
    assert pvalue > P_MIN, (
        f"{what} should be distributed as {np.round(normalise(probs), 3)}; observed frequencies "
        f"{np.round(observed, 3)} over {len(samples)} samples (chi-square p-value {pvalue:.2g} < "
        f"{P_MIN}).{f' Suspect {suspect}.' if suspect else ''} See the proof in {CHAPTER}"
    )


def sample_drafts(q_rows, trials, key):
    """Draft tokens [trials, K]: row t, column i drawn from q_rows[i] (independent keys)."""
    log_q = mx.log(mx.array(np.asarray(q_rows, dtype=np.float32)))
    K, Vq = log_q.shape
    drafts = mx.random.categorical(mx.broadcast_to(log_q, (trials, K, Vq)), key=key)
    return np.array(drafts.astype(mx.int32))


def run_rounds(verify, target_logits, q_rows, trials, seed, temperature=1.0):
    """`trials` independent rounds: drafts from q, one verify call each with its own key.

    Returns (drafts [trials, K] numpy, list of (n, tokens)).
    """
    key_draft, key_verify = mx.random.split(mx.random.key(seed))
    drafts = sample_drafts(q_rows, trials, key_draft)
    draft_rows = mx.array(drafts)
    q_draft = mx.array(np.asarray(q_rows, dtype=np.float32))
    keys = mx.random.split(key_verify, trials)
    outcomes = [verify(draft_rows[t], target_logits, q_draft, temperature, keys[t]) for t in range(trials)]
    K = drafts.shape[1]
    for t in (0, trials - 1):  # the contract, checked on a couple of rounds
        n, tokens = outcomes[t]
        assert type(n) is int and 0 <= n <= K and len(tokens) == n + 1, (
            f"verify_speculation returns (n, tokens) with n in [0, {K}] and n + 1 tokens, got {outcomes[t]}"
        )
        assert all(type(x) is int for x in tokens), "tokens must be python ints"
    for (n, tokens), row in zip(outcomes, drafts):
        assert tokens[:n] == row[:n].tolist(), (
            f"the first n = {n} emitted tokens must be the accepted drafts {row[:n].tolist()}, got {tokens}"
        )
    return drafts, outcomes


def log_probs(p_rows):
    """Target logits whose softmax (T = 1) is p_rows; impossible tokens get -inf."""
    with np.errstate(divide="ignore"):
        return mx.array(np.log(np.asarray(p_rows, dtype=np.float32)))


def acceptance(p, q):
    return float(np.minimum(normalise(p), normalise(q)).sum())


def check_speculative_distribution(outcomes, p_rows, q_rows, check_second=True, where=""):
    """The exact laws listed in the module docstring, for the rounds in `outcomes`.

    The laws that pin one rule down (acceptance, the residual, the bonus) are checked before the
    first emitted token, which mixes them, so a failure names the most specific suspect.
    """
    p_rows, q_rows = normalise(p_rows), normalise(q_rows)
    K = len(q_rows)
    n = np.array([o[0] for o in outcomes])
    firsts = np.array([o[1][0] for o in outcomes])

    alpha_0 = acceptance(p_rows[0], q_rows[0])
    accepted_0 = int((n >= 1).sum())
    binomial = binomtest(accepted_0, len(n), alpha_0).pvalue
    assert binomial > P_MIN, (
        f"{where}the first draft should be accepted with probability sum_x min(p, q) = "
        f"{alpha_0:.3f}; observed {accepted_0 / len(n):.3f} over {len(n)} rounds (binomial p-value "
        f"{binomial:.2g}). Suspect {SUSPECT_ACCEPT}"
    )
    if accepted_0:
        assert_distributed(
            firsts[n >= 1], np.minimum(p_rows[0], q_rows[0]), f"{where}an accepted first draft",
            SUSPECT_ACCEPT,
        )
    check_residuals(outcomes, p_rows, q_rows, where)
    # n: P(n = i) = alpha_0 ... alpha_(i-1) * (1 - alpha_i), P(n = K) = alpha_0 ... alpha_(K-1).
    alphas = [acceptance(p_rows[i], q_rows[i]) for i in range(K)]
    reach = np.cumprod([1.0] + alphas)  # P(n >= i), i = 0 .. K
    law_n = np.append(reach[:-1] * (1 - np.array(alphas)), reach[-1])
    assert_distributed(n, law_n, f"{where}the number of accepted drafts n", f"{SUSPECT_WALK}; or {SUSPECT_ACCEPT}")
    bonus = [o[1][-1] for o in outcomes if o[0] == K]
    if len(bonus) >= 200:
        assert_distributed(bonus, p_rows[K], f"{where}the bonus token (all K drafts accepted)", SUSPECT_BONUS)
    assert_distributed(
        firsts, p_rows[0], f"{where}the first emitted token (accepted draft or correction)", SUSPECT_FIRST
    )
    if check_second and K >= 2:
        seconds = np.array([o[1][1] for o in outcomes if o[0] >= 1])
        assert_distributed(
            seconds, p_rows[1], f"{where}the second emitted token, when the first was a draft",
            f"{SUSPECT_KEYS}; or {SUSPECT_FIRST}",
        )


def check_residuals(outcomes, p_rows, q_rows, where=""):
    """Given a rejection at position i (n = i < K), the emitted token tokens[i] is distributed as
    normalise(max(0, p_i - q_i)); checked for every position with at least 100 rejections."""
    p_rows, q_rows = normalise(p_rows), normalise(q_rows)
    for i in range(len(q_rows)):
        replacements = [tokens[i] for n, tokens in outcomes if n == i]
        residual = np.maximum(p_rows[i] - q_rows[i], 0.0)
        if len(replacements) < 100 or residual.sum() == 0:
            continue
        assert_distributed(
            replacements, residual,
            f"{where}the replacement token after a rejection at position {i} (rounds with n = {i})",
            SUSPECT_RESIDUAL,
        )


# Task 1: residual_distribution -------------------------------------------------------------------
def test_task_1_residual_small_example(impl):
    p = mx.array([0.5, 0.3, 0.2, 0.0])
    q = mx.array([0.2, 0.5, 0.1, 0.2])
    got = impl.verify.residual_distribution(p, q)
    # max(0, p - q) = [0.3, 0, 0.1, 0], mass 0.4.
    assert got.dtype == mx.float32 and got.shape == (4,), f"expected float32 [4], got {got.dtype} {got.shape}"
    assert np.allclose(np.array(got), [0.75, 0.0, 0.25, 0.0], atol=1e-6), (
        f"normalise(max(0, p - q)) for p={p.tolist()}, q={q.tolist()} is [0.75, 0, 0.25, 0], got "
        f"{np.round(np.array(got), 4).tolist()}"
    )
    # A one-hot q (a greedy draft): p with the drafted token removed, renormalised.
    got = impl.verify.residual_distribution(p, mx.array([0.0, 1.0, 0.0, 0.0]))
    assert np.allclose(np.array(got), [0.5 / 0.7, 0.0, 0.2 / 0.7, 0.0], atol=1e-6), (
        f"with a one-hot q at token 1 the residual is p without token 1, renormalised; got {np.array(got)}"
    )
    # Disjoint supports: nothing to subtract, the residual is p itself.
    got = impl.verify.residual_distribution(mx.array([0.5, 0.5, 0, 0]), mx.array([0, 0, 0.3, 0.7]))
    assert np.allclose(np.array(got), [0.5, 0.5, 0, 0], atol=1e-6), f"disjoint q: expected p, got {np.array(got)}"


def test_task_1_residual_of_identical_rows_is_p(impl):
    p = mx.array([0.1, 0.6, 0.3])
    got = np.array(impl.verify.residual_distribution(p, p))
    assert np.all(np.isfinite(got)) and np.allclose(got, np.array(p), atol=1e-7), (
        f"when p == q the residual max(0, p - q) is all zero; return p instead of dividing by "
        f"zero (a rejection cannot happen there). Got {got}"
    )


def test_task_1_residual_batched_rows(impl):
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(7), size=(2, 3)).astype(np.float32)
    q = rng.dirichlet(np.ones(7), size=(2, 3)).astype(np.float32)
    q[1, 2] = p[1, 2]  # one row with p == q inside the batch
    got = impl.verify.residual_distribution(mx.array(p), mx.array(q))
    assert got.shape == (2, 3, 7) and got.dtype == mx.float32, f"expected float32 [2, 3, 7], got {got.dtype} {got.shape}"
    got = np.array(got)
    residual = np.maximum(p.astype(np.float64) - q, 0)
    expected = residual / np.where(residual.sum(-1, keepdims=True) > 0, residual.sum(-1, keepdims=True), 1)
    expected[1, 2] = p[1, 2]
    assert np.all(np.isfinite(got)), "no NaN or inf: guard the rows where p == q"
    assert np.allclose(got.sum(-1), 1.0, atol=1e-5), f"every row must sum to 1 (last axis), sums {got.sum(-1)}"
    assert np.allclose(got, expected, atol=1e-5), (
        "residual_distribution works row by row on [..., V]: normalise(max(0, p - q)) over the last "
        "axis, and p for the rows where p == q"
    )


# Task 2: verify_speculation ----------------------------------------------------------------------
def test_task_2_output_is_distributed_as_the_target(impl, use_ref):
    use_ref(*EARLIER)
    _, outcomes = run_rounds(impl.verify.verify_speculation, log_probs(P_GENERIC), Q_GENERIC, 4000, seed=1)
    check_speculative_distribution(outcomes, P_GENERIC, Q_GENERIC)
    # The first two tokens of rounds that accepted the first draft, jointly:
    # P(x1 = a, x2 = b | n >= 1) = min(p_0, q_0)(a) / alpha_0 * p_1(b) — 36 cells.
    p, q = normalise(P_GENERIC), normalise(Q_GENERIC)
    pairs = [o[1][0] * 6 + o[1][1] for o in outcomes if o[0] >= 1]
    joint = np.outer(np.minimum(p[0], q[0]), p[1]).reshape(-1)
    assert_distributed(pairs, joint, "the pair (first, second) emitted tokens when the first was a draft")


def test_task_2_replacement_comes_from_the_residual(impl, use_ref):
    """A greedy-like draft: q is one-hot at token 1, so every round drafts token 1, which the
    target accepts with probability p(1) = 0.25. After a rejection the residual
    normalise(max(0, p - q)) gives token 1 probability exactly 0: a correct verifier NEVER emits
    token 1 in a rejected round (no false alarms), while resampling from p emits it about a quarter
    of the time. Then the replacement's whole distribution is checked (chi-square, P_MIN)."""
    use_ref(*EARLIER)
    p_rows = [P_GENERIC[0], P_GENERIC[3]]  # p_0, and the bonus row p_1 (K = 1)
    q_rows = [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    _, outcomes = run_rounds(impl.verify.verify_speculation, log_probs(p_rows), q_rows, 1200, seed=8)
    replacements = [tokens[0] for n, tokens in outcomes if n == 0]
    assert len(replacements) > 700, (
        f"only {len(replacements)} of 1200 rounds rejected a draft the target accepts with probability "
        f"0.25 (about 900 expected). Suspect {SUSPECT_ACCEPT}"
    )
    wrong = sum(token == 1 for token in replacements)
    assert wrong == 0, (
        f"after rejecting draft token 1 (q one-hot at 1), the replacement was token 1 again in {wrong} "
        f"of {len(replacements)} rejected rounds. The residual max(0, p - q) is 0 at token 1, so it "
        f"can never come back: {SUSPECT_RESIDUAL} — see {CHAPTER}"
    )
    residual = normalise(np.maximum(normalise(p_rows[0]) - np.array(q_rows[0]), 0.0))
    assert_distributed(replacements, residual, "the replacement after a rejection", SUSPECT_RESIDUAL)
    check_residuals(outcomes, p_rows, q_rows)


def test_task_2_replacement_is_independent_of_the_accept_test(impl, use_ref):
    """Given a rejection at position i, the replacement is distributed as the residual — whatever
    uniform made the accept test reject. A verifier that draws the accept uniforms and the
    replacement from ONE key correlates them: here, on MLX, the uniforms of u[0] and u[2] (K = 3)
    are the very numbers behind the replacement's draw at tokens 0 and 2 (V = 4), so a rejection
    (u_i large) pushes token i up, from 1/2 to about 0.7 — a total variation of 0.2, about 150
    in chi-square over ~900 rejections, against a threshold near 15. A verifier that splits its
    key (any split) passes. False alarms: two chi-square checks at P_MIN, probability < 2e-4."""
    use_ref(*EARLIER)
    # Position 0: q drafts token 1, p accepts it w.p. 0.4; residual = 1/2 on tokens 0 and 2.
    # Position 1: q == p (always accepted). Position 2: like position 0, drafting token 3.
    p_rows = [[0.3, 0.4, 0.3, 0.0], [0.25] * 4, [0.3, 0.0, 0.3, 0.4], [0.25] * 4]
    q_rows = [[0.0, 1.0, 0.0, 0.0], [0.25] * 4, [0.0, 0.0, 0.0, 1.0]]
    _, outcomes = run_rounds(impl.verify.verify_speculation, log_probs(p_rows), q_rows, 1500, seed=11)
    for i in (0, 2):
        replacements = [tokens[i] for n, tokens in outcomes if n == i]
        assert len(replacements) >= 200, (
            f"only {len(replacements)} of 1500 rounds rejected at position {i} (about "
            f"{900 if i == 0 else 360} expected). Suspect {SUSPECT_ACCEPT}"
        )
        residual = normalise(np.maximum(normalise(p_rows[i]) - np.array(q_rows[i]), 0.0))
        assert_distributed(
            replacements, residual,
            f"the replacement after a rejection at position {i} (rounds with n = {i})",
            f"{SUSPECT_KEYS}: a uniform that decided the rejection must not also pick the "
            f"replacement",
        )


def test_task_2_draft_with_zero_draft_probability_is_rejected(impl, use_ref):
    """The contract: reject d_i if q_i(d_i) == 0 (it cannot have been drawn from q). A test written
    u < p / q divides by zero there and accepts it; u * q < p with q > 0 does not."""
    use_ref(*EARLIER)
    target_logits = log_probs([[1 / 6] * 6, [1 / 6] * 6])  # p: uniform at both rows
    q_draft = mx.array([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # q puts everything on token 0
    drafts = mx.array([3], dtype=mx.int32)  # q(3) = 0, p(3) = 1/6
    keys = mx.random.split(mx.random.key(4), 60)
    results = [impl.verify.verify_speculation(drafts, target_logits, q_draft, 1.0, k) for k in keys]
    accepted = sum(n for n, _ in results)
    assert accepted == 0, (
        f"draft token 3 has q(3) = 0 and must always be rejected (the contract: reject if "
        f"q_i(d_i) == 0), but {accepted} of 60 rounds accepted it. Write the accept test as "
        f"(q > 0) & (u * q < p): u < p / q divides by zero — see {CHAPTER}"
    )
    assert all(tokens[0] != 0 for _, tokens in results), (
        "the replacement came out as token 0, where max(0, p - q) is 0: "
        f"{SUSPECT_RESIDUAL}"
    )


def test_negative_controls_show_the_statistics_can_fail():
    """Two classic mistakes, written inline, fail the first-token check of the test above.

    This proves the statistic has power: with the same drafts and N, a verifier that accepts
    every draft (emits q_0, total variation 0.30 from p_0) or that resamples from p instead of the
    residual after a rejection (emits min(p, q) + (1 - alpha) p, total variation 0.15 from p_0)
    gets a p-value far below P_MIN.
    """
    p, q = normalise(P_GENERIC), normalise(Q_GENERIC)
    drafts = sample_drafts(Q_GENERIC, 4000, mx.random.key(1))[:, 0]
    rng = np.random.default_rng(0)

    accept_always = drafts
    accepted = rng.uniform(size=drafts.size) < np.minimum(1.0, p[0][drafts] / q[0][drafts])
    resampled_from_p = rng.choice(6, size=drafts.size, p=p[0])
    wrong_residual = np.where(accepted, drafts, resampled_from_p)
    for name, firsts in (("accept always", accept_always), ("resample from p", wrong_residual)):
        pvalue = chi2_pvalue(firsts, p[0])
        assert pvalue < 1e-12, f"the negative control '{name}' should fail clearly, p-value {pvalue:.2g}"
    # And the right rule, on the same drafts and uniforms, passes.
    residual = np.maximum(p[0] - q[0], 0) / np.maximum(p[0] - q[0], 0).sum()
    correct = np.where(accepted, drafts, rng.choice(6, size=drafts.size, p=residual))
    assert chi2_pvalue(correct, p[0]) > P_MIN


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_task_2_identical_draft_is_always_accepted(impl, use_ref, ref, temperature):
    """q = p: min(1, p/q) = 1, every draft is accepted and only the bonus is sampled from p.

    q is made exactly as verification must make p: make_probs(target_logits, T). A verifier that
    applied another temperature to the target would see p != q and reject some drafts.
    """
    use_ref(*EARLIER)
    rng = np.random.default_rng(7)
    target_logits = mx.array(rng.normal(size=(4, 6)).astype(np.float32))
    q_draft = ref.sampling.make_probs(target_logits[:3], temperature)
    _, outcomes = run_rounds(impl.verify.verify_speculation, target_logits, np.array(q_draft), 300, 5, temperature)
    n = np.array([o[0] for o in outcomes])
    assert np.all(n == 3), (
        f"when the draft's q equals the target's p = make_probs(target_logits, T={temperature}), "
        f"every draft must be accepted; {int((n < 3).sum())} of 300 rounds rejected one. Is the "
        "temperature applied to the target logits?"
    )
    p_bonus = np.array(ref.sampling.make_probs(target_logits[3], temperature))
    assert_distributed([o[1][-1] for o in outcomes], p_bonus, "the bonus token")


def test_task_2_draft_support_is_a_strict_subset(impl, use_ref):
    """q is 0 on tokens the target likes, and positive on a token the target never emits."""
    use_ref(*EARLIER)
    p_rows = [[0.25, 0.20, 0.20, 0.15, 0.20, 0.00], [0.10, 0.30, 0.20, 0.00, 0.20, 0.20]]
    q_rows = [[0.50, 0.00, 0.30, 0.00, 0.00, 0.20]]  # never proposes 1, 3, 4; proposes 5 (p = 0)
    _, outcomes = run_rounds(impl.verify.verify_speculation, log_probs(p_rows), q_rows, 3000, seed=2)
    check_speculative_distribution(outcomes, p_rows, q_rows)


def test_task_2_disjoint_supports_reject_everything(impl, use_ref):
    """q and p share no token: acceptance 0, yet every emitted token is distributed as p."""
    use_ref(*EARLIER)
    p_rows = [[0.5, 0.3, 0.2, 0, 0, 0], [0.2, 0.2, 0.6, 0, 0, 0], [0.3, 0.3, 0.4, 0, 0, 0]]
    q_rows = [[0, 0, 0, 0.2, 0.3, 0.5], [0, 0, 0, 0.6, 0.2, 0.2]]
    _, outcomes = run_rounds(impl.verify.verify_speculation, log_probs(p_rows), q_rows, 2000, seed=3)
    n = np.array([o[0] for o in outcomes])
    assert np.all(n == 0), (
        "a draft token the target gives probability 0 must always be rejected (p/q = 0); "
        f"{int((n > 0).sum())} rounds accepted one"
    )
    assert_distributed([o[1][0] for o in outcomes], p_rows[0], "the correction token (residual = p)")


def test_task_2_near_deterministic_draft(impl, use_ref):
    """The draft puts 0.97 on token 2, which the target gives only 0.15."""
    use_ref(*EARLIER)
    p_rows = [[0.20, 0.10, 0.15, 0.25, 0.10, 0.20], [0.10, 0.15, 0.30, 0.15, 0.10, 0.20],
              [0.30, 0.10, 0.10, 0.20, 0.10, 0.20]]
    q_rows = [[0.006, 0.006, 0.97, 0.006, 0.006, 0.006], [0.01, 0.01, 0.01, 0.95, 0.01, 0.01]]
    _, outcomes = run_rounds(impl.verify.verify_speculation, log_probs(p_rows), q_rows, 3000, seed=4)
    check_speculative_distribution(outcomes, p_rows, q_rows)


def test_task_2_temperature_is_applied_to_the_target(impl, use_ref, ref):
    """At T = 0.5 the emitted tokens follow make_probs(target_logits, 0.5), not softmax(logits)."""
    use_ref(*EARLIER)
    temperature = 0.5
    rng = np.random.default_rng(11)
    target_logits = mx.array(rng.normal(size=(3, 6)).astype(np.float32))
    q_rows = np.array(ref.sampling.make_probs(mx.array(rng.normal(size=(2, 6)).astype(np.float32)), temperature))
    p_rows = np.array(ref.sampling.make_probs(target_logits, temperature))
    p_at_one = np.array(ref.sampling.make_probs(target_logits[0], 1.0))
    assert 0.5 * np.abs(p_rows[0] - p_at_one).sum() > 0.1  # the premise: T visibly matters here
    _, outcomes = run_rounds(
        impl.verify.verify_speculation, target_logits, q_rows, 2000, seed=6, temperature=temperature
    )
    firsts = [tokens[0] for _, tokens in outcomes]
    if chi2_pvalue(firsts, p_rows[0]) <= P_MIN and chi2_pvalue(firsts, p_at_one) > P_MIN:
        pytest.fail(
            f"at T={temperature} the first emitted token follows softmax(target_logits) at T = 1 "
            f"({np.round(p_at_one, 3)}), not make_probs(target_logits, {temperature}) "
            f"({np.round(p_rows[0], 3)}): apply the temperature to the target with make_probs, "
            f"the same transform that made q_draft — see {CHAPTER}"
        )
    check_speculative_distribution(
        outcomes, p_rows, q_rows,
        where=f"at T={temperature} (p = make_probs(target_logits, {temperature})): ",
    )


def test_task_2_temperature_zero_is_greedy_verification(impl, use_ref, ref):
    use_ref(*EARLIER)
    rng = np.random.default_rng(12)
    for K in (1, 3, 6):
        for trial in range(4):
            target_logits = mx.array(rng.normal(size=(K + 1, 8)).astype(np.float32))
            choices = np.argmax(np.array(target_logits), axis=-1)
            # Agree with the target for a random number of drafts, then disagree.
            drafts = choices[:K].copy()
            cut = int(rng.integers(0, K + 1))
            drafts[cut:] = (drafts[cut:] + 1) % 8
            q_draft = mx.array(np.eye(8, dtype=np.float32)[drafts])  # a greedy draft's one-hot q
            expected = ref.verify.verify_greedy(mx.array(drafts), target_logits)
            for key in (None, mx.random.key(trial)):
                got = impl.verify.verify_speculation(mx.array(drafts), target_logits, q_draft, 0.0, key)
                assert got == expected, (
                    f"at temperature 0 verify_speculation must agree with verify_greedy: expected "
                    f"{expected}, got {got} (K={K}, key={'None' if key is None else 'given'})"
                )


def test_task_2_randomness_comes_from_the_key(impl, use_ref):
    use_ref(*EARLIER)
    target_logits, q_draft = log_probs(P_GENERIC), mx.array(np.asarray(Q_GENERIC, dtype=np.float32))
    drafts = mx.array([1, 2, 0])
    with raises(ValueError, "temperature=1.0 with key=None must be refused: all randomness comes "
                "from the key you are given, never hidden global state"):
        impl.verify.verify_speculation(drafts, target_logits, q_draft, 1.0, None)
    results = [impl.verify.verify_speculation(drafts, target_logits, q_draft, 1.0, mx.random.key(s)) for s in range(20)]
    again = [impl.verify.verify_speculation(drafts, target_logits, q_draft, 1.0, mx.random.key(s)) for s in range(20)]
    assert results == again, "the same key must give the same (n, tokens): all randomness comes from `key`"
    assert len(set((n, tuple(t)) for n, t in results)) > 1, (
        f"20 different keys all gave {results[0]}: the accept test and the resampling must use the key"
    )
