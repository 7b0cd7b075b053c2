"""Provided code: the coupled rule with a draft token tree (src/specdec/kit/coupled_tree.py).

Not a graded day: `coupled_tree_generate` is provided (Week 5 Day 1 meets Week 3 Day 4), and these
checks hold it to the day's promise: whatever the tree's shape, the output is plain seeded
decoding's (`seeded_generate`), token for token. Run with
    pytest tests/test_coupled_tree.py -q
Token equality on the tiny llama needs exact enough float32 arithmetic: those checks run on the
CPU device (see `exact_arithmetic` in tests/test_week_5_day_1.py); the Markov pair's logits are
table lookups, exact on every backend.
"""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from specdec.kit import coupled_tree
from specdec.kit.coupled_tree import coupled_draft_tree, coupled_tree_generate
from specdec.kit.stats import SpecStats
from support import CallCounter, raises
# The CPU-device fixture (a tree call and 1-token steps agree to ~1e-6 there, no TF32), the ground
# truth and the difference report are Day 1's own.
from test_week_5_day_1 import exact_arithmetic, first_difference, seeded  # noqa: F401

CHAPTER = "book/src/week5-01-drafter-invariant-sampling.md"
WIDTHS = [(2,), (2, 2), (3, 1, 1)]
NOISE_BY_DEPTH = (
    "a tree node at depth d stands for the token at position t + d - 1, so the token after it uses "
    "gumbel_noise(seed, [t + d]): nodes at the same depth share their noise (noise keyed by node "
    "index instead of depth?)")


def run_tree(draft, target, prompt, max_tokens, seed, temperature=0.8, top_k=0, top_p=1.0,
             eos=(), widths=(2, 2), stats=None):
    return list(coupled_tree_generate(draft, target, mx.array(prompt, dtype=mx.int32), max_tokens,
                                      seed, temperature, top_k, top_p, eos, widths, stats))


def check_equals_seeded(ref, draft, target, pair, seeds, settings, prompt=(1, 2, 3, 1, 2),
                        max_tokens=16):
    """Every (seed, widths, temperature, top_k, top_p) gives seeded_generate's tokens; returns
    how many tokens came from the draft tree (so the checks can't pass by rejecting everything)."""
    accepted = 0
    for seed in seeds:
        for widths, temperature, top_k, top_p in settings:
            want = seeded(ref, target, prompt, max_tokens, seed, temperature, top_k, top_p)
            out = run_tree(draft, target, prompt, max_tokens, seed, temperature, top_k, top_p,
                           widths=widths)
            got = [token for token, _ in out]
            assert got == want, (
                f"{pair} pair, widths {widths}, seed {seed}, T={temperature}, top_k={top_k}, "
                f"top_p={top_p}: {first_difference(got, want)}. Coupled tree verification must "
                f"emit plain seeded decoding's tokens whatever the tree: {NOISE_BY_DEPTH} ({CHAPTER})")
            accepted += sum(from_draft for _, from_draft in out)
    return accepted


def test_markov_output_is_plain_seeded_decoding(ref, markov_models):
    draft, target = markov_models
    settings = [(w, T, 0, 1.0) for w in WIDTHS for T in (0.6, 1.0)] + [((2, 2), 0.0, 0, 1.0),
                                                                      ((3, 1, 1), 0.8, 4, 0.9)]
    accepted = check_equals_seeded(ref, draft, target, "markov", range(5), settings)
    assert accepted > 100, f"only {accepted} tokens came from the draft tree: the test proves nothing"


def test_llama_output_is_plain_seeded_decoding(ref, exact_arithmetic, llama_models):
    draft, target = llama_models
    settings = [(w, 0.8, 0, 1.0) for w in WIDTHS] + [((2, 2), 0.6, 5, 0.9), ((2,), 0.0, 0, 1.0)]
    accepted = check_equals_seeded(ref, draft, target, "llama", range(3), settings)
    assert accepted > 20, f"only {accepted} tokens came from the draft tree: the test proves nothing"


def test_planted_bug_noise_by_node_index_fails(ref, markov_models, monkeypatch):
    """The checks above catch noise keyed by the node's index in the tree instead of its depth."""

    def noise_by_node_index(seed, t, nodes, depths, vocab_size, gumbel_noise):
        return gumbel_noise(seed, [t + 1 + i for i in nodes], vocab_size)

    monkeypatch.setattr(coupled_tree, "node_noise", noise_by_node_index)
    draft, target = markov_models
    with pytest.raises(AssertionError, match="noise keyed by node index instead of depth"):
        check_equals_seeded(ref, draft, target, "markov", range(5),
                            [(w, 0.8, 0, 1.0) for w in WIDTHS])


def test_first_children_are_the_drafts_coupled_tokens(ref, markov_models):
    """A tree of widths 1, 1, 1 is the coupled draft chain; the first child is the draft's token."""
    draft, _ = markov_models
    unseen, seed, t = [1, 2, 3, 1, 2], 7, 5
    cache = make_prompt_cache(draft)
    tokens, parents = coupled_draft_tree(ref.tree, ref.sampling, ref.coupling.gumbel_noise, draft,
                                         cache, unseen, (1, 1, 1), seed, t, 0.8, 0, 1.0)
    noise = ref.coupling.gumbel_noise(seed, range(t, t + 3), draft.vocab_size)
    chain = ref.coupling.coupled_draft(draft, make_prompt_cache(draft), mx.array([unseen]),
                                       noise[None], 0.8)[0].tolist()
    assert (tokens, parents) == (chain, [-1, 0, 1]), (
        f"widths (1, 1, 1) gave {tokens} (parents {parents}); the coupled draft chain is {chain}: "
        "each node's first child must be the draft's coupled token, argmax(log q + noise)")
    assert cache[0].offset == len(unseen), "the draft cache must hold only the unseen tokens after"
    wide, wide_parents = coupled_draft_tree(ref.tree, ref.sampling, ref.coupling.gumbel_noise,
                                            draft, make_prompt_cache(draft), unseen, (3, 2), seed,
                                            t, 0.8, 0, 1.0)
    first_children = (wide[0], wide[3])  # level 1's first node, and its first child
    assert wide_parents == [-1, -1, -1, 0, 0, 1, 1, 2, 2] and first_children == tuple(chain[:2]), (
        f"widths (3, 2) gave tokens {wide}, parents {wide_parents}: level order, children of a "
        "node consecutive, the draft's coupled token first")


def test_stops_stats_and_errors(ref, markov_models):
    draft, target = markov_models
    prompt = [2, 5, 1]
    for max_tokens in (0, 1, 2, 7):
        got = [t for t, _ in run_tree(draft, target, prompt, max_tokens, 3)]
        want = seeded(ref, target, prompt, max_tokens, 3, 0.8)
        assert got == want, f"max_tokens={max_tokens}: {first_difference(got, want)}"
    want = seeded(ref, target, prompt, 30, 3, 0.8)
    eos = want[9]
    got = [t for t, _ in run_tree(draft, target, prompt, 30, 3, eos=(eos,))]
    assert got == want[: want.index(eos) + 1], (
        f"eos {eos}: got {got}, want {want[: want.index(eos) + 1]}: stop right after the EOS")
    stats = SpecStats()
    out = run_tree(draft, target, prompt, 20, 3, widths=(2, 2), stats=stats)
    assert stats.emitted == len(out) == 20 and stats.accepted == sum(d for _, d in out), (
        f"stats emitted {stats.emitted}, accepted {stats.accepted}: record_round(N, accepted, "
        "emitted) once per target call")
    assert stats.draft_calls == sum(1 if n == 2 else 2 for n in stats.lookahead_per_round), (
        "draft_calls must grow by the round's levels (one draft call per level)")
    with raises(ValueError, "an empty prompt must be refused", match="empty"):
        run_tree(draft, target, [], 5, 0)
    with raises(ValueError, "a width < 1 must be refused", match="widths"):
        run_tree(draft, target, prompt, 5, 0, widths=(2, 0))


def test_one_target_call_and_one_draft_call_per_level(llama_models):
    draft, target = (CallCounter(model) for model in llama_models)
    stats = SpecStats()
    out = run_tree(draft, target, [5, 9, 2], 16, 1, widths=(2, 2, 1), stats=stats)
    assert len(out) == 16 and target.calls == stats.rounds, (
        f"{target.calls} target calls for {stats.rounds} rounds: each round scores the target's "
        "unseen tokens and the whole tree in ONE tree call")
    assert draft.calls == stats.draft_calls, (
        f"{draft.calls} draft calls, stats say {stats.draft_calls}: one draft call per tree level")
