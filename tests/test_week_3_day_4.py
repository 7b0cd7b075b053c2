"""Week 3 Day 4 — token trees: the tree mask (task 1), one tree call (task 2), growing a draft
tree (task 3), greedy tree verification (task 4), keeping the accepted path in the cache
(task 5) and the whole loop (task 6).

Book: book/src/week3-04-token-trees.md. Grade with
    pytest tests/test_week_3_day_4.py --impl student -k task_2
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

from specdec.kit.models import tiny_llama, tiny_llama_pair
from specdec.kit.stats import SpecStats
from support import CallCounter, assert_close, mlx_lm_greedy, raises, tolerance

BOOK = "see book/src/week3-04-token-trees.md"
PROMPT = [3, 9, 2, 7, 11, 4]

# The example tree of the chapter: root -> {a, b}; a -> {c, d}; b -> {e}; c -> {f}.
#                   a  b  c  d  e  f
EXAMPLE_PARENTS = [-1, -1, 0, 0, 1, 2]
EXAMPLE_TOKENS = [10, 20, 30, 40, 50, 60]


def path_to(node, parents):
    """Node indices from the root's child down to `node`."""
    path = []
    while node != -1:
        path.append(node)
        node = parents[node]
    return path[::-1]


def last_logits(model, tokens):
    """Logits after `tokens`, from a plain forward with no cache: the ground truth."""
    return model(mx.array(tokens)[None])[0, -1]


def prefilled(model, tokens):
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(tokens)[None], cache=cache))
    return cache


# Task 1 ------------------------------------------------------------------------------------------
def test_task_1_tree_attention_mask(impl):
    mask = impl.tree.tree_attention_mask(EXAMPLE_PARENTS)
    expected = np.array(
        [  # a  b  c  d  e  f      (row: the node that reads; column: what it may see)
            [1, 0, 0, 0, 0, 0],  # a
            [0, 1, 0, 0, 0, 0],  # b
            [1, 0, 1, 0, 0, 0],  # c
            [1, 0, 0, 1, 0, 0],  # d
            [0, 1, 0, 0, 1, 0],  # e
            [1, 0, 1, 0, 0, 1],  # f
        ],
        dtype=bool,
    )
    assert mask.dtype == mx.bool_ and mask.shape == (6, 6), (
        f"the mask must be bool [N, N], got {mask.dtype} {mask.shape}; {BOOK}"
    )
    assert (np.array(mask) == expected).all(), (
        f"mask[j, i] must be True exactly when node i is node j or one of its ancestors "
        f"(never a sibling or cousin); got\n{np.array(mask).astype(int)}\nexpected\n"
        f"{expected.astype(int)}; {BOOK}"
    )
    chain = np.array(impl.tree.tree_attention_mask([-1, 0, 1, 2]))
    assert (chain == np.tril(np.ones((4, 4), bool))).all(), (
        "a chain (parents [-1, 0, 1, 2]) is ordinary text: its tree mask is the causal mask"
    )
    star = np.array(impl.tree.tree_attention_mask([-1, -1, -1]))
    assert (star == np.eye(3, dtype=bool)).all(), "siblings must not see each other"
    with raises(ValueError, "parents [-1, 2, 0] lists node 1's parent (2) after it: refuse it "
                "with a ValueError naming the index — the tree must be flattened parents first",
                match="1"):
        impl.tree.tree_attention_mask([-1, 2, 0])
    with raises(ValueError, "parents [0]: node 0 cannot be its own parent (parents[i] must be "
                "in [-1, i)); refuse it with a ValueError naming the index", match="0"):
        impl.tree.tree_attention_mask([0])


def test_task_1_tree_depths(impl):
    depths = impl.tree.tree_depths(EXAMPLE_PARENTS)
    assert list(depths) == [1, 1, 2, 2, 2, 3], (
        f"the root's children have depth 1 and every child one more than its parent; got "
        f"{list(depths)}; {BOOK}"
    )
    assert list(impl.tree.tree_depths([-1, 0, 1])) == [1, 2, 3]
    with raises(ValueError, "tree_depths([-1, 5]): parents[1] = 5 is not in [-1, 1); refuse "
                "it with a ValueError naming the index, as tree_attention_mask does", match="1"):
        impl.tree.tree_depths([-1, 5])


# Task 2 ------------------------------------------------------------------------------------------
TASK_1 = ("tree.tree_attention_mask", "tree.tree_depths")


def test_task_2_tree_logits_equal_path_forwards(impl, use_ref, llama_models):
    use_ref(*TASK_1)
    _, target = llama_models
    cache = prefilled(target, PROMPT)
    ropes = [layer.self_attn.rope for layer in target.layers]
    layers = list(cache)
    logits = impl.tree.tree_forward(target, cache, EXAMPLE_TOKENS, EXAMPLE_PARENTS)
    assert logits.shape == (6, 64) and logits.dtype == mx.float32, (
        f"one row of float32 logits per tree node, [N, V] = [6, 64]; got {logits.dtype} {logits.shape}"
    )
    for j in range(len(EXAMPLE_TOKENS)):
        path_tokens = [EXAMPLE_TOKENS[i] for i in path_to(j, EXAMPLE_PARENTS)]
        expected = last_logits(target, PROMPT + path_tokens)
        assert_close(logits[j], expected, (
            f"node {j} (path {path_tokens}): the tree call's logits differ from a plain forward "
            "of prompt + path. Each node must see the prefix and its ancestors only (the tree "
            f"mask), and be rotated at position prefix_len + depth - 1 (its siblings share it); {BOOK}"
        ))
    assert [c.offset for c in cache] == [len(PROMPT) + 6] * len(cache), (
        "after a tree call every cache layer holds the prefix + all N nodes"
    )
    assert all(a is b for a, b in zip(cache, layers)) and len(cache) == len(layers), (
        "tree_forward must leave the cache list as it was (the same KVCache objects, with the "
        "new entries in them): wrap the layers for the call, do not put the wrappers in the list"
    )
    assert all(layer.self_attn.rope is rope for layer, rope in zip(target.layers, ropes)), (
        "tree_forward must put every layer's original rope module back when it is done"
    )
    fresh = prefilled(target, PROMPT)
    after = target(mx.array([8])[None], cache=fresh)[0, -1]
    assert_close(after, last_logits(target, PROMPT + [8]), (
        "after tree_forward the model must be its plain self again: a normal call must give "
        "normal logits"
    ))


def test_task_2_first_call_prefills_a_chain_with_the_tree(impl, use_ref, llama_models):
    """The first round feeds the prompt (a chain) and the tree in one call, on an empty cache."""
    use_ref(*TASK_1)
    _, target = llama_models
    P = len(PROMPT)
    parents = list(range(-1, P - 1)) + [P - 1 if p == -1 else p + P for p in EXAMPLE_PARENTS]
    cache = make_prompt_cache(target)
    logits = impl.tree.tree_forward(target, cache, PROMPT + EXAMPLE_TOKENS, parents)
    assert logits.shape == (P + 6, 64), f"expected [{P + 6}, 64] logits, got {logits.shape}"
    plain = target(mx.array(PROMPT)[None])[0]
    assert_close(logits[:P], plain, (
        "a chain (parents -1, 0, 1, ...) fed by tree_forward must give a plain forward's logits"
    ))
    for j in (0, 3, 5):
        path_tokens = [EXAMPLE_TOKENS[i] for i in path_to(j, EXAMPLE_PARENTS)]
        expected = last_logits(target, PROMPT + path_tokens)
        assert_close(logits[P + j], expected, (
            f"node {j}: wrong logits when the prompt and the tree share one call on an empty "
            f"cache (positions start at 0 then); {BOOK}"
        ))


class Unrotatable(nn.Module):
    """A positional module tree_forward cannot know how to place per token."""

    def __call__(self, x, offset=0):
        return x


class Boom(nn.Module):
    def __call__(self, x):
        raise RuntimeError("boom")


def test_task_2_refuses_unknown_rope_and_restores_on_error(impl, use_ref):
    use_ref(*TASK_1)
    model = tiny_llama(seed=5)
    model.layers[0].self_attn.rope = Unrotatable()
    with raises(ValueError, "layer 0's rope is an Unrotatable: tree_forward cannot place it per "
                "token, so it must refuse with a ValueError naming the module (and the fix)",
                match="Unrotatable"):
        impl.tree.tree_forward(model, make_prompt_cache(model), [1, 2], [-1, -1])

    model = tiny_llama(seed=5)
    with raises(ValueError, "a cache layer that is not a KVCache (here a RotatingKVCache) must "
                "be refused with a ValueError naming it: the tree's entries must be plain, "
                "trimmable KVCache entries", match="RotatingKVCache"):
        cache = [RotatingKVCache(max_size=64) for _ in model.layers]
        impl.tree.tree_forward(model, cache, [1, 2], [-1, -1])

    ropes = [layer.self_attn.rope for layer in model.layers]
    model.layers[1].mlp = Boom()
    with raises(RuntimeError, "the model itself raised inside the tree call: let its error "
                "through (after restoring the ropes)", match="boom"):
        impl.tree.tree_forward(model, make_prompt_cache(model), [1, 2], [-1, -1])
    assert all(layer.self_attn.rope is rope for layer, rope in zip(model.layers, ropes)), (
        "when the model raises inside a tree call, the original ropes must still be put back "
        "(try/finally)"
    )


# Task 3 ------------------------------------------------------------------------------------------
TASK_2 = TASK_1 + ("tree.tree_forward",)


def brute_force_tree(model, prefix, widths):
    """The expected tree: top-w children of each node from plain forwards, level by level."""
    tokens, parents, level = [], [], [-1]
    for width in widths:
        next_level = []
        for node in level:
            path_tokens = [tokens[i] for i in path_to(node, parents)] if node >= 0 else []
            ranked = mx.argsort(-last_logits(model, prefix + path_tokens)).tolist()
            for token in ranked[:width]:
                next_level.append(len(tokens))
                tokens.append(token)
                parents.append(node)
        level = next_level
    return tokens, parents


def tree_mistake(model, prefix, widths, tokens, parents) -> str | None:
    """Why (tokens, parents) is not the draft tree for `widths`, or None if it is.

    Walks the tree level by level as brute_force_tree builds it: the next widths[d] nodes must be
    children of the current node, and their tokens the draft's top widths[d] after the path to
    it, most likely first. "Top" holds up to the device's float tolerance: on a GPU two nearly
    tied tokens may rank either way, and the tree built on either ranking is right.
    """
    i, level = 0, [-1]
    for d, width in enumerate(widths):
        next_level = []
        for node in level:
            path_tokens = [tokens[k] for k in path_to(node, parents)] if node >= 0 else []
            where = f"level {d + 1}, the children of {'the root' if node < 0 else f'node {node}'}"
            if parents[i : i + width] != [node] * width:
                return (f"{where}: expected {width} nodes with parent {node} at indices "
                        f"{i}..{i + width - 1}, got parents {parents[i : i + width]}")
            logits = np.array(last_logits(model, prefix + path_tokens), dtype=np.float64)
            children, tol = tokens[i : i + width], tolerance(logits)
            cutoff = np.sort(logits)[::-1][width - 1]  # the width-th largest logit
            ranked = all(logits[a] >= logits[b] - tol for a, b in zip(children, children[1:]))
            if len(set(children)) < width or min(logits[children]) < cutoff - tol or not ranked:
                best = mx.argsort(-mx.array(logits)).tolist()[:width]
                return (f"{where} (path {path_tokens}): got tokens {children}, but the draft's top "
                        f"{width} after prompt + path are {best}, most likely first")
            next_level += range(i, i + width)
            i += width
        level = next_level
    if i != len(tokens):
        return f"the tree has {len(tokens)} nodes, but widths {widths} make {i}"
    return None


@pytest.mark.parametrize("widths", [[2, 2, 1], [3, 1], [1, 1, 1]])
def test_task_3_build_draft_tree(impl, use_ref, llama_models, widths):
    use_ref(*TASK_2)
    draft, _ = llama_models
    seen, unseen = PROMPT[:4], PROMPT[4:]
    cache = prefilled(draft, seen)
    counter = CallCounter(draft)
    tokens, parents = impl.tree.build_draft_tree(counter, cache, unseen, widths)
    tokens, parents = [int(t) for t in tokens], [int(p) for p in parents]
    mistake = tree_mistake(draft, PROMPT, widths, tokens, parents)
    if mistake is not None:
        expected_tokens, expected_parents = brute_force_tree(draft, PROMPT, widths)
        pytest.fail(
            f"widths {widths}: expected the tree (tokens, parents) = {expected_tokens}, "
            f"{expected_parents}, got {tokens}, {parents}. {mistake}. Each node at level d gets "
            "the draft's top widths[d] tokens after the path to it, most likely first, flattened "
            f"level by level; {BOOK}"
        )
    assert counter.calls == len(widths), (
        f"one draft call per level: expected {len(widths)} calls, got {counter.calls}"
    )
    assert [c.offset for c in cache] == [len(PROMPT)] * len(cache), (
        "afterwards the draft cache holds what it held + the unseen tokens: trim the tree away"
    )
    after = draft(mx.array([8])[None], cache=cache)[0, -1]
    assert_close(after, last_logits(draft, PROMPT + [8]), (
        "the draft cache's contents are wrong after build_draft_tree (a tree node left behind?)"
    ))


def test_task_3_rejects_bad_inputs(impl, use_ref, llama_models):
    use_ref(*TASK_2)
    draft, _ = llama_models
    with raises(ValueError, "build_draft_tree with no unseen tokens must raise ValueError: the "
                "root is the last unseen token, so there must be at least one"):
        impl.tree.build_draft_tree(draft, make_prompt_cache(draft), [], [2, 1])
    with raises(ValueError, "widths [2, 0] must be refused with a ValueError: every level needs "
                "a width >= 1"):
        impl.tree.build_draft_tree(draft, make_prompt_cache(draft), [1, 2], [2, 0])


# Task 4 ------------------------------------------------------------------------------------------
def logits_choosing(choices, V=100):
    """Rows of logits whose argmax are `choices`: row 0 the root, rows 1..6 nodes a..f."""
    rows = np.zeros((len(choices), V), np.float32)
    rows[np.arange(len(choices)), choices] = 5.0
    return mx.array(rows)


@pytest.mark.parametrize(
    "choices, path, new_tokens",
    [
        # root -> a (10) -> c (30) -> f (60) -> bonus 7: the deepest leaf, all accepted
        ([10, 30, 99, 60, 99, 99, 7], [0, 2, 5], [10, 30, 60, 7]),
        # root -> b (20) -> e (50) -> bonus 8
        ([20, 99, 50, 99, 99, 8, 99], [1, 4], [20, 50, 8]),
        # root -> a -> d (40), then the target wants 9: d is a leaf, 9 is the bonus
        ([10, 40, 99, 99, 9, 99, 99], [0, 3], [10, 40, 9]),
        # the target wants 50 at the root: e's token, but e is not a child of the root
        ([50, 99, 99, 99, 99, 99, 99], [], [50]),
        # a accepted, then 60 (f's token, a grandchild of a, not a child): correction 60
        ([10, 60, 99, 99, 99, 99, 99], [0], [10, 60]),
    ],
)
def test_task_4_verify_tree_greedy(impl, choices, path, new_tokens):
    got_path, got_tokens = impl.tree.verify_tree_greedy(
        EXAMPLE_TOKENS, EXAMPLE_PARENTS, logits_choosing(choices)
    )
    assert all(type(t) is int for t in list(got_path) + list(got_tokens)), (
        f"path and new_tokens are python ints, got {got_path!r} and {got_tokens!r}"
    )
    assert (list(got_path), list(got_tokens)) == (path, new_tokens), (
        f"target argmax per row (root first) {choices}: expected path {path} and tokens "
        f"{new_tokens}, got {list(got_path)} and {list(got_tokens)}. Walk down from the root, "
        "stepping into the child whose token is the target's argmax at the current node; stop "
        f"when no child matches and append that argmax; {BOOK}"
    )


# Task 5 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [[0, 2, 5], [1, 4], [0, 3], [], [1]])
def test_task_5_commit_tree_path(impl, use_ref, llama_models, path):
    use_ref(*TASK_2)
    _, target = llama_models
    cache = prefilled(target, PROMPT)
    mx.eval(impl.tree.tree_forward(target, cache, EXAMPLE_TOKENS, EXAMPLE_PARENTS))
    impl.tree.commit_tree_path(cache, len(EXAMPLE_TOKENS), path)
    committed = PROMPT + [EXAMPLE_TOKENS[i] for i in path]
    assert [c.offset for c in cache] == [len(committed)] * len(cache), (
        f"path {path}: every layer must hold prefix + path = {len(committed)} entries, got "
        f"{[c.offset for c in cache]}"
    )
    fresh = prefilled(target, committed)
    for layer, (c, f) in enumerate(zip(cache, fresh)):
        for name in ("keys", "values"):
            kept, want = getattr(c, name)[..., : c.offset, :], getattr(f, name)[..., : f.offset, :]
            assert_close(kept, want, (
                f"path {path}, layer {layer}: the kept {name} are not those of prefix + path in "
                "order; move each path node's entry (at prefix_len + node) to follow the prefix, "
                f"keys and values alike; {BOOK}"
            ))
    next_logits = target(mx.array([8])[None], cache=cache)[0, -1]
    assert_close(next_logits, last_logits(target, committed + [8]), (
        f"path {path}: the next token's logits must equal a fresh prefill of the committed tokens"
    ))


def test_task_5_rejects_a_short_cache(impl, use_ref, llama_models):
    use_ref(*TASK_2)
    _, target = llama_models
    cache = prefilled(target, [1, 2, 3])
    with raises(ValueError, "a cache holding 3 entries cannot hold a tree of 5 nodes: "
                "commit_tree_path must raise ValueError (call it right after the tree_forward "
                "that scored the tree)"):
        impl.tree.commit_tree_path(cache, 5, [0])
    assert [c.offset for c in cache] == [3] * len(cache), "a refused call must not trim the cache"
    rotating = [RotatingKVCache(max_size=64) for _ in target.layers]
    target(mx.array(PROMPT + EXAMPLE_TOKENS)[None], cache=rotating)
    with raises(ValueError, "commit_tree_path needs plain KVCache layers: a RotatingKVCache must "
                "be refused with a ValueError naming it", match="RotatingKVCache"):
        impl.tree.commit_tree_path(rotating, len(EXAMPLE_TOKENS), [0])


# Task 6 ------------------------------------------------------------------------------------------
TASK_5 = TASK_2 + ("tree.build_draft_tree", "tree.verify_tree_greedy", "tree.commit_tree_path")


@pytest.mark.parametrize("branching, depth", [(1, 3), (2, 2), (2, 4), (3, 3)])
@pytest.mark.parametrize("prompt", [[5], PROMPT])
def test_task_6_greedy_exactness(impl, use_ref, llama_models, branching, depth, prompt):
    use_ref(*TASK_5)
    draft, target = llama_models
    expected = mlx_lm_greedy(target, prompt, 20)
    for max_tokens in (1, 6, 20):
        got = impl.tree.tree_speculative_generate(
            draft, target, prompt, max_tokens, branching=branching, depth=depth
        )
        got = [token for token, _ in got]
        assert got == expected[:max_tokens], (
            f"branching={branching}, depth={depth}, prompt {prompt}, max_tokens={max_tokens}: "
            f"tree decoding must reproduce the target's greedy output exactly.\n  expected "
            f"{expected[:max_tokens]}\n  got      {got}\nA wrong token after the first round "
            f"usually means the target cache kept the wrong entries (commit_tree_path); {BOOK}"
        )


def test_task_6_eos_and_stats(impl, use_ref, llama_models):
    use_ref(*TASK_5)
    draft, target = llama_models
    expected = mlx_lm_greedy(target, PROMPT, 30)
    eos = expected[9]
    expected = expected[: expected.index(eos) + 1]
    counter, stats = CallCounter(target), SpecStats()
    out = list(
        impl.tree.tree_speculative_generate(
            draft, counter, PROMPT, 30, eos_token_ids=[eos], stats=stats, branching=2, depth=3
        )
    )
    assert [t for t, _ in out] == expected, (
        f"stop right after the first EOS ({eos}): expected {expected}, got {[t for t, _ in out]}"
    )
    assert stats.rounds == counter.calls, (
        f"one target call per round: {counter.calls} target calls, {stats.rounds} rounds recorded"
    )
    assert stats.emitted == len(out), (
        f"stats.emitted counts the yielded tokens: {len(out)} yielded, got {stats.as_dict()}"
    )
    assert stats.accepted >= sum(d for _, d in out) > 0, (
        "stats.accepted counts the accepted path lengths (at least the from_draft=True tokens "
        f"yielded; EOS may cut a path); got {stats.as_dict()}"
    )
    assert stats.rounds < len(out), "with a decent draft some rounds must emit more than one token"


def test_task_6_tree_beats_chain(impl, use_ref, ref):
    """Same depth, same number of draft calls: the tree's extra candidates raise tokens per call."""
    use_ref(*TASK_5)
    draft, target = tiny_llama_pair(seed=0, noise=0.2)
    prompts = [[5], PROMPT, [60, 1, 33]]
    per_call = {}
    for branching in (1, 2):
        stats = SpecStats()
        for prompt in prompts:
            for _ in impl.tree.tree_speculative_generate(
                draft, target, prompt, 24, stats=stats, branching=branching, depth=4
            ):
                pass
        per_call[branching] = stats.tokens_per_round
    # branching=1 is Week 2's greedy chain: same rounds as speculative_generate with K = depth.
    chain_stats = SpecStats()
    decoder = ref.draft.SpeculativeDecoder(draft, target, lookahead=4)
    for prompt in prompts:
        chain = ref.speculative.speculative_generate(decoder, prompt, 24, stats=chain_stats)
        for _ in chain:
            pass
    assert per_call[1] == pytest.approx(chain_stats.tokens_per_round), (
        f"branching=1 must be Week 2's chain: {per_call[1]:.3f} tokens per target call, the "
        f"chain gets {chain_stats.tokens_per_round:.3f}"
    )
    assert per_call[2] > per_call[1], (
        f"a branching tree should accept more per target call than a chain of the same depth: "
        f"tree {per_call[2]:.2f}, chain {per_call[1]:.2f} tokens per call; {BOOK}"
    )


def tree_nodes(levels, branching):
    """Nodes of a tree with widths [branching] * min(2, levels) + [1] * (levels - 2)."""
    widths = [branching] * min(2, levels) + [1] * (levels - 2)
    return sum(int(np.prod(widths[: d + 1])) for d in range(levels))


class RoundSpy(CallCounter):
    """A target that records, at each of its calls (one per round), how many draft calls came
    before it and how many tokens the caller had received by then."""

    def __init__(self, model, draft_counter, received):
        super().__init__(model)
        self.draft_counter, self.received, self.seen = draft_counter, received, []

    def __call__(self, *args, **kwargs):
        self.seen.append((self.draft_counter.calls, len(self.received)))
        return super().__call__(*args, **kwargs)


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 13])
@pytest.mark.parametrize("branching, depth", [(1, 4), (2, 4), (2, 3)])
def test_task_6_tree_depth_capped_by_max_tokens(impl, use_ref, branching, depth, max_tokens):
    """Each round's depth is max(1, min(depth, remaining - 1)), remaining = max_tokens - tokens
    yielded so far: near the end no round drafts what max_tokens will cut off. A draft equal to
    the target accepts whole paths, so rounds are long and the cap bites near the end.
    """
    use_ref(*TASK_5)
    draft, target = tiny_llama_pair(seed=0, noise=0.0)
    draft_counter, out = CallCounter(draft), []
    target_spy, stats = RoundSpy(target, draft_counter, out), SpecStats()
    for item in impl.tree.tree_speculative_generate(
        draft_counter, target_spy, PROMPT, max_tokens, stats=stats, branching=branching, depth=depth
    ):
        out.append(item)
    where = f"branching={branching}, depth={depth}, max_tokens={max_tokens}"
    assert [t for t, _ in out] == mlx_lm_greedy(target, PROMPT, max_tokens), (
        f"{where}: tree decoding must reproduce the target's greedy output exactly"
    )
    draft_calls, received = [d for d, _ in target_spy.seen], [r for _, r in target_spy.seen]
    levels = [b - a for a, b in zip([0] + draft_calls[:-1], draft_calls)]
    want = [max(1, min(depth, max_tokens - r - 1)) for r in received]
    assert levels == want, (
        f"{where}: draft calls (tree levels) per round {levels}, with {received} tokens yielded "
        f"before each round; expected {want}. Each round caps the tree's depth at "
        "max(1, min(depth, remaining - 1)), remaining = max_tokens - tokens yielded so far: "
        "a deeper tree only drafts tokens that max_tokens will cut off"
    )
    assert draft_counter.calls == (draft_calls[-1] if draft_calls else 0), (
        f"{where}: the draft was called {draft_counter.calls - draft_calls[-1]} times after the "
        "last target call: no round may draft what it will not verify"
    )
    nodes = [tree_nodes(lv, branching) for lv in want]
    assert stats.lookahead_per_round == nodes, (
        f"{where}: tree nodes per round (stats.record_round's num_drafted) "
        f"{stats.lookahead_per_round}, expected {nodes}: widths [branching, branching, 1, 1, "
        "...] over the capped depth, one record_round per target call"
    )
    assert stats.draft_calls == draft_counter.calls, (
        f"{where}: stats.draft_calls is {stats.draft_calls}, but the draft was called "
        f"{draft_counter.calls} times: add the number of levels every round"
    )
    emitted = [b - a for a, b in zip(received, received[1:] + [len(out)])]
    flags = []
    for accepted, n in zip(stats.accepted_per_round, emitted):
        flags += [True] * min(accepted, n) + [False] * (n - min(accepted, n))
    assert [f for _, f in out] == flags, (
        f"{where}: from_draft flags {[f for _, f in out]}, expected {flags}: True for the "
        "accepted path's tokens, False for the target's bonus or correction token"
    )
    assert stats.accepted > 0, f"{where}: a draft equal to the target must have drafts accepted"


def test_task_6_rejects_bad_arguments(impl, use_ref, llama_models):
    use_ref(*TASK_5)
    draft, target = llama_models
    for kwargs, why in [
        (dict(prompt_tokens=[]), "an empty prompt must be refused with a ValueError: the tree "
         "hangs off the last committed token"),
        (dict(branching=0), "branching=0 must be refused with a ValueError: every level has >= 1 child"),
        (dict(depth=0), "depth=0 must be refused with a ValueError: the tree has >= 1 level"),
    ]:
        args = dict(prompt_tokens=PROMPT, max_tokens=4) | kwargs
        with raises(ValueError, why):
            # A generator runs nothing until asked for its first token: ask for it.
            next(iter(impl.tree.tree_speculative_generate(draft, target, **args)))

