"""Week 1 Day 4 — rolling back a KV cache.

A model's cache is a list of per-layer caches (mlx-lm's `KVCache` and friends), each with an
`offset` (tokens held), `is_trimmable()` and `trim(n)` (drop the newest n tokens). Speculative
decoding writes rejected draft tokens into caches; rollback is how we take them back.
"""


def cache_length(cache: list) -> int:
    """The number of tokens the cache holds: the common `offset` of its layers.

    Raises ValueError if the cache is empty (no layers) or its layers disagree.
    """
    raise NotImplementedError("Week 1 Day 4 Task 1: cache_length — see book/src/week1-04-kv-rollback.md")


def rollback(cache: list, length: int) -> None:
    """Trim every layer so the cache holds exactly its first `length` tokens (in place).

    Raises ValueError if length < 0 or length > cache_length(cache), and ValueError naming the
    layer's type if any layer is not trimmable — checked *before* any layer is changed, so a
    failed rollback leaves the cache untouched.
    """
    raise NotImplementedError("Week 1 Day 4 Task 2: rollback — see book/src/week1-04-kv-rollback.md")
