"""Week 5 Day 3 — EAGLE: the one-layer drafter (task 1), its training-time-test loss (task 2),
drafting in feature space (task 3) and the drafter behind the `Drafter` interface, with the
re-feed rule (task 4).

Book: book/src/week5-03-eagle.md. Grade with
    pytest tests/test_week_5_day_3.py --impl student -k task_2

Every test uses a tiny random-weight llama target and seeded random drafters; only the last
test loads the drafter that ships with the package, and only to check its shapes.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, make_prompt_cache

from specdec.kit.features import EAGLE_DRAFTER, FeatureModel, lm_head_of, load_eagle
from specdec.kit.models import tiny_llama
from specdec.kit.stats import SpecStats
from support import (BATCHED_FOUNDATIONS, assert_close, laws_of_tokens_2_and_3, mlx_lm_greedy,
                     pooled_chisquare_p, raises)

BOOK = "see book/src/week5-03-eagle.md"
PROMPTS = [[3, 9, 2, 7, 11, 4], [5], [60, 1, 33]]
D, V, TAPS = 32, 64, (1, 2)  # the tiny llama's hidden size, vocabulary, and its two layers

LAYER = ("eagle.EagleLayer.__init__", "eagle.EagleLayer.fuse_features", "eagle.EagleLayer.__call__")
DRAFT = LAYER + ("eagle.eagle_draft", "sampling.make_probs")
LOOP = DRAFT + BATCHED_FOUNDATIONS


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0)


def random_layer(impl, target, taps=(), seed: int = 5):
    """An EagleLayer with seeded random weights (its own init draws from global state)."""
    layer = impl.eagle.EagleLayer(target.args, taps)
    params = tree_flatten(layer.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    layer.update(tree_unflatten([
        (name, (1.0 if "norm" in name else 0.0) + mx.random.normal(w.shape, key=k)
         * (0.1 if "norm" in name else w.shape[-1] ** -0.5))
        for (name, w), k in zip(params, keys)]))
    mx.eval(layer.parameters())
    return layer


def by_hand(layer, features, embeddings, cache=None):
    """The layer's definition, spelled out: norm(block(fc([embedding, feature]), causal mask)),
    each input RMS-normed first."""
    x = layer.fc(mx.concatenate([layer.embed_norm(embeddings), layer.feature_norm(features)], -1))
    return layer.norm(layer.layer(x, create_attention_mask(x, cache), cache=cache))


def target_features(target, taps, tokens):
    """The target's features [L, F * D] and final hidden states [L, D] on tokens (no cache)."""
    fm = FeatureModel(target, taps or None)
    fm(mx.array(tokens)[None])
    return fm.features[0], fm.hidden[0]


# Task 1: the drafter network ---------------------------------------------------------------------
def test_task_1_parts_and_shapes(impl, target):
    for taps, F in (((), 1), (TAPS, 2)):
        layer = impl.eagle.EagleLayer(target.args, taps)
        assert (layer.hidden_size, tuple(layer.taps), layer.num_features) == (D, taps, F), (
            f"EagleLayer(args, taps={taps}) keeps hidden_size {D}, taps {taps} and num_features "
            f"{F}; got {getattr(layer, 'hidden_size', None)}, {getattr(layer, 'taps', None)}, "
            f"{getattr(layer, 'num_features', None)}; {BOOK}")
        if F == 1:
            assert layer.fuse is None, f"one feature is used as it is: fuse must be None; {BOOK}"
        else:
            assert isinstance(layer.fuse, nn.Linear) and layer.fuse.weight.shape == (D, F * D) \
                and "bias" not in layer.fuse, (
                    f"fuse must be nn.Linear({F * D}, {D}, bias=False) for {F} features; {BOOK}")
        assert isinstance(layer.fc, nn.Linear) and layer.fc.weight.shape == (D, 2 * D) \
            and "bias" not in layer.fc, f"fc must be nn.Linear({2 * D}, {D}, bias=False); {BOOK}"
        assert isinstance(layer.layer, llama.TransformerBlock), (
            f"the drafter's layer must be mlx-lm's llama.TransformerBlock (reuse it, don't "
            f"rewrite attention); got {type(layer.layer).__name__}; {BOOK}")
        assert layer.layer.self_attn.n_heads == target.args.num_attention_heads and \
            layer.layer.self_attn.n_kv_heads == target.args.num_key_value_heads, (
                f"the layer has the target's head counts; {BOOK}")
        for name in ("embed_norm", "feature_norm", "norm"):
            norm = getattr(layer, name, None)
            assert isinstance(norm, nn.RMSNorm) and norm.weight.shape == (D,) and \
                norm.eps == target.args.rms_norm_eps, (
                    f"{name} must be nn.RMSNorm({D}, eps=args.rms_norm_eps); {BOOK}")


def test_task_1_forward_is_the_definition(impl, target):
    layer = random_layer(impl, target)
    L = len(PROMPTS[0])
    features = mx.random.normal((2, L, D), key=mx.random.key(1))
    embeddings = mx.random.normal((2, L, D), key=mx.random.key(2))
    got = layer(features, embeddings)
    assert got.shape == (2, L, D), f"the output is [B, L, D] = (2, {L}, {D}); got {got.shape}; {BOOK}"
    assert_close(got, by_hand(layer, features, embeddings),
                 f"the output must be norm(layer(fc(concat([embed_norm(embeddings), "
                 f"feature_norm(features)], -1)), causal mask)): embeddings first, then "
                 f"features, each normed; {BOOK}")
    cache = KVCache()
    first = layer(features[:1, :4], embeddings[:1, :4], cache=cache)
    rest = layer(features[:1, 4:], embeddings[:1, 4:], cache=cache)
    assert cache.offset == L, f"the cache holds the {L} positions fed; it holds {cache.offset}; {BOOK}"
    assert_close(mx.concatenate([first, rest], axis=1), got[:1],
                 f"feeding 4 positions and then the rest through a KVCache must equal one call on "
                 f"all: pass the cache to the layer and build the mask after what it holds; {BOOK}")


def test_task_1_fuse_features(impl, target):
    one, two = random_layer(impl, target), random_layer(impl, target, TAPS)
    f1 = mx.random.normal((3, D), key=mx.random.key(3))
    f2 = mx.random.normal((3, 2 * D), key=mx.random.key(4))
    assert_close(one.fuse_features(f1), f1, f"with one feature, fuse_features returns it unchanged; {BOOK}")
    assert_close(two.fuse_features(f2), two.fuse(f2), f"with F > 1 features, fuse_features is fuse(features); {BOOK}")
    with raises(ValueError, f"features of width {D} for a layer reading 2 * {D}", match=str(2 * D)):
        two.fuse_features(f1)


# Task 2: the loss with training-time test --------------------------------------------------------
def loss_inputs(target, taps, tokens):
    feats, hidden = target_features(target, taps, tokens)
    logprobs = nn.log_softmax(lm_head_of(target)(hidden), axis=-1)
    return feats[None], mx.array(tokens)[None], logprobs[None]


def steps_by_hand(layer, target, feats, tokens, logprobs, unroll, stop_gradient=False):
    emb, previous, losses = target.model.embed_tokens(tokens), layer.fuse_features(feats), []
    p = mx.exp(logprobs)
    for _ in range(unroll):
        if stop_gradient:
            previous = mx.stop_gradient(previous)
        inputs = mx.concatenate([mx.zeros_like(previous[:, :1]), previous[:, :-1]], axis=1)
        previous = by_hand(layer, inputs, emb)
        out = nn.log_softmax(lm_head_of(target)(previous), axis=-1)
        losses.append(-(p * out).sum(-1).mean())
    return mx.stack(losses)


def test_task_2_one_step_is_teacher_forcing(impl, use_ref, target):
    use_ref(*LAYER)
    layer = random_layer(impl, target, TAPS)
    feats, tokens, logprobs = loss_inputs(target, TAPS, PROMPTS[0] + [8, 20, 13])
    total, per_step = impl.eagle.eagle_loss(layer, feats, tokens, logprobs,
                                            target.model.embed_tokens, lm_head_of(target), 1)
    want = steps_by_hand(layer, target, feats, tokens, logprobs, 1)
    assert per_step.shape == (1,) and per_step.dtype == mx.float32, (
        f"per_step is float32 [U] = [1]; got {per_step.shape} {per_step.dtype}; {BOOK}")
    assert_close(per_step, want,
                 f"step 1 feeds position t the fused target feature of t - 1 (zeros at t = 0) and "
                 f"the embedding of token t; loss = mean soft cross-entropy against the target's "
                 f"law of token t + 1; {BOOK}")
    assert_close(total, want[0], f"with U = 1 the total is the one step's loss; {BOOK}")
    with raises(ValueError, "unroll=0 leaves nothing to train"):
        impl.eagle.eagle_loss(layer, feats, tokens, logprobs, target.model.embed_tokens,
                              lm_head_of(target), 0)


def test_task_2_unroll_feeds_own_predictions_weighted_by_step(impl, use_ref, target):
    use_ref(*LAYER)
    layer = random_layer(impl, target)
    feats, tokens, logprobs = loss_inputs(target, (), PROMPTS[0] + [8, 20, 13])
    args = (layer, feats, tokens, logprobs, target.model.embed_tokens, lm_head_of(target))
    want = steps_by_hand(*args[:1], target, feats, tokens, logprobs, 3)
    total, per_step = impl.eagle.eagle_loss(*args, 3)
    assert_close(per_step, want,
                 f"the training-time test: step u >= 2 feeds position t the drafter's OWN output "
                 f"of step u - 1 at t - 1 (not the target's feature again), with the same token "
                 f"embeddings; {BOOK}")
    assert_close(total, want[0] + 0.8 * want[1] + 0.64 * want[2],
                 f"total = sum_u decay**(u - 1) * loss_u, decay 0.8: weights 1, 0.8, 0.64; {BOOK}")
    total_half, _ = impl.eagle.eagle_loss(*args, 3, decay=0.5)
    assert_close(total_half, want[0] + 0.5 * want[1] + 0.25 * want[2],
                 f"decay=0.5 weighs the steps 1, 0.5, 0.25; {BOOK}")

    def step_two(layer):
        return impl.eagle.eagle_loss(layer, *args[1:], 2)[1][1]

    def step_two_stopped(layer):
        return steps_by_hand(layer, target, feats, tokens, logprobs, 2, stop_gradient=True)[1]

    grad = nn.value_and_grad(layer, step_two)(layer)[1]["fc"]["weight"]
    stopped = nn.value_and_grad(layer, step_two_stopped)(layer)[1]["fc"]["weight"]
    assert not np.allclose(np.array(grad), np.array(stopped), atol=1e-6), (
        f"step 2's gradient must flow back through step 1's predictions (do not stop it): the "
        f"drafter learns to make features it can draft from; {BOOK}")


# Task 3: drafting in feature space ---------------------------------------------------------------
def draft_by_hand(layer, target, feats, tokens, K, temperature=0.0, key=None):
    from specdec_ref.sampling import make_probs, sample_token

    embed, head, cache = target.model.embed_tokens, lm_head_of(target), KVCache()
    keys = mx.random.split(key, K) if temperature > 0 else [None] * K
    h = layer(feats[None], embed(mx.array(tokens)[None]), cache=cache)[0, -1]
    drafts, qs = [], []
    for i in range(K):
        q = make_probs(head(h), temperature)
        d = mx.argmax(q) if temperature == 0 else sample_token(q, keys[i])
        drafts.append(int(d))
        qs.append(q)
        h = layer(h[None, None], embed(mx.array([[int(d)]])), cache=cache)[0, -1]
    return drafts, mx.stack(qs)


def test_task_3_greedy_drafts_in_feature_space(impl, use_ref, target):
    use_ref(*LAYER, "sampling.make_probs")
    layer = random_layer(impl, target, TAPS)
    tokens = PROMPTS[0]
    feats = layer.fuse_features(target_features(target, TAPS, tokens)[0])
    feats = mx.concatenate([mx.zeros((1, D)), feats[:-1]])
    for K in (1, 4):
        cache = KVCache()
        drafts, q = impl.eagle.eagle_draft(layer, cache, feats, mx.array(tokens),
                                           target.model.embed_tokens, lm_head_of(target), K)
        want, want_q = draft_by_hand(layer, target, feats, tokens, K)
        assert drafts.dtype == mx.int32 and q.shape == (K, V) and q.dtype == mx.float32, (
            f"returns int32 [K] drafts and float32 [K, V] q; got {drafts.dtype}, {q.shape} "
            f"{q.dtype}; {BOOK}")
        assert drafts.tolist() == want, (
            f"K = {K}: drafts {drafts.tolist()}, want {want}: feed all pairs in one call, then "
            f"draft i + 1 feeds (the drafter's own last output h, draft i) — no target; {BOOK}")
        assert_close(q, want_q, f"q_draft at temperature 0 is one-hot at each draft; {BOOK}")
        assert cache.offset == len(tokens) + K - 1, (
            f"afterwards the cache holds the {len(tokens)} pairs and drafts[:-1] = "
            f"{len(tokens) + K - 1} entries; it holds {cache.offset}; {BOOK}")


def test_task_3_sampled_drafts_and_errors(impl, use_ref, target, key):
    use_ref(*LAYER, "sampling.make_probs", "sampling.sample_token")
    layer = random_layer(impl, target, seed=9)
    tokens = PROMPTS[2]
    feats = mx.random.normal((len(tokens), D), key=mx.random.key(6))
    args = (target.model.embed_tokens, lm_head_of(target))
    drafts, q = impl.eagle.eagle_draft(layer, KVCache(), feats, mx.array(tokens), *args, 5, 1.5, key)
    want, want_q = draft_by_hand(layer, target, feats, tokens, 5, 1.5, key)
    assert_close(q, want_q, f"q_i = make_probs(lm_head(h_i), temperature) at each step; {BOOK}")
    assert drafts.tolist() == want, (
        f"drafts {drafts.tolist()}, want {want}: draw draft i with sample_token(q_i, keys[i]), "
        f"keys = mx.random.split(key, K); {BOOK}")
    with raises(ValueError, "num_tokens=0 must be refused"):
        impl.eagle.eagle_draft(layer, KVCache(), feats, mx.array(tokens), *args, 0)
    with raises(ValueError, "an empty token list must be refused"):
        impl.eagle.eagle_draft(layer, KVCache(), feats[:0], mx.array([], dtype=mx.int32), *args, 2)
    with raises(ValueError, "sampling without a key must be refused"):
        impl.eagle.eagle_draft(layer, KVCache(), feats, mx.array(tokens), *args, 2, 1.0, None)


# Task 4: the drafter behind the Drafter interface, and the re-feed rule ---------------------------
def fresh_q(layer, target, committed, K):
    """The drafts of a drafter fed the whole committed text with the target's TRUE features."""
    feats = layer.fuse_features(target_features(target, layer.taps, committed)[0])
    feats = mx.concatenate([mx.zeros((1, D)), feats[:-1]])
    return draft_by_hand(layer, target, feats, committed, K)


def test_task_4_first_round_drafts_one_token(impl, use_ref, target):
    use_ref(*DRAFT)
    drafter = impl.eagle.EagleDrafter(target, random_layer(impl, target))
    drafts, q = drafter.draft(mx.array(PROMPTS[0]), 4)
    assert drafts.shape == (1,) and q.shape == (1, V), (
        f"before the target's first call there are no features: draft ONE token; got "
        f"{drafts.shape[0]}; {BOOK}")
    assert drafter.cache[0].offset == len(PROMPTS[0]) and drafter.num_true == 1, (
        f"the prompt is fed (zeros for its features), and only entry 0 counts as true: cache "
        f"{drafter.cache[0].offset}, num_true {drafter.num_true}; {BOOK}")
    drafter.reset()
    with raises(ValueError, "a drafter whose target is never called must say so"):
        drafter.draft(mx.array(PROMPTS[0]), 2)
        drafter.draft(mx.array([5]), 2)


@pytest.mark.parametrize("taps", [(), TAPS], ids=["last", "layers-1-2"])
def test_task_4_refeed_rule(impl, use_ref, ref, target, taps):
    """Three rounds driven by hand, with drafts 'accepted' whatever the target says, so the
    drafter's cache holds entries it computed from its own predicted features."""
    use_ref(*DRAFT)
    layer = random_layer(impl, target, taps)
    drafter = impl.eagle.EagleDrafter(target, layer)
    fm = drafter.target_model
    decoder = SimpleNamespace(target_cache=make_prompt_cache(target), draft_cache=drafter.cache)
    committed, unseen, target_unseen = list(PROMPTS[0]), list(PROMPTS[0]), list(PROMPTS[0])
    for K, accept, new_token in ((3, "all", 17), (3, 2, 40), (4, 1, 9)):
        drafts, q = drafter.draft(mx.array(unseen), K)
        drafts = drafts.tolist()
        fm(mx.array(target_unseen + drafts)[None], cache=decoder.target_cache)
        n = len(drafts) if accept == "all" else accept
        unseen = ref.speculative.commit_round(decoder, drafts, n, new_token)
        committed += drafts[:n] + [new_token]
        target_unseen = [new_token]
    drafts, q = drafter.draft(mx.array(unseen), 3)
    want, want_q = fresh_q(layer, target, committed, 3)
    assert drafter.num_true == len(committed) and drafter.cache[0].offset == len(committed) + 2, (
        f"after drafting, every committed entry was fed its true feature (num_true "
        f"{drafter.num_true}, want {len(committed)}) and the cache holds the text + 2 drafts "
        f"({drafter.cache[0].offset}, want {len(committed) + 2}); {BOOK}")
    assert_close(q, want_q,
                 f"the re-feed rule: after verification, cache entries the drafter fed with its own "
                 f"predicted features (accepted drafts, or zeros before the target's first call) "
                 f"must be trimmed and fed again with the target's true features "
                 f"(target_model.known_features); the drafts then equal those of a fresh drafter "
                 f"fed the whole text with true features; {BOOK}")
    assert drafts.tolist() == want


@pytest.mark.parametrize("taps", [(), TAPS], ids=["last", "layers-1-2"])
def test_task_4_greedy_identical_to_plain(impl, use_ref, ref, target, taps):
    use_ref(*LOOP)
    drafter = impl.eagle.EagleDrafter(target, random_layer(impl, target, taps))
    for prompt in PROMPTS:
        want = mlx_lm_greedy(target, prompt, 24)
        for K in (1, 2, 5):
            decoder = ref.drafters.DrafterDecoder(drafter, drafter.target_model, K)
            stats = SpecStats()
            got = [t for t, _ in ref.speculative.speculative_generate(decoder, prompt, 24, stats=stats)]
            assert got == want, (
                f"K = {K}, prompt {prompt}: got {got}, plain greedy gives {want}: the drafter's "
                f"proposals must never change the output; {BOOK}")


class OracleLayer(nn.Module):
    """A drafter that 'predicts' the target's own next feature by looking it up in a known text:
    its drafts are the greedy text, so rounds accept many drafts (a random drafter accepts none)."""

    def __init__(self, target, text):
        nn.Module.__init__(self)
        self.taps, self.hidden_size, self.num_features, self.fuse = (), D, 1, None
        self.text = text
        self.feats = target.model(mx.array(text)[None])[0]  # the final-normed features

    def fuse_features(self, features):
        return features

    def __call__(self, features, embeddings, cache=None):
        start = cache.offset if cache is not None else 0
        L = features.shape[1]
        if cache is not None:
            cache.update_and_fetch(mx.zeros((1, 1, L, 1)), mx.zeros((1, 1, L, 1)))
        return self.feats[start : start + L][None]


def test_task_4_accepts_drafts_and_stays_exact(impl, use_ref, ref, target):
    use_ref(*LOOP)
    prompt = PROMPTS[0]
    text = prompt + mlx_lm_greedy(target, prompt, 40)
    drafter = impl.eagle.EagleDrafter(target, OracleLayer(target, text))
    stats = SpecStats()
    decoder = ref.drafters.DrafterDecoder(drafter, drafter.target_model, 4)
    got = [t for t, _ in ref.speculative.speculative_generate(decoder, prompt, 30, stats=stats)]
    assert got == text[len(prompt) : len(prompt) + 30], f"greedy output must equal plain; {BOOK}"
    assert stats.accepted >= 20, (
        f"a drafter that knows the target's features should have most drafts accepted; "
        f"{stats.accepted} of {stats.drafted} were: feed exactly the committed tokens the cache "
        f"lacks, at their positions, after trimming the entries to re-feed; {BOOK}")


def test_task_4_sampled_law_is_the_targets(impl, use_ref, ref, target):
    """Tokens 2 and 3 of a 3-token sample must follow the target's marginal laws.
    False alarms: two chi-square tests at p < 1e-3 each, so at most 0.2 % of seeds would fail
    a correct loop; the seeds are fixed, so the outcome never changes from run to run."""
    use_ref(*LOOP)
    prompt, T, N = [3, 9, 2], 1.0, 500
    layer = random_layer(impl, target, seed=11)
    layer.update(tree_unflatten([("norm.weight", 0.3 * layer.norm.weight)]))  # flatter q
    drafter = impl.eagle.EagleDrafter(target, layer)

    def probs(batch):
        return np.array(mx.softmax(target(mx.array(batch))[:, -1] / T, axis=-1), dtype=np.float64)

    law2, law3 = laws_of_tokens_2_and_3(probs, prompt, V)
    counts2, counts3, stats = np.zeros(V), np.zeros(V), SpecStats()
    decoder = ref.drafters.DrafterDecoder(drafter, drafter.target_model, 3)
    for key in mx.random.split(mx.random.key(2024), N):
        out = [t for t, _ in ref.speculative.speculative_generate(
            decoder, prompt, 3, temperature=T, key=key, stats=stats)]
        counts2[out[1]] += 1
        counts3[out[2]] += 1
    assert stats.accepted > 0.02 * stats.drafted, (
        f"acceptance {stats.accepted}/{stats.drafted}: this test needs accepted drafts")
    for name, counts, law in (("token 2", counts2, law2), ("token 3", counts3, law3)):
        pvalue = pooled_chisquare_p(counts, law)
        assert pvalue > 1e-3, (
            f"{name} of {N} seeded samples at T = {T} is not distributed as the target's "
            f"(chi-square p = {pvalue:.1e}): draw the drafts with the key you are given and "
            f"return the q they were drawn from; {BOOK}")


def test_kit_shipped_drafter_loads(target):
    assert (EAGLE_DRAFTER / "config.json").exists(), f"the trained drafter ships in {EAGLE_DRAFTER}"
    embedded = SimpleNamespace(args=SimpleNamespace(hidden_size=512))
    layer = load_eagle(EAGLE_DRAFTER, embedded)
    assert layer.hidden_size == 512 and layer.fc.weight.dtype == mx.float32
    with raises(ValueError, "a drafter for hidden size 512 on a target of hidden size 32", match="512"):
        load_eagle(EAGLE_DRAFTER, target)


def test_kit_feature_model_taps_and_log(target):
    """FeatureModel(taps): the same logits as the model, the taps' outputs, a log by position."""
    tokens = mx.array(PROMPTS[0] + [8, 20, 13])[None]
    fm = FeatureModel(target, TAPS)
    assert_close(fm(tokens), target(tokens), "taps must not change the logits")
    assert fm.features.shape == (1, 9, 2 * D) and fm.num_features == 2
    assert_close(fm.features[..., D:], target.model.layers[1](
        target.model.layers[0](target.model.embed_tokens(tokens), "causal"), "causal"),
        "tap 2 is the output of layer 2, before the final norm")
    whole = fm.features[0]
    cache = make_prompt_cache(target)
    fm(tokens[:, :5], cache=cache)
    fm(mx.array([[1, 2, 3]]), cache=cache)  # positions 5..7, then roll them back
    for c in cache:
        c.trim(3)
    fm(tokens[:, 5:], cache=cache)  # positions 5..8 again, the true tokens
    assert fm.num_known == 9
    assert_close(fm.known_features(0, 5), whole[:5], "positions of the first call")
    assert_close(fm.known_features(3, 9), whole[3:], "a call at offset o replaces the log from o")
    with raises(ValueError, "position 9 was never computed"):
        fm.known_features(8, 10)
    with raises(ValueError, "taps must be layer numbers of the model", match="1..2"):
        FeatureModel(target, (0, 2))


def test_kit_week4_controller_drives_the_eagle_drafter(ref, target):
    """Week 4's fallback_generate and its controller drive the reference EagleDrafter unchanged:
    plain rounds in between leave gaps the feature log fills; the output stays plain greedy."""
    drafter = ref.eagle.EagleDrafter(target, random_layer(ref, target, TAPS))
    for prompt in PROMPTS[:2]:
        controller = ref.fallback.FallbackController(calibration_rounds=1)
        decoder = ref.drafters.DrafterDecoder(drafter, drafter.target_model, 3)
        got = [t for t, _ in ref.fallback.fallback_generate(decoder, controller, mx.array(prompt), 30)]
        assert got == mlx_lm_greedy(target, prompt, 30), "fallback_generate with EAGLE must equal plain"
