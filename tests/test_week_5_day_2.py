"""Week 5 Day 2 — Medusa heads: the heads (task 1), their self-distillation loss (task 2), the
draft tree of one position (task 3), greedy decoding with one target call per round (task 4)
and exact sampled decoding (task 5).

Book: book/src/week5-02-medusa-heads.md. Grade with
    pytest tests/test_week_5_day_2.py --impl student -k task_2

Every test uses tiny random-weight llamas and seeded random heads; only the last test loads the
trained heads that ship with the package, and only to check their shapes.
"""

from __future__ import annotations

import inspect
import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from specdec.kit.features import MEDUSA_HEADS, FeatureModel, lm_head_of, load_heads
from specdec.kit.models import _seeded_weights, tiny_llama
from specdec.kit.stats import SpecStats
from support import (BATCHED_FOUNDATIONS, assert_close, laws_of_tokens_2_and_3, mlx_lm_greedy,
                     pooled_chisquare_p, raises, tolerance)

BOOK = "see book/src/week5-02-medusa-heads.md"
PROMPTS = [[3, 9, 2, 7, 11, 4], [5], [60, 1, 33]]
D, V = 32, 64  # the tiny llama's hidden size and vocabulary

HEADS = ("medusa.MedusaHeads.__init__", "medusa.MedusaHeads.__call__")
LOOP_FOUNDATIONS = BATCHED_FOUNDATIONS + (
    "sampling.make_probs", "tree.tree_forward", "tree.verify_tree_greedy", "tree.commit_tree_path",
    "medusa.medusa_tree",
)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0)


def random_heads(impl, num_heads: int, seed: int = 5, scale: float = 1.0, hidden_size: int = D):
    """MedusaHeads with seeded random weights (a fresh head is the LM head: too easy to test)."""
    heads = impl.medusa.MedusaHeads(hidden_size, num_heads)
    params = tree_flatten(heads.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    heads.update(tree_unflatten([
        (name, scale * mx.random.normal(w.shape, key=k) / hidden_size**0.5)
        for (name, w), k in zip(params, keys)
    ]))
    mx.eval(heads.parameters())
    return heads


def hidden_states(model, tokens):
    """The target's final-normed hidden states [L, D] on `tokens` (a plain forward, no cache)."""
    return model.model(mx.array(tokens)[None])[0]


# Task 1: the heads -------------------------------------------------------------------------------
def test_task_1_shapes_and_zero_init(impl, target):
    heads = impl.medusa.MedusaHeads(D, 3)
    assert (heads.hidden_size, heads.num_heads, len(heads.blocks)) == (D, 3, 3), (
        f"MedusaHeads(hidden_size={D}, num_heads=3) keeps hidden_size, num_heads and 3 blocks; "
        f"got {getattr(heads, 'hidden_size', None)}, {getattr(heads, 'num_heads', None)}, "
        f"{len(getattr(heads, 'blocks', []))} blocks; {BOOK}"
    )
    for k, block in enumerate(heads.blocks, start=1):
        assert isinstance(block, nn.Linear) and block.weight.shape == (D, D) and "bias" in block, (
            f"head {k}'s block must be an nn.Linear({D}, {D}) with a bias; {BOOK}"
        )
        assert not mx.any(block.weight).item() and not mx.any(block.bias).item(), (
            f"head {k} must start at zero (weight and bias), so that a fresh head is the LM "
            f"head: h + SiLU(0) = h; {BOOK}"
        )
    hidden = hidden_states(target, PROMPTS[0])[None]  # [1, L, D]
    logits = heads(hidden, lm_head_of(target))
    assert logits.shape == (1, len(PROMPTS[0]), 3, V), (
        f"heads(hidden [1, L, D]) returns [1, L, K, V] = (1, {len(PROMPTS[0])}, 3, {V}); "
        f"got {logits.shape}; {BOOK}"
    )
    want = target.lm_head(hidden)
    for k in range(3):
        assert_close(logits[:, :, k], want, f"a zero-initialised head {k + 1} must give exactly "
                     f"the LM head's logits; {BOOK}")


def test_task_1_residual_block_per_head(impl, target):
    heads = random_heads(impl, 3)
    hidden = hidden_states(target, PROMPTS[0])  # [L, D]
    logits = heads(hidden, lm_head_of(target))
    assert logits.shape == (len(PROMPTS[0]), 3, V), (
        f"heads(hidden [L, D]) returns [L, K, V]; got {logits.shape}; {BOOK}"
    )
    for k, block in enumerate(heads.blocks, start=1):
        h = np.array(hidden, dtype=np.float64)
        pre = h @ np.array(block.weight, dtype=np.float64).T + np.array(block.bias)
        residual = h + pre / (1.0 + np.exp(-pre))  # h + SiLU(W h + b)
        want = residual @ np.array(target.lm_head.weight, dtype=np.float64).T
        assert_close(logits[:, k - 1], want, (
            f"head {k} (entry [..., {k - 1}, :]) must be lm_head(h + SiLU(W_{k} h + b_{k})): the "
            f"residual block of head {k} through the target's shared LM head; {BOOK}"
        ))


def test_task_1_errors_name_the_sizes(impl, target):
    heads = random_heads(impl, 2)
    with raises(ValueError, "hidden states of size 48 fed to heads of size 32 must be refused, "
                "naming both sizes", match=r"48.*32|32.*48"):
        heads(mx.zeros((3, 48)), lm_head_of(target))
    for bad in [(0, 2), (D, 0)]:
        with raises(ValueError, f"MedusaHeads{bad} must be refused: D >= 1 and K >= 1"):
            impl.medusa.MedusaHeads(*bad)


# Task 2: the self-distillation loss -------------------------------------------------------------
def test_task_2_head_k_learns_token_t_plus_1_plus_k(impl, use_ref, target):
    use_ref(*HEADS)
    heads = random_heads(impl, 3)
    tokens = [[3, 9, 2, 7, 11, 4, 8, 1], [5, 5, 6, 40, 2, 33, 9, 12]]
    hidden = target.model(mx.array(tokens))  # [2, 8, D]
    # A target law that is not the model's own, so that every shift gives a different loss.
    target_logprobs = nn.log_softmax(mx.random.normal((2, 8, V), key=mx.random.key(9)) * 2, -1)
    loss = impl.medusa.medusa_loss(heads, hidden, target_logprobs, lm_head_of(target))
    assert loss.shape == (3,), f"medusa_loss returns one loss per head, (3,), not {loss.shape}"
    logp = np.array(nn.log_softmax(heads(hidden, lm_head_of(target)), -1), dtype=np.float64)
    p = np.exp(np.array(target_logprobs, dtype=np.float64))
    for k in range(1, 4):
        want = -(p[:, k:] * logp[:, : 8 - k, k - 1]).sum(-1).mean()
        wrong = {k - 1: -(p[:, k - 1 : 7] * logp[:, : 8 - k, k - 1]).sum(-1).mean()}
        got = float(loss[k - 1])
        hint = "".join(f" (graded against target_logprobs[:, t + {s}] it would be {w:.4f})"
                       for s, w in wrong.items() if abs(got - w) <= tolerance(w))
        assert abs(got - want) <= tolerance(want), (
            f"head {k}: loss {got:.4f}, want {want:.4f}{hint}. Head k at position t predicts "
            f"token t + 1 + k, whose target law is target_logprobs[:, t + k]: the cross-entropy "
            f"averaged over the L - k positions that have one; {BOOK}"
        )


def test_task_2_trains_heads_only_and_needs_long_texts(impl, use_ref, target):
    use_ref(*HEADS)
    heads = random_heads(impl, 2)
    hidden = target.model(mx.array([[3, 9, 2, 7, 11]]))
    target_logprobs = nn.log_softmax(target.lm_head(hidden), -1)

    def total(heads):
        return impl.medusa.medusa_loss(heads, hidden, target_logprobs, lm_head_of(target)).sum()

    grads = tree_flatten(nn.value_and_grad(heads, total)(heads)[1])
    assert grads and all(mx.all(mx.isfinite(g)).item() for _, g in grads) and any(
        mx.any(g != 0).item() for _, g in grads), (
        f"the loss must be differentiable in the heads' weights (finite, non-zero gradients); "
        f"{BOOK}"
    )
    with raises(ValueError, "a text of L = 2 tokens cannot train K = 2 heads (head K needs a "
                "position t with t + K < L): refuse L <= K"):
        impl.medusa.medusa_loss(heads, hidden[:, :2], target_logprobs[:, :2], lm_head_of(target))


# Task 3: the draft tree of one position ---------------------------------------------------------
@pytest.mark.parametrize("widths", [[1], [1, 1, 1], [2, 3, 1], [3, 1, 2, 1]])
def test_task_3_tree_levels_read_their_heads(impl, widths):
    head_logits = mx.random.normal((4, V), key=mx.random.key(3))
    tokens, parents = impl.medusa.medusa_tree(head_logits, widths)
    # Expected: level d holds head d's top widths[d-1] below every node of level d - 1.
    ranked = np.argsort(-np.array(head_logits), axis=-1, kind="stable")
    want_tokens, want_parents, level = [], [], [-1]
    for d, width in enumerate(widths):
        nxt = []
        for parent in level:
            for token in ranked[d, :width]:
                nxt.append(len(want_tokens))
                want_tokens.append(int(token))
                want_parents.append(parent)
        level = nxt
    assert (list(tokens), list(parents)) == (want_tokens, want_parents), (
        f"widths {widths}: got tokens {list(tokens)} parents {list(parents)}, want {want_tokens} "
        f"{want_parents}. Level d reads head d (row d - 1 of head_logits) and hangs its top "
        f"widths[d - 1] tokens, most likely first, below every node of level d - 1, in level "
        f"order; {BOOK}"
    )


def test_task_3_refuses_widths_the_heads_cannot_fill(impl):
    head_logits = mx.random.normal((2, V), key=mx.random.key(3))
    for widths in ([1, 1, 1], [], [2, 0]):
        with raises(ValueError, f"widths {widths} with K = 2 heads must be refused: one width "
                    ">= 1 per level, at most K levels"):
            impl.medusa.medusa_tree(head_logits, widths)


# Task 4: greedy decoding, one target call per round --------------------------------------------
class CountingHeads:
    """Heads that record the hidden state each call drafts from."""

    def __init__(self, heads):
        self.heads, self.seen = heads, []
        self.num_heads, self.hidden_size = heads.num_heads, heads.hidden_size

    def __call__(self, hidden, lm_head):
        self.seen.append(hidden)
        return self.heads(hidden, lm_head)


@pytest.mark.parametrize("widths", [(1,), (1, 1, 1), (1, 1, 1, 1, 1, 1), (2, 2, 1), (3, 2, 1, 1)])
def test_task_4_greedy_identity(impl, use_ref, target, widths):
    use_ref(*HEADS, *LOOP_FOUNDATIONS)
    heads = random_heads(impl, 6)
    for prompt, max_tokens in itertools.product(PROMPTS, (1, 2, 23)):
        want = mlx_lm_greedy(target, prompt, max_tokens)
        out = list(impl.medusa.medusa_generate(target, heads, prompt, max_tokens, widths=widths))
        got = [int(t) for t, _ in out]
        assert got == want, (
            f"widths {widths}, prompt {prompt}, max_tokens {max_tokens}: got {got}, plain greedy "
            f"gives {want}. Medusa decoding must reproduce the target's greedy output token for "
            f"token: verify the heads' tree with the target, keep only what it agrees with; {BOOK}"
        )


class OracleHeads(CountingHeads):
    """Heads that know the greedy text: from the hidden state at position p they draft the true
    tokens p + 2, p + 3, ... except where (p + k) % 3 == 0, where they draft a wrong one, so
    rounds end both on a rejection and on full acceptance. They record what they are fed."""

    def __init__(self, text, hidden, num_heads):
        self.text, self.hidden, self.seen = text, hidden, []  # hidden [len(text), D]
        self.num_heads, self.hidden_size = num_heads, hidden.shape[-1]

    def __call__(self, hidden, lm_head):
        self.seen.append(hidden)
        p = int(mx.argmin(((self.hidden - hidden.reshape(1, -1)) ** 2).sum(-1)).item())
        logits = np.zeros((self.num_heads, V), dtype=np.float32)
        for k in range(1, self.num_heads + 1):
            token = self.text[min(p + 1 + k, len(self.text) - 1)]
            logits[k - 1, token if (p + k) % 3 else (token + 1) % V] = 10.0
        return mx.array(logits)


def check_hidden_sources(target, heads, stats, prompt, tokens):
    """Each drafting round must draft from the hidden state of the token before the newest."""
    emitted = 0
    for r, (seen, accepted) in enumerate(zip(heads.seen, stats.accepted_per_round)):
        emitted += accepted + 1  # what the round before this draft emitted
        want = hidden_states(target, prompt + tokens[: emitted - 1])[-1]
        assert seen.size == D, f"round {r + 2} drafts from one hidden state [D]; got {seen.shape}"
        assert_close(seen.reshape(-1), want, (
            f"round {r + 2} must draft from the hidden state of the last verified position "
            f"(position {len(prompt) + emitted - 2}, the token before the newest one), taken "
            f"from the verifying call: the last accepted draft's row, or the fed token's row "
            f"if no draft was accepted; {BOOK}"
        ))


def test_task_4_drafts_come_from_the_verifying_forward(impl, use_ref, target):
    use_ref(*HEADS, *LOOP_FOUNDATIONS)
    prompt, max_tokens = PROMPTS[0], 30
    text = prompt + mlx_lm_greedy(target, prompt, max_tokens + 8)
    heads = OracleHeads(text, hidden_states(target, text), 3)
    fm, stats = FeatureModel(target), SpecStats()
    out = list(impl.medusa.medusa_generate(fm, heads, prompt, max_tokens, stats=stats,
                                           widths=(2, 1, 1)))
    tokens = [int(t) for t, _ in out]
    assert tokens == text[len(prompt) : len(prompt) + max_tokens] and stats.emitted == max_tokens, (
        f"max_tokens={max_tokens} yields the greedy text; got {tokens} (stats.emitted "
        f"{stats.emitted}); {BOOK}"
    )
    assert fm.calls == stats.rounds and stats.draft_calls == 0, (
        f"{fm.calls} target calls for {stats.rounds} rounds (draft_calls {stats.draft_calls}): a "
        f"Medusa round makes ONE target call and no draft-model call; {BOOK}"
    )
    assert len(heads.seen) == stats.speculative_rounds, (
        f"the heads ran {len(heads.seen)} times in {stats.speculative_rounds} drafting rounds: "
        f"once per round that drafts (not in the prefill, which has no hidden state yet); {BOOK}"
    )
    check_hidden_sources(target, heads, stats, prompt, tokens)
    assert stats.accepted > stats.rounds and stats.rejections > 2, (
        f"heads that know the text should see many drafts accepted and a few rejected: "
        f"{stats.accepted} accepted, {stats.rejections} rejected rounds; {BOOK}"
    )


def test_task_4_eos_and_errors(impl, use_ref, target):
    use_ref(*HEADS, *LOOP_FOUNDATIONS)
    heads = random_heads(impl, 3)
    want = mlx_lm_greedy(target, PROMPTS[0], 20)
    eos = want[7]
    got = [int(t) for t, _ in impl.medusa.medusa_generate(
        target, heads, PROMPTS[0], 20, eos_token_ids=[eos], widths=(2, 1))]
    stop = want.index(eos) + 1
    assert got == want[:stop], (
        f"eos {eos}: got {got}, want {want[:stop]}: stop right after yielding an eos token; {BOOK}"
    )
    with raises(ValueError, "an empty prompt must be refused"):
        list(impl.medusa.medusa_generate(target, heads, [], 5))


# Task 5: exact sampled decoding ----------------------------------------------------------------
SAMPLED_FOUNDATIONS = HEADS + BATCHED_FOUNDATIONS + ("sampling.make_probs",)


def test_task_5_temperature_zero_is_greedy(impl, use_ref, target):
    use_ref(*SAMPLED_FOUNDATIONS)
    heads = random_heads(impl, 4)
    for prompt, n in itertools.product(PROMPTS, (1, 3)):
        want = mlx_lm_greedy(target, prompt, 25)
        got = [int(t) for t, _ in impl.medusa.medusa_sample_generate(
            target, heads, prompt, 25, mx.random.key(0), temperature=0.0, num_drafts=n)]
        assert got == want, (
            f"temperature 0, num_drafts {n}, prompt {prompt}: got {got}, greedy gives {want}; "
            f"at T = 0 the drafts are one-hot and verification is greedy; {BOOK}"
        )


def test_task_5_drafts_come_from_the_verifying_forward(impl, use_ref, target):
    use_ref(*SAMPLED_FOUNDATIONS)
    prompt, max_tokens = PROMPTS[0], 30
    text = prompt + mlx_lm_greedy(target, prompt, max_tokens + 8)
    heads = OracleHeads(text, hidden_states(target, text), 3)
    fm, stats = FeatureModel(target), SpecStats()
    tokens = [int(t) for t, _ in impl.medusa.medusa_sample_generate(
        fm, heads, prompt, max_tokens, mx.random.key(0), temperature=0.0, stats=stats)]
    assert tokens == text[len(prompt) : len(prompt) + max_tokens], (
        f"temperature 0 yields the greedy text; got {tokens}; {BOOK}")
    assert fm.calls == stats.rounds and len(heads.seen) == stats.speculative_rounds, (
        f"{fm.calls} target calls and {len(heads.seen)} heads calls for {stats.rounds} rounds "
        f"({stats.speculative_rounds} drafting): one target call per round, the heads once per "
        f"drafting round; {BOOK}"
    )
    check_hidden_sources(target, heads, stats, prompt, tokens)

def test_task_5_sampled_law_is_the_targets(impl, use_ref, target):
    """Tokens 2 and 3 of a 4-token sample must follow the target's marginal laws. Round 2 drafts
    both from the heads, so each comes from an accepted draft or a residual draw.
    False alarms: two chi-square tests at p < 1e-3 each, so at most 0.2 % of seeds would fail
    a correct loop; the seeds are fixed, so the outcome never changes from run to run."""
    use_ref(*SAMPLED_FOUNDATIONS)
    heads, prompt, T, N = random_heads(impl, 2, scale=0.0), [3, 9, 2], 2.0, 1200
    # Exact marginals by enumeration: p(t1), then p(t2 | t1), then p(t3 | t1, t2).
    def probs(batch):
        return np.array(mx.softmax(target(mx.array(batch))[:, -1] / T, axis=-1), dtype=np.float64)
    law2, law3 = laws_of_tokens_2_and_3(probs, prompt, V)
    counts2, counts3, stats = np.zeros(V), np.zeros(V), SpecStats()
    for key in mx.random.split(mx.random.key(2024), N):
        out = [int(t) for t, _ in impl.medusa.medusa_sample_generate(
            target, heads, prompt, 4, key, temperature=T, stats=stats)]
        assert len(out) == 4, f"max_tokens=4 yields 4 tokens; got {out}"
        counts2[out[1]] += 1
        counts3[out[2]] += 1
    assert 0.05 < stats.accepted / stats.drafted < 0.95, (
        f"acceptance {stats.accepted}/{stats.drafted}: this test needs both accepted and rejected "
        "drafts to check anything"
    )
    for name, counts, law in (("token 2", counts2, law2), ("token 3", counts3, law3)):
        pvalue = pooled_chisquare_p(counts, law)
        assert pvalue > 1e-3, (
            f"{name} of {N} seeded samples at T = {T} is not distributed as the target's "
            f"(chi-square p = {pvalue:.1e}). Draw each draft from its head's q = make_probs(head "
            f"logits, T), then accept with verify_speculation against those same q; {BOOK}"
        )


def test_task_5_every_round_draws_with_fresh_keys(impl, use_ref, target, monkeypatch):
    """Key discipline, checked directly: every key handed to verify_speculation and to
    sample_token in one run is a new one. A loop that reuses one key every round (never
    advancing `key`) draws the same uniforms in every round, so its rounds are correlated even
    though each token's marginal law looks right (the law test above cannot see it). No
    randomness in the check itself: it cannot fail a correct loop."""
    use_ref(*SAMPLED_FOUNDATIONS)
    seen = []  # (function, round's key as a tuple of ints)

    def spy(name, fn):
        signature = inspect.signature(fn)

        def wrapped(*args, **kwargs):
            key = signature.bind(*args, **kwargs).arguments.get("key")
            seen.append((name, None if key is None else tuple(np.array(key).reshape(-1).tolist())))
            return fn(*args, **kwargs)

        return wrapped

    for name in ("verify_speculation", "sample_token"):
        monkeypatch.setattr(impl.medusa, name, spy(name, getattr(impl.medusa, name)))
    heads, stats = random_heads(impl, 3, scale=0.0), SpecStats()
    out = [int(t) for t, _ in impl.medusa.medusa_sample_generate(
        target, heads, PROMPTS[0], 24, mx.random.key(11), temperature=1.0, stats=stats)]
    assert len(out) == 24, f"max_tokens=24 yields 24 tokens; got {len(out)}"
    verifies = [key for name, key in seen if name == "verify_speculation"]
    assert len(verifies) == stats.speculative_rounds >= 3, (
        f"{len(verifies)} calls of verify_speculation for {stats.speculative_rounds} drafting "
        f"rounds: each drafting round verifies once with verify_speculation(drafts, logits, q, "
        f"temperature, key), called by that name from medusa.py; {BOOK}"
    )
    first_use = {}
    for i, (name, key) in enumerate(seen):
        assert key is not None, f"{name} was called without a key at temperature 1; {BOOK}"
        assert key not in first_use, (
            f"call {i + 1} ({name}) reuses the key of call {first_use[key][0] + 1} "
            f"({first_use[key][1]}): every round needs keys of its own, or its draws repeat the "
            f"earlier ones. Split the key every round: key, key_draft, key_verify = "
            f"mx.random.split(key, 3), and keep the new `key` for the next round; {BOOK}"
        )
        first_use[key] = (i, name)


def test_task_5_seeded_and_errors(impl, use_ref, target):
    use_ref(*SAMPLED_FOUNDATIONS)
    heads = random_heads(impl, 3)
    runs = [[int(t) for t, _ in impl.medusa.medusa_sample_generate(
        target, heads, PROMPTS[0], 20, mx.random.key(7), temperature=1.0)] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 20, (
        f"the same key must give the same text: {runs[0]} vs {runs[1]}; take every draw's key "
        f"from the key you were given; {BOOK}"
    )
    for n in (0, 4):
        with raises(ValueError, f"num_drafts={n} with K = 3 heads must be refused: 1 <= n <= K"):
            list(impl.medusa.medusa_sample_generate(
                target, heads, PROMPTS[0], 5, mx.random.key(0), num_drafts=n))


# Provided: the trained heads that ship with the package ------------------------------------------
def test_shipped_heads_load_with_the_right_shapes(ref):
    """Smoke test of the asset (no decoding): the heads for the embedded target load and fit it."""
    if not (MEDUSA_HEADS / "config.json").exists():
        pytest.fail(f"the trained heads are missing from {MEDUSA_HEADS}: "
                    "run scripts/train_heads.py")
    heads = load_heads(MEDUSA_HEADS, ref.medusa.MedusaHeads)
    assert heads.hidden_size == 512 and heads.num_heads >= 3
    assert all(b.weight.shape == (512, 512) for b in heads.blocks)
    small = tiny_llama(seed=0)  # hidden size 32: the loader must refuse it, naming both sizes
    with raises(ValueError, "heads for hidden size 512 on a target of hidden size 32",
                match=r"512.*32"):
        load_heads(MEDUSA_HEADS, ref.medusa.MedusaHeads, small)


@pytest.mark.parametrize("tied", [False, True])
def test_kit_feature_model_is_the_model(tied):
    """Provided: FeatureModel returns exactly the model's logits and keeps the hidden states
    behind them, for a separate LM head and for tied embeddings (as the embedded target has)."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=D, num_hidden_layers=2,
                           intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-5, vocab_size=V, tie_word_embeddings=tied)
    model = llama.Model(args)
    model.update(tree_unflatten(_seeded_weights(model, mx.random.key(0))))  # explicit key
    fm = FeatureModel(model)
    tokens = mx.array([PROMPTS[0]])
    logits = fm(tokens)
    assert fm.calls == 1 and fm.hidden.shape == (1, len(PROMPTS[0]), D)
    assert_close(logits, model(tokens), f"FeatureModel returns the model's logits (tied={tied})")
    assert_close(lm_head_of(model)(fm.hidden), logits, "lm_head_of(model)(hidden) gives the logits")
