"""Week 3 Day 2 — batched speculative decoding: B prompts at once, each row at its own pace.

All rows share one draft call per drafted position and one target call per round, through
mlx-lm's `BatchKVCache` (left padding, per-row offsets and masks). What is new is per-row
rollback: row i keeps n_i of the K drafts, but `BatchKVCache.trim(n)` moves every row together.
Shapes: `B` batch, `L` sequence, `K` draft length, `V` vocabulary.

Cache invariant between rounds, per row (C = the row's committed sequence: prompt + output):
the target cache holds C[:-1], the draft cache holds C[:-2]. So every row feeds the target
exactly 1 unseen token and the draft exactly 2, and both caches drop K - n_i entries per round.
"""

import time
from typing import Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from specdec.kit.models import model_vocab_size
from specdec.kit.stats import SpecStats

from .sampling import make_probs, sample_token
from .verify import verify_speculation

SHARED_PADDING_LIMIT = 32  # drop the columns every row pads once there are this many


def left_pad(batch_prompts: list[list[int]], pad_id: int = 0) -> tuple[mx.array, list[int]]:
    """Stack prompts of different lengths into one array, right-aligned (padding on the left).

    batch_prompts: B >= 1 lists of token ids, each non-empty (ValueError naming the empty row,
        or saying the batch is empty).
    Returns (tokens, left_padding):
        tokens        int32 [B, L], L = the longest prompt's length; row i is
                      [pad_id] * left_padding[i] + batch_prompts[i]
        left_padding  list of B ints, left_padding[i] = L - len(batch_prompts[i])
    Right-aligned rows all end in column L - 1, so logits[:, -1] is every row's next-token
    prediction — the layout `BatchKVCache(left_padding)` expects.
    """
    if len(batch_prompts) == 0:
        raise ValueError("batch_prompts is empty: pass at least one prompt")
    for i, prompt in enumerate(batch_prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every row needs at least one token")
    L = max(len(prompt) for prompt in batch_prompts)
    left_padding = [L - len(prompt) for prompt in batch_prompts]
    rows = [[pad_id] * pad + list(prompt) for pad, prompt in zip(left_padding, batch_prompts)]
    return mx.array(rows, dtype=mx.int32), left_padding


def make_batch_cache(model, left_padding: list[int]) -> list:
    """One empty `BatchKVCache(left_padding)` per layer of `model` (provided)."""
    return [BatchKVCache(left_padding) for _ in model.layers]


def rollback_rows(cache: list, num_to_drop: list[int]) -> None:
    """Drop each row's newest cache entries — a different number per row — in place.

    cache: list of per-layer `BatchKVCache` over the same B rows (every layer in the same state).
    num_to_drop: B ints with 0 <= num_to_drop[i] <= offset[i] (the row's length). Check all of
        them before changing anything; ValueError naming the row and the values otherwise.
    Afterwards, in every layer, row i holds its old entries minus its newest num_to_drop[i]:
      - `offset[i]` is smaller by num_to_drop[i] (it is also the RoPE position of the next token);
      - the kept entries still end in the last used column (`size()` does not change), so the
        next call's tokens land right after them in every row; the columns freed at the front
        are padding: `left_padding[i]` is larger by num_to_drop[i], and the mask hides them.
    (The kept entries may change order: attention reads them as a set, see the chapter.)
    `BatchKVCache.trim(n)` cannot do this: it drops the same n columns from every row.
    """
    offsets = cache[0].offset.tolist()
    if len(num_to_drop) != len(offsets):
        raise ValueError(
            f"num_to_drop has {len(num_to_drop)} entries but the cache has {len(offsets)} rows: "
            "pass one count per row"
        )
    for i, (drop, length) in enumerate(zip(num_to_drop, offsets)):
        if not 0 <= drop <= max(length, 0):
            raise ValueError(
                f"row {i}: cannot drop {drop} entries from a row holding {length}: "
                "need 0 <= num_to_drop[i] <= offset[i]"
            )
    if not any(num_to_drop):
        return
    used = cache[0].size()  # the last used column + 1, the same in every layer
    # Attention reads a row's entries as a set (RoPE put each entry's position in its key
    # already, and the mask only tells padding from the rest): the kept entries need not stay
    # in order. So instead of rolling every entry d_i to the right, move only the row's first
    # min(d_i, kept) entries into the last columns the rejects held.
    moves = []  # (row, first column moved, where it goes, how many)
    for i, (drop, length) in enumerate(zip(num_to_drop, offsets)):
        count = min(drop, length - drop)
        if drop and count > 0:
            start = used - length  # the row's first entry (its padding ends here)
            moves.append((i, start, max(start + drop, used - drop), count))
    _move_entries([getattr(layer, name) for layer in cache for name in ("keys", "values")], moves)
    shifts = mx.array(num_to_drop, dtype=mx.int32)
    for layer in cache:
        layer.offset = layer.offset - shifts
        layer.left_padding = layer.left_padding + shifts


def _move_entries(buffers: list, moves: list[tuple[int, int, int, int]]) -> None:
    """In every buffer, copy columns [src, src + n) of row i to [dst, dst + n), in every head,
    in place.

    The pieces are copied out first (one evaluation for the whole cache), so that a buffer has
    no other reader when it is updated and MLX can write into it instead of copying the whole
    cache: a few columns per row, not the B * H * C * D numbers a roll moves (about 1 ms instead
    of 15-80 ms a round at batch 8 on the embedded target).
    """
    pieces = [[mx.contiguous(buffer[i : i + 1, :, src : src + n]) for i, src, _, n in moves]
              for buffer in buffers]
    mx.eval(pieces)
    for buffer, row_pieces in zip(buffers, pieces):
        for (i, _, dst, n), piece in zip(moves, row_pieces):
            buffer[i : i + 1, :, dst : dst + n] = piece


def filter_rows(cache: list, keep: list[int]) -> None:
    """Keep only rows `keep` (indices into the batch) in every layer, in place (provided).

    `BatchKVCache.filter` also slices off the columns that are padding in every kept row.
    """
    indices = mx.array(keep, dtype=mx.int32)
    for layer in cache:
        layer.filter(indices)


def draft_batch(
    draft_model,
    cache: list,
    inputs: mx.array,
    num_tokens: int,
    temperature: float = 0.0,
    key: Optional[mx.array] = None,
) -> tuple[mx.array, mx.array]:
    """Propose `num_tokens` tokens for every row at once: K batched draft calls.

    cache: the draft's per-layer `BatchKVCache` over B rows. inputs: int [B, U], U >= 1 — every
        row's unseen tokens, right-aligned (the left-padded prompts on the first round).
    num_tokens: K >= 1. temperature: 0 is greedy (argmax per row); > 0 samples from
        `make_probs(logits, temperature)` and needs `key` — split it once per drafted position,
        so each position draws fresh randomness (reusing one key across positions correlates
        consecutive drafts); one key draws the whole batch, whose rows are independent.
        ValueError for num_tokens < 1, or temperature > 0 without a key.
    Returns (draft_tokens, q_draft):
        draft_tokens  int32 [B, K]
        q_draft       float32 [B, K, V], q_draft[b, i] the distribution draft_tokens[b, i] was
                      drawn from (one-hot at temperature 0; normalised over V)
    Row b is what Week 2's `draft_generation` proposes for row b alone. Cache: grows by U + K - 1
    columns — inputs, then draft_tokens[:, :-1] (the last proposal is never fed).
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=mx.random.key(seed)")
    keys = mx.random.split(key, num_tokens) if temperature > 0 else [None] * num_tokens
    tokens, probs = [], []
    inputs = mx.array(inputs, dtype=mx.int32)
    for i in range(num_tokens):
        logits = draft_model(inputs, cache=cache)[:, -1]  # [B, V]: every row's last column
        q = make_probs(logits, temperature)
        token = mx.argmax(logits, axis=-1) if temperature == 0 else sample_token(q, keys[i])
        token = token.astype(mx.int32)
        tokens.append(token)
        probs.append(q)
        mx.async_eval(token)  # start computing while Python builds the next step
        if i + 1 < num_tokens:  # the last proposal is never fed (as in draft_generation)
            inputs = token[:, None]
    return mx.stack(tokens, axis=1), mx.stack(probs, axis=1)


def batched_speculative_decode(
    batch_prompts: list[list[int]],
    draft_model,
    target_model,
    max_tokens: int = 100,
    lookahead: int = 4,
    temperature: float = 0.0,
    key: Optional[mx.array] = None,
    eos_token_ids: Sequence[int] = (),
    stats: Optional[SpecStats] = None,
) -> list[list[int]]:
    """Speculative decoding for B prompts at once; returns each row's generated tokens.

    batch_prompts: B >= 1 non-empty lists of token ids (any lengths). max_tokens: at most this
    many tokens per row. lookahead: K >= 1 (ValueError otherwise). temperature: 0 is greedy; > 0
    samples and needs `key` (ValueError otherwise). eos_token_ids: a row stops right after one.
    Returns B lists of python ints, in the order of batch_prompts. Row i must be what unbatched
    decoding of batch_prompts[i] gives: exactly the target's greedy tokens at temperature 0, and
    samples distributed exactly as the target's at temperature > 0.
    Each round (all live rows together): `draft_batch` on the draft's `make_batch_cache` caches;
    one target call on [each row's unseen token(s), d_1..d_K] (the first round also prefills the
    left-padded prompts, `left_pad`); per row, `verify_speculation` on that row's K + 1 logits,
    with the row's own key; `rollback_rows` on both caches. Rows that hit EOS or max_tokens leave
    the batch (`filter_rows`). K = max(1, min(lookahead, r - 1)), r = the most tokens a live row
    still needs.
    stats: if given, one `stats.record_round(K, n_i, emitted_i)` per live row per round (so
    `rounds` counts row-rounds and acceptance_rate/tokens_per_round read as in Week 2);
    `draft_calls` counts batched draft calls; draft/verify times are wall times of the batch.
    """
    tokens, left_padding = left_pad(batch_prompts)
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=mx.random.key(seed)")
    if model_vocab_size(draft_model) != model_vocab_size(target_model):
        raise ValueError(
            f"draft vocab {model_vocab_size(draft_model)} != target vocab "
            f"{model_vocab_size(target_model)}: the draft must share the target's tokenizer"
        )
    sampling, eos = temperature > 0, set(eos_token_ids)
    outputs: list[list[int]] = [[] for _ in batch_prompts]
    if max_tokens <= 0:
        return outputs
    draft_cache = make_batch_cache(draft_model, left_padding)
    target_cache = make_batch_cache(target_model, left_padding)
    rows = list(range(len(batch_prompts)))  # the original index of each live row
    row_keys = list(mx.random.split(key, len(rows))) if sampling else [None] * len(rows)
    draft_inputs = target_inputs = tokens  # the first round feeds the whole padded prompts
    while rows:
        K = max(1, min(lookahead, max(max_tokens - len(outputs[r]) for r in rows) - 1))
        key_draft = None
        if sampling:
            key, key_draft = mx.random.split(key)
        start = time.perf_counter()
        draft_tokens, q_draft = draft_batch(
            draft_model, draft_cache, draft_inputs, K, temperature, key_draft
        )
        mx.eval(draft_tokens, q_draft)
        drafted = time.perf_counter()
        # One target call scores every row's K drafts; row b's K + 1 logits are the last columns.
        inputs = mx.concatenate([target_inputs, draft_tokens], axis=1)
        target_logits = target_model(inputs, cache=target_cache)[:, -(K + 1) :]
        mx.eval(target_logits)

        keep, drops, last_two = [], [], []
        for b, r in enumerate(rows):
            key_verify = None
            if sampling:
                row_keys[b], key_verify = mx.random.split(row_keys[b])
            n, new_tokens = verify_speculation(
                draft_tokens[b], target_logits[b], q_draft[b], temperature, key_verify
            )
            out = []
            for token in new_tokens[: max_tokens - len(outputs[r])]:
                out.append(token)
                if token in eos:
                    break
            outputs[r] += out
            if stats is not None:
                stats.record_round(K, n, len(out))
            if len(outputs[r]) < max_tokens and out[-1] not in eos:
                keep.append(b)
                drops.append(K - n)
                last_two.append((list(batch_prompts[r]) + outputs[r])[-2:])
        verified = time.perf_counter()
        if stats is not None:
            stats.draft_calls += K
            stats.draft_time_s += drafted - start
            stats.verify_time_s += verified - drafted
        if not keep:
            break
        if len(keep) < len(rows):
            for cache in (draft_cache, target_cache):
                filter_rows(cache, keep)
            rows = [rows[b] for b in keep]
            row_keys = [row_keys[b] for b in keep]
        # Target held C[:-1] + d_1..d_K, draft C[:-2] + d_1..d_{K-1}: both drop K - n_i.
        rollback_rows(target_cache, drops)
        rollback_rows(draft_cache, drops)
        # Columns that are padding in every row only cost attention time: now and then, let
        # BatchKVCache.filter (keeping every row) slice them off.
        if min(target_cache[0].left_padding.tolist()) >= SHARED_PADDING_LIMIT:
            for cache in (draft_cache, target_cache):
                filter_rows(cache, list(range(len(rows))))
        draft_inputs = mx.array(last_two, dtype=mx.int32)  # [B, 2]: the last two committed
        target_inputs = draft_inputs[:, 1:]  # [B, 1]: the newest committed token
    return outputs


def batched_plain_decode(
    batch_prompts: list[list[int]],
    target_model,
    max_tokens: int,
    eos_token_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Plain batched greedy decoding, the baseline for `specdec bench --batch` (provided).

    Same padding machinery as `batched_speculative_decode`: one left-padded prefill, then one
    [B, 1] target call per token; rows that hit EOS or max_tokens leave the batch.
    Returns B lists of python ints, row i equal to greedy decoding of batch_prompts[i] alone.
    """
    tokens, left_padding = left_pad(batch_prompts)
    outputs: list[list[int]] = [[] for _ in batch_prompts]
    cache = make_batch_cache(target_model, left_padding)
    rows, eos = list(range(len(batch_prompts))), set(eos_token_ids)
    inputs = tokens
    while rows and max_tokens > 0:
        next_tokens = mx.argmax(target_model(inputs, cache=cache)[:, -1], axis=-1)
        keep = []
        for b, (r, token) in enumerate(zip(rows, next_tokens.tolist())):
            outputs[r].append(token)
            if token not in eos and len(outputs[r]) < max_tokens:
                keep.append(b)
        if len(keep) < len(rows):
            if not keep:
                break
            filter_rows(cache, keep)
            rows = [rows[b] for b in keep]
            next_tokens = next_tokens[mx.array(keep, dtype=mx.int32)]
        inputs = next_tokens[:, None].astype(mx.int32)
    return outputs
