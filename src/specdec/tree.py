"""Week 3 Day 4 — token trees: verify several candidate continuations in one target call.

A draft tree is stored flattened in level order: `tokens[i]` is node i's token and
`parents[i]` the index of its parent node (-1: a child of the root, the last committed token).
Parents come before children (`parents[i] < i`). Node i sits at depth `depths[i]` (1 for the
root's children) and must be read at position `prefix_len + depths[i] - 1`: nodes at the same
depth share a position. One target call scores every node with a *tree attention mask*: node j
sees the cached prefix and its own ancestors (and itself), never its cousins.
Shapes: `N` tree nodes, `V` vocabulary, `L` tokens fed in one call.
"""

from typing import Iterator, Optional, Sequence

import mlx.core as mx

from specdec.kit.stats import SpecStats


def tree_attention_mask(parents: Sequence[int]) -> mx.array:
    """The tree's attention mask: mask[j, i] is True iff node i is node j or an ancestor of j.

    parents: N ints, parents[i] in [-1, i) (ValueError otherwise, naming the bad index: the
        tree must be flattened parents-first). Returns bool [N, N]; row j is what node j sees
        among the tree nodes (every row has its diagonal set; a chain gives the causal mask).
    """
    raise NotImplementedError(
        "Week 3 Day 4 Task 1: tree_attention_mask — see book/src/week3-04-token-trees.md"
    )


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node: 1 for the root's children (parent -1), parent's depth + 1 otherwise.

    parents: N ints as in `tree_attention_mask` (same ValueError). Returns N python ints.
    """
    raise NotImplementedError(
        "Week 3 Day 4 Task 1: tree_depths — see book/src/week3-04-token-trees.md"
    )


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
    raise NotImplementedError(
        "Week 3 Day 4 Task 2: tree_forward — see book/src/week3-04-token-trees.md"
    )


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
    raise NotImplementedError(
        "Week 3 Day 4 Task 3: build_draft_tree — see book/src/week3-04-token-trees.md"
    )


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
    raise NotImplementedError(
        "Week 3 Day 4 Task 4: verify_tree_greedy — see book/src/week3-04-token-trees.md"
    )


def commit_tree_path(cache: list, num_nodes: int, path: Sequence[int]) -> None:
    """Keep only the accepted path's entries of a cache that scored a whole tree.

    cache: per-layer KVCaches holding prefix + num_nodes tree nodes (flattened order) at the
    end. path: accepted node indices, increasing (as `verify_tree_greedy` returns them).
    Afterwards every layer holds prefix + the path's nodes in path order: offset = prefix +
    len(path), and the kept keys/values are the ones computed in the tree call (never re-run
    the model). ValueError if a layer holds fewer than num_nodes entries or is not a KVCache.
    """
    raise NotImplementedError(
        "Week 3 Day 4 Task 5: commit_tree_path — see book/src/week3-04-token-trees.md"
    )


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
    raise NotImplementedError(
        "Week 3 Day 4 Task 6: tree_speculative_generate — see book/src/week3-04-token-trees.md"
    )
