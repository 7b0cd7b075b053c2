"""Week 2 Day 4 — the full loop: commit_round (task 1) and speculative_generate (task 2).

Book: book/src/week2-04-full-loop.md. Grade with
    pytest tests/test_week_2_day_4.py --impl student -k task_1
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import (
    ChunkedKVCache,
    KVCache,
    RotatingKVCache,
    make_prompt_cache,
    trim_prompt_cache,
)
from scipy import stats as scipy_stats

from specdec.kit.models import MarkovLM, markov_pair, tiny_llama_pair
from specdec.kit.stats import SpecStats
from support import CallCounter, logits_atol, mlx_lm_greedy, raises

# The earlier tasks the loop stands on: graded elsewhere, taken from the reference here.
EARLIER_TASKS = (
    "sampling.logits_to_probs",
    "sampling.top_k_filter",
    "sampling.top_p_filter",
    "sampling.sample_token",
    "kv_cache.cache_length",
    "kv_cache.rollback",
    "draft.SpeculativeDecoder.__init__",
    "draft.SpeculativeDecoder.draft_generation",
    "verify.verify_greedy",
    "verify.residual_distribution",
    "verify.verify_speculation",
)

PROMPTS = ([5], [1, 5, 7], [3, 9, 2, 7, 11, 4, 0, 6, 8])


@pytest.fixture(scope="module")
def identical_llama_models():
    """A draft that *is* the target: greedy drafting is always fully accepted."""
    return tiny_llama_pair(seed=0, noise=0.0)


def models_by_name(name, markov_models, llama_models, identical_llama_models):
    return {
        "markov": markov_models,
        "llama": llama_models,
        "llama-identical": identical_llama_models,
    }[name]


def fresh_next_logits(model, tokens: list[int]) -> np.ndarray:
    """The logits after `tokens` from a brand-new cache: what any correct cache must reproduce."""
    cache = make_prompt_cache(model)
    return np.array(model(mx.array(tokens, dtype=mx.int32)[None], cache=cache)[0, -1])


def next_logits_then_undo(model, cache, unseen: list[int]) -> np.ndarray:
    """Feed the unseen tokens, read the next logits, and trim them off again (test-only peek)."""
    logits = np.array(model(mx.array(unseen, dtype=mx.int32)[None], cache=cache)[0, -1])
    trim_prompt_cache(cache, len(unseen))
    return logits


# Task 1: commit_round -----------------------------------------------------------------------------
def check_commit(impl, decoder, committed, draft_tokens, num_accepted, new_token, where):
    """Call the student's commit_round and check the cache invariant; returns the new state."""
    draft, target = decoder.draft_model, decoder.target_model
    calls_before = (draft.calls, target.calls)
    unseen = impl.speculative.commit_round(decoder, draft_tokens, num_accepted, new_token)
    K = len(draft_tokens)
    assert (draft.calls, target.calls) == calls_before, (
        f"{where}: commit_round called a model. It must only trim the caches (trim_prompt_cache) "
        "— re-running a model would waste the work speculative decoding saves"
    )
    committed = committed + draft_tokens[:num_accepted] + [new_token]
    expected_unseen = [draft_tokens[-1], new_token] if num_accepted == K else [new_token]
    assert [int(t) for t in unseen] == expected_unseen, (
        f"{where}: with K={K} drafts {draft_tokens} and n={num_accepted} accepted, commit_round "
        f"must return the tokens the draft has not seen: {expected_unseen} ([new_token], or "
        f"[d_K, new_token] when all K were accepted), got {list(unseen)}"
    )
    # Each cache holds the committed sequence minus the tokens it has not seen yet.
    for role, cache, unseen_by_model in (
        ("target", decoder.target_cache, [new_token]),
        ("draft", decoder.draft_cache, expected_unseen),
    ):
        held = len(committed) - len(unseen_by_model)
        assert cache[0].offset == held, (
            f"{where}: after the round the {role} cache must hold the committed sequence minus "
            f"the tokens it has not seen {unseen_by_model} ({held} tokens), but its offset is "
            f"{cache[0].offset}. Trims (K={K}, n={num_accepted}): target K - n, draft K - 1 - n "
            "(nothing when n = K: the draft never fed d_K)"
        )
    # The caches must not just have the right length: they must hold the *right* tokens.
    for role, model, cache, feed in (
        ("target", target, decoder.target_cache, [new_token]),
        ("draft", draft, decoder.draft_cache, expected_unseen),
    ):
        got = next_logits_then_undo(model, cache, feed)
        want = fresh_next_logits(model, committed)
        assert np.allclose(got, want, atol=logits_atol(want), rtol=0), (
            f"{where}: after commit_round, feeding the {role} its unseen tokens {feed} must give "
            "the same next-token logits as a fresh prefill of the whole committed sequence — "
            "the cache holds the wrong tokens (trimmed too little or too much?)"
        )
    return committed, expected_unseen


@pytest.mark.parametrize("pair", ["markov", "llama"])
@pytest.mark.parametrize("K", [1, 4])
def test_task_1_commit_round_every_outcome(
    impl, ref, use_ref, pair, K, markov_models, llama_models, identical_llama_models
):
    """Force every n in 0..K (zero, partial, full acceptance), twice in a row."""
    use_ref(*EARLIER_TASKS)
    draft, target = models_by_name(pair, markov_models, llama_models, identical_llama_models)
    decoder = ref.draft.SpeculativeDecoder(CallCounter(draft), CallCounter(target), K)
    prompt = [1, 5, 7]
    for first_n in range(K + 1):
        for second_n in (0, K):  # the second round starts from a state commit_round produced
            decoder.reset()
            committed, draft_unseen, target_unseen = prompt, prompt, prompt
            for round_index, n in enumerate((first_n, second_n)):
                draft_tokens, _ = decoder.draft_generation(mx.array(draft_unseen), K)
                inputs = mx.array(target_unseen + draft_tokens.tolist(), dtype=mx.int32)
                logits = decoder.target_model(inputs[None], cache=decoder.target_cache)[0, -(K + 1):]
                # As if verification had accepted exactly n drafts: the target's token after them.
                new_token = int(mx.argmax(logits[n]).item())
                where = f"{pair}, K={K}, round {round_index + 1}, n={n}"
                committed, draft_unseen = check_commit(
                    impl, decoder, committed, draft_tokens.tolist(), n, new_token, where
                )
                target_unseen = [new_token]


@pytest.mark.parametrize(
    "pair, temperature", [("markov", 0.0), ("markov", 1.0), ("llama", 0.0), ("llama-identical", 0.0)]
)
def test_task_1_commit_round_after_verified_rounds(
    impl, ref, use_ref, pair, temperature, markov_models, llama_models, identical_llama_models
):
    """Real rounds by hand (draft, one target call, verify), chained through commit_round."""
    use_ref(*EARLIER_TASKS)
    draft, target = models_by_name(pair, markov_models, llama_models, identical_llama_models)
    K = 3
    decoder = ref.draft.SpeculativeDecoder(CallCounter(draft), CallCounter(target), K)
    key = mx.random.key(42)
    prompt = [2, 7]
    committed, draft_unseen, target_unseen = prompt, prompt, prompt
    outcomes = []
    for round_index in range(12):
        key, key_draft, key_verify = mx.random.split(key, 3)
        draft_tokens, q_draft = decoder.draft_generation(
            mx.array(draft_unseen), K, temperature, key_draft if temperature > 0 else None
        )
        inputs = mx.array(target_unseen + draft_tokens.tolist(), dtype=mx.int32)
        logits = decoder.target_model(inputs[None], cache=decoder.target_cache)[0, -(K + 1):]
        n, tokens = ref.verify.verify_speculation(
            draft_tokens, logits, q_draft, temperature, key_verify if temperature > 0 else None
        )
        outcomes.append(n)
        where = f"{pair} at temperature {temperature}, round {round_index + 1} (n={n} of K={K})"
        committed, draft_unseen = check_commit(
            impl, decoder, committed, draft_tokens.tolist(), n, tokens[-1], where
        )
        target_unseen = [tokens[-1]]
    # The setup itself: these pairs must exercise the cases the test claims to cover.
    if pair == "llama-identical":
        assert outcomes == [K] * len(outcomes), "test setup: an identical draft is always accepted"
    else:
        assert any(0 < n < K for n in outcomes) and 0 in outcomes, f"test setup: outcomes {outcomes}"


def filled_layer(layer, num_tokens: int):
    """A cache layer that has stored `num_tokens` (all-zero) keys and values, no model needed."""
    kv = mx.zeros((1, 1, num_tokens, 4))
    layer.update_and_fetch(kv, kv)
    return layer


def wrapped_rotating(num_tokens: int = 12):
    """A sliding-window layer of 8 that has seen 12 tokens: is_trimmable() is False."""
    layer = filled_layer(RotatingKVCache(max_size=8), num_tokens)
    assert not layer.is_trimmable()  # the premise
    return layer


def short_chunked(num_tokens: int = 12):
    """A ChunkedKVCache (Llama 4's local layers) that kept only its last 2 tokens: it reports
    is_trimmable() True, but trim(3) drops only 2."""
    layer = filled_layer(ChunkedKVCache(chunk_size=2), num_tokens)
    layer.maybe_trim_front()
    assert layer.is_trimmable() and layer.offset - layer.start_position == 2  # the premise
    return layer


@pytest.mark.parametrize(
    "role, make_layer",
    [("target", wrapped_rotating), ("target", short_chunked), ("draft", wrapped_rotating), ("draft", short_chunked)],
    ids=["target-wrapped", "target-short-trim", "draft-wrapped", "draft-short-trim"],
)
def test_task_1_commit_round_refuses_a_cache_it_cannot_trim(impl, ref, use_ref, markov_models, role, make_layer):
    """The contract: ValueError if a cache cannot be trimmed by the amount needed. mlx-lm's
    trim_prompt_cache trims NOTHING and returns 0 when a layer is not trimmable, and a layer's
    trim(n) may drop fewer than n: both must be caught, or the next round decodes with rejected
    drafts still in the cache."""
    use_ref(*EARLIER_TASKS)
    decoder = ref.draft.SpeculativeDecoder(*markov_models, 4)
    draft_tokens, new_token = [1, 2, 3, 4], 5
    # n = 0: the target must drop 4 tokens, the draft 3; each bad layer holds fewer than that.
    good_target = [filled_layer(KVCache(), 12)]
    good_draft = [filled_layer(KVCache(), 11)]
    bad = [make_layer(), make_layer()]
    decoder.target_cache, decoder.draft_cache = (bad, good_draft) if role == "target" else (good_target, bad)
    needed = 4 if role == "target" else 3
    kind = (
        "a RotatingKVCache that has wrapped (is_trimmable() is False, so trim_prompt_cache trims "
        "nothing and returns 0)"
        if make_layer is wrapped_rotating
        else f"a ChunkedKVCache whose trim({needed}) drops only 2 tokens (compare what "
        "trim_prompt_cache returns with the amount needed)"
    )
    with raises(ValueError, f"n=0 of K=4 accepted: the {role} cache must drop {needed} tokens, but "
                f"its layers are {kind}. commit_round must raise ValueError instead of going on with "
                "rejected drafts in the cache — see book/src/week2-04-full-loop.md"):
        impl.speculative.commit_round(decoder, draft_tokens, 0, new_token)


# Task 2: speculative_generate -----------------------------------------------------------------------
def run_loop(impl, decoder, prompt, max_tokens, **kwargs):
    """The student's loop, fully consumed: (tokens, from_draft flags, stats)."""
    stats = kwargs.pop("stats", None) or SpecStats()
    out = list(
        impl.speculative.speculative_generate(
            decoder, mx.array(prompt, dtype=mx.int32), max_tokens, stats=stats, **kwargs
        )
    )
    return [int(t) for t, _ in out], [bool(f) for _, f in out], stats


def check_round_structure(flags, stats, where):
    """Each round yields n accepted drafts (True) then one target token (False), maybe cut short."""
    expected, emitted = [], 0
    for n in stats.accepted_per_round:
        expected += ([True] * n + [False])[: len(flags) - emitted]
        emitted = len(expected)
    assert flags == expected, (
        f"{where}: from_draft flags {flags} do not match the rounds' accepted counts "
        f"{stats.accepted_per_round}: each round yields its n accepted drafts (from_draft=True) "
        "and then the target's correction or bonus token (from_draft=False)"
    )


@pytest.mark.parametrize("pair", ["markov", "llama"])
def test_task_2_greedy_output_is_the_targets_greedy_output(
    impl, ref, use_ref, pair, markov_models, llama_models, identical_llama_models
):
    use_ref(*EARLIER_TASKS, "speculative.commit_round")
    draft, target = models_by_name(pair, markov_models, llama_models, identical_llama_models)
    for prompt in PROMPTS:
        greedy = mlx_lm_greedy(target, prompt, 33)
        for K in range(1, 9):
            for max_tokens in (33, 7, 1) if K in (1, 3, 8) else (33,):
                counted_draft, counted_target = CallCounter(draft), CallCounter(target)
                decoder = ref.draft.SpeculativeDecoder(counted_draft, counted_target, K)
                tokens, flags, stats = run_loop(impl, decoder, prompt, max_tokens)
                where = f"{pair}, prompt {prompt}, K={K}, max_tokens={max_tokens}"
                assert tokens == greedy[:max_tokens], (
                    f"{where}: at temperature 0 speculative decoding must reproduce the target's "
                    f"plain greedy output token for token.\n  greedy:      {greedy[:max_tokens]}"
                    f"\n  speculative: {tokens}\nCheck which tokens each model is fed per round "
                    "and the cache trims in commit_round"
                )
                assert stats.emitted == len(tokens), (
                    f"{where}: stats.emitted={stats.emitted} but {len(tokens)} tokens were yielded: "
                    "record_round(K, n, emitted) takes the tokens yielded in THIS round, not the "
                    "running total"
                )
                assert stats.rounds == counted_target.calls, (
                    f"{where}: stats.rounds={stats.rounds} but the target was called "
                    f"{counted_target.calls} times: one target call per round, record_round once each"
                )
                assert stats.draft_calls == counted_draft.calls, (
                    f"{where}: stats.draft_calls={stats.draft_calls} but the draft model was called "
                    f"{counted_draft.calls} times"
                )
                assert sum(flags) == stats.accepted, (
                    f"{where}: {sum(flags)} tokens were flagged from_draft=True but stats.accepted="
                    f"{stats.accepted}"
                )
                check_round_structure(flags, stats, where)
    # reset() first: the same decoder, reused, gives the same output again.
    decoder = ref.draft.SpeculativeDecoder(draft, target, 4)
    first, _, _ = run_loop(impl, decoder, PROMPTS[1], 20)
    again, _, _ = run_loop(impl, decoder, PROMPTS[1], 20)
    assert first == again, (
        "running the loop twice with the same decoder gave different outputs: "
        "speculative_generate must start with decoder.reset() (fresh caches for a new prompt)"
    )


def test_task_2_max_tokens_zero_yields_nothing(impl, ref, use_ref, markov_models):
    use_ref(*EARLIER_TASKS, "speculative.commit_round")
    draft, target = CallCounter(markov_models[0]), CallCounter(markov_models[1])
    decoder = ref.draft.SpeculativeDecoder(draft, target, 4)
    rounds_seen = []
    tokens, _, stats = run_loop(impl, decoder, [1, 2], 0, on_round=lambda k, n: rounds_seen.append((k, n)))
    assert tokens == [] and stats.rounds == 0 and stats.emitted == 0, (
        f"max_tokens=0 must yield nothing and run no round, got {tokens} in {stats.rounds} rounds"
    )
    assert (draft.calls, target.calls, rounds_seen) == (0, 0, []), (
        f"max_tokens=0 runs no round: no draft call, no target call, no on_round; got "
        f"{draft.calls} draft calls, {target.calls} target calls, on_round calls {rounds_seen}"
    )


class RecordingStats(SpecStats):
    """SpecStats that also keeps the arguments of every record_round call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int, int]] = []

    def record_round(self, num_drafted, num_accepted, num_emitted):
        self.calls.append((num_drafted, num_accepted, num_emitted))
        super().record_round(num_drafted, num_accepted, num_emitted)


@pytest.mark.parametrize("pair", ["markov", "llama-identical", "llama"])
def test_task_2_stops_right_after_eos_inside_an_accepted_block(
    impl, ref, use_ref, pair, markov_models, llama_models, identical_llama_models
):
    use_ref(*EARLIER_TASKS, "speculative.commit_round")
    draft, target = models_by_name(pair, markov_models, llama_models, identical_llama_models)
    K, prompt = 4, [3, 9, 2]
    greedy = mlx_lm_greedy(target, prompt, 40)
    # Find an EOS id whose first occurrence is an accepted draft: the round goes on after it.
    reference_out = list(
        ref.speculative.speculative_generate(
            ref.draft.SpeculativeDecoder(draft, target, K), mx.array(prompt), 40
        )
    )
    eos_at = next(
        (i for i, (t, from_draft) in enumerate(reference_out) if from_draft and t not in greedy[:i]),
        None,
    )
    assert eos_at is not None, f"test setup: no accepted draft token to use as EOS in {reference_out}"
    eos = greedy[eos_at]
    # The rounds of the full run, up to and including the one EOS cuts short (greedy: the same).
    full_stats = SpecStats()
    for _ in ref.speculative.speculative_generate(
        ref.draft.SpeculativeDecoder(draft, target, K), mx.array(prompt), 40, stats=full_stats
    ):
        pass
    expected_calls, emitted = [], 0
    for k, n in zip(full_stats.lookahead_per_round, full_stats.accepted_per_round):
        this_round = min(n + 1, eos_at + 1 - emitted)
        expected_calls.append((k, n, this_round))
        emitted += this_round
        if emitted == eos_at + 1:
            break
    decoder = ref.draft.SpeculativeDecoder(draft, target, K)
    rounds_seen = []
    tokens, flags, stats = run_loop(
        impl, decoder, prompt, 40, eos_token_ids=(eos,), stats=RecordingStats(),
        on_round=lambda k, n: rounds_seen.append((k, n)),
    )
    assert tokens == greedy[: eos_at + 1], (
        f"{pair}: with eos_token_ids=({eos},) generation must stop right after the first {eos} "
        f"(position {eos_at}), even though it sits inside an accepted block:\n  expected "
        f"{greedy[: eos_at + 1]}\n  got      {tokens}"
    )
    assert stats.emitted == len(tokens) and flags[-1], (
        f"{pair}: stats.emitted={stats.emitted} must count only the {len(tokens)} yielded tokens "
        "(the rest of the block is dropped), and the EOS here is an accepted draft (from_draft=True)"
    )
    assert stats.calls == expected_calls, (
        f"{pair}: record_round calls {stats.calls}, expected {expected_calls}: once per round "
        "(the round EOS cuts short included) as record_round(K, n, emitted) with K the drafts of "
        "that round, n verification's accepted count (even the drafts EOS cut off), and emitted "
        "the tokens yielded in THAT round — not a running total"
    )
    assert rounds_seen == [(k, n) for k, n, _ in expected_calls], (
        f"{pair}: on_round calls {rounds_seen}, expected {[(k, n) for k, n, _ in expected_calls]}: "
        "on_round(K, n) runs once per round, the last round cut short by EOS included, with "
        "verification's n"
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_task_2_stats_and_on_round(impl, ref, use_ref, temperature, markov_models):
    use_ref(*EARLIER_TASKS, "speculative.commit_round")
    draft, target = CallCounter(markov_models[0]), CallCounter(markov_models[1])
    decoder = ref.draft.SpeculativeDecoder(draft, target, 3)
    rounds_seen = []
    key = mx.random.key(5) if temperature > 0 else None
    tokens, flags, stats = run_loop(
        impl, decoder, [4, 1], 50, temperature=temperature, key=key,
        on_round=lambda k, n: rounds_seen.append((k, n)),
    )
    where = f"temperature {temperature}"
    assert len(tokens) == 50, f"{where}: max_tokens=50 without EOS must yield 50 tokens"
    assert stats.rounds == target.calls == len(rounds_seen), (
        f"{where}: {target.calls} target calls, stats.rounds={stats.rounds}, on_round called "
        f"{len(rounds_seen)} times — all three must be the number of rounds"
    )
    assert rounds_seen == list(zip(stats.lookahead_per_round, stats.accepted_per_round)), (
        f"{where}: on_round must be called once per round with (num_drafted, num_accepted): "
        f"got {rounds_seen}, stats say {list(zip(stats.lookahead_per_round, stats.accepted_per_round))}"
    )
    assert stats.drafted == sum(stats.lookahead_per_round) and stats.draft_calls == draft.calls, (
        f"{where}: stats.drafted={stats.drafted}, stats.draft_calls={stats.draft_calls}, draft "
        f"model calls {draft.calls}: record every round's K and count every draft forward call"
    )
    assert stats.emitted == 50 and stats.tokens_per_round == pytest.approx(50 / target.calls), (
        f"{where}: stats.emitted={stats.emitted} for 50 yielded tokens, tokens_per_round="
        f"{stats.tokens_per_round}: record_round(K, n, emitted) takes the tokens yielded in THIS "
        "round, not the running total"
    )
    check_round_structure(flags, stats, where)


def test_task_2_lookahead_is_read_every_round(impl, ref, use_ref, markov_models):
    use_ref(*EARLIER_TASKS, "speculative.commit_round")
    draft, target = markov_models
    decoder = ref.draft.SpeculativeDecoder(draft, target, 2)
    schedule = [5, 1, 7, 3, 8, 2, 6, 1, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]
    rounds_seen = []

    def on_round(k, n):  # Week 3's adaptive lookahead changes K exactly like this
        decoder.lookahead = schedule[len(rounds_seen)]
        rounds_seen.append((k, n))

    max_tokens = 40
    tokens, _, stats = run_loop(impl, decoder, [6, 2, 9], max_tokens, on_round=on_round)
    assert tokens == mlx_lm_greedy(target, [6, 2, 9], max_tokens), (
        "changing decoder.lookahead between rounds must not change the greedy output"
    )
    expected_k, emitted = [], 0
    for i, n in enumerate(stats.accepted_per_round):
        lookahead = 2 if i == 0 else schedule[i - 1]
        expected_k.append(max(1, min(lookahead, max_tokens - emitted - 1)))
        emitted += min(n + 1, max_tokens - emitted)
    assert stats.lookahead_per_round == expected_k, (
        f"K per round {stats.lookahead_per_round}, expected {expected_k}: read decoder.lookahead at "
        "the start of every round (on_round may change it) and cap K at "
        "max(1, min(lookahead, remaining - 1)) so no round drafts what max_tokens would cut off"
    )


def test_task_2_rejects_bad_inputs(impl, ref, use_ref, markov_models):
    use_ref(*EARLIER_TASKS, "speculative.commit_round")
    decoder = ref.draft.SpeculativeDecoder(*markov_models, 3)
    with raises(ValueError, "an empty prompt must be refused: speculative decoding needs at least "
                "one token (L >= 1)"):
        list(impl.speculative.speculative_generate(decoder, mx.array([], dtype=mx.int32), 5))
    with raises(ValueError, "temperature=1.0 without a key must be refused: pass "
                "key=mx.random.key(seed), never hidden global state"):
        list(impl.speculative.speculative_generate(decoder, mx.array([1, 2]), 5, temperature=1.0))


def test_task_2_streams_round_by_round(impl, ref, use_ref, identical_llama_models):
    use_ref(*EARLIER_TASKS, "speculative.commit_round")
    draft, target = identical_llama_models
    counted_target = CallCounter(target)
    decoder = ref.draft.SpeculativeDecoder(draft, counted_target, 4)
    stream = impl.speculative.speculative_generate(decoder, mx.array([1, 5, 7]), 30)
    first = next(stream)
    assert counted_target.calls == 1, (
        f"after the first token only the first round may have run, but the target was called "
        f"{counted_target.calls} times: yield a round's tokens as soon as it is verified"
    )
    rest = [first, *stream]
    assert [int(t) for t, _ in rest] == mlx_lm_greedy(target, [1, 5, 7], 30), (
        "the rest of the stream must continue the target's greedy output"
    )


def test_task_2_drafter_may_return_fewer_tokens(impl, ref, use_ref, llama_models):
    """A drafter may propose fewer than the K tokens asked for (Week 3's n-gram drafter does):
    the round uses the number it returned — for the target call, verification, commit_round,
    stats and on_round."""
    use_ref(*EARLIER_TASKS, "speculative.commit_round")
    draft, target = llama_models
    returned = []

    class ShortDrafter(ref.draft.SpeculativeDecoder):
        def draft_generation(self, prompt_tokens, num_tokens, temperature=0.0, key=None):
            num_tokens = min(num_tokens, 1 + len(returned) % 3)  # 1, 2, 3, 1, 2, 3, ...
            returned.append(num_tokens)
            return super().draft_generation(prompt_tokens, num_tokens, temperature, key)

    counted_draft, counted_target = CallCounter(draft), CallCounter(target)
    decoder = ShortDrafter(counted_draft, counted_target, 4)
    rounds_seen = []
    prompt = [3, 9, 2, 7]
    tokens, flags, stats = run_loop(impl, decoder, prompt, 30, on_round=lambda k, n: rounds_seen.append((k, n)))
    assert tokens == mlx_lm_greedy(target, prompt, 30), (
        f"with a drafter that returned {returned} tokens when asked for 4, the output must still be "
        "the target's greedy output: use draft_tokens.shape[0], not decoder.lookahead, for the "
        "target's rows, verification and commit_round"
    )
    assert stats.lookahead_per_round == returned and [k for k, _ in rounds_seen] == returned, (
        f"the drafter returned {returned} tokens per round; record_round and on_round must get "
        f"those counts, got {stats.lookahead_per_round} and {[k for k, _ in rounds_seen]}"
    )
    assert stats.draft_calls == counted_draft.calls and stats.rounds == counted_target.calls, (
        f"stats.draft_calls={stats.draft_calls} (draft model calls {counted_draft.calls}), "
        f"stats.rounds={stats.rounds} (target calls {counted_target.calls})"
    )
    check_round_structure(flags, stats, "a drafter returning fewer tokens")


# Sampling exactness -------------------------------------------------------------------------------
def exact_marginals(model: MarkovLM, prompt: list[int], num_tokens: int) -> list[np.ndarray]:
    """Distribution of each of the next `num_tokens` tokens after `prompt`, from the transitions."""
    transitions = np.array(model.transitions, dtype=np.float64)
    period, V = transitions.shape[0], transitions.shape[-1]
    dist = np.eye(V)[prompt[-1]]
    out = []
    for j in range(num_tokens):
        # The token read at absolute position len(prompt) - 1 + j picks the phase.
        dist = dist @ transitions[(len(prompt) - 1 + j) % period]
        out.append(dist)
    return out


def chi_square_p(samples: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit; cells with an expected count below 5 are pooled into one."""
    observed = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    expected = probs * len(samples)
    big = expected >= 5
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    expected *= observed.sum() / expected.sum()  # exact totals for scipy
    return scipy_stats.chisquare(observed, expected).pvalue


SAMPLING_PROMPT, NUM_SAMPLES, SAMPLED_TOKENS = [2, 5], 2000, 4


@pytest.fixture(scope="module")
def sampling_pair():
    """V = 8, period 3, a draft far from the target (acceptance ~ 0.5): rejections are common."""
    return markov_pair(vocab_size=8, seed=11, mix=0.6, period=3, concentration=0.5)


def test_task_2_samples_follow_the_targets_distribution(impl, ref, use_ref, sampling_pair):
    use_ref(*EARLIER_TASKS, "speculative.commit_round")
    draft, target = sampling_pair
    decoder = ref.draft.SpeculativeDecoder(draft, target, 2)
    keys = mx.random.split(mx.random.key(2024), NUM_SAMPLES)
    samples = np.array([
        run_loop(impl, decoder, SAMPLING_PROMPT, SAMPLED_TOKENS, temperature=1.0, key=keys[i])[0]
        for i in range(NUM_SAMPLES)
    ])  # [N, SAMPLED_TOKENS]: with K = 2 a run takes one or two rounds (the second with K = 1)
    assert samples.shape == (NUM_SAMPLES, SAMPLED_TOKENS)
    again = run_loop(impl, decoder, SAMPLING_PROMPT, SAMPLED_TOKENS, temperature=1.0, key=keys[0])[0]
    assert again == samples[0].tolist(), "the same key must give the same tokens (seeded sampling)"
    # Each test below has a false-alarm rate of 1e-3 (5 tests: at most 0.5% for a correct loop;
    # the seed is fixed, so the outcome is deterministic).
    for j, p_j in enumerate(exact_marginals(target, SAMPLING_PROMPT, SAMPLED_TOKENS)):
        p_value = chi_square_p(samples[:, j], p_j)
        assert p_value > 1e-3, (
            f"token {j + 1} of {NUM_SAMPLES} sampled outputs does not follow the target's exact "
            f"distribution (chi-square p = {p_value:.2e}). Speculative sampling must be exact: "
            "check the key splitting per round, the target rows used for verification, and the "
            "caches (the Markov toy's distributions depend on the position)"
        )
    # Joint law of the first two tokens: it catches a wrong row paired with a right marginal.
    transitions = np.array(target.transitions, dtype=np.float64)
    first = exact_marginals(target, SAMPLING_PROMPT, 1)[0]
    joint = first[:, None] * transitions[len(SAMPLING_PROMPT) % target.period]
    pairs = samples[:, 0] * target.vocab_size + samples[:, 1]
    p_value = chi_square_p(pairs, joint.reshape(-1))
    assert p_value > 1e-3, (
        f"the pair (token 1, token 2) does not follow the target's joint distribution "
        f"(chi-square p = {p_value:.2e})"
    )


def test_sampling_check_has_power(sampling_pair):
    """Negative control: the check above must reject a loop that simply emits the draft's samples."""
    draft, target = sampling_pair
    rng = np.random.default_rng(7)
    q = np.array(draft.transitions, dtype=np.float64)
    tokens = np.full(NUM_SAMPLES, SAMPLING_PROMPT[-1])
    p_values = []
    for j, p_j in enumerate(exact_marginals(target, SAMPLING_PROMPT, SAMPLED_TOKENS)):
        rows = q[(len(SAMPLING_PROMPT) - 1 + j) % draft.period, tokens]
        tokens = (rows.cumsum(-1) > rng.random((NUM_SAMPLES, 1))).argmax(-1)
        p_values.append(chi_square_p(tokens, p_j))
    assert max(p_values) < 1e-6, (
        f"draft-only samples should fail the target check decisively, p-values {p_values}: "
        "the sampling test needs a draft that differs more from the target"
    )
