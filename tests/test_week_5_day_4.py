"""Week 5 Day 4 — self-speculation by layer skipping. Chapter: book/src/week5-04-layer-skipping.md

Task 1: LayerSkipModel (the target with some layers skipped, called like an mlx-lm model)
Task 2: greedy_agreement (the measured acceptance of a skip set on held-out text)
Task 3: choose_layers_to_skip (greedy search, one more skipped layer per step)
Task 4: shareable_layers and LayerSkipDrafter (the drafter in the loop; what its cache shares)
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from specdec.kit import layers as kit_layers
from specdec.kit.impl import get_impl
from specdec.kit.models import tiny_llama
from support import CallCounter, assert_close, logits_atol, mlx_lm_greedy, raises
from test_week_3_day_3 import merged_chi_square  # one copy of the merged-cells chi-square

CHAPTER = "book/src/week5-04-layer-skipping.md"
MODEL = ("layerskip.LayerSkipModel.__init__", "layerskip.LayerSkipModel.__call__")
DRAFTING = MODEL + ("draft.SpeculativeDecoder.draft_generation",)
NUM_LAYERS = 4


@pytest.fixture(scope="module")
def target():
    """A tiny random-weight mlx-lm llama with 4 layers (V = 64)."""
    return tiny_llama(seed=5, num_layers=NUM_LAYERS)


def without_layers(model, skip) -> llama.Model:
    """A hand-built llama that lacks the layers in `skip`: the same weights, renumbered."""
    kept = [j for j in range(len(model.layers)) if j not in skip]
    short = tiny_llama(seed=5, num_layers=len(kept))
    weights = []
    for name, w in tree_flatten(model.parameters()):
        if name.startswith("model.layers."):
            j = int(name.split(".")[2])
            if j in skip:
                continue
            name = name.replace(f"model.layers.{j}.", f"model.layers.{kept.index(j)}.", 1)
        weights.append((name, w))
    short.update(tree_unflatten(weights))
    return short


def feed_in_pieces(model, tokens: list[int], pieces=(5, 1, 3)) -> mx.array:
    """Logits [L, V] of `tokens` fed through a fresh cache in pieces of the given sizes."""
    cache, out, start = make_prompt_cache(model), [], 0
    for size in pieces:
        out.append(model(mx.array(tokens[start : start + size])[None], cache=cache)[0])
        start += size
    return mx.concatenate(out)


TEXT = [3, 17, 42, 8, 8, 21, 60, 1, 33]


# Task 1 -----------------------------------------------------------------------------------------
def test_task_1_skipping_no_layer_is_the_target(impl, target):
    skipped = impl.layerskip.LayerSkipModel(target, [])
    x = mx.array(TEXT)[None]
    np.testing.assert_allclose(
        np.array(skipped(x)), np.array(target(x)), rtol=0, atol=logits_atol(target(x)),
        err_msg=f"with no layer skipped the draft pass is the target's own forward ({CHAPTER}, Task 1)")
    assert_close(feed_in_pieces(skipped, TEXT), target(x)[0],
                 "fed through its cache in pieces (5, 1, 3 tokens), the unskipped model must give "
                 "the target's logits: one KV cache per kept layer, the mask from the first one")
    assert skipped.target is target and skipped.skip == () and skipped.kept == (0, 1, 2, 3), (
        f"skip=[] keeps every layer: expected skip=(), kept=(0, 1, 2, 3), got skip={skipped.skip}, "
        f"kept={skipped.kept}")
    assert skipped.vocab_size == 64, "vocab_size is the target's V (model_vocab_size)"


@pytest.mark.parametrize("skip", [[0], [1], [3], [1, 3], [0, 2, 3]])
def test_task_1_skipping_equals_a_model_without_those_layers(impl, target, skip):
    skipped = impl.layerskip.LayerSkipModel(target, skip)
    short = without_layers(target, skip)
    x = mx.array(TEXT)[None]
    want = short(x)
    assert_close(skipped(x), want,
                 f"skipping layers {skip} must equal a llama built without them: the residual "
                 f"stream passes a skipped layer unchanged ({CHAPTER}, Task 1)")
    assert_close(feed_in_pieces(skipped, TEXT), want[0],
                 f"skip={skip}, fed through make_prompt_cache(skipped) in pieces: cache[i] belongs "
                 "to the i-th kept layer, and the mask comes from the first kept layer's cache")
    assert len(make_prompt_cache(skipped)) == NUM_LAYERS - len(skip), (
        "make_prompt_cache(skipped) must give one cache per kept layer: `layers` holds the kept "
        "decoder blocks only")


def test_task_1_skip_is_sorted_without_duplicates(impl, target):
    skipped = impl.layerskip.LayerSkipModel(target, [3, 1, 3])
    assert skipped.skip == (1, 3) and skipped.kept == (0, 2), (
        f"skip=[3, 1, 3] is the set {{1, 3}}: expected skip=(1, 3), kept=(0, 2), got "
        f"skip={skipped.skip}, kept={skipped.kept}")
    assert [id(b) for b in skipped.layers] == [id(target.layers[0]), id(target.layers[2])], (
        "`layers` must be the target's own kept blocks, in order (no copy of any weight)")


@pytest.mark.parametrize("skip, match, why", [
    ([4], r"4.*0\.\.3", "layer 4 does not exist in a 4-layer target: name the value and the range 0..3"),
    ([-1], r"-1.*0\.\.3", "negative indices are refused (no Python wrap-around): name -1 and 0..3"),
    ([1.5], r"1\.5.*0\.\.3", "a layer index is an int: name 1.5 and the range 0..3"),
    ([0, 1, 2, 3], r"at least one", "skipping all 4 layers leaves nothing to run: keep at least one"),
])
def test_task_1_refuses_bad_layer_indices(impl, target, skip, match, why):
    with raises(ValueError, why, match=match):
        impl.layerskip.LayerSkipModel(target, skip)


# Task 2 -----------------------------------------------------------------------------------------
class FixedLogits:
    """A 'model' whose argmax at position i is tokens_out[i], whatever it is fed."""

    def __init__(self, tokens_out: list[int], vocab_size: int = 8):
        self.logits = mx.eye(vocab_size)[mx.array(tokens_out)][None] * 5.0

    def __call__(self, inputs, cache=None):
        assert cache is None, "greedy_agreement runs each model once over the text, with no cache"
        assert inputs.shape == (1, self.logits.shape[1]), f"expected tokens[None], got {inputs.shape}"
        return self.logits


def test_task_2_counts_positions_that_agree(impl):
    text = mx.array([0, 1, 2, 3, 4, 5, 6, 7])
    full, draft = FixedLogits([1, 2, 3, 4, 5, 6, 7, 0]), FixedLogits([1, 2, 0, 4, 5, 6, 0, 0])
    full, draft = CallCounter(full), CallCounter(draft)
    alpha = impl.layerskip.greedy_agreement(full, draft, text)
    assert alpha == pytest.approx(0.75), (
        f"the greedy tokens agree at 6 of 8 positions, so alpha = 0.75, got {alpha} ({CHAPTER}, Task 2)")
    assert (full.calls, draft.calls) == (1, 1), (
        f"one forward of each model over the whole text (teacher forcing), got {full.calls} target "
        f"and {draft.calls} draft calls")


def test_task_2_on_a_real_skip(impl, use_ref, target):
    use_ref(*MODEL)
    text = mx.array([(7 * i + 3) % 64 for i in range(48)])
    same = impl.layerskip.greedy_agreement(target, impl.layerskip.LayerSkipModel(target, []), text)
    assert same == 1.0, f"skipping nothing agrees everywhere: alpha must be 1.0, got {same}"
    skipped = impl.layerskip.LayerSkipModel(target, [1])
    want = float(np.mean(np.argmax(target(text[None]), -1) == np.argmax(skipped(text[None]), -1)))
    got = impl.layerskip.greedy_agreement(target, skipped, text)
    assert got == pytest.approx(want), f"skip=[1]: expected alpha {want:.4f}, got {got}"
    assert isinstance(got, float), f"return a python float (use .item()), got {type(got).__name__}"
    with raises(ValueError, "one token has no next-token pair to compare: need L >= 2"):
        impl.layerskip.greedy_agreement(target, skipped, mx.array([5]))


# Task 3 -----------------------------------------------------------------------------------------
def test_task_3_greedy_path(impl, ref, use_ref, target):
    use_ref(*MODEL, "layerskip.greedy_agreement")
    text = mx.array([(5 * i + 1) % 64 for i in range(40)])
    path = impl.layerskip.choose_layers_to_skip(target, text, NUM_LAYERS - 1)
    # The expected path, built here step by step from the reference's agreement.
    skip, want = (), []
    for _ in range(NUM_LAYERS - 1):
        scores = {j: ref.layerskip.greedy_agreement(target, ref.layerskip.LayerSkipModel(
            target, skip + (j,)), text) for j in range(NUM_LAYERS) if j not in skip}
        best = max(scores.values())
        skip = tuple(sorted(skip + (min(j for j, a in scores.items() if a == best),)))
        want.append((skip, best))
    assert [s for s, _ in path] == [s for s, _ in want], (
        f"each step adds the layer whose skip keeps agreement highest: expected the path "
        f"{[s for s, _ in want]}, got {[s for s, _ in path]} ({CHAPTER}, Task 3)")
    for (s, got), (_, expected) in zip(path, want):
        assert got == pytest.approx(expected), f"step {s}: alpha should be {expected}, got {got}"


def test_task_3_keeps_the_previous_set_and_breaks_ties_low(impl, use_ref, target, monkeypatch):
    use_ref(*MODEL)
    # A made-up agreement: layer 2 is the best first skip; afterwards 0 and 3 tie.
    table = {(2,): 0.9, (0,): 0.5, (1,): 0.5, (3,): 0.5, (0, 2): 0.7, (2, 3): 0.7, (1, 2): 0.2,
             (0, 1, 2): 0.1, (0, 2, 3): 0.4, (0, 1, 3): 0.95, (1, 2, 3): 0.3}
    monkeypatch.setattr(impl.layerskip, "greedy_agreement",
                        lambda full, skipped, tokens: table[tuple(skipped.skip)])
    path = impl.layerskip.choose_layers_to_skip(target, mx.arange(10), 3)
    assert path == [((2,), 0.9), ((0, 2), 0.7), ((0, 2, 3), 0.4)], (
        "greedy search keeps the previous step's set (it never revisits (0, 1, 3)), and a tie "
        f"goes to the lowest layer index: expected [((2,), 0.9), ((0, 2), 0.7), ((0, 2, 3), 0.4)], "
        f"got {path} ({CHAPTER}, Task 3)")


@pytest.mark.parametrize("num_skip", [0, NUM_LAYERS])
def test_task_3_refuses_a_budget_out_of_range(impl, use_ref, target, num_skip):
    use_ref(*MODEL, "layerskip.greedy_agreement")
    with raises(ValueError, f"num_skip={num_skip} on a 4-layer target: skip 1..3 layers",
                match=rf"{num_skip}.*1\.\.3"):
        impl.layerskip.choose_layers_to_skip(target, mx.arange(10), num_skip)


# Task 4 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers, skip, expected", [
    (6, [3, 5], [0, 1, 2]), (6, [], [0, 1, 2, 3, 4, 5]), (6, [0], []), (4, [2, 1], [0])])
def test_task_4_shareable_layers(impl, num_layers, skip, expected):
    got = impl.layerskip.shareable_layers(num_layers, skip)
    assert got == expected, (
        f"skip={skip}: only the layers below the first skipped one see the target's own inputs, "
        f"so their K/V equal the target's: expected {expected}, got {got} ({CHAPTER}, Task 4)")


def spec_decoder(impl, ref, target, skip, lookahead):
    drafter = impl.layerskip.LayerSkipDrafter(target, skip)
    return ref.drafters.DrafterDecoder(drafter, target, lookahead), drafter


@pytest.mark.parametrize("skip", [[1], [0, 2], [1, 2, 3]])
def test_task_4_greedy_identical_to_plain(impl, ref, use_ref, target, skip):
    use_ref(*DRAFTING)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    expected = mlx_lm_greedy(target, prompt, 32)
    for lookahead in range(1, 7):
        decoder, drafter = spec_decoder(impl, ref, target, skip, lookahead)
        got = [t for t, _ in ref.speculative.speculative_generate(decoder, mx.array(prompt), 32)]
        assert got == expected, (
            f"self-speculation with skip={skip}, K={lookahead} must reproduce plain greedy "
            f"decoding token for token: got {got}, expected {expected} ({CHAPTER}, Task 4)")
    assert drafter.skip == tuple(sorted(skip)) and drafter.draft_model.target is target, (
        "LayerSkipDrafter(target, skip) drafts with LayerSkipModel(target, skip): expose its skip")


def test_task_4_cache_shares_exactly_the_layers_below_the_first_skip(impl, ref, use_ref, target):
    use_ref(*DRAFTING)
    skip = [2]
    decoder, drafter = spec_decoder(impl, ref, target, skip, 3)
    offsets = []

    def after_round(num_drafted, num_accepted):
        offsets.append({c.offset for c in drafter.cache})

    list(ref.speculative.speculative_generate(decoder, mx.array([9, 4, 4, 1, 7]), 30,
                                              on_round=after_round))
    assert len(drafter.cache) == NUM_LAYERS - 1, (
        "the drafter keeps its own KV cache, one per kept layer (3 for a 4-layer target skipping 1)")
    assert all(len(o) == 1 for o in offsets), (
        f"after every round all the drafter's kept-layer caches hold the same number of tokens "
        f"(rolled back together), got offsets per round {offsets}")
    assert all(c.offset > 0 for c in decoder.target_cache), "the target's cache was never touched?"
    n = min(drafter.cache[0].offset, decoder.target_cache[0].offset)
    shared = impl.layerskip.shareable_layers(NUM_LAYERS, skip)
    for i, layer in enumerate(drafter.kept):
        draft_keys = drafter.cache[i].keys[..., :n, :]
        target_keys = decoder.target_cache[layer].keys[..., :n, :]
        if layer in shared:
            assert_close(draft_keys, target_keys,
                         f"kept layer {layer} lies below the first skipped layer {skip[0]}: its "
                         "keys for the committed prefix must equal the target's (it could share them)")
        else:
            gap = float(mx.abs(draft_keys - target_keys).max())
            assert gap > 1e-2, (
                f"kept layer {layer} lies above the skipped layer {skip[0]}: its input differs from "
                f"the target's, so its keys must too (max gap {gap:.1e}); sharing would be wrong")


def test_task_4_sampling_follows_the_target(impl, ref, use_ref, target):
    """T = 1: the first two tokens must be distributed as the target says."""
    use_ref(*DRAFTING)
    prompt = [1, 2, 3, 4, 5]
    decoder, _ = spec_decoder(impl, ref, target, [1], 2)
    p_first = np.array(mx.softmax(target(mx.array(prompt)[None])[0, -1], axis=-1))
    # p(second) = sum_x p(x) p(. | prompt + [x]): one batched forward over all 64 continuations.
    extended = mx.concatenate([mx.broadcast_to(mx.array(prompt), (64, 5)), mx.arange(64)[:, None]], 1)
    p_given = np.array(mx.softmax(target(extended)[:, -1], axis=-1))
    p_second = p_first @ p_given
    first, second, sources = np.zeros(64), np.zeros(64), set()
    for sample_key in mx.random.split(mx.random.key(11), 400):
        out = list(ref.speculative.speculative_generate(decoder, mx.array(prompt), 2, 1.0, sample_key))
        first[out[0][0]] += 1
        second[out[1][0]] += 1
        sources.add(out[0][1])
    assert sources == {True, False}, "both accepted drafts and corrections should occur here"
    # Each p-value is below 1e-3 with probability 1e-3 when the law is right: a 2e-3 false-alarm
    # rate over the two checks (the keys are fixed, so the outcome is deterministic anyway).
    for name, counts, probs in [("first", first, p_first), ("second", second, p_second)]:
        pvalue = merged_chi_square(counts, probs)
        assert pvalue > 1e-3, (
            f"the {name} sampled token is not distributed as the target's p (chi-square p = "
            f"{pvalue:.2g}): the skipped model's q must be the distribution its drafts were drawn "
            f"from ({CHAPTER}, Task 4)")


# The kit ------------------------------------------------------------------------------------------
def test_kit_decoder_parts_reads_tied_and_untied_heads():
    untied = tiny_llama(seed=2)
    parts = kit_layers.decoder_parts(untied)
    x = mx.array(TEXT)[None]
    h = parts.embed(x)
    for layer in parts.layers:
        h = layer(h, kit_layers.attention_mask(h), cache=None)
    assert_close(parts.head(parts.norm(h)), untied(x), "decoder_parts' pieces, run in order, are the model")
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                           vocab_size=64, tie_word_embeddings=True)
    tied = llama.Model(args)
    tied.update(tree_unflatten([(n, 0.3 * mx.random.normal(w.shape, key=mx.random.key(i)))
                                for i, (n, w) in enumerate(tree_flatten(tied.parameters()))]))
    parts = kit_layers.decoder_parts(tied)
    h = parts.embed(x)
    for layer in parts.layers:
        h = layer(h, kit_layers.attention_mask(h), cache=None)
    assert_close(parts.head(parts.norm(h)), tied(x), "a tied model's head is embed_tokens.as_linear")
    with raises(TypeError, "a model without model.model.layers is not llama-family", match="layers"):
        kit_layers.decoder_parts(object())


def test_provided_code_lives_once_in_the_kit():
    for tree in (get_impl("student").layerskip, get_impl("ref").layerskip):
        assert tree.decoder_parts is kit_layers.decoder_parts, (
            f"{tree.__name__} must import decoder_parts from specdec.kit.layers, not copy it")
        assert issubclass(tree.LayerSkipDrafter, tree.ModelDrafter), (
            "LayerSkipDrafter is a ModelDrafter: Week 2's drafting loop, run on the skipped model")


def test_reference_methods_can_stand_in_for_unfinished_tasks(monkeypatch):
    """`use_reference_for_unfinished` (and `use_ref`) put the reference's methods on the student's
    classes: the reference's LayerSkipDrafter.__init__ must work on a student instance."""
    student, reference = get_impl("student").layerskip, get_impl("ref").layerskip
    monkeypatch.setattr(student.LayerSkipDrafter, "__init__", reference.LayerSkipDrafter.__init__)
    drafter = student.LayerSkipDrafter(tiny_llama(seed=5, num_layers=NUM_LAYERS), [1])
    assert drafter.kept == (0, 2, 3) and len(drafter.cache) == 3, (
        "the reference's LayerSkipDrafter.__init__ on a student instance: name ModelDrafter.__init__, "
        "not super() (super() needs an instance of the reference's own class)")
