"""Provided: the coupled (drafter-invariant) rule with a draft token tree.

Week 5 Day 1 meets Week 3 Day 4.

With Gumbel noise keyed only by (seed, absolute position), every tree node at depth d stands for
the token at position t + d - 1 (t = the length of the committed sequence), and the target's
coupled token after it is argmax(log p + g(seed, t + d)), p = make_probs(logits, temperature,
top_k, top_p): a deterministic function of the node's prefix. So coupled tree verification is
*greedy* tree verification (`verify_tree_greedy`) on transformed logits, log p plus the noise of
the row's next position, and the accepted path and its last token are exactly plain seeded
decoding's tokens. The draft grows its tree with the same noise: each node's first child is the
draft's own coupled token (argmax of log q + noise), the others the next best under that noise.

Nothing here is a task: it is the reference's Week 3 Day 4 and Week 5 Day 1 code put together
(`package` picks the tree whose `tree`, `coupling` and `sampling` modules run; the default is the
reference). Graded by tests/test_coupled_tree.py:
    pytest tests/test_coupled_tree.py -q
Shapes: `N` tree nodes, `V` vocabulary.
"""

import importlib
import time
from typing import Iterator, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from specdec.kit.models import MarkovLM, model_vocab_size
from specdec.kit.stats import SpecStats


def node_noise(seed: int, t: int, nodes: Sequence[int], depths: Sequence[int], vocab_size: int,
               gumbel_noise) -> mx.array:
    """Noise for the token that follows each of `nodes`: float32 [len(nodes), V].

    nodes: node indices, -1 for the root (the last committed token, at position t - 1).
    depths: every node's depth (1 for the root's children). The token after a node at depth d
    sits at absolute position t + d, so its noise is gumbel_noise(seed, [t + d]): nodes at the
    same depth share it — keyed by depth, never by the node's index in the tree.
    """
    return gumbel_noise(seed, [t + (0 if i < 0 else depths[i]) for i in nodes], vocab_size)


def _tree_logits(tree, model, cache: list, tokens: list[int], parents: list[int]) -> mx.array:
    """`tree.tree_forward`, plus the toy MarkovLM (it reads only the token and its position)."""
    if not isinstance(model, MarkovLM):
        return tree.tree_forward(model, cache, tokens, parents)
    P = cache[0].offset
    model(mx.array(tokens)[None], cache=cache)  # grows the cache by len(tokens), as tree_forward
    phase = mx.array([(P + d - 1) % model.period for d in tree.tree_depths(parents)])
    return mx.log(model.transitions[phase, mx.array(tokens)])


def coupled_draft_tree(tree, sampling, gumbel_noise, draft_model, draft_cache: list,
                       unseen_tokens: list[int], widths: Sequence[int], seed: int, t: int,
                       temperature: float, top_k: int, top_p: float) -> tuple[list[int], list[int]]:
    """`build_draft_tree` under the coupled noise: one draft call per level.

    Each node at level d (root: level 0) gets the draft's top widths[d] tokens ranked by
    log q + node_noise (q = make_probs of the draft's logits), so its first child is the draft's
    coupled token. Returns (tokens, parents) in level order; the draft cache ends holding what it
    held before + unseen_tokens.
    """
    tokens, parents, depths, level = [], [], [], [-1]
    for d, width in enumerate(widths):
        if d == 0:
            logits = draft_model(mx.array(unseen_tokens)[None], cache=draft_cache)[0, -1:]
        else:
            logits = _tree_logits(tree, draft_model, draft_cache, tokens, parents)[mx.array(level)]
            trim_prompt_cache(draft_cache, len(tokens))
        noise = node_noise(seed, t, level, depths, logits.shape[-1], gumbel_noise)
        scores = mx.log(sampling.make_probs(logits, temperature, top_k, top_p)) + noise
        ranked = mx.argsort(-scores, axis=-1)[:, :width].tolist()
        next_level = []
        for parent, children in zip(level, ranked):
            for token in children:
                next_level.append(len(tokens))
                tokens.append(int(token))
                parents.append(parent)
                depths.append(d + 1)
        level = next_level
    return tokens, parents


def coupled_tree_generate(
    draft_model,
    target_model,
    prompt_tokens: mx.array,
    max_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    widths: Sequence[int] = (2, 2),
    stats: Optional[SpecStats] = None,
    package: str = "specdec_ref",
) -> Iterator[tuple[int, bool]]:
    """Tree speculative decoding whose output is `seeded_generate`'s, token for token.

    prompt_tokens: int [L], L >= 1 (ValueError if empty). widths: one int >= 1 per tree level
    (ValueError otherwise); each round caps the levels at max(1, min(len(widths), remaining -
    1)). Each round (t = committed length): `coupled_draft_tree`; ONE target tree call on the
    target's unseen tokens with the tree hanging off the last one; `verify_tree_greedy` on
    log p + node_noise per row; `commit_tree_path`. Yields (token, from_draft) as
    `coupled_generate`; stops at max_tokens or right after an EOS. stats: record_round(N,
    accepted, emitted) per round; draft_calls += levels. package: the tree ("specdec_ref" or
    "specdec") whose tree, coupling and sampling modules run.
    """
    tree = importlib.import_module(f"{package}.tree")
    sampling = importlib.import_module(f"{package}.sampling")
    gumbel_noise = importlib.import_module(f"{package}.coupling").gumbel_noise
    prompt = mx.array(prompt_tokens, dtype=mx.int32).reshape(-1).tolist()
    if not prompt:
        raise ValueError("the prompt is empty: decoding needs at least one token")
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be a non-empty list of ints >= 1, got {list(widths)}: "
                         "one width per tree level, e.g. (2, 2)")
    V = model_vocab_size(target_model)
    draft_cache, target_cache = make_prompt_cache(draft_model), make_prompt_cache(target_model)
    eos, committed, emitted = set(eos_token_ids), list(prompt), 0
    draft_unseen, target_unseen = list(prompt), list(prompt)
    while emitted < max_tokens:
        levels = max(1, min(len(widths), max_tokens - emitted - 1))
        t = len(committed)
        start = time.perf_counter()
        tokens, parents = coupled_draft_tree(tree, sampling, gumbel_noise, draft_model,
                                             draft_cache, draft_unseen, widths[:levels], seed, t,
                                             temperature, top_k, top_p)
        drafted = time.perf_counter()
        U = len(target_unseen)
        chained = list(range(-1, U - 1)) + [U - 1 if p == -1 else p + U for p in parents]
        logits = _tree_logits(tree, target_model, target_cache, target_unseen + tokens, chained)
        depths = tree.tree_depths(parents)
        noise = node_noise(seed, t, range(-1, len(tokens)), depths, V, gumbel_noise)
        scores = mx.log(sampling.make_probs(logits[U - 1 :], temperature, top_k, top_p)) + noise
        path, new_tokens = tree.verify_tree_greedy(tokens, parents, scores)
        tree.commit_tree_path(target_cache, len(tokens), path)
        verified = time.perf_counter()
        target_unseen, draft_unseen = new_tokens[-1:], new_tokens
        out = []
        for i, token in enumerate(new_tokens[: max_tokens - emitted]):
            out.append((token, i < len(path)))
            if token in eos:
                break
        committed += [token for token, _ in out]
        emitted += len(out)
        if stats is not None:
            stats.record_round(len(tokens), len(path), len(out))
            stats.draft_calls += levels
            stats.draft_time_s += drafted - start
            stats.verify_time_s += verified - drafted
        yield from out
        if out[-1][0] in eos:
            return
