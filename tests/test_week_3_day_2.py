"""Week 3 Day 2 — batched speculative decoding: left_pad (task 1), rollback_rows (task 2),
draft_batch (task 3), batched_speculative_decode (task 4).

Book: book/src/week3-02-batched.md. Grade with
    pytest tests/test_week_3_day_2.py --impl student -k task_1
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from scipy import stats as scipy_stats

from specdec.kit.models import MarkovLM, markov_pair, model_vocab_size, random_transitions, tiny_llama_pair
from specdec.kit.stats import SpecStats
from support import BATCHED_FOUNDATIONS, CallCounter, assert_close, mlx_lm_greedy, raises

# What batched_speculative_decode stands on: graded elsewhere, taken from the reference here.
EARLIER_TASKS = BATCHED_FOUNDATIONS
SAMPLING = EARLIER_TASKS[:4]

# Very different lengths on purpose: 1 token next to 40 means lots of left padding.
PROMPTS = (
    [5],
    [1, 5, 7],
    [3, 9, 2, 7, 11, 4, 0, 6, 8],
    [(7 * i + 3) % 12 for i in range(40)],
    [2, 2],
)


@pytest.fixture(scope="module")
def identical_markov_models():
    """A draft equal to the target (mix = 0), position-dependent: greedy drafts always match."""
    return markov_pair(vocab_size=12, seed=3, mix=0.0, period=3)


@pytest.fixture(scope="module")
def identical_llama_models():
    """A draft that *is* the target: greedy drafting is always fully accepted."""
    return tiny_llama_pair(seed=0, noise=0.0)


def fresh_next_logits(model, tokens: list[int]) -> np.ndarray:
    """The logits after `tokens` from a brand-new unbatched cache: what every row must match."""
    cache = make_prompt_cache(model)
    return np.array(model(mx.array(tokens, dtype=mx.int32)[None], cache=cache)[0, -1])


# Task 1: left_pad ---------------------------------------------------------------------------------
def test_task_1_left_pad_layout(impl):
    tokens, left_padding = impl.batched.left_pad([[1, 2, 3], [5], [7, 8]])
    assert isinstance(left_padding, list) and all(type(p) is int for p in left_padding), (
        f"left_padding must be a list of python ints (BatchKVCache takes it), got {left_padding!r}"
    )
    assert list(left_padding) == [0, 2, 1], (
        f"left_padding[i] must be L - len(prompt i) with L the longest prompt (3): expected "
        f"[0, 2, 1], got {list(left_padding)}"
    )
    assert isinstance(tokens, mx.array) and tokens.dtype == mx.int32 and tokens.shape == (3, 3), (
        "tokens must be an int32 mx.array of shape [B, L] = [3, 3]"
    )
    assert tokens.tolist() == [[1, 2, 3], [0, 0, 5], [0, 7, 8]], (
        "rows must be right-aligned: the padding goes on the LEFT, so that every row's last "
        f"token sits in the last column; got {tokens.tolist()}"
    )
    tokens, left_padding = impl.batched.left_pad([[4, 4], [9]], pad_id=11)
    assert tokens.tolist() == [[4, 4], [11, 9]], "pad_id fills the padded slots"


def test_task_1_left_pad_errors(impl):
    with raises(ValueError, "an empty prompt must be refused with a ValueError naming its row "
                "(here row 1): every row needs at least one token", match="1"):
        impl.batched.left_pad([[1, 2], [], [3]])
    with raises(ValueError, "an empty batch (no prompts) must be refused with a ValueError"):
        impl.batched.left_pad([])


@pytest.mark.parametrize("pair", ["markov", "llama"])
def test_task_1_left_padded_prefill_matches_each_prompt(impl, pair, markov_models, llama_models):
    """The layout is what BatchKVCache expects: one batched prefill gives every row's logits."""
    _, target = {"markov": markov_models, "llama": llama_models}[pair]
    tokens, left_padding = impl.batched.left_pad([list(p) for p in PROMPTS])
    cache = [BatchKVCache(left_padding) for _ in target.layers]
    logits = np.array(target(tokens, cache=cache)[:, -1])  # [B, V]
    for i, prompt in enumerate(PROMPTS):
        assert_close(logits[i], fresh_next_logits(target, list(prompt)), (
            f"{pair}, row {i} (prompt length {len(prompt)}): the last column of a left-padded "
            "batched prefill must equal that prompt's own next-token logits. Check that padding "
            "is on the left and left_padding counts it"
        ))
    offsets = cache[0].offset.tolist()
    assert offsets == [len(p) for p in PROMPTS], (
        f"after the prefill each row's offset is its prompt length; got {offsets}: is "
        "left_padding right?"
    )


# Task 2: rollback_rows ----------------------------------------------------------------------------
def padded_batch(prompts):
    """Left-padded tokens built by hand (task 1 may be unfinished): [B, L] and the padding."""
    L = max(len(p) for p in prompts)
    left_padding = [L - len(p) for p in prompts]
    rows = [[0] * pad + list(p) for pad, p in zip(left_padding, prompts)]
    return mx.array(rows, dtype=mx.int32), left_padding


def check_rows(model, cache, sequences, feed, where, sizes):
    """Feed one column block `feed` [B, U] and compare each row with a fresh unbatched prefill.

    sizes: every layer's size() before the rollback (it must not change)."""
    B = len(sequences)
    assert [layer.size() for layer in cache] == sizes, (
        f"{where}: rollback_rows must not change any layer's size() (the last used column): "
        f"it was {sizes}, now {[layer.size() for layer in cache]}. The kept entries stay where "
        "they end; the freed columns at the front become left padding"
    )
    offsets = cache[0].offset.tolist()
    expected = [len(s) for s in sequences]
    assert offsets == expected, (
        f"{where}: row offsets must be the rows' remaining lengths {expected}, got {offsets} "
        "(offset[i] decreases by num_to_drop[i])"
    )
    for layer_index, layer in enumerate(cache):
        pads = (layer.left_padding + layer.offset).tolist()
        assert pads == [layer.size()] * B, (
            f"{where}, layer {layer_index}: every row's kept entries must still end in the last "
            f"column, i.e. left_padding[i] + offset[i] == size() = {layer.size()} for every row; "
            f"got {pads}. The dropped columns become left padding"
        )
    logits = np.array(model(mx.array(feed, dtype=mx.int32), cache=cache)[:, -1])
    for i in range(B):
        want = fresh_next_logits(model, sequences[i] + list(feed[i]))
        assert_close(logits[i], want, (
            f"{where}, row {i}: after rollback_rows, feeding {list(feed[i])} must give the same "
            "logits as a fresh prefill of the row's kept tokens + those — the row holds the "
            "wrong entries, or its mask/RoPE offset is off (see the picture in the chapter)"
        ))
    for i in range(B):
        sequences[i] += list(feed[i])


@pytest.mark.parametrize("pair", ["markov", "llama"])
def test_task_2_rollback_rows_each_row_its_own_amount(impl, pair, markov_models, llama_models):
    """Two rounds: drop a different number per row (0, all new, into the prompt, everything)."""
    _, model = {"markov": markov_models, "llama": llama_models}[pair]
    prompts = [[5], [1, 5, 7], [3, 9, 2, 7, 11, 4, 0, 6, 8], [2, 2]]
    tokens, left_padding = padded_batch(prompts)
    cache = [BatchKVCache(left_padding) for _ in model.layers]
    model(tokens, cache=cache)
    extra = [[4, 1, 8, 3], [6, 6, 2, 9], [1, 2, 3, 4], [7, 0, 5, 10]]  # like 1 + K = 4 fed tokens
    model(mx.array(extra, dtype=mx.int32), cache=cache)
    sequences = [p + e for p, e in zip(prompts, extra)]
    drops = [5, 0, 6, 4]  # row 0 to empty; row 2 reaches into its prompt
    sizes = [layer.size() for layer in cache]
    impl.batched.rollback_rows(cache, drops)
    sequences = [s[: len(s) - d] for s, d in zip(sequences, drops)]
    check_rows(model, cache, sequences, [[3], [8], [10], [1]], f"{pair}, round 1, drops {drops}", sizes)

    model(mx.array([[9, 4], [2, 2], [0, 1], [11, 3]], dtype=mx.int32), cache=cache)
    sequences = [s + e for s, e in zip(sequences, [[9, 4], [2, 2], [0, 1], [11, 3]])]
    drops = [1, 3, 0, 2]
    sizes = [layer.size() for layer in cache]
    impl.batched.rollback_rows(cache, drops)
    sequences = [s[: len(s) - d] for s, d in zip(sequences, drops)]
    check_rows(model, cache, sequences, [[1, 6], [7, 7], [5, 3], [4, 4]], f"{pair}, round 2", sizes)


def test_task_2_rollback_rows_checks_before_changing(impl, llama_models):
    _, model = llama_models
    tokens, left_padding = padded_batch([[1, 2, 3], [4]])
    cache = [BatchKVCache(left_padding) for _ in model.layers]
    model(tokens, cache=cache)

    def state():
        return [(c.offset.tolist(), c.left_padding.tolist(), c.size(), np.array(c.keys),
                 np.array(c.values)) for c in cache]

    before = state()
    # (counts, what the message must name): row 1 holds 1 entry (row 0's count 2 is fine, so a
    # row-by-row loop would already have rolled row 0); a negative count; a missing row.
    for bad, named in (([2, 2], r"\b1\b|2"), ([-1, 0], "-1"), ([1], r"\b1\b|\b2\b")):
        with raises(ValueError, f"rollback_rows(cache, {bad}) must raise ValueError naming the "
                    "bad row or count: need one count per row with 0 <= num_to_drop[i] <= "
                    "offset[i]", match=named):
            impl.batched.rollback_rows(cache, bad)
        for layer, (b, a) in enumerate(zip(before, state())):
            same = b[:3] == a[:3] and np.array_equal(b[3], a[3]) and np.array_equal(b[4], a[4])
            assert same, (
                f"rollback_rows(cache, {bad}) changed layer {layer} before raising: check every "
                "count first, then change the cache (offsets, left_padding, keys and values "
                "must be untouched by a refused call)"
            )


# Task 3: draft_batch ------------------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


@pytest.mark.parametrize("pair", ["markov", "llama"])
def test_task_3_draft_batch_greedy_rows_match_unbatched(impl, use_ref, pair, markov_models, llama_models):
    use_ref(*SAMPLING)
    draft, _ = {"markov": markov_models, "llama": llama_models}[pair]
    prompts = [list(p) for p in PROMPTS]
    tokens, left_padding = padded_batch(prompts)
    cache = [BatchKVCache(left_padding) for _ in draft.layers]
    K = 3
    counter = CallCounter(draft)
    draft_tokens, q_draft = impl.batched.draft_batch(counter, cache, tokens, K)
    assert counter.calls == K, (
        f"draft_batch drafts K = {K} positions for all rows with K batched draft calls (one "
        f"per drafted position, every row at once); the draft model was called {counter.calls} times"
    )
    assert draft_tokens.shape == (len(prompts), K) and draft_tokens.dtype == mx.int32, (
        f"draft_tokens must be int32 [B, K] = [{len(prompts)}, {K}], got {draft_tokens.dtype} "
        f"{draft_tokens.shape}"
    )
    assert q_draft.shape == (len(prompts), K, model_vocab_size(draft)) and q_draft.dtype == mx.float32, (
        f"q_draft must be float32 [B, K, V], got {q_draft.dtype} {q_draft.shape}"
    )
    for b, prompt in enumerate(prompts):
        want = mlx_lm_greedy(draft, prompt, K)
        assert draft_tokens[b].tolist() == want, (
            f"{pair}, row {b} (prompt length {len(prompt)}): at temperature 0 the row's drafts must "
            f"be the draft model's own greedy continuation {want}, got {draft_tokens[b].tolist()}. "
            "Read every row's LAST column, and feed each new proposal as a [B, 1] column"
        )
        assert np.array_equal(np.array(q_draft[b]), np.eye(q_draft.shape[-1])[want]), (
            f"{pair}, row {b}: at temperature 0, q_draft rows are one-hot at the drafted tokens"
        )
    grown = [len(p) + K - 1 for p in prompts]
    assert cache[0].offset.tolist() == grown, (
        f"the cache must hold each row's inputs + its first K - 1 = {K - 1} drafts (the last "
        f"proposal is never fed): offsets {grown}, got {cache[0].offset.tolist()}"
    )
    # Round two: two unseen tokens per row, as the loop feeds them.
    sequences = [p + d[: K - 1] for p, d in zip(prompts, draft_tokens.tolist())]
    unseen = [[d[-1], 4] for d in draft_tokens.tolist()]
    second, _ = impl.batched.draft_batch(draft, cache, mx.array(unseen, dtype=mx.int32), 2)
    for b in range(len(prompts)):
        want = mlx_lm_greedy(draft, sequences[b] + unseen[b], 2)
        assert second[b].tolist() == want, (
            f"{pair}, row {b}: a second call feeding [B, 2] unseen tokens must continue the row: "
            f"expected {want}, got {second[b].tolist()}"
        )


def test_task_3_draft_batch_sampling_records_q(impl, use_ref, llama_models, key):
    use_ref(*SAMPLING)
    draft, _ = llama_models
    prompts = [list(p) for p in PROMPTS]
    tokens, left_padding = padded_batch(prompts)
    cache = [BatchKVCache(left_padding) for _ in draft.layers]
    draft_tokens, q_draft = impl.batched.draft_batch(draft, cache, tokens, 3, 1.0, key)
    q_draft, drafts = np.array(q_draft), draft_tokens.tolist()
    for b, prompt in enumerate(prompts):
        for i in range(3):
            want = softmax(fresh_next_logits(draft, prompt + drafts[b][:i]))
            assert_close(q_draft[b, i], want, (
                f"row {b}, draft {i}: q_draft[b, i] must be make_probs(logits, temperature) of the "
                "draft's logits after the row's prompt and its earlier drafts (normalised over V)"
            ))
            assert q_draft[b, i, drafts[b][i]] > 0, "a sampled draft must have q > 0"
    with raises(ValueError, "draft_batch at temperature > 0 without a key must raise ValueError: "
                "sampling takes its randomness from `key`, never from global state"):
        impl.batched.draft_batch(draft, cache, tokens[:, -1:], 2, 1.0, None)
    with raises(ValueError, "draft_batch with num_tokens = 0 must raise ValueError: K >= 1"):
        impl.batched.draft_batch(draft, cache, tokens[:, -1:], 0)


def pooled_chisquare_pvalue(counts, probs):
    """Chi-square p-value of counts against probs (float64, summing to 1); cells expecting fewer
    than 5 samples are pooled into one, as the chi-square approximation needs."""
    expected = probs * counts.sum()
    rare = expected < 5
    observed_cells = np.append(counts[~rare], counts[rare].sum())
    expected_cells = np.append(expected[~rare], expected[rare].sum())
    keep = expected_cells > 0
    return scipy_stats.chisquare(observed_cells[keep], expected_cells[keep]).pvalue


def test_task_3_consecutive_drafts_are_independent_draws(impl, use_ref):
    """Every row drafts (d_1, d_2) at T = 0.5 from one flat Markov chain; 2,000 rows in ONE call
    are 2,000 independent samples. The first draft must follow q(d_1), the pair q(d_1) q(d_2 | d_1).

    False alarm: a correct draft_batch fails each of the two chi-square checks with probability
    1e-4 (the p-value threshold), 2e-4 in all; the key is fixed, so the outcome never changes.
    Power: reusing one key for both positions correlates the draws (P(d_1 = d_2) 0.19 instead
    of 0.03 here), a pair p-value far below 1e-10; one key per row repeats the first draft.
    """
    use_ref(*SAMPLING)
    flat = MarkovLM(mx.array(random_transitions(6, seed=2, concentration=1.0)))  # position-free
    temperature, rows = 0.5, 2000
    # Half the rows read token 4 after padding: the chain has no memory, so all rows share one law.
    prompts = [[4] if r % 2 else [1, 3, 4] for r in range(rows)]
    tokens, left_padding = padded_batch(prompts)
    cache = [BatchKVCache(left_padding) for _ in flat.layers]
    draft_tokens, _ = impl.batched.draft_batch(flat, cache, tokens, 2, temperature, mx.random.key(21))
    drafts = np.array(draft_tokens)
    q = np.array(flat.transitions[0], dtype=np.float64) ** (1 / temperature)
    q /= q.sum(-1, keepdims=True)  # q[a] = make_probs at T = 0.5 after token a
    q_first, q_pair = q[4], (q[4][:, None] * q).reshape(-1)
    firsts = np.bincount(drafts[:, 0], minlength=6).astype(float)
    pvalue = pooled_chisquare_pvalue(firsts, q_first)
    assert pvalue > 1e-4, (
        f"the first drafts of {rows} rows should follow q = make_probs(logits, T={temperature}) "
        f"= {np.round(q_first, 3)}, observed {np.round(firsts / rows, 3)} (chi-square p-value "
        f"{pvalue:.2g}). Sample all rows with one key per drafted position: sample_token draws "
        "each row independently (do not give every row the same key)"
    )
    pairs = np.bincount(drafts[:, 0] * 6 + drafts[:, 1], minlength=36).astype(float)
    pvalue = pooled_chisquare_pvalue(pairs, q_pair)
    same, expected_same = np.mean(drafts[:, 0] == drafts[:, 1]), q_pair.reshape(6, 6).trace()
    assert pvalue > 1e-4, (
        f"consecutive drafts (d_1, d_2) should follow q(d_1) q(d_2 | d_1) (chi-square p-value "
        f"{pvalue:.2g}; P(d_1 = d_2) is {same:.3f}, expected {expected_same:.3f}). Each drafted "
        "position needs fresh randomness: split `key` once per drafted position — reusing one key "
        "across positions makes consecutive drafts correlated"
    )


# Task 4: batched_speculative_decode ---------------------------------------------------------------
GREEDY_CACHE: dict = {}


def greedy_reference(name, target, prompts, max_tokens):
    key = (name, tuple(map(tuple, prompts)), max_tokens)
    if key not in GREEDY_CACHE:
        GREEDY_CACHE[key] = [mlx_lm_greedy(target, list(p), max_tokens) for p in prompts]
    return GREEDY_CACHE[key]


@pytest.mark.parametrize("pair", ["markov", "llama"])
@pytest.mark.parametrize("K", [1, 3, 6])
def test_task_4_greedy_rows_match_unbatched(impl, use_ref, pair, K, markov_models, llama_models):
    use_ref(*EARLIER_TASKS)
    draft, target = {"markov": markov_models, "llama": llama_models}[pair]
    max_tokens = 28  # long enough for rows to drift apart and padding to pile up
    want = greedy_reference(pair, target, PROMPTS, max_tokens)
    stats = SpecStats()
    got = impl.batched.batched_speculative_decode(
        [list(p) for p in PROMPTS], draft, target, max_tokens=max_tokens, lookahead=K, stats=stats
    )
    assert len(got) == len(PROMPTS), "return one list of tokens per prompt, in prompt order"
    assert all(isinstance(g, list) and all(type(t) is int for t in g) for g in got), (
        "return B lists of python ints (not mx.arrays or numpy ints)"
    )
    for i, (g, w) in enumerate(zip(got, want)):
        assert [int(t) for t in g] == w, (
            f"{pair}, K={K}, row {i} (prompt length {len(PROMPTS[i])}): at temperature 0 every "
            f"row must equal its own unbatched greedy output.\n  expected {w}\n  got      "
            f"{list(g)}\nCheck the row's rollback (K - n_i), its unseen tokens, and that its "
            "logits are the last K + 1 columns"
        )
    assert stats.emitted == sum(len(w) for w in want) and stats.accepted <= stats.drafted, (
        "stats: record_round(K, n_i, emitted_i) once per live row per round"
    )

    single = impl.batched.batched_speculative_decode(
        [list(PROMPTS[2])], draft, target, max_tokens=max_tokens, lookahead=K
    )
    assert single == [want[2]], f"{pair}, K={K}: a batch of one must also match greedy decoding"


@pytest.mark.parametrize("pair", ["markov", "llama"])
def test_task_4_identical_draft_is_always_accepted(
    impl, use_ref, pair, identical_markov_models, identical_llama_models
):
    """Every round fully accepted: the draft must read the two tokens it has not seen (d_K, t).

    Output exactness cannot see a broken *draft* cache (the target fixes every token); the
    acceptance rate can."""
    use_ref(*EARLIER_TASKS)
    draft, target = {"markov": identical_markov_models, "llama": identical_llama_models}[pair]
    stats = SpecStats()
    got = impl.batched.batched_speculative_decode(
        [list(p) for p in PROMPTS], draft, target, max_tokens=16, lookahead=3, stats=stats
    )
    assert got == greedy_reference(pair + "-identical", target, PROMPTS, 16), (
        f"{pair}: rows must equal their unbatched greedy output"
    )
    assert stats.acceptance_rate == 1.0, (
        f"{pair}: the draft is the target, so every greedy draft must be accepted, but the "
        f"acceptance rate is {stats.acceptance_rate:.2f}. The draft proposes from the wrong "
        "context: after a fully accepted round it has not read d_K nor the bonus token, and must "
        "be fed both (with the reference's invariant: every row's last two committed tokens)"
    )


def simulate_greedy_rounds(draft, target, prompts, max_tokens, lookahead):
    """What a correct run does, replayed on the exact Markov tables: (row-rounds, accepted, the
    K of every batched round).

    Per round (K = max(1, min(lookahead, r - 1)), r = the most tokens a live row still needs),
    each live row drafts K greedy tokens from its own committed sequence, keeps the longest
    prefix the target's greedy choice agrees with, and adds the target's token.
    """
    p_target, q_draft = np.array(target.transitions), np.array(draft.transitions)

    def greedy_next(table, seq):  # the token read last sits at absolute position len(seq) - 1
        return int(np.argmax(table[(len(seq) - 1) % target.period, seq[-1]]))

    seqs, emitted = [list(p) for p in prompts], [0] * len(prompts)
    live, rounds, accepted, batch_ks = list(range(len(prompts))), 0, 0, []
    while live:
        K = max(1, min(lookahead, max(max_tokens - emitted[r] for r in live) - 1))
        batch_ks.append(K)
        for r in list(live):
            drafts = []
            for _ in range(K):
                drafts.append(greedy_next(q_draft, seqs[r] + drafts))
            n = 0
            while n < K and drafts[n] == greedy_next(p_target, seqs[r] + drafts[:n]):
                n += 1
            new = (drafts[:n] + [greedy_next(p_target, seqs[r] + drafts[:n])])[: max_tokens - emitted[r]]
            seqs[r] += new
            emitted[r] += len(new)
            rounds, accepted = rounds + 1, accepted + n
            if emitted[r] == max_tokens:
                live.remove(r)
    return rounds, accepted, batch_ks


def test_task_4_draft_cache_follows_each_row(impl, use_ref, markov_models):
    """Output exactness cannot see a broken *draft* cache (the target fixes every token), but
    the number of accepted drafts can: replay the run on the exact Markov tables and compare."""
    use_ref(*EARLIER_TASKS)
    draft, target = markov_models
    prompts = [list(p) for p in PROMPTS]
    stats = SpecStats()
    draft_counter, target_counter = CallCounter(draft), CallCounter(target)
    impl.batched.batched_speculative_decode(
        prompts, draft_counter, target_counter, max_tokens=24, lookahead=3, stats=stats
    )
    rounds, accepted, batch_ks = simulate_greedy_rounds(draft, target, prompts, 24, 3)
    assert 0 < accepted < 3 * rounds, "test setup: some drafts accepted, some rejected"
    assert (stats.rounds, stats.accepted) == (rounds, accepted), (
        f"a correct run has {rounds} row-rounds with {accepted} accepted drafts in all; this run "
        f"recorded {stats.rounds} row-rounds with {stats.accepted} accepted. If the tokens are "
        "right but fewer drafts are accepted, the draft proposes from the wrong context: after "
        "each round the draft cache must drop the row's rejected drafts too (and be fed the "
        "tokens it has not seen). Also check K = max(1, min(lookahead, r - 1)) and that "
        "stats.record_round is called once per live row per round"
    )
    assert target_counter.calls == len(batch_ks), (
        f"one batched target call per round: a correct run has {len(batch_ks)} rounds (K per "
        f"round {batch_ks}), the target was called {target_counter.calls} times"
    )
    assert draft_counter.calls == stats.draft_calls == sum(batch_ks), (
        f"one batched draft call per drafted position, K per round {batch_ks}: expected "
        f"{sum(batch_ks)} draft calls, the draft model was called {draft_counter.calls} times and "
        f"stats.draft_calls is {stats.draft_calls} (add K per round)"
    )
    assert stats.draft_time_s > 0 and stats.verify_time_s > 0, (
        "stats.draft_time_s and stats.verify_time_s: add the wall time of every round's drafting "
        f"and verifying; got {stats.draft_time_s} and {stats.verify_time_s}"
    )


def test_task_4_rows_leave_at_eos_and_max_tokens(impl, use_ref, identical_llama_models):
    use_ref(*EARLIER_TASKS)
    draft, target = identical_llama_models  # every draft accepted: rounds emit K + 1 = 5 tokens
    prompts = [list(p) for p in PROMPTS]
    full = greedy_reference("llama-identical", target, PROMPTS, 20)
    eos = full[0][2]  # inside row 0's first accepted block
    want = [row[: row.index(eos) + 1] if eos in row else row for row in full]
    lengths = sorted(len(w) for w in want)
    assert lengths[0] <= 3 and lengths[-1] == 20, "test setup: rows stop at EOS and at max_tokens"
    got = impl.batched.batched_speculative_decode(
        prompts, draft, target, max_tokens=20, lookahead=4, eos_token_ids=[eos]
    )
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, (
            f"row {i}: with eos_token_ids=[{eos}] the row must stop right after its first EOS "
            f"(even inside an accepted block) and leave the batch; the others go on.\n  expected "
            f"{w}\n  got      {g}"
        )
    got = impl.batched.batched_speculative_decode(prompts, draft, target, max_tokens=1, lookahead=4)
    assert got == [w[:1] for w in full], "max_tokens=1: exactly one token per row"
    got = impl.batched.batched_speculative_decode(prompts, draft, target, max_tokens=0)
    assert got == [[] for _ in prompts], "max_tokens=0: an empty list per row"


def test_task_4_checks_its_arguments(impl, use_ref, markov_models):
    use_ref(*EARLIER_TASKS)
    draft, target = markov_models
    with raises(ValueError, "lookahead=0 must be refused with a ValueError: K counts drafted "
                "tokens, K >= 1"):
        impl.batched.batched_speculative_decode([[1, 2]], draft, target, lookahead=0)
    with raises(ValueError, "temperature > 0 without a key must be refused with a ValueError: "
                "sampling takes its randomness from `key`"):
        impl.batched.batched_speculative_decode([[1, 2]], draft, target, temperature=1.0)


def exact_marginals(model, prompt, num_tokens):
    """The exact distribution of each of the first num_tokens sampled tokens (Markov chain)."""
    transitions = np.array(model.transitions, dtype=np.float64)  # [M, V, V]
    dist = np.eye(model.vocab_size)[prompt[-1]]
    marginals = []
    for t in range(num_tokens):
        position = len(prompt) - 1 + t  # absolute position of the token being read
        dist = dist @ transitions[position % model.period]
        marginals.append(dist)
    return marginals


def chi_square_pvalue(samples, probs):
    """Pearson chi-square; bins expected to hold < 5 samples are merged into one."""
    counts = np.bincount(samples, minlength=len(probs)).astype(float)
    expected = probs * len(samples)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return scipy_stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_task_4_sampling_is_exact_per_row(impl, use_ref, markov_models):
    """Many copies of three prompts in ONE batch: each row is an independent sample.

    For each prompt and each of the first 4 tokens, the empirical distribution over 400 rows is
    compared with the exact Markov marginal by a chi-square test at p < 1e-4: 12 tests, so a
    correct implementation fails with probability < 0.12% (and, seeded, never flakes).
    """
    use_ref(*EARLIER_TASKS)
    draft, target = markov_models
    prompts = [[5], [1, 5, 7, 2], [3, 9, 2, 7, 11, 4, 0]]
    copies, num_tokens = 400, 4
    batch = [list(p) for p in prompts for _ in range(copies)]
    got = impl.batched.batched_speculative_decode(
        batch, draft, target, max_tokens=num_tokens, lookahead=3, temperature=1.0,
        key=mx.random.key(7),
    )
    assert all(len(row) == num_tokens for row in got), "every row produces max_tokens tokens"
    samples = np.array(got).reshape(len(prompts), copies, num_tokens)
    for p, prompt in enumerate(prompts):
        for t, probs in enumerate(exact_marginals(target, prompt, num_tokens)):
            pvalue = chi_square_pvalue(samples[p, :, t], probs)
            assert pvalue > 1e-4, (
                f"prompt {prompt}, token {t + 1}: over {copies} rows the sampled tokens do not "
                f"follow the target's distribution (chi-square p = {pvalue:.1e}). Each row must "
                "be verified with verify_speculation on its own logits, q_draft rows and key; "
                "the Markov target depends on position, so a wrong row offset also shows here"
            )
