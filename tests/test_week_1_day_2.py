"""Week 1 Day 2 — the autoregressive loop: prefill, then one single-token call per new token.

Chapter: book/src/week1-02-autoregressive-loop.md. Grade one task with
    pytest tests/test_week_1_day_2.py --impl student -k task_2
"""

import collections.abc

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from scipy import stats

from specdec.kit.models import MarkovLM
from support import logits_atol, mlx_lm_greedy, raises

CHAPTER = "see book/src/week1-02-autoregressive-loop.md"

# Tasks before generate_tokens, replaced by the reference so that only generate_tokens is graded.
EARLIER_TASKS = (
    "generate.prefill",
    "sampling.logits_to_probs",
    "sampling.top_k_filter",
    "sampling.top_p_filter",
    "sampling.make_probs",
    "sampling.sample_token",
)


class CountingModel:
    """Wraps a model and records how many tokens each call fed, and the cache offset before it."""

    def __init__(self, model):
        self.model = model
        self.tokens_per_call: list[int] = []
        self.offsets: list[int] = []

    def __call__(self, inputs, cache=None):
        self.tokens_per_call.append(int(inputs.shape[-1]))
        self.offsets.append(cache[0].offset if cache else 0)
        return self.model(inputs, cache=cache)

    def make_cache(self):
        return make_prompt_cache(self.model)


# Task 1: prefill --------------------------------------------------------------------------------
def test_task_1_logits_match_full_forward(impl, llama_models):
    _, model = llama_models
    prompt = mx.array([5, 17, 3, 42, 8, 8, 60])
    expected = model(prompt[None])[0, -1]  # no cache: the whole sequence in one forward
    cache = make_prompt_cache(model)
    logits = impl.generate.prefill(model, prompt, cache)
    assert logits.dtype == mx.float32, f"prefill returns float32 logits, got {logits.dtype}"
    assert tuple(logits.shape) == (64,), (
        f"prefill returns the last position's logits [V] = [64], got {tuple(logits.shape)}"
    )
    np.testing.assert_allclose(
        np.array(logits), np.array(expected), atol=1e-5,
        err_msg=f"prefill must return the logits at the prompt's last position — {CHAPTER}",
    )


def test_task_1_cache_offset_grows_by_prompt_length(impl, llama_models):
    _, model = llama_models
    cache = make_prompt_cache(model)
    impl.generate.prefill(model, mx.array([1, 2, 3, 4, 5]), cache)
    assert [c.offset for c in cache] == [5, 5], (
        f"after prefilling 5 tokens every layer's cache must hold 5, got "
        f"{[c.offset for c in cache]}"
    )
    # A second prefill continues from the cached context: same logits as one long forward.
    logits = impl.generate.prefill(model, mx.array([6, 7, 8]), cache)
    assert [c.offset for c in cache] == [8, 8], "a second prefill of 3 tokens must grow 5 -> 8"
    expected = model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]))[0, -1]
    np.testing.assert_allclose(
        np.array(logits), np.array(expected), atol=logits_atol(np.array(expected)), rtol=0,
        err_msg="prefill must feed the given cache (the model attends to the cached tokens)",
    )


def test_task_1_one_model_call_for_the_whole_prompt(impl, llama_models, markov_models):
    for model, prompt in [(llama_models[1], [5, 17, 3, 42, 8, 8, 60]), (markov_models[1], [3, 8, 1])]:
        counting = CountingModel(model)
        impl.generate.prefill(counting, mx.array(prompt), make_prompt_cache(model))
        assert counting.tokens_per_call == [len(prompt)], (
            f"prefill of a {len(prompt)}-token prompt must be ONE model call over all "
            f"{len(prompt)} tokens (prompt_tokens[None]), got calls of {counting.tokens_per_call} "
            f"tokens: feeding the prompt token by token gives the same logits but costs L calls "
            f"instead of one — {CHAPTER}"
        )


def test_task_1_markov_exact_distribution(impl, markov_models):
    _, model = markov_models
    logits = impl.generate.prefill(model, mx.array([3, 8]), make_prompt_cache(model))
    np.testing.assert_allclose(
        np.array(mx.softmax(logits)), np.array(model.next_token_probs(8, position=1)), atol=1e-6,
        err_msg="on the Markov toy, prefill([3, 8]) predicts p(. | token 8 at position 1)",
    )


def test_task_1_empty_prompt_raises(impl, llama_models):
    _, model = llama_models
    with raises(ValueError, "an empty prompt must be refused: the model needs at least one "
                "token to predict the next one (L >= 1)"):
        impl.generate.prefill(model, mx.array([], dtype=mx.int32), make_prompt_cache(model))


# Task 2: generate_tokens ------------------------------------------------------------------------
LLAMA_PROMPTS = [[1], [5, 17, 3], [60, 2, 2, 9, 33, 41, 12, 0]]
MARKOV_PROMPTS = [[0], [3, 8], [7, 3, 9, 1, 0], [11, 11, 11, 2]]


def test_task_2_greedy_matches_mlx_lm(impl, use_ref, llama_models, markov_models):
    use_ref(*EARLIER_TASKS)
    for name, model, prompts in [
        ("tiny llama", llama_models[1], LLAMA_PROMPTS),
        ("Markov toy (position-dependent)", markov_models[1], MARKOV_PROMPTS),
    ]:
        for prompt in prompts:
            expected = mlx_lm_greedy(model, prompt, 12)
            got = list(impl.generate.generate_tokens(model, mx.array(prompt), 12))
            assert got == expected, (
                f"{name}, prompt {prompt}: greedy generate_tokens gave {got}, mlx-lm's "
                f"generate_step gave {expected}. A mismatch after the first token usually means "
                f"the cache was not reused or a token was fed twice — {CHAPTER}"
            )
            assert all(type(t) is int for t in got), "generate_tokens yields python ints"


def test_task_2_max_tokens(impl, use_ref, llama_models):
    use_ref(*EARLIER_TASKS)
    model = llama_models[1]
    full = mlx_lm_greedy(model, [5, 17, 3], 6)
    for max_tokens in (0, 1, 6):
        got = list(impl.generate.generate_tokens(model, mx.array([5, 17, 3]), max_tokens))
        assert got == full[:max_tokens], (
            f"max_tokens={max_tokens}: expected {full[:max_tokens]}, got {got}"
        )


def test_task_2_stops_right_after_eos(impl, use_ref, llama_models):
    use_ref(*EARLIER_TASKS)
    model = llama_models[1]
    prompt = [60, 2, 2, 9]
    full = mlx_lm_greedy(model, prompt, 12)
    for eos_ids in [(full[4],), (full[7], full[2]), (full[0],), (99,)]:
        stop = min((full.index(e) for e in eos_ids if e in full), default=len(full) - 1)
        counting = CountingModel(model)
        got = list(
            impl.generate.generate_tokens(counting, mx.array(prompt), 12, eos_token_ids=eos_ids)
        )
        assert got == full[: stop + 1], (
            f"eos_token_ids={eos_ids} on greedy output {full}: expected {full[:stop + 1]} "
            f"(the EOS token is yielded, then generation stops), got {got}"
        )
        assert len(counting.tokens_per_call) == len(got), (
            f"{len(got)} tokens need {len(got)} model calls (no call after EOS), "
            f"got {len(counting.tokens_per_call)}"
        )


def test_task_2_streams(impl, use_ref, llama_models):
    use_ref(*EARLIER_TASKS)
    model = CountingModel(llama_models[1])
    expected = mlx_lm_greedy(llama_models[1], [5, 17, 3], 20)
    stream = impl.generate.generate_tokens(model, mx.array([5, 17, 3]), 20)
    assert isinstance(stream, collections.abc.Iterator), (
        f"generate_tokens must return an iterator (write it as a generator with `yield`), got "
        f"{type(stream).__name__}"
    )
    first = next(stream)
    assert first == expected[0], f"the first token should be {expected[0]}, got {first}"
    assert len(model.tokens_per_call) <= 2, (
        f"after the first token only the prefill (and at most the next step) may have run, but "
        f"the model was called {len(model.tokens_per_call)} times: yield each token as soon as "
        "it is known"
    )
    assert [first, *stream] == expected, "the rest of the stream must continue the greedy run"


def test_task_2_one_single_token_call_per_step(impl, use_ref, llama_models, markov_models, key):
    use_ref(*EARLIER_TASKS)
    for model, prompt in [(llama_models[1], [5, 17, 3, 9]), (markov_models[1], [7, 3, 9])]:
        for temperature in (0.0, 1.0):
            counting = CountingModel(model)
            cache = make_prompt_cache(model)
            got = list(
                impl.generate.generate_tokens(
                    counting, mx.array(prompt), 7, temperature=temperature, key=key, cache=cache
                )
            )
            assert len(got) == 7
            assert counting.tokens_per_call == [len(prompt)] + [1] * 6, (
                f"7 tokens after a {len(prompt)}-token prompt take one prefill call of "
                f"{len(prompt)} tokens, then 6 calls of 1 token (the last token is never fed); "
                f"tokens per call were {counting.tokens_per_call}"
            )
            assert counting.offsets == [0, *range(len(prompt), len(prompt) + 6)], (
                f"each call must extend the same cache by what the previous call fed; the cache "
                f"offsets before the calls were {counting.offsets}"
            )
            assert cache[0].offset == len(prompt) + 6, (
                f"the cache you pass must be the one used: it should end holding the prompt and "
                f"the 6 fed tokens ({len(prompt) + 6}), holds {cache[0].offset}"
            )


def test_task_2_sampling_without_a_key_raises(impl, use_ref, markov_models):
    use_ref(*EARLIER_TASKS)
    model = markov_models[1]
    with raises(ValueError, "temperature=0.7 samples, so generate_tokens needs key=mx.random.key(seed) "
                "(never hidden global random state): raise ValueError when key is None"):
        next(impl.generate.generate_tokens(model, mx.array([3, 8]), 5, temperature=0.7))


def test_task_2_sampling_is_reproducible(impl, use_ref, markov_models):
    use_ref(*EARLIER_TASKS)
    model = markov_models[1]
    runs = {}
    for seed in (0, 0, 1, 2, 3):
        tokens = list(impl.generate.generate_tokens(
            model, mx.array([3, 8]), 10, temperature=1.0, key=mx.random.key(seed)
        ))
        assert runs.setdefault(seed, tokens) == tokens, (
            f"the same key must give the same tokens: {runs[seed]} then {tokens}"
        )
    assert len({tuple(t) for t in runs.values()}) > 1, (
        f"four different keys gave identical samples {runs[0]}: sample with the key you are given"
    )
    # On a model whose next token is uniform at every step, reusing one key for every token
    # would repeat the same token; a fresh split per token makes 10 equal draws (12^-9) absurd.
    uniform = MarkovLM(mx.full((12, 12), 1 / 12))
    tokens = list(impl.generate.generate_tokens(
        uniform, mx.array([0]), 10, temperature=1.0, key=mx.random.key(5)
    ))
    assert len(set(tokens)) > 1, (
        f"10 tokens from a uniform model were all {tokens[0]}: split the key once per token, "
        "never reuse it"
    )


def test_task_2_first_sampled_token_follows_p(impl, use_ref, markov_models, key):
    use_ref(*EARLIER_TASKS)
    model = markov_models[1]
    temperature, N = 0.5, 2000
    p = np.array(model.next_token_probs(8, position=1), dtype=np.float64) ** (1 / temperature)
    p /= p.sum()
    draws = [
        next(impl.generate.generate_tokens(model, mx.array([3, 8]), 1, temperature, key=k))
        for k in mx.random.split(key, N)
    ]
    counts = np.bincount(draws, minlength=p.size)
    # Chi-square over the tokens expected >= 5 times, the rare ones pooled into one bin. For a
    # correct sampler the p-value is uniform: threshold 1e-3 = 0.1% false alarms (seed is fixed).
    big = N * p >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(N * p[big], N * p[~big].sum())
    pvalue = stats.chisquare(observed, expected).pvalue
    assert pvalue > 1e-3, (
        f"{N} first tokens at T={temperature} after [3, 8]: counts {counts.tolist()} vs expected "
        f"{np.round(N * p, 1).tolist()} (softmax(logits / T)), chi-square p-value {pvalue:.1e}"
    )
