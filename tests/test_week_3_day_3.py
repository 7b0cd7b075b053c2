"""Week 3 Day 3 — drafting without a draft model. Chapter: book/src/week3-03-ngram-drafting.md

Task 1: find_ngram_continuation (prompt lookup on a list of token ids)
Task 2: NgramDrafter.draft (one-hot q, the history as a trimmable cache)
Task 3: DrafterDecoder (any drafter + a target = a decoder for speculative_generate)
"""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache
from scipy import stats as scipy_stats

from specdec.kit import drafters as kit_drafters
from specdec.kit.impl import get_impl
from specdec.kit.models import markov_pair
from specdec.kit.stats import SpecStats
from support import raises

CHAPTER = "book/src/week3-03-ngram-drafting.md"
EARLIER = ("drafters.find_ngram_continuation",)
DRAFTER = EARLIER + ("drafters.NgramDrafter.draft",)


# Task 1 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "history, max_ngram, min_ngram, num_tokens, expected, why",
    [
        ([5, 1, 2, 3, 9, 8, 3, 7, 1, 2, 3], 3, 1, 3, [9, 8, 3],
         "the longest suffix n-gram that occurred before wins: [1, 2, 3] (followed by 9, 8, 3) "
         "beats the more recent 1-gram [3] (followed by 7)"),
        ([5, 1, 2, 3, 9, 8, 3, 7, 1, 2, 3], 1, 1, 3, [7, 1, 2],
         "with max_ngram = 1 only the last token is matched: its most recent earlier occurrence "
         "is followed by 7, 1, 2"),
        ([1, 2, 8, 4, 1, 2, 9, 4, 1, 2], 2, 1, 2, [9, 4],
         "the most recent earlier occurrence wins: [1, 2] was last followed by 9, 4 (not 8, 4)"),
        ([4, 5, 6], 3, 1, 4, [],
         "no earlier occurrence of any suffix: return [] (the suffix itself does not count)"),
        ([6, 6], 2, 1, 3, [6, 6, 6],
         "[6] occurred at 0; the copy runs into the tokens it proposes (overlapping copy)"),
        ([1, 2, 3, 1, 2, 3], 3, 1, 5, [1, 2, 3, 1, 2],
         "periodic text: the copy wraps around, giving num_tokens tokens"),
        ([1, 2, 3, 1, 2, 3, 4, 5], 3, 1, 2, [],
         "5 never occurred before and min_ngram = 1 is the last try: []"),
        ([7, 1, 8, 2, 7, 1, 9, 3, 1], 3, 2, 3, [],
         "min_ngram = 2: the 1-gram [1] must not be used, and [3, 1] never occurred: []"),
        ([7, 1, 8, 2, 7, 1, 9, 3, 1], 3, 1, 1, [9],
         "num_tokens = 1 caps the proposal at one token"),
        ([3, 4, 3, 4], 3, 1, 0, [], "num_tokens = 0: nothing to propose"),
        ([9], 3, 1, 2, [], "a single token has no earlier context"),
    ],
)
def test_task_1_find_ngram_continuation(impl, history, max_ngram, min_ngram, num_tokens, expected, why):
    before = list(history)
    got = impl.drafters.find_ngram_continuation(history, max_ngram, min_ngram, num_tokens)
    assert list(got) == expected, (
        f"find_ngram_continuation({history}, max_ngram={max_ngram}, min_ngram={min_ngram}, "
        f"num_tokens={num_tokens}) = {got}, expected {expected}: {why} ({CHAPTER}, Task 1)"
    )
    assert history == before, "find_ngram_continuation must not modify the history it searches"
    assert isinstance(got, list) and all(type(t) is int for t in got), (
        f"find_ngram_continuation returns a list of python ints, got {got!r}"
    )


# Task 2 -----------------------------------------------------------------------------------------
def one_hot_check(draft_tokens, q_draft, vocab_size):
    assert draft_tokens.dtype == mx.int32 and q_draft.dtype == mx.float32
    assert q_draft.shape == (draft_tokens.shape[0], vocab_size), (
        f"q_draft must be [k', V] = [{draft_tokens.shape[0]}, {vocab_size}], got {q_draft.shape}"
    )
    expected = np.eye(vocab_size, dtype=np.float32)[np.array(draft_tokens.tolist())]
    assert np.array_equal(np.array(q_draft), expected), (
        "the n-gram proposal is deterministic, so q_draft must be one-hot on each proposed token"
    )


def test_task_2_draft_proposes_and_keeps_the_cache_invariant(impl, use_ref, key):
    use_ref(*EARLIER)
    drafter = impl.drafters.NgramDrafter(vocab_size=16)
    prompt = [3, 5, 7, 3, 5, 7, 1, 3, 5]
    draft_tokens, q_draft = drafter.draft(mx.array(prompt), 4)
    assert draft_tokens.tolist() == [7, 1, 3, 5], (
        "after [3, 5] the most recent continuation is 7, 1, 3, 5 (find_ngram_continuation)"
    )
    one_hot_check(draft_tokens, q_draft, 16)
    assert drafter.history == prompt + [7, 1, 3], (
        "after draft the history holds what was fed plus draft_tokens[:-1], like a draft "
        f"model's KV cache; got {drafter.history} ({CHAPTER}, Task 2)"
    )
    # Nothing to look up: one token, the last one repeated.
    drafter = impl.drafters.NgramDrafter(vocab_size=16)
    draft_tokens, q_draft = drafter.draft(mx.array([2, 4, 6]), 4, temperature=1.0, key=key)
    assert draft_tokens.tolist() == [6], "with no match, propose the single token [history[-1]]"
    one_hot_check(draft_tokens, q_draft, 16)
    assert drafter.history == [2, 4, 6]
    for bad, why, named in [
        (dict(num_tokens=0), "num_tokens = 0: there is nothing to propose, K >= 1", None),
        (dict(vocab_size=None), "vocab_size is None: q_draft needs V — the message should say "
         "to set vocab_size or wrap the drafter in a DrafterDecoder", "vocab_size|DrafterDecoder"),
        (dict(unseen=[]), "no unseen tokens: every round feeds at least one", None),
    ]:
        drafter = impl.drafters.NgramDrafter(vocab_size=bad.get("vocab_size", 16))
        with raises(ValueError, f"NgramDrafter.draft must raise ValueError for {bad}: {why}",
                    match=named):
            drafter.draft(mx.array(bad.get("unseen", [1, 2]), dtype=mx.int32), bad.get("num_tokens", 2))


def test_task_2_history_across_rounds(impl, ref, use_ref):
    """Play rounds by hand with commit_round: the history must track the committed text."""
    use_ref(*EARLIER)
    drafter = impl.drafters.NgramDrafter(vocab_size=16)
    decoder = SimpleNamespace(draft_cache=drafter.cache, target_cache=[])
    committed = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    unseen = list(committed)
    # (num_accepted, new_token) per round: partial, none, all accepted ([d_K, t] fed next).
    for num_accepted, new_token in [(1, 9), (0, 4), (3, 8), (2, 5)]:
        draft_tokens, _ = drafter.draft(mx.array(unseen), 3)
        draft_tokens = draft_tokens.tolist()
        expected = ref.drafters.find_ngram_continuation(committed, 3, 1, 3) or committed[-1:]
        assert draft_tokens == expected, (
            f"round proposal {draft_tokens} != {expected}: the history must equal the committed "
            f"text {committed} when drafting (check your bookkeeping, {CHAPTER})"
        )
        num_accepted = min(num_accepted, len(draft_tokens))
        unseen = ref.speculative.commit_round(decoder, draft_tokens, num_accepted, new_token)
        committed += draft_tokens[:num_accepted] + [new_token]
        assert drafter.history + unseen == committed, (
            "after commit_round trims the rejected drafts, history + the tokens fed next round "
            f"must be the committed text: {drafter.history} + {unseen} != {committed}"
        )


# Task 3 -----------------------------------------------------------------------------------------
def ngram_decoder(impl, use_ref, target, lookahead, **drafter_kwargs):
    use_ref(*DRAFTER)
    return impl.drafters.DrafterDecoder(impl.drafters.NgramDrafter(**drafter_kwargs), target, lookahead)


@pytest.mark.parametrize("lookahead", [1, 3, 6])
@pytest.mark.parametrize("pair", ["llama", "markov"])
def test_task_3_greedy_exact(impl, ref, use_ref, llama_models, markov_models, pair, lookahead):
    target = llama_models[1] if pair == "llama" else markov_models[1]
    decoder = ngram_decoder(impl, use_ref, target, lookahead)
    prompt = mx.array([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], dtype=mx.int32)
    expected = list(ref.generate.generate_tokens(target, prompt, 50))
    for _ in range(2):  # a second run must start from a clean history (reset)
        got = [t for t, _ in ref.speculative.speculative_generate(decoder, prompt, 50)]
        assert got == expected, (
            f"n-gram drafting must reproduce the target's greedy output exactly ({pair}, "
            f"K={lookahead}): got {got}, expected {expected} ({CHAPTER}, Task 3)"
        )
        history = decoder.drafter.history
        assert history[: prompt.size] == prompt.tolist() and len(history) <= prompt.size + 50, (
            "each generation starts with reset(): afterwards the drafter's history is this run's "
            f"committed text (prompt + at most 50 tokens), got {len(history)} tokens"
        )


def test_task_3_checks_and_learns_the_vocabulary(impl, use_ref, llama_models):
    target = llama_models[1]
    decoder = ngram_decoder(impl, use_ref, target, 4)
    assert decoder.vocab_size == 64 and decoder.drafter.vocab_size == 64, (
        "a drafter without a vocabulary learns V from the target"
    )
    assert decoder.target_model is target and decoder.lookahead == 4, (
        "DrafterDecoder keeps `target_model` and `lookahead` (speculative_generate reads them)"
    )
    assert decoder.draft_cache is decoder.drafter.cache, "draft_cache is the drafter's cache list"
    decoder.draft_generation(mx.array([1, 2, 1], dtype=mx.int32), 2)
    target(mx.array([[1, 2, 1]]), cache=decoder.target_cache)
    decoder.reset()
    assert decoder.drafter.history == [] and decoder.target_cache[0].offset == 0, (
        "reset() must empty the drafter's history and give the target a fresh cache"
    )
    with raises(ValueError, "a drafter with V = 32 and a target with V = 64 must be refused "
                "with a ValueError naming both vocabularies: the drafter must propose the "
                "target's token ids", match=r"32.*64|64.*32"):
        impl.drafters.DrafterDecoder(impl.drafters.NgramDrafter(vocab_size=32), target, 4)
    with raises(ValueError, "lookahead = 0 must be refused with a ValueError: K >= 1"):
        impl.drafters.DrafterDecoder(impl.drafters.NgramDrafter(), target, 0)


class StuckDrafter:
    """A drafter whose state cannot be rolled back (like a state-space model's ArraysCache)."""

    vocab_size = 64

    def reset(self):
        self.cache = [ArraysCache(size=2)]

    def draft(self, unseen_tokens, num_tokens, temperature=0.0, key=None):
        raise AssertionError("never called")


class StuckTarget:
    """A target model whose cache has a layer that cannot be trimmed."""

    def __init__(self, inner):
        self.inner, self.vocab_size = inner, 64

    def __call__(self, inputs, cache=None):
        return self.inner(inputs, cache=None if cache is None else cache[:1])

    def make_cache(self):
        return [KVCache(), ArraysCache(size=2)]


def test_task_3_refuses_caches_that_cannot_be_trimmed(impl, use_ref, llama_models):
    target = llama_models[1]
    with raises(ValueError, "the drafter's cache (made by its reset()) holds an ArraysCache, "
                "which cannot be trimmed: DrafterDecoder must refuse it with a ValueError, since "
                "rejected drafts must be rolled back"):
        impl.drafters.DrafterDecoder(StuckDrafter(), target, 4)
    use_ref(*DRAFTER)
    with raises(ValueError, "the target's cache holds an ArraysCache, which cannot be trimmed: "
                "DrafterDecoder must refuse it with a ValueError"):
        impl.drafters.DrafterDecoder(impl.drafters.NgramDrafter(), StuckTarget(target), 4)


class Misbehaving:
    """A drafter that breaks the contract: it returns `extra` tokens more than it was asked for,
    and a q_draft of `q_width` columns."""

    vocab_size = 64

    def __init__(self, extra=1, q_width=64):
        self.cache = []  # no state to roll back: an empty cache list is allowed
        self.extra, self.q_width = extra, q_width

    def reset(self):
        pass

    def draft(self, unseen_tokens, num_tokens, temperature=0.0, key=None):
        k = num_tokens + self.extra
        return mx.zeros((k,), dtype=mx.int32), mx.zeros((k, self.q_width), dtype=mx.float32)


@pytest.mark.parametrize("extra, q_width, what", [
    (1, 64, "4 tokens for num_tokens = 3"),
    (-3, 64, "no token at all (k' = 0)"),
    (0, 32, "a q_draft of shape [3, 32] for V = 64"),
])
def test_task_3_checks_the_drafter_output(impl, llama_models, extra, q_width, what):
    decoder = impl.drafters.DrafterDecoder(Misbehaving(extra, q_width), llama_models[1], 3)
    assert decoder.draft_cache == [], "any object with the Drafter attributes works, even cache=[]"
    with raises(ValueError, f"the drafter returned {what}: draft_generation must refuse it with a "
                "ValueError (need 1 <= k' <= num_tokens tokens and q_draft of shape [k', V])"):
        decoder.draft_generation(mx.array([1, 2], dtype=mx.int32), 3)


def test_task_3_model_drafter_matches_week_2(impl, ref, use_ref, llama_models):
    draft_model, target = llama_models
    _ = impl.drafters
    use_ref("draft.SpeculativeDecoder.draft_generation")
    decoder = impl.drafters.DrafterDecoder(impl.drafters.ModelDrafter(draft_model), target, 3)
    prompt = mx.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=mx.int32)
    week2 = ref.draft.SpeculativeDecoder(draft_model, target, 3)
    expected = list(ref.speculative.speculative_generate(week2, prompt, 40))
    got = list(ref.speculative.speculative_generate(decoder, prompt, 40))
    assert got == expected, (
        "a ModelDrafter behind a DrafterDecoder must behave exactly like Week 2's "
        "SpeculativeDecoder (same tokens, same accepted drafts)"
    )


def test_task_3_repetitive_text_is_accepted(impl, ref, use_ref):
    # Greedy decoding of a Markov chain falls into a cycle: text that repeats itself.
    _, target = markov_pair(vocab_size=12, seed=5, concentration=0.3)
    decoder = ngram_decoder(impl, use_ref, target, 4)
    stats = SpecStats()
    list(ref.speculative.speculative_generate(decoder, mx.array([1, 2, 3, 1, 2]), 80, stats=stats))
    assert stats.acceptance_rate > 0.8 and stats.tokens_per_round > 3.0, (
        "on repetitive text prompt lookup should be accepted most of the time; got "
        f"{stats.summary()} ({CHAPTER})"
    )


def merged_chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value, merging cells expected < 5 times into one (valid asymptotics)."""
    probs = probs.astype(np.float64)
    probs = probs / probs.sum()  # float32 rows: renormalise in float64
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    if (obs[~keep] > 0).any():
        return 0.0  # a token the target gives probability 0 was produced
    return scipy_stats.chisquare(obs[keep], exp[keep]).pvalue


def test_task_3_sampling_follows_the_target(impl, ref, use_ref):
    """T = 1 with one-hot q: the first two tokens must be distributed as the target says."""
    _, target = markov_pair(vocab_size=12, seed=3, mix=0.4, period=3)
    decoder = ngram_decoder(impl, use_ref, target, 3)
    prompt = [1, 2, 3, 1, 2]  # the drafter proposes 3, 1 (what followed [1, 2] last time)
    p_first = np.array(target.next_token_probs(prompt[-1], len(prompt) - 1))
    p_next = np.array(target.transitions[len(prompt) % 3])  # [V, V]: row x = p(. | x)
    p_second = p_first @ p_next
    num_samples = 800
    first, second = np.zeros(12), np.zeros(12)
    sources = set()
    for sample_key in mx.random.split(mx.random.key(7), num_samples):
        out = list(ref.speculative.speculative_generate(decoder, mx.array(prompt), 2 + 1, 1.0, sample_key))
        first[out[0][0]] += 1
        second[out[1][0]] += 1
        sources.add(out[0][1])
    assert sources == {True, False}, "both accepted drafts and corrections should occur here"
    # Each p-value is below 1e-3 with probability 1e-3 when correct: a 2e-3 false-alarm rate
    # (the keys are fixed, so the outcome is deterministic anyway).
    for name, counts, probs in [("first", first, p_first), ("second", second, p_second)]:
        pvalue = merged_chi_square(counts, probs)
        assert pvalue > 1e-3, (
            f"the {name} sampled token is not distributed as the target's p (chi-square p = "
            f"{pvalue:.2g}): with a one-hot q, verification accepts d with probability p(d) and "
            f"otherwise resamples from p without d ({CHAPTER})"
        )


# The kit ------------------------------------------------------------------------------------------
def test_provided_code_lives_once_in_the_kit():
    """Provided code is one copy (specdec/kit/drafters.py) that both trees import: a fix reaches both."""
    for tree in (get_impl("student").drafters, get_impl("ref").drafters):
        assert tree.Drafter is kit_drafters.Drafter and tree.TokenHistory is kit_drafters.TokenHistory, (
            f"{tree.__name__} must re-export the kit's Drafter and TokenHistory, not a copy")
        for cls, base in (("ModelDrafter", "ModelDrafterBase"), ("NgramDrafter", "NgramDrafterBase"),
                          ("DrafterDecoder", "DrafterDecoderBase")):
            assert issubclass(getattr(tree, cls), getattr(kit_drafters, base)), (
                f"{tree.__name__}.{cls} must build on the kit's {base} (its provided part)")
