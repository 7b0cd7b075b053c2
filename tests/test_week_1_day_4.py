"""Week 1 Day 4 — rolling back a KV cache: cache_length and rollback.

Chapter: book/src/week1-04-kv-rollback.md. Grade one task with
    pytest tests/test_week_1_day_4.py --impl student -k task_2
"""

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from support import logits_atol, raises

CHAPTER = "see book/src/week1-04-kv-rollback.md"
TOKENS = [5, 17, 3, 42, 8, 8, 60, 1, 33, 12]


def filled_cache(model, tokens: list[int]) -> list:
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(tokens)[None], cache=cache))
    return cache


def offsets(cache: list) -> list[int]:
    return [layer.offset for layer in cache]


# Task 1: cache_length ---------------------------------------------------------------------------
def test_task_1_counts_cached_tokens(impl, llama_models, markov_models):
    _, llama = llama_models
    assert impl.kv_cache.cache_length(make_prompt_cache(llama)) == 0, "a fresh cache holds 0 tokens"
    length = impl.kv_cache.cache_length(filled_cache(llama, TOKENS))
    assert type(length) is int and length == 10, (
        f"after feeding 10 tokens the cache holds 10 (a python int), got {length!r} — {CHAPTER}"
    )
    cache = filled_cache(markov_models[1], TOKENS[:4])
    assert impl.kv_cache.cache_length(cache) == 4, "the Markov toy's one-layer cache holds 4"


def test_task_1_layers_must_agree(impl, llama_models):
    cache = filled_cache(llama_models[1], TOKENS)
    cache[1].trim(3)  # one layer on its own: the cache is now inconsistent
    with raises(ValueError, "layers holding 10 and 7 tokens must be refused: every layer must see "
                "every token, so cache_length raises when the offsets disagree"):
        impl.kv_cache.cache_length(cache)


def test_task_1_empty_cache_raises(impl):
    with raises(ValueError, "an empty list (no layers) has no length: raise ValueError"):
        impl.kv_cache.cache_length([])


# Task 2: rollback -------------------------------------------------------------------------------
def assert_same_logits(got: mx.array, expected: mx.array, what: str) -> None:
    expected = np.array(expected)
    np.testing.assert_allclose(
        np.array(got), expected, atol=logits_atol(expected), rtol=0, err_msg=f"{what} — {CHAPTER}"
    )


def test_task_2_trim_and_refeed_equals_fresh_prefill(impl, use_ref, llama_models):
    use_ref("kv_cache.cache_length")
    _, model = llama_models
    for keep in (6, 1, 0, 10):
        cache = filled_cache(model, TOKENS)
        impl.kv_cache.rollback(cache, keep)
        assert offsets(cache) == [keep, keep], (
            f"rollback(cache, {keep}) on 10 cached tokens must leave every layer at offset "
            f"{keep}, got {offsets(cache)}"
        )
        # Re-feed something else after the kept prefix, as speculative decoding does after a
        # rejected draft: the logits must equal a fresh prefill of the same sequence.
        new_tokens = [7, 7, 50] if keep < 10 else [7]
        got = model(mx.array(new_tokens)[None], cache=cache)[0, -1]
        expected = model(mx.array(TOKENS[:keep] + new_tokens)[None])[0, -1]
        assert_same_logits(
            got, expected,
            f"after rollback to {keep} and feeding {new_tokens}, the logits must equal a fresh "
            f"forward of TOKENS[:{keep}] + {new_tokens}",
        )


def test_task_2_any_trimmable_layer(impl, use_ref, llama_models):
    use_ref("kv_cache.cache_length")
    _, model = llama_models
    # A sliding-window cache that has not filled its window yet can still be trimmed; it keeps
    # its own write index, so only the layer's trim() rolls it back correctly.
    cache = [RotatingKVCache(max_size=64), RotatingKVCache(max_size=64)]
    mx.eval(model(mx.array(TOKENS)[None], cache=cache))
    impl.kv_cache.rollback(cache, 6)
    got = model(mx.array([[7]]), cache=cache)[0, -1]
    expected = model(mx.array(TOKENS[:6] + [7])[None])[0, -1]
    assert_same_logits(
        got, expected,
        "rollback of a RotatingKVCache (window not yet full) must go through each layer's trim()",
    )


def test_task_2_position_dependent_model(impl, use_ref, markov_models):
    use_ref("kv_cache.cache_length")
    _, model = markov_models
    cache = filled_cache(model, TOKENS[:7])
    impl.kv_cache.rollback(cache, 5)
    got = model(mx.array([[4]]), cache=cache)[0, -1]
    assert_same_logits(
        got, mx.log(model.next_token_probs(4, position=5)),
        "the Markov toy reads positions from the cache offset: after rollback to 5, token 4 is "
        "read at position 5",
    )


def test_task_2_out_of_range_raises_and_keeps_cache(impl, use_ref, llama_models):
    use_ref("kv_cache.cache_length")
    cache = filled_cache(llama_models[1], TOKENS)
    for length in (11, -1):
        with raises(ValueError, f"rollback(cache, {length}) on a 10-token cache must be refused: "
                    "0 <= length <= cache_length(cache)"):
            impl.kv_cache.rollback(cache, length)
        assert offsets(cache) == [10, 10], (
            f"a refused rollback to {length} must leave the cache untouched, offsets are "
            f"{offsets(cache)}"
        )


def test_task_2_untrimmable_layer_raises_before_changing_anything(impl, use_ref, llama_models):
    use_ref("kv_cache.cache_length")
    _, model = llama_models
    # A sliding-window cache of 8 that has seen 12 tokens has dropped the oldest 4: it can no
    # longer say what it held at length 9, so it reports is_trimmable() == False.
    mixed = [KVCache(), RotatingKVCache(max_size=8)]  # layer 0 could be trimmed, layer 1 not
    sliding = [RotatingKVCache(max_size=8), RotatingKVCache(max_size=8)]
    for cache in (mixed, sliding):
        mx.eval(model(mx.array(TOKENS + [2, 3])[None], cache=cache))
        assert not cache[1].is_trimmable()  # the premise of this test
        with raises(ValueError, "a layer with is_trimmable() == False (a RotatingKVCache that has "
                    "wrapped) must make rollback refuse, before any layer is trimmed") as error:
            impl.kv_cache.rollback(cache, 9)
        assert "RotatingKVCache" in str(error.value), (
            f"the error must name the type of the layer that cannot be trimmed, got: {error.value}"
        )
        assert offsets(cache) == [12, 12], (
            f"check every layer *before* trimming any: after the refused rollback the offsets "
            f"are {offsets(cache)}, expected [12, 12] — {CHAPTER}"
        )
