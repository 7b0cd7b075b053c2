"""Week 2 Day 1 — draft integration: `SpeculativeDecoder.__init__` and `draft_generation`.

Book: book/src/week2-01-draft-integration.md. Grade one task with
    pytest tests/test_week_2_day_1.py --impl student -k task_1

The Markov models give exact next-token distributions (`next_token_probs(token, position)`), and
their period-3 position dependence makes a wrong cache offset produce different tokens.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache
from scipy.stats import chisquare

from specdec.kit.models import MarkovLM, markov_pair, random_transitions
from support import CallCounter, mlx_lm_greedy, raises

# Earlier tasks (Week 1 Day 1) that drafting builds on: always the reference's here.
SAMPLING = (
    "sampling.logits_to_probs",
    "sampling.top_k_filter",
    "sampling.top_p_filter",
    "sampling.sample_token",
    "sampling.make_probs",
)
CHAPTER = "book/src/week2-01-draft-integration.md"


def exact_probs(markov, token, position, temperature):
    """p(. | token at position) at a temperature: p ** (1 / T), renormalised (float64)."""
    p = np.array(markov.next_token_probs(token, position), dtype=np.float64)
    if temperature == 0:
        return (np.arange(p.size) == np.argmax(p)).astype(np.float64)
    p = p ** (1.0 / temperature)
    return p / p.sum()


class UntrimmableModel:
    """Wraps a model, but one of its cache layers cannot be rolled back (like a state-space
    layer's `ArraysCache`): speculative decoding cannot use it."""

    def __init__(self, inner):
        self.inner, self.vocab_size = inner, inner.vocab_size

    def __call__(self, inputs, cache=None):
        return self.inner(inputs, cache=None if cache is None else cache[:1])

    def make_cache(self):
        return [KVCache(), ArraysCache(size=2)]


# Task 1: SpeculativeDecoder.__init__ -------------------------------------------------------------
def test_task_1_stores_models_and_fresh_caches(impl, markov_models, llama_models):
    for draft, target in (markov_models, llama_models):
        decoder = impl.draft.SpeculativeDecoder(draft, target, lookahead=3)
        assert decoder.draft_model is draft and decoder.target_model is target, (
            "__init__ must keep the two models as `draft_model` and `target_model`"
        )
        assert decoder.lookahead == 3, f"lookahead should be 3, got {decoder.lookahead}"
        expected_vocab = 12 if isinstance(target, MarkovLM) else 64
        assert decoder.vocab_size == expected_vocab and isinstance(decoder.vocab_size, int), (
            f"vocab_size should be the shared vocabulary {expected_vocab} (use model_vocab_size), "
            f"got {decoder.vocab_size!r}"
        )
        for role, model, cache in (
            ("draft", draft, decoder.draft_cache),
            ("target", target, decoder.target_cache),
        ):
            assert isinstance(cache, list) and len(cache) == len(make_prompt_cache(model)), (
                f"{role}_cache should be make_prompt_cache({role}_model): one cache per layer"
            )
            assert all(layer.offset == 0 for layer in cache), (
                f"a new decoder's {role}_cache must be empty (offset 0): create it with self.reset()"
            )
        assert decoder.draft_cache is not decoder.target_cache, "each model needs its own cache"
    assert impl.draft.SpeculativeDecoder(*markov_models).lookahead == 4, "the default lookahead is 4"


@pytest.mark.parametrize("lookahead", [0, -3])
def test_task_1_rejects_lookahead_below_one(impl, markov_models, lookahead):
    with raises(ValueError, f"lookahead={lookahead} must be refused: K counts the tokens drafted per "
                "round, so lookahead >= 1") as error:
        impl.draft.SpeculativeDecoder(*markov_models, lookahead=lookahead)
    assert str(lookahead) in str(error.value), (
        f"the error for lookahead={lookahead} should name the value, got: {error.value}"
    )


def test_task_1_rejects_different_vocabularies(impl, markov_models, llama_models):
    markov_draft, markov_target = markov_models  # V = 12
    small_draft, _ = markov_pair(vocab_size=10, seed=5)  # V = 10
    pairs = [
        (markov_draft, llama_models[1], 12, 64),
        (llama_models[0], markov_target, 64, 12),
        (small_draft, markov_target, 10, 12),
    ]
    for draft, target, draft_vocab, target_vocab in pairs:
        with raises(ValueError, f"a draft with V={draft_vocab} and a target with V={target_vocab} "
                    "must be refused: the draft must share the target's tokenizer") as error:
            impl.draft.SpeculativeDecoder(draft, target)
        message = str(error.value)
        assert str(draft_vocab) in message and str(target_vocab) in message, (
            f"a draft with V={draft_vocab} and a target with V={target_vocab} must be refused with "
            f"a message naming both sizes, got: {message}"
        )
        assert "tokenizer" in message, (
            f"the message should say the draft must share the target's tokenizer, got: {message}"
        )


def test_task_1_rejects_caches_that_cannot_be_trimmed(impl, markov_models):
    draft, target = markov_models
    assert not ArraysCache(size=2).is_trimmable()  # the premise of this test
    for pair, role in (((UntrimmableModel(draft), target), "draft"), ((draft, UntrimmableModel(target)), "target")):
        with raises(ValueError, f"a {role} model with an ArraysCache layer (is_trimmable() False) "
                    "must be refused: rejected drafts are rolled back by trimming") as error:
            impl.draft.SpeculativeDecoder(*pair)
        assert "trim" in str(error.value).lower(), (
            f"a {role} model whose cache has a layer with is_trimmable() == False must be refused "
            f"(rejected drafts are rolled back by trimming); the message should say so, got: "
            f"{error.value}"
        )


# Task 2: draft_generation ------------------------------------------------------------------------
def test_task_2_greedy_drafts_are_the_drafts_own_greedy_tokens(impl, use_ref, llama_models):
    use_ref("draft.SpeculativeDecoder.__init__", *SAMPLING)
    draft, target = llama_models
    prompt = [3, 41, 17, 8, 59, 22]
    K, more = 5, 3
    expected = mlx_lm_greedy(draft, prompt, K + more)
    decoder = impl.draft.SpeculativeDecoder(draft, target, lookahead=K)

    draft_tokens, q_draft = decoder.draft_generation(mx.array(prompt), K)
    assert isinstance(draft_tokens, mx.array) and draft_tokens.shape == (K,), (
        f"draft_tokens should be an mx.array of shape [K] = ({K},), got {getattr(draft_tokens, 'shape', draft_tokens)}"
    )
    assert draft_tokens.dtype == mx.int32, f"draft_tokens should be int32, got {draft_tokens.dtype}"
    assert q_draft.shape == (K, 64) and q_draft.dtype == mx.float32, (
        f"q_draft should be float32 [K, V] = ({K}, 64), got {q_draft.dtype} {q_draft.shape}"
    )
    assert draft_tokens.tolist() == expected[:K], (
        f"at temperature 0 the drafts must be the draft model's own greedy tokens {expected[:K]}, "
        f"got {draft_tokens.tolist()} — feed the prompt once, then each new token (see {CHAPTER})"
    )
    one_hot = np.eye(64, dtype=np.float32)[expected[:K]]
    assert np.array_equal(np.array(q_draft), one_hot), (
        "at temperature 0 each q_draft row is one-hot at its draft token (make_probs(logits, 0))"
    )
    offsets = {layer.offset for layer in decoder.draft_cache}
    assert offsets == {len(prompt) + K - 1}, (
        f"after drafting K={K} tokens from a prompt of L={len(prompt)}, the draft cache should hold "
        f"L + K - 1 = {len(prompt) + K - 1} tokens (the prompt and all drafts but the last), "
        f"got offsets {sorted(offsets)}"
    )
    assert all(layer.offset == 0 for layer in decoder.target_cache), "drafting never runs the target"

    # Next round, all K accepted: the draft has not seen its last proposal yet, so it is fed now.
    next_tokens, _ = decoder.draft_generation(draft_tokens[-1:], more)
    assert next_tokens.tolist() == expected[K:], (
        f"feeding the unseen token [d_K] must continue the same greedy sequence {expected[K:]}, got "
        f"{next_tokens.tolist()}: the cache must hold exactly the prompt and d_1..d_(K-1)"
    )


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_task_2_q_draft_rows_are_the_exact_draft_distributions(impl, use_ref, markov_models, temperature):
    use_ref("draft.SpeculativeDecoder.__init__", *SAMPLING)
    draft, target = markov_models  # period 3: row i depends on the absolute position
    prompt = [4, 0, 9, 7]
    K = 6
    decoder = impl.draft.SpeculativeDecoder(draft, target)
    draft_tokens, q_draft = decoder.draft_generation(
        mx.array(prompt), K, temperature=temperature, key=mx.random.key(11)
    )
    tokens = draft_tokens.tolist()
    assert len(tokens) == K and q_draft.shape == (K, 12), f"expected K={K} drafts and q_draft [K, 12]"
    # Row i is the distribution after reading token `read` at absolute position L - 1 + i.
    for i in range(K):
        read = prompt[-1] if i == 0 else tokens[i - 1]
        position = len(prompt) - 1 + i
        expected = exact_probs(draft, read, position, temperature)
        got = np.array(q_draft[i], dtype=np.float64)
        assert np.allclose(got, expected, atol=2e-5), (
            f"q_draft[{i}] at T={temperature} should be make_probs(logits, T) of the draft after "
            f"token {read} at position {position}:\n  expected {np.round(expected, 4)}\n  got      "
            f"{np.round(got, 4)}\n(a wrong cache offset reads the wrong position; see {CHAPTER})"
        )
        assert expected[tokens[i]] > 0, f"draft token {tokens[i]} has probability 0 in its q row"
        if temperature == 0:
            assert tokens[i] == int(np.argmax(expected)), "at T=0 each draft is the argmax of its row"


def pooled_chisquare_pvalue(counts, probs):
    """Chi-square p-value of counts against probs (float64, summing to 1); cells expecting fewer
    than 5 samples are pooled into one, as the chi-square approximation needs."""
    expected = probs * counts.sum()
    rare = expected < 5
    observed_cells = np.append(counts[~rare], counts[rare].sum())
    expected_cells = np.append(expected[~rare], expected[rare].sum())
    keep = expected_cells > 0
    return chisquare(observed_cells[keep], expected_cells[keep]).pvalue


def test_task_2_sampled_drafts_follow_q(impl, use_ref):
    """Two drafted tokens, over many keys: the first follows its q row, and the pair follows
    q(a) * q(b | a) — each draft sampled from its own row with its own key (chi-square).

    False alarm: a correct drafter fails each check with probability 1e-4 (the p-value threshold).
    Power: a drafter that samples at T = 1 instead of T = 0.5 is 0.11 away in total variation on
    the first token, a p-value near 1e-36 at 2000 trials; one that reuses a single key for every
    token correlates the two draws and fails the pair check.
    """
    use_ref("draft.SpeculativeDecoder.__init__", *SAMPLING)
    flat = MarkovLM(mx.array(random_transitions(6, seed=2, concentration=1.0)))
    temperature, trials, token = 0.5, 2000, 4
    decoder = impl.draft.SpeculativeDecoder(flat, flat)
    firsts, pairs = np.zeros(6), np.zeros(36)
    for k in mx.random.split(mx.random.key(21), trials):
        decoder.reset()
        draft_tokens, _ = decoder.draft_generation(mx.array([token]), 2, temperature, k)
        a, b = draft_tokens.tolist()
        firsts[a] += 1
        pairs[a * 6 + b] += 1
    q_first = exact_probs(flat, token, 0, temperature)
    pvalue = pooled_chisquare_pvalue(firsts, q_first)
    assert pvalue > 1e-4, (
        f"sampled drafts should follow q = make_probs(logits, T={temperature}) = "
        f"{np.round(q_first, 3)}, observed frequencies {np.round(firsts / trials, 3)} "
        f"(chi-square p-value {pvalue:.2g}): sample each draft from its own q row"
    )
    q_pair = np.concatenate([q_first[a] * exact_probs(flat, a, 1, temperature) for a in range(6)])
    pvalue = pooled_chisquare_pvalue(pairs, q_pair)
    assert pvalue > 1e-4, (
        f"the pair of drafts (d_1, d_2) should follow q(d_1) * q(d_2 | d_1) (chi-square p-value "
        f"{pvalue:.2g}): draw each token with its own key — split `key` once per token"
    )


def test_task_2_sampling_is_reproducible_from_the_key(impl, use_ref, markov_models):
    use_ref("draft.SpeculativeDecoder.__init__", *SAMPLING)
    decoder = impl.draft.SpeculativeDecoder(*markov_models)
    prompt, K = mx.array([2, 5]), 8
    runs = []
    for seed in (7, 7, 8):
        decoder.reset()
        runs.append(decoder.draft_generation(prompt, K, temperature=1.0, key=mx.random.key(seed)))
    (tokens_a, q_a), (tokens_b, q_b), (tokens_c, _) = runs
    assert tokens_a.tolist() == tokens_b.tolist() and np.array_equal(np.array(q_a), np.array(q_b)), (
        "the same key must give the same drafts: all randomness comes from `key` (split it once "
        "per token), never from global state"
    )
    assert tokens_a.tolist() != tokens_c.tolist(), (
        f"a different key should give different drafts (got {tokens_a.tolist()} for both): "
        "are you sampling, and with the key you were given?"
    )


def test_task_2_rejects_bad_arguments(impl, use_ref, markov_models):
    use_ref("draft.SpeculativeDecoder.__init__", *SAMPLING)
    decoder = impl.draft.SpeculativeDecoder(*markov_models)
    with raises(ValueError, "num_tokens=0 must be refused: a round drafts K >= 1 tokens"):
        decoder.draft_generation(mx.array([1, 2]), 0)
    with raises(ValueError, "empty prompt_tokens must be refused: the draft needs at least one "
                "unseen token to read"):
        decoder.draft_generation(mx.array([], dtype=mx.int32), 2)
    with raises(ValueError, "temperature=0.8 without a key must be refused: sampling needs "
                "key=mx.random.key(seed), never hidden global state"):
        decoder.draft_generation(mx.array([1, 2]), 2, temperature=0.8)


class FeedLog(CallCounter):
    """A CallCounter that also records how many tokens each call fed."""

    def __init__(self, model):
        super().__init__(model)
        self.tokens_per_call: list[int] = []

    def __call__(self, inputs, *args, **kwargs):
        self.tokens_per_call.append(int(inputs.shape[-1]))
        return super().__call__(inputs, *args, **kwargs)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_task_2_one_draft_call_per_token(impl, use_ref, llama_models, temperature):
    use_ref("draft.SpeculativeDecoder.__init__", *SAMPLING)
    draft, target = FeedLog(llama_models[0]), llama_models[1]
    decoder = impl.draft.SpeculativeDecoder(draft, target, lookahead=4)
    prompt, K = [3, 41, 17, 8, 59, 22], 4
    decoder.draft_generation(mx.array(prompt), K, temperature, mx.random.key(3))
    assert draft.tokens_per_call == [len(prompt)] + [1] * (K - 1), (
        f"drafting K={K} tokens after {len(prompt)} unseen tokens takes K draft calls: one over the "
        f"{len(prompt)} unseen tokens, then one per new draft except the last (never fed), i.e. "
        f"tokens per call {[len(prompt)] + [1] * (K - 1)}; got {draft.tokens_per_call} (T={temperature})"
    )
