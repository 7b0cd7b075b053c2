"""Week 1 Day 4 — rolling back a KV cache.

A model's cache is a list of per-layer caches (mlx-lm's `KVCache` and friends), each with an
`offset` (tokens held), `is_trimmable()` and `trim(n)` (drop the newest n tokens). Speculative
decoding writes rejected draft tokens into caches; rollback is how we take them back.
"""


def cache_length(cache: list) -> int:
    """The number of tokens the cache holds: the common `offset` of its layers.

    Raises ValueError if the cache is empty (no layers) or its layers disagree.
    """
    if len(cache) == 0:
        raise ValueError("the cache has no layers: build it with make_prompt_cache(model)")
    offsets = [layer.offset for layer in cache]
    if any(offset != offsets[0] for offset in offsets):
        raise ValueError(
            f"cache layers hold different numbers of tokens {offsets}: every layer must see "
            "every token (was a layer fed or trimmed on its own?)"
        )
    return int(offsets[0])


def rollback(cache: list, length: int) -> None:
    """Trim every layer so the cache holds exactly its first `length` tokens (in place).

    Raises ValueError if length < 0 or length > cache_length(cache), and ValueError naming the
    layer's type if any layer is not trimmable — checked *before* any layer is changed, so a
    failed rollback leaves the cache untouched.
    """
    current = cache_length(cache)
    if not 0 <= length <= current:
        raise ValueError(
            f"cannot roll back to length {length}: the cache holds {current} tokens "
            f"(choose 0 <= length <= {current})"
        )
    # Check every layer before touching any: a half-trimmed cache is worse than none.
    for i, layer in enumerate(cache):
        if not layer.is_trimmable():
            raise ValueError(
                f"layer {i} ({type(layer).__name__}) cannot be trimmed: it has overwritten or "
                "summarised old tokens, so rollback is impossible; use a model with KVCache layers"
            )
    for layer in cache:
        layer.trim(current - length)
