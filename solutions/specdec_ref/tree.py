"""Week 3 Day 4 — token trees: verify several candidate continuations in one target call.

A draft tree is stored flattened in level order: `tokens[i]` is node i's token and
`parents[i]` the index of its parent node (-1: a child of the root, the last committed token).
Parents come before children (`parents[i] < i`). Node i sits at depth `depths[i]` (1 for the
root's children) and must be read at position `prefix_len + depths[i] - 1`: nodes at the same
depth share a position. One target call scores every node with a *tree attention mask*: node j
sees the cached prefix and its own ancestors (and itself), never its cousins.
Shapes: `N` tree nodes, `V` vocabulary, `L` tokens fed in one call.
"""

import time
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.models.rope_utils import Llama3RoPE, YarnRoPE

from specdec.kit.stats import SpecStats


class _TreeCache:
    """Stands in for one layer's KVCache during a tree call: same storage, the tree's mask."""

    def __init__(self, cache: KVCache, mask: mx.array):
        self.cache, self.mask = cache, mask

    @property
    def offset(self) -> int:
        return self.cache.offset

    def update_and_fetch(self, keys, values):
        return self.cache.update_and_fetch(keys, values)

    def make_mask(self, *args, **kwargs) -> mx.array:
        return self.mask  # [L, P + L]: what `create_attention_mask` asks the first layer for


# Rope modules that only hand `offset` on to mx.fast.rope: they can rotate by per-row offsets.
_PER_ROW_ROPES = (nn.RoPE, Llama3RoPE, YarnRoPE)


class _RoPEAt:
    """Wraps a layer's rope so token l is rotated by positions[l] instead of offset + l.

    mx.fast.rope takes one offset per batch row, so each token becomes its own row of length 1.
    """

    def __init__(self, rope, positions: mx.array):
        self.rope, self.positions = rope, positions

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        B, H, L, D = x.shape  # `offset` (the sequential start) is ignored on purpose
        rows = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
        rows = self.rope(rows, offset=mx.tile(self.positions, B))
        return rows.reshape(B, L, H, D).transpose(0, 2, 1, 3)


def tree_attention_mask(parents: Sequence[int]) -> mx.array:
    """The tree's attention mask: mask[j, i] is True iff node i is node j or an ancestor of j.

    parents: N ints, parents[i] in [-1, i) (ValueError otherwise, naming the bad index: the
        tree must be flattened parents-first). Returns bool [N, N]; row j is what node j sees
        among the tree nodes (every row has its diagonal set; a chain gives the causal mask).
    """
    depth_of = tree_depths(parents)  # validates parents
    N = len(depth_of)
    mask = [[False] * N for _ in range(N)]
    for j in range(N):
        i = j
        while i != -1:  # walk up from j: itself, its parent, ... up to the root
            mask[j][i] = True
            i = int(parents[i])
    return mx.array(mask, dtype=mx.bool_)


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node: 1 for the root's children (parent -1), parent's depth + 1 otherwise.

    parents: N ints as in `tree_attention_mask` (same ValueError). Returns N python ints.
    """
    depths = []
    for i, parent in enumerate(int(p) for p in parents):
        if not -1 <= parent < i:
            raise ValueError(
                f"parents[{i}] = {parent} is not in [-1, {i}): flatten the tree parents-first "
                "(level order), so every node comes after its parent"
            )
        depths.append(1 if parent == -1 else depths[parent] + 1)
    return depths


def tree_forward(model, cache: list, tokens: Sequence[int], parents: Sequence[int]) -> mx.array:
    """Score a whole token tree with ONE model call: tree mask plus per-node RoPE positions.

    model: an mlx-lm transformer whose layers call `self_attn.rope(x, offset=cache.offset)`
        and take their mask from `cache[0].make_mask` (llama, qwen2, mistral, ...).
    cache: its per-layer `KVCache`s, holding a prefix of P tokens (P = cache[0].offset).
    tokens, parents: the tree to feed (L nodes, parents as in `tree_attention_mask`; -1 means
        "follows the last cached token"). A chain (parents [-1, 0, 1, ...]) is a plain forward.
    Returns float32 logits [L, V]: row j is exactly (up to float rounding) what a plain forward
    of prefix + the path root→j would give at node j. Node j is read at position
    P + depth(j) - 1 and attends to the P cached tokens and its ancestors-or-self only.
    Cache: grows by L and holds the nodes' keys/values in flattened order (roll back with
    `trim_prompt_cache` or keep one path with `commit_tree_path`).
    The model is restored afterwards, even on error: its layers' `rope` modules and the caches
    are exactly as before (apart from the L new entries): the `cache` list still holds the same
    KVCache objects (wrap them for the call, never replace them in the list).
    Raises ValueError, naming the module and the fix, for a rope it cannot place per token
    (you must support `nn.RoPE`; the reference also takes mlx-lm's Llama3RoPE and YarnRoPE,
    which likewise hand `offset` to mx.fast.rope) or a cache layer that is not a KVCache.
    """
    tokens, parents = [int(t) for t in tokens], [int(p) for p in parents]
    if len(tokens) != len(parents) or not tokens:
        raise ValueError(
            f"need >= 1 token and one parent each: {len(tokens)} tokens, {len(parents)} parents"
        )
    for c in cache:
        if not isinstance(c, KVCache):
            raise ValueError(f"tree_forward needs plain KVCache layers, got {type(c).__name__}")
    attentions = [getattr(layer, "self_attn", None) for layer in model.layers]
    for i, attn in enumerate(attentions):
        rope = getattr(attn, "rope", None)
        if not isinstance(rope, _PER_ROW_ROPES):
            raise ValueError(
                f"layer {i}'s self_attn.rope is a {type(rope).__name__}: tree_forward can give "
                "per-token positions only to nn.RoPE (or mlx-lm's Llama3RoPE / YarnRoPE); use "
                "such a model, or verify a batch of paths instead of a tree"
            )
    P, L = cache[0].offset, len(tokens)
    positions = mx.array([P + d - 1 for d in tree_depths(parents)], dtype=mx.int32)
    # The prefix is visible to every node; among the nodes, only ancestors-or-self.
    mask = mx.concatenate([mx.ones((L, P), dtype=mx.bool_), tree_attention_mask(parents)], axis=1)
    ropes = [attn.rope for attn in attentions]
    try:
        for attn, rope in zip(attentions, ropes):
            attn.rope = _RoPEAt(rope, positions)
        logits = model(mx.array(tokens)[None], cache=[_TreeCache(c, mask) for c in cache])
    finally:
        for attn, rope in zip(attentions, ropes):
            attn.rope = rope
    return logits[0].astype(mx.float32)


def build_draft_tree(
    draft_model, draft_cache: list, unseen_tokens: Sequence[int], widths: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Grow a draft token tree level by level: one draft call per level.

    unseen_tokens: L >= 1 committed tokens the draft cache has not seen (ValueError if empty).
    widths: one int >= 1 per level (ValueError otherwise); the tree has len(widths) levels.
        Every node at level d (the root is level 0: the last unseen token) gets as children the
        draft's top `widths[d]` tokens after the path to it, most likely first.
    Returns (tokens, parents), the tree flattened in level order (all of level 1, then level 2,
    ...), children of the same node consecutive and in the order of their parents. Children
    follow the draft's greedy (argmax) ranking, so a widths of all 1s is the greedy draft chain.
    Cache: afterwards the draft cache holds exactly what it held before + unseen_tokens (every
    tree node it scored is trimmed away). Calls: the first level comes from a plain call on
    unseen_tokens, each deeper level from one `tree_forward` over the tree so far.
    """
    unseen_tokens = [int(t) for t in unseen_tokens]
    if not unseen_tokens:
        raise ValueError("build_draft_tree needs at least one unseen token (the root)")
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be a non-empty list of ints >= 1, got {list(widths)}")
    tokens, parents = [], []
    level = [-1]  # the nodes whose children come next; -1 is the root
    for d, width in enumerate(widths):
        if d == 0:  # the root's logits: a plain call that also commits unseen_tokens
            logits = draft_model(mx.array(unseen_tokens)[None], cache=draft_cache)[0, -1:]
        else:  # one call over the whole tree so far; keep the newest level's rows
            logits = tree_forward(draft_model, draft_cache, tokens, parents)[mx.array(level)]
            trim_prompt_cache(draft_cache, len(tokens))
        # Top `width` tokens per node, most likely first (a stable sort: argmax comes first).
        ranked = mx.argsort(-logits, axis=-1)[:, :width].tolist()
        next_level = []
        for parent, children in zip(level, ranked):
            for token in children:
                next_level.append(len(tokens))
                tokens.append(token)
                parents.append(parent)
        level = next_level
    return tokens, parents


def verify_tree_greedy(
    tokens: Sequence[int], parents: Sequence[int], target_logits: mx.array
) -> tuple[list[int], list[int]]:
    """Greedy tree verification: follow the target's argmax down the tree as far as it goes.

    tokens, parents: the draft tree (N nodes). target_logits: float [N + 1, V]; row 0 is the
    target at the root (the last committed token), row i + 1 the target at node i.
    Start at the root; while the target's argmax at the current node equals the token of one of
    its children, step into that child. Returns (path, new_tokens): path is the accepted node
    indices, root to deepest (possibly empty); new_tokens (python ints, len(path) + 1) are the
    path's tokens followed by the target's argmax at the last accepted node (or the root) — the
    correction, or the bonus token when the path ends at a leaf.
    """
    choices = mx.argmax(target_logits, axis=-1).tolist()  # one host sync for the whole tree
    children = {}  # parent -> its children, in flattened order
    for i, parent in enumerate(parents):
        children.setdefault(int(parent), []).append(i)
    path, node = [], -1
    while True:
        choice = choices[node + 1]  # row 0 is the root, row i + 1 node i
        match = [c for c in children.get(node, []) if int(tokens[c]) == choice]
        if not match:
            return path, [int(tokens[i]) for i in path] + [choice]
        node = match[0]
        path.append(node)


def commit_tree_path(cache: list, num_nodes: int, path: Sequence[int]) -> None:
    """Keep only the accepted path's entries of a cache that scored a whole tree.

    cache: per-layer KVCaches holding prefix + num_nodes tree nodes (flattened order) at the
    end. path: accepted node indices, increasing (as `verify_tree_greedy` returns them).
    Afterwards every layer holds prefix + the path's nodes in path order: offset = prefix +
    len(path), and the kept keys/values are the ones computed in the tree call (never re-run
    the model). ValueError if a layer holds fewer than num_nodes entries or is not a KVCache.
    """
    path = [int(i) for i in path]
    if any(b <= a for a, b in zip(path, path[1:])) or any(not 0 <= i < num_nodes for i in path):
        raise ValueError(f"path {path} must be increasing node indices in [0, {num_nodes})")
    for c in cache:
        if not isinstance(c, KVCache):
            raise ValueError(f"commit_tree_path needs plain KVCache layers, got {type(c).__name__}")
        if c.offset < num_nodes:
            raise ValueError(
                f"a cache layer holds {c.offset} entries, fewer than the {num_nodes} tree nodes: "
                "call commit_tree_path right after the tree_forward that scored the tree"
            )
    for c in cache:
        start = c.offset - num_nodes  # where the tree's entries begin
        if path:  # move the path's entries up to follow the prefix, in path order
            keep = mx.array([start + i for i in path])
            c.keys[..., start : start + len(path), :] = c.keys[..., keep, :]
            c.values[..., start : start + len(path), :] = c.values[..., keep, :]
        c.trim(num_nodes - len(path))


def tree_speculative_generate(
    draft_model,
    target_model,
    prompt_tokens: mx.array,
    max_tokens: int,
    eos_token_ids: Sequence[int] = (),
    stats: Optional[SpecStats] = None,
    branching: int = 2,
    depth: int = 4,
) -> Iterator[tuple[int, bool]]:
    """Greedy speculative decoding with a draft tree: exactly the target's greedy output.

    prompt_tokens: int [L], L >= 1 (ValueError if empty). max_tokens: yield at most this many.
    branching >= 1, depth >= 1 (ValueError otherwise): the tree has widths
    [branching, branching, 1, 1, ...] (`depth` levels; the first two levels branch), so
    branching=1 is the chain of Week 2. Each round caps the depth at max(1, min(depth,
    remaining - 1)), remaining = max_tokens - tokens yielded so far: no round drafts levels
    that max_tokens would cut off (a round yields at most depth + 1 tokens).
    Each round: `build_draft_tree`, ONE target `tree_forward` on [target's unseen tokens, tree]
    (a chain of unseen tokens with the tree hanging off the last one; the first round also
    prefills the prompt), `verify_tree_greedy`, `commit_tree_path` on the target cache; the
    draft is fed the accepted path + new token next round. Fresh caches per call.
    eos_token_ids: stop right after yielding one of these. stats: if given, filled in place:
    record_round(num_nodes, len(path), emitted) once per target call; draft_calls += levels.
    Yields (token, from_draft): True for accepted tree tokens, False for the target's token.
    """
    prompt_tokens = mx.array(prompt_tokens, dtype=mx.int32).reshape(-1).tolist()
    if not prompt_tokens:
        raise ValueError("the prompt is empty: speculative decoding needs at least one token")
    if branching < 1 or depth < 1:
        raise ValueError(f"branching and depth must be >= 1, got {branching} and {depth}")
    draft_cache, target_cache = make_prompt_cache(draft_model), make_prompt_cache(target_model)
    eos = set(eos_token_ids)
    draft_unseen, target_unseen = prompt_tokens, prompt_tokens
    emitted = 0
    while emitted < max_tokens:
        levels = max(1, min(depth, max_tokens - emitted - 1))
        widths = [branching] * min(2, levels) + [1] * (levels - 2)
        start = time.perf_counter()
        tokens, parents = build_draft_tree(draft_model, draft_cache, draft_unseen, widths)
        drafted = time.perf_counter()
        # One target call: the unseen tokens as a chain, the tree hanging off the last one.
        U = len(target_unseen)
        chained = list(range(-1, U - 1)) + [U - 1 if p == -1 else p + U for p in parents]
        logits = tree_forward(target_model, target_cache, target_unseen + tokens, chained)
        path, new_tokens = verify_tree_greedy(tokens, parents, logits[U - 1 :])
        commit_tree_path(target_cache, len(tokens), path)
        verified = time.perf_counter()
        target_unseen, draft_unseen = new_tokens[-1:], new_tokens

        out = []
        for i, token in enumerate(new_tokens[: max_tokens - emitted]):
            out.append((token, i < len(path)))
            if token in eos:
                break
        emitted += len(out)
        if stats is not None:
            stats.record_round(len(tokens), len(path), len(out))
            stats.draft_calls += len(widths)
            stats.draft_time_s += drafted - start
            stats.verify_time_s += verified - drafted
        yield from out
        if out and out[-1][0] in eos:
            return
