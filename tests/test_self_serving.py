"""Batched speculation with Medusa heads, EAGLE and prompt lookup: kit/self_serving.py, `--batch`
and `specdec serve --drafter ngram|medusa|eagle` (not graded: these test the kit, on the reference).

Toy llama target (hidden size 32, V = 64, 2 layers), seeded random heads and a random EAGLE
layer (with taps, so the fused path runs). The promises: every draft of every row in every
round is what the drafter proposes from scratch for that row's committed text — the heads at
the target's hidden state of position n - 2; EAGLE fed the target's true features of the whole
text, then its own; the n-gram lookup in the row's own text — whoever shares the batch, rows
joining and leaving, plain rounds between; greedy output is plain greedy output; a seeded row's
text is plain seeded decoding's; the CLI and the server run them.
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import KVCache

from specdec.kit.cli import main
from specdec.kit.features import FeatureModel, save_eagle, save_heads
from specdec.kit.impl import get_impl
from specdec.kit.models import tiny_llama
from specdec.kit.self_serving import (EagleDraftModel, HeadsDraftModel, NgramDraftModel, decode_batch,
                                      self_draft_scheduler)
from support import forced, mlx_lm_greedy

REF = get_impl("ref")
TOY = ["--target", "toy-llama"]
D, V = 32, 64
PROMPTS = [[3, 9, 2, 7, 11, 4], [5], [60, 1], [7, 7, 7, 7, 7, 7, 7, 7, 7], [12, 40, 8], [33]]
TOL = 1e-4  # a batched call may round differently from a solo one: a near-tie may flip


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0)


def randomized(module, seed: int):
    """`module` with seeded random weights (fresh Medusa heads are LM-head copies)."""
    params = tree_flatten(module.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    module.update(tree_unflatten([(n, w if "norm" in n else mx.random.normal(w.shape, key=k) * 0.3)
                                  for (n, w), k in zip(params, keys)]))
    mx.eval(module.parameters())
    return module


def heads_adapter(target):
    return HeadsDraftModel(randomized(REF.medusa.MedusaHeads(D, 3), 5), FeatureModel(target))


def eagle_adapter(target):
    layer = randomized(REF.eagle.EagleLayer(target.args, (1, 2)), 6)
    return EagleDraftModel(layer, FeatureModel(target, layer.taps))


def ngram_adapter(target):
    return NgramDraftModel(target, REF.drafters.find_ngram_continuation, max_ngram=2, min_ngram=1)


ADAPTERS = {"medusa": heads_adapter, "eagle": eagle_adapter, "ngram": ngram_adapter}


def scratch_logits(adapter, target, text: list[int], drafts: list[int]) -> list[mx.array]:
    """The drafter's logits for each draft, recomputed from scratch for committed text `text`
    (fed the drafts the batch chose, so each position is checked on its own)."""
    if isinstance(adapter, NgramDraftModel):  # the lookup in the row's own text, or its last token
        found = REF.drafters.find_ngram_continuation(text, 2, 1, len(drafts)) or [text[-1]] * len(drafts)
        return [mx.array([0.0 if v == t else -1.0 for v in range(V)]) for t in found]
    fm = FeatureModel(target, getattr(getattr(adapter, "layer", None), "taps", ()))
    if isinstance(adapter, HeadsDraftModel):
        fm(mx.array([text[:-1]]))
        return list(adapter.heads(fm.hidden[0, -1], fm.lm_head)[: len(drafts)])
    layer, embed = adapter.layer, target.model.embed_tokens
    if len(text) > 1:
        fm(mx.array([text[:-1]]))
        true = layer.fuse_features(fm.features)[0]  # positions 0 .. n - 2
    else:
        true = mx.zeros((0, D))
    features = mx.concatenate([mx.zeros((1, D)), true])  # entry j: the feature of j - 1
    cache, out = KVCache(), []
    h = layer(features[None], embed(mx.array([text])), cache=cache)[:, -1:]
    for token in drafts:
        out.append(fm.lm_head(h)[0, -1])
        h = layer(h, embed(mx.array([[token]])), cache=cache)[:, -1:]
    return out


def check_eagle_cache(adapter, target, scheduler):
    """Between rounds, row b's EAGLE cache holds the entries of C[:-2] (C its text), each fed the
    target's true feature: its keys are those of a from-scratch cache of that text (as a set)."""
    layer, cache = adapter.layer, scheduler.draft_cache[0]
    for b, r in enumerate(scheduler.rows):
        text = r.prompt + r.output
        n = len(text)
        held = cache.keys[b : b + 1, :, int(cache.left_padding[b]) : cache._idx]
        assert held.shape[2] == max(n - 2, 0), (
            f"row {b}: the EAGLE cache holds {held.shape[2]} entries, C[:-2] is {max(n - 2, 0)} long")
        if n < 3:
            continue
        fm = FeatureModel(target, layer.taps)
        fm(mx.array([text[:-2]]))
        features = layer.fuse_features(fm.features)[0, :-1]
        features = mx.concatenate([mx.zeros((1, layer.hidden_size)), features])
        fresh = KVCache()
        layer(features[None], target.model.embed_tokens(mx.array([text[:-2]])), cache=fresh)
        # Attention reads a row's entries as a set (Week 3 Day 2's rollback may reorder them):
        # match each fresh entry with its nearest held one.
        have = held[0].transpose(1, 0, 2).reshape(n - 2, -1)
        want = fresh.keys[0, :, : n - 2].transpose(1, 0, 2).reshape(n - 2, -1)
        distance = mx.abs(have[:, None] - want[None]).max(-1)  # [held, fresh]
        gap = max(float(distance.min(0).max()), float(distance.min(1).max()))
        assert gap < 1e-3, (
            f"row {b}, text of {n} tokens: its EAGLE cache entries differ from a cache fed the "
            f"target's true features (max key gap {gap:.4f}): after a round, the accepted drafts' "
            "entries must be re-fed with the target's features of that round (refeed)")


def run_logged(adapter, target, prompts, schedule, max_tokens, max_batch=3):
    """Serve `prompts` with K forced through `schedule`; returns (log of (text, drafts) per row
    per drafting round, the requests, the accepted counts per round). EAGLE's cache is checked
    after every round (`check_eagle_cache`)."""
    log, accepted = [], []

    class Logged(self_draft_scheduler(REF.serving.Scheduler)):
        def commit_round(self, K, target_logits, draft_tokens=None, q_draft=None):
            if K > 0:
                log.extend((r.prompt + r.output, draft_tokens[b].tolist()) for b, r in enumerate(self.rows))
            events, counts = super().commit_round(K, target_logits, draft_tokens, q_draft)
            accepted.append(counts)
            if isinstance(adapter, EagleDraftModel) and self.rows:
                check_eagle_cache(adapter, target, self)
            return events, counts

    controller = forced(REF, schedule, max_lookahead=3, initial_lookahead=3)
    scheduler = Logged(adapter, lookahead=3, max_batch=max_batch, controller=controller)
    requests = [scheduler.submit(REF.serving.Request(p, max_tokens=max_tokens)) for p in prompts]
    while scheduler.has_work:
        scheduler.step()
    return log, requests, accepted


def test_eagle_cache_holds_true_features_on_the_embedded_pair():
    """The shipped EAGLE drafter on the embedded target accepts runs of drafts (a random layer
    rarely accepts two), so the re-feed of accepted drafts is exercised: after every round each
    row's cache is that of its text fed the target's true features."""
    from specdec.kit.features import EAGLE_DRAFTER, load_eagle
    from specdec.kit.loading import load_model

    target, tokenizer = load_model("tiny-code")
    layer = load_eagle(EAGLE_DRAFTER, target)
    adapter = EagleDraftModel(layer, FeatureModel(target, layer.taps))
    prompts = [tokenizer.encode(t) for t in ("def add(a, b):\n", "import os\n", "for i in range(")]
    _, requests, accepted = run_logged(adapter, target, prompts, [3], 14)
    assert max(max(c) for c in accepted) >= 2, f"no row accepted 2 drafts: {accepted}"
    for p, r in zip(prompts, requests):
        assert r.output == mlx_lm_greedy(target, p, 14), "greedy serving is exact"


@pytest.mark.parametrize("name", ["medusa", "eagle", "ngram"])
@pytest.mark.parametrize("schedule", [[3], [3, 0, 2, 0, 0, 1, 3]], ids=["K3", "with-plain-rounds"])
def test_every_batched_draft_is_the_drafters_own(target, name, schedule):
    """Rows join (max_batch 3 < 6 prompts) and leave; K follows a fixed schedule with plain
    rounds between (a forced controller: no clock). Each round, each row's drafts are what the
    drafter proposes from scratch for its text; greedy output is plain greedy output."""
    adapter = ADAPTERS[name](target)
    log, requests, _ = run_logged(adapter, target, PROMPTS, schedule, 11)
    for p, r in zip(PROMPTS, requests):
        assert r.output == mlx_lm_greedy(target, p, 11), f"{name}, prompt {p}: greedy serving is exact"
    checked = 0
    for text, drafts in log:
        if name == "medusa" and len(text) == 1:
            assert drafts == [text[-1]] * len(drafts), (
                "a one-token text has no hidden state at n - 2 yet: the heads' row repeats its token")
            continue
        for i, (token, logits) in enumerate(zip(drafts, scratch_logits(adapter, target, text, drafts))):
            top = float(logits.max())
            assert float(logits[token]) >= top - TOL, (
                f"{name}: text of {len(text)} tokens, draft {i + 1} is {token}, but from scratch the "
                f"drafter proposes {int(logits.argmax())} (logit {top:.5f} vs {float(logits[token]):.5f}): "
                "the row's features are not the target's of its own text")
            checked += 1
    assert checked >= 20, f"only {checked} drafts were checked: the schedule must draft"


@pytest.mark.parametrize("name", ["medusa", "eagle", "ngram"])
def test_a_seeded_row_is_plain_seeded_text(target, name):
    """The coupled rule (Week 5 Day 1) with drafts from the target's own features: each row's
    text is plain seeded decoding's for its seed, whatever its batch-mates."""
    prompts, seeds = PROMPTS[:4], [11, 12, 13, 14]
    out = decode_batch(REF.serving.Scheduler, ADAPTERS[name](target), prompts, 10, lookahead=3,
                       temperature=0.9, seeds=seeds, sampling=REF.serving.COUPLED)
    for p, seed, got in zip(prompts, seeds, out):
        want = [int(t) for t in REF.coupling.seeded_generate(target, mx.array(p), 10, seed, temperature=0.9)]
        assert got == want, f"{name}, seed {seed}: the coupled row must be plain seeded decoding's text"


def test_adapters_check_what_they_are_given(target):
    with pytest.raises(TypeError, match="FeatureModel"):
        HeadsDraftModel(REF.medusa.MedusaHeads(D, 2), target)
    with pytest.raises(ValueError, match="hidden size 16"):
        HeadsDraftModel(REF.medusa.MedusaHeads(16, 2), FeatureModel(target))
    with pytest.raises(ValueError, match="taps"):
        EagleDraftModel(REF.eagle.EagleLayer(target.args, (1, 2)), FeatureModel(target))


# The CLI and the server --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory, target):
    root = tmp_path_factory.mktemp("weights")
    save_heads(randomized(REF.medusa.MedusaHeads(D, 3), 5), root / "medusa")
    save_eagle(randomized(REF.eagle.EagleLayer(target.args, (1, 2)), 6), root / "eagle", target.args)
    return root


@pytest.mark.parametrize("drafter", ["medusa", "eagle", "layerskip", "ngram"])
def test_bench_batch_with_a_self_drafter_is_exact(drafter, weights, capsys):
    heads = ["--heads", str(weights / drafter)] if drafter in ("medusa", "eagle") else []
    code = main(["bench", *TOY, "--batch", "3", "--prompts", "1", "--max-tokens", "8", "--json",
                 "--drafter", drafter, *heads])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    for mode in ("speculative", "fallback"):
        assert report["median"][mode]["identical"] is True, (
            f"--batch 3 --drafter {drafter}, {mode}: greedy rows are plain's")


@pytest.mark.parametrize("drafter", ["medusa", "eagle", "ngram"])
def test_serve_drafts_with_heads_eagle_and_ngram(drafter, weights, target):
    """`specdec serve --drafter ngram|medusa|eagle` builds its scheduler with `self_drafter`
    (in-process here: no HTTP); greedy rows are plain greedy decoding's."""
    from specdec.kit.server.startup import build_parser, self_drafter

    heads = ["--heads", str(weights / drafter)] if drafter != "ngram" else []
    args = build_parser().parse_args([*TOY, "--drafter", drafter, *heads])
    make, note = self_drafter(REF, target, args)
    assert drafter in note and (not heads or heads[1] in note), note
    scheduler = make(lookahead=3, max_batch=2)
    requests = [scheduler.submit(REF.serving.Request(p, max_tokens=7)) for p in PROMPTS[:3]]
    while scheduler.has_work:
        scheduler.step()
    for p, r in zip(PROMPTS, requests):
        assert r.output == mlx_lm_greedy(target, p, 7), f"serve --drafter {drafter}, prompt {p}"
    assert scheduler.stats.drafted > 0, f"--drafter {drafter} drafted"


@pytest.mark.parametrize("drafter", ["medusa", "eagle", "layerskip", "ngram"])
def test_generate_batch_with_a_seed_is_the_drafter_free_text(drafter, weights, capsys):
    """`generate --batch 2 --seed 1 --temperature 0.8`: row i is plain seeded decoding's text for
    seed 1 + i (the coupled rule), so every drafter prints the draft model's rows."""
    heads = ["--heads", str(weights / drafter)] if drafter in ("medusa", "eagle") else []
    argv = ["generate", *TOY, "--batch", "2", "--max-tokens", "10", "--seed", "1", "--temperature", "0.8"]

    def rows(*extra):
        code = main([*argv, *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return [line for line in captured.out.splitlines() if not line.startswith("#")]

    assert rows("--drafter", drafter, *heads) == rows("--drafter", "model"), (
        f"--batch with --seed and --drafter {drafter}: each row is its seed's plain text")
