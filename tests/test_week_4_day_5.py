"""Week 4 Day 5 — serving with continuous batching: find_stop (task 1), prefill_request (task 2),
Scheduler.admit (task 3), Scheduler.commit_round (task 4: a round's bookkeeping), Scheduler.step
(task 5: the round itself); and the kit's HTTP server (test_server_*).

Tasks 4 and 5 are graded through the same scenarios: a task 4 test runs your commit_round under
the reference's step, a task 5 test runs your step over the reference's commit_round.

Book: book/src/week4-05-serving.md. Grade with
    pytest tests/test_week_4_day_5.py --impl student -k task_1

The task tests run the scheduler in-process on toy models. The server tests (`test_server_*`)
start `python -m specdec.kit.server` on 127.0.0.1 and talk to it with the `openai` client and
raw HTTP. They test the kit's HTTP layer on top of the implementation under test: with
`--impl student` the server runs your scheduler, with the reference standing in for the tasks
you have not finished (so they grade your finished code and never fail on an unfinished task).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from scipy import stats as scipy_stats

from specdec.kit.models import markov_pair, tiny_llama_pair
from support import BATCHED_FOUNDATIONS, assert_close, mlx_lm_greedy, raises, start_server, stop_server

# What the scheduler stands on: graded elsewhere, taken from the reference here.
EARLIER_TASKS = BATCHED_FOUNDATIONS
TASK_1, TASK_2, TASK_3 = "serving.find_stop", "serving.prefill_request", "serving.Scheduler.admit"
TASK_4, TASK_5 = "serving.Scheduler.commit_round", "serving.Scheduler.step"
BEFORE_4 = (*EARLIER_TASKS, TASK_1, TASK_2, TASK_3)

def fresh_next_logits(model, tokens: list[int]) -> np.ndarray:
    cache = make_prompt_cache(model)
    return np.array(model(mx.array(tokens, dtype=mx.int32)[None], cache=cache)[0, -1])


def check_invariant(scheduler) -> None:
    """Between rounds every row's caches hold C[:-1] (target) and C[:-2] (draft)."""
    lengths = [len(r.prompt) + len(r.output) for r in scheduler.rows]
    if not lengths:
        return
    target = scheduler.target_cache[0].offset.tolist()
    assert target == [n - 1 for n in lengths], (
        f"after a step, the target cache must hold each row's C[:-1] (C = prompt + output): "
        f"offsets {[n - 1 for n in lengths]}, got {target}. Roll back K - n_i per row after keep_rows")
    if scheduler.draft_cache is not None:
        draft = scheduler.draft_cache[0].offset.tolist()
        assert draft == [n - 2 for n in lengths], (
            f"after a step, the draft cache must hold each row's C[:-2]: offsets "
            f"{[n - 2 for n in lengths]}, got {draft}. Roll back the draft cache too; in a plain "
            "round feed it the first unseen token")


def run_all(scheduler, arrivals: dict[int, list], check: bool = False) -> int:
    """Step until done; arrivals[s] = requests submitted just before step s. Returns the steps."""
    steps = 0
    while scheduler.has_work or any(s >= steps for s in arrivals):
        for request in arrivals.pop(steps, []):
            scheduler.submit(request)
        scheduler.step()
        if check:
            check_invariant(scheduler)
        steps += 1
        assert steps < 5000, "the scheduler never finished: rows that are done must leave"
    return steps


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.choice([1, 1, 2, 3, 6, 19, 41]))] for _ in range(n)]


# Task 1: find_stop --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, stop, want", [
    ("hello world", ["wor"], (6, True)),
    ("hello world", ["zz", "o w", "l"], (2, True)),  # the earliest occurrence of any stop string
    ("hello wo", ["world"], (6, False)),  # "wo" may become "world": hold it back
    ("hello w", ["xyz", "w!", "world"], (6, False)),
    ("abcab", ["abcabd"], (0, False)),  # the whole text is a prefix of the stop string
    ("hello", ["x"], (5, False)),
    ("hello", [], (5, False)),
    ("", ["ab"], (0, False)),
    ("aaa", ["ab"], (2, False)),  # only the suffix "a" is a prefix of "ab"
])
def test_task_1_find_stop(impl, text, stop, want):
    got = impl.serving.find_stop(text, stop)
    assert tuple(got) == want, (
        f"find_stop({text!r}, {stop!r}) should be {want}: a stop string found cuts the text where "
        "its earliest occurrence starts (stopped=True); otherwise hold back the longest suffix "
        f"that could still grow into a stop string; got {got}"
    )


def test_task_1_find_stop_refuses_empty_stop_string(impl):
    with raises(ValueError, "an empty stop string would match everywhere: refuse it with a "
                "ValueError"):
        impl.serving.find_stop("hello", ["lo", ""])


# Task 2: prefill_request --------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 2, 3, 8])
def test_task_2_prefill_reaches_the_invariant(impl, use_ref, llama_models, length):
    use_ref(*EARLIER_TASKS)
    draft, target = llama_models
    prompt = [(11 * i + 5) % 64 for i in range(length)]
    draft_cache, target_cache = impl.serving.prefill_request(draft, target, prompt)
    assert all(isinstance(c, BatchKVCache) for c in draft_cache + target_cache), (
        "both caches must be per-layer lists of one-row BatchKVCache (make_batch_cache), so they "
        "can join the running batch"
    )
    assert target_cache[0].offset.tolist() == [length - 1], (
        f"prompt of {length} tokens: the target cache must hold P[:-1], offset {length - 1}; got "
        f"{target_cache[0].offset.tolist()}"
    )
    want_draft = [length - 2] if length >= 2 else [-1]
    assert draft_cache[0].offset.tolist() == want_draft, (
        f"prompt of {length} tokens: the draft cache must hold P[:-2] (offset {want_draft}; a "
        "1-token prompt gets one padding slot: left_padding [1], offset -1); got "
        f"{draft_cache[0].offset.tolist()}"
    )
    # The next round feeds 1 token to the target and 2 to the draft: both must predict P's next.
    logits = target(mx.array([prompt[-1:]], dtype=mx.int32), cache=target_cache)[0, -1]
    assert_close(logits, fresh_next_logits(target, prompt), (
        f"prompt of {length} tokens: after prefill_request, feeding the target P[-1] must give "
        "the logits of the whole prompt"))
    unseen = ([0] + prompt)[-2:]
    logits = draft(mx.array([unseen], dtype=mx.int32), cache=draft_cache)[0, -1]
    assert_close(logits, fresh_next_logits(draft, prompt), (
        f"prompt of {length} tokens: after prefill_request, feeding the draft {unseen} (the last "
        "two tokens, [PAD_ID, P[0]] for one token) must give the logits of the whole prompt — "
        "the padding slot must be masked (left_padding) and P[0] at position 0"))


def test_task_2_prefill_without_draft_and_empty_prompt(impl, use_ref, llama_models):
    use_ref(*EARLIER_TASKS)
    draft, target = llama_models
    draft_cache, target_cache = impl.serving.prefill_request(None, target, [3, 4, 5])
    assert draft_cache is None, "plain serving (draft_model None) has no draft cache: return None"
    assert target_cache[0].offset.tolist() == [2], "the target cache holds P[:-1]"
    with raises(ValueError, "an empty prompt has no token to start from: refuse it"):
        impl.serving.prefill_request(draft, target, [])


# Task 3: admit -------------------------------------------------------------------------------------
def test_task_3_admit_joins_up_to_max_batch(impl, use_ref, llama_models):
    use_ref(*EARLIER_TASKS, TASK_2)
    draft, target = llama_models
    S = impl.serving
    scheduler = S.Scheduler(target, draft, lookahead=3, max_batch=3)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 9], [4, 4, 4, 4, 4, 4, 4, 4], [5, 6, 7]]
    seeds = [9001 + 37 * i for i in range(len(prompts))]  # never the admission index
    requests = [scheduler.submit(S.Request(p, max_tokens=4, seed=s)) for p, s in zip(prompts, seeds)]
    requests[1].cancel()
    events = scheduler.admit()
    assert [e.request for e in events] == [requests[1]] and events[0].finish_reason == "cancelled", (
        "a request cancelled while waiting is not prefilled: admit returns its Event with "
        f"finish_reason 'cancelled'; got {[(e.request.prompt, e.finish_reason) for e in events]}"
    )
    assert scheduler.rows == [requests[0], requests[2], requests[3]], (
        "admit takes waiting requests oldest first while len(rows) < max_batch (3 here), "
        f"skipping cancelled ones; rows are now {[r.prompt for r in scheduler.rows]}"
    )
    assert list(scheduler.waiting) == [requests[4]], "the request that did not fit keeps waiting"
    assert scheduler.target_cache[0].offset.tolist() == [4, 1, 7], (
        "the running target cache must hold every row's P[:-1] (offsets [4, 1, 7]) after the "
        f"rows join (join_caches); got {scheduler.target_cache[0].offset.tolist()}"
    )
    assert scheduler.draft_cache[0].offset.tolist() == [3, 0, 6], (
        f"the running draft cache must hold every row's P[:-2]; got {scheduler.draft_cache[0].offset.tolist()}"
    )
    for r in scheduler.rows:
        assert r.key is not None and np.array_equal(np.array(r.key), np.array(mx.random.key(r.seed))), (
            f"each admitted request gets its own key, mx.random.key(request.seed) (seed {r.seed}), "
            "never one derived from the admission order or the row index"
        )


def test_task_3_admit_isolates_a_failing_prefill(impl, use_ref, llama_models):
    use_ref(*EARLIER_TASKS, TASK_2)
    draft, target = llama_models

    class Fragile:
        """The target, except that it raises on any input holding token 13."""

        def __call__(self, inputs, cache=None):
            if 13 in np.array(inputs).tolist()[0]:
                raise RuntimeError("token 13 is cursed")
            return target(inputs, cache=cache)

        def __getattr__(self, name):
            return getattr(target, name)

    S = impl.serving
    scheduler = S.Scheduler(Fragile(), draft, lookahead=2, max_batch=4)
    good = scheduler.submit(S.Request([1, 2, 3], max_tokens=3))
    bad = scheduler.submit(S.Request([13, 13, 13, 13], max_tokens=3))
    also_good = scheduler.submit(S.Request([5, 6], max_tokens=3))
    events = scheduler.admit()
    assert [(e.request, e.finish_reason) for e in events] == [(bad, "error")], (
        "a request whose prefill raises fails alone: its Event has finish_reason 'error', and "
        f"admission goes on; got {[(e.request.prompt, e.finish_reason) for e in events]}"
    )
    assert bad.error and "cursed" in bad.error, "request.error must carry the exception's message"
    assert scheduler.rows == [good, also_good], "the other requests still join the batch"


# Tasks 4 and 5: commit_round and step ----------------------------------------------------------------
@pytest.fixture(scope="module")
def staggered_case(llama_models):
    """36 prompts (1 to 41 tokens), their max_tokens, and their solo greedy outputs."""
    prompts = random_prompts(36, 64, seed=1)
    rng = random.Random(2)
    max_tokens = [rng.choice([1, 2, 5, 9, 16]) for _ in prompts]
    return prompts, max_tokens, [mlx_lm_greedy(llama_models[1], p, m) for p, m in zip(prompts, max_tokens)]


def continuous_batching_is_exact(impl, llama_models, staggered_case, mode):
    """>= 32 requests of many lengths, joining at different steps: each is its solo greedy output."""
    draft, target = llama_models
    S = impl.serving
    prompts, max_tokens, want = staggered_case
    scheduler = S.Scheduler(target, draft if mode == "speculative" else None, lookahead=3, max_batch=6)
    requests = [S.Request(p, max_tokens=m, temperature=0.0) for p, m in zip(prompts, max_tokens)]
    arrivals: dict[int, list] = {}
    for i, request in enumerate(requests):
        arrivals.setdefault(i // 3 + (i % 3) * 2, []).append(request)
    run_all(scheduler, arrivals, check=True)
    for i, (request, w) in enumerate(zip(requests, want)):
        assert request.output == w, (
            f"{mode}, request {i} (prompt of {len(request.prompt)} tokens, max_tokens "
            f"{request.max_tokens}): at temperature 0 a request's output must be exactly its solo "
            f"greedy output, whoever shares its batch: expected {w}, got {request.output}. Check "
            "the unseen tokens ([PAD_ID, C[0]] for 1-token sequences), per-row rollback of K - n_i "
            "after keep_rows, and that finished rows leave"
        )
        assert request.finish_reason == "length", f"request {i} ended by max_tokens: 'length'"
        assert request.stats.emitted == len(request.output), (
            f"{mode}, request {i}: record_round(K, n, emitted) with emitted = the tokens emit() "
            f"actually appended (a round cut short by max_tokens emits fewer than n + 1): its stats "
            f"count {request.stats.emitted} emitted tokens, its output has {len(request.output)}")
    assert scheduler.rows == [] and scheduler.target_cache is None, "when all are done no row remains"
    if mode == "speculative":
        assert scheduler.stats.drafted > 0, "with a draft model and lookahead 3 the rounds must draft"


@pytest.mark.parametrize("mode", ["speculative", "plain"])
def test_task_4_continuous_batching_is_exact(impl, use_ref, llama_models, staggered_case, mode):
    use_ref(*BEFORE_4, TASK_5)
    continuous_batching_is_exact(impl, llama_models, staggered_case, mode)


@pytest.mark.parametrize("mode", ["speculative", "plain"])
def test_task_5_continuous_batching_is_exact(impl, use_ref, llama_models, staggered_case, mode):
    use_ref(*BEFORE_4, TASK_4)
    continuous_batching_is_exact(impl, llama_models, staggered_case, mode)


class ScriptedController:
    """Stands in for Week 4 Day 3's FallbackController: K follows a script (0 = a plain round)."""

    def __init__(self, script: list[int]):
        self.script, self.updates = script, []

    @property
    def lookahead(self) -> int:
        return self.script[len(self.updates) % len(self.script)]

    def update(self, num_drafted, num_accepted, draft_time_s=None, verify_time_s=None):
        self.updates.append((num_drafted, num_accepted))
        return self.lookahead


def test_task_5_controller_rounds_and_plain_rounds(impl, use_ref, llama_models):
    """With a controller, K changes every round, 0 included: the draft must stay in step."""
    use_ref(*BEFORE_4, TASK_4)
    draft, target = llama_models
    S = impl.serving
    controller = ScriptedController([0, 3, 0, 0, 2, 1, 4])
    scheduler = S.Scheduler(target, draft, lookahead=3, max_batch=4, controller=controller)
    prompts = random_prompts(10, 64, seed=4)
    requests = [S.Request(p, max_tokens=9) for p in prompts]
    steps = run_all(scheduler, {2 * i: [r] for i, r in enumerate(requests)}, check=True)
    for i, r in enumerate(requests):
        assert r.output == mlx_lm_greedy(target, r.prompt, 9), (
            f"request {i}: with K chosen by the controller (0 = plain round) the output must still "
            "be the solo greedy output")
    kinds = {k for k, _ in controller.updates}
    assert len(controller.updates) == steps and 0 in kinds and max(kinds) > 0, (
        f"record_round (controller.update) once per step with that step's K: {steps} steps, "
        f"{len(controller.updates)} updates, Ks {sorted(kinds)}")
    assert sum(r.stats.rounds for r in requests) == scheduler.stats.rounds, (
        "every row-round is recorded in its request's stats and in the scheduler's stats")


def test_task_5_identical_draft_is_always_accepted(impl, use_ref):
    """A draft equal to the target proposes exactly the target's tokens: only a draft cache out
    of step (wrong unseen tokens, a missed rollback, a misaligned joined row) can reject one."""
    use_ref(*BEFORE_4, TASK_4)
    draft, target = tiny_llama_pair(seed=0, noise=0.0)
    S = impl.serving
    prompts = random_prompts(16, 64, seed=3)
    scheduler = S.Scheduler(target, draft, lookahead=3, max_batch=5)
    requests = [S.Request(p, max_tokens=7 + i % 5) for i, p in enumerate(prompts)]
    run_all(scheduler, {i: [r] for i, r in enumerate(requests)})
    assert scheduler.stats.drafted > 0 and scheduler.stats.accepted == scheduler.stats.drafted, (
        f"with a draft identical to the target every draft must be accepted, but "
        f"{scheduler.stats.drafted - scheduler.stats.accepted} of {scheduler.stats.drafted} were "
        "rejected: the draft cache is out of step. Feed the draft the last two committed tokens "
        "([PAD_ID, C[0]] for a 1-token sequence) and roll back both caches by K - n_i"
    )


def test_task_4_events_eos_stop_and_cancel(impl, use_ref, llama_models):
    use_ref(*BEFORE_4, TASK_5)
    draft, target = llama_models
    S = impl.serving
    prompt = [3, 1, 4, 1, 5]
    solo = mlx_lm_greedy(target, prompt, 12)
    eos = next(t for j, t in enumerate(solo) if j >= 5 and t not in solo[:j])  # first seen late
    decode = lambda tokens: "".join(chr(65 + t % 26) for t in tokens)  # noqa: E731
    scheduler = S.Scheduler(target, draft, lookahead=3, max_batch=4, eos_token_ids=[eos], decode=decode)
    stopped_by_eos = scheduler.submit(S.Request(prompt, max_tokens=12))
    stop_text = decode(solo[2:4])
    stopped_by_text = scheduler.submit(S.Request(prompt, max_tokens=12, stop=[stop_text]))
    cancelled = scheduler.submit(S.Request([9, 8, 7], max_tokens=40))
    bystander = scheduler.submit(S.Request([2, 7, 1, 8], max_tokens=20))
    texts, finishes = {}, {}
    steps = 0
    while scheduler.has_work:
        for event in scheduler.step():
            texts[id(event.request)] = texts.get(id(event.request), "") + event.text
            if event.finish_reason is not None:
                finishes[id(event.request)] = event.finish_reason
        steps += 1
        if steps == 2:
            cancelled.cancel()
        assert steps < 500, "the scheduler never finished"
    cut = solo.index(eos) + 1
    assert stopped_by_eos.output == solo[:cut] and finishes[id(stopped_by_eos)] == "stop", (
        f"a row stops right after an EOS token (finish_reason 'stop'): expected {solo[:cut]}, "
        f"got {stopped_by_eos.output} ({finishes.get(id(stopped_by_eos))})"
    )
    assert texts[id(stopped_by_eos)] == decode(solo[: cut - 1]), "the EOS token is not part of the text"
    want_text = decode(solo)[: decode(solo).find(stop_text)]
    assert len(want_text) < cut - 1, "test setup: the stop string comes before the EOS"
    assert finishes[id(stopped_by_text)] == "stop" and texts[id(stopped_by_text)] == want_text, (
        f"a stop string ends the request (finish_reason 'stop') and is cut from its text: expected "
        f"{want_text!r}, got {texts.get(id(stopped_by_text))!r} ({finishes.get(id(stopped_by_text))})"
    )
    assert finishes[id(cancelled)] == "cancelled" and len(cancelled.output) < 40, (
        "a cancelled request leaves at the next step with finish_reason 'cancelled'"
    )
    alone = mlx_lm_greedy(target, [2, 7, 1, 8], 20)
    alone = alone[: alone.index(eos) + 1] if eos in alone else alone
    assert bystander.output == alone, (
        "the rows that leave (EOS, stop string, cancelled) must not disturb the others: the "
        "bystander's output must stay its solo greedy output"
    )


@pytest.fixture(scope="module")
def markov_serving_models():
    return markov_pair(vocab_size=12, seed=5, mix=0.5, period=3)


def test_task_5_seeded_sampling_ignores_batch_mates(impl, use_ref, markov_serving_models):
    """A request's randomness is its own: same seed, same tokens, alone or in a crowd."""
    use_ref(*BEFORE_4, TASK_4)
    draft, target = markov_serving_models
    S = impl.serving

    def run(crowd: bool) -> list[int]:
        scheduler = S.Scheduler(target, draft, lookahead=3, max_batch=8)
        me = S.Request([4, 7], max_tokens=40, temperature=1.0, seed=99)
        arrivals = {0: [me]}
        if crowd:
            for i in range(6):  # they join at different steps and leave long before `me` ends
                arrivals.setdefault(i // 2, []).append(
                    S.Request([i % 12] * (1 + i), max_tokens=4 + i, temperature=0.5 + 0.2 * i, seed=i))
        run_all(scheduler, arrivals)
        return me.output

    alone, crowded = run(False), run(True)
    assert alone == crowded, (
        "at temperature > 0 a request must draw only from its own key (mx.random.key(seed), split "
        "three ways each round), so its tokens do not depend on which requests share its batch: "
        f"alone {alone}, with others {crowded}"
    )


def test_task_4_sampled_rows_follow_the_target(impl, use_ref, markov_serving_models):
    """Mixed batch: sampled rows are distributed as the target; greedy rows stay exact.

    Chi-square test of the 4th output token's marginal over 400 seeded requests; the seeds are
    fixed, so the result is deterministic; a correct implementation fails with probability 1e-3.
    """
    use_ref(*BEFORE_4, TASK_5)
    draft, target = markov_serving_models
    S = impl.serving
    scheduler = S.Scheduler(target, draft, lookahead=3, max_batch=16)
    start, N, T = 4, 400, 0.8
    sampled = [S.Request([start], max_tokens=4, temperature=T, seed=1000 + i) for i in range(N)]
    greedy = [S.Request([start, i % 12], max_tokens=6, temperature=0.0) for i in range(12)]
    arrivals: dict[int, list] = {}
    for i, r in enumerate(sampled):
        arrivals.setdefault(i // 8, []).append(r)
    for i, r in enumerate(greedy):
        arrivals.setdefault(5 * i, []).append(r)
    run_all(scheduler, arrivals)
    for r in greedy:
        assert r.output == mlx_lm_greedy(target, r.prompt, 6), (
            "a greedy row sharing its batch with sampled rows must still be exactly greedy")
    # Exact marginal of output token 3 (absolute position 4): chain the tempered transitions.
    p = np.array(target.transitions, dtype=np.float64) ** (1 / T)
    p = p / p.sum(-1, keepdims=True)
    dist = np.eye(12)[start]
    for position in range(4):
        dist = dist @ p[position % 3]
    counts = np.bincount([r.output[3] for r in sampled], minlength=12)
    expected = dist * N
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    p_value = scipy_stats.chi2.sf(chi2, keep.sum() - 1)
    assert p_value > 1e-3, (
        f"sampled rows are not distributed as the target at temperature {T} (chi-square p = "
        f"{p_value:.2e}): observed {counts.tolist()}, expected {np.round(dist * N, 1).tolist()}. "
        "Verify each row with its own temperature and key, and give verify_speculation the q "
        "the drafts were drawn from"
    )


def test_task_4_accepted_counts_and_shared_padding(impl, use_ref, llama_models):
    """commit_round returns each row's n (what the controller is told) and, once every row pads
    SHARED_PADDING_LIMIT columns (rollbacks free columns at the front), slices them off."""
    use_ref(*BEFORE_4, TASK_5)
    draft, target = llama_models
    S = impl.serving
    controller = ScriptedController([4])
    scheduler = S.Scheduler(target, draft, lookahead=4, max_batch=2, controller=controller)
    requests = [scheduler.submit(S.Request(p, max_tokens=90)) for p in ([1, 2, 3], [7, 7])]
    most = 0
    while scheduler.has_work:
        scheduler.step()
        check_invariant(scheduler)
        if scheduler.rows:
            padding = min(scheduler.target_cache[0].left_padding.tolist())
            most = max(most, padding)
            assert padding < S.SHARED_PADDING_LIMIT, (
                f"every row pads {padding} >= SHARED_PADDING_LIMIT ({S.SHARED_PADDING_LIMIT}) columns "
                "after commit_round: when that happens, filter_rows(cache, all rows) on both caches "
                "slices the shared padding off (the rows' rollbacks keep adding to it)")
    rejected = scheduler.stats.drafted - scheduler.stats.accepted
    assert rejected >= 2 * S.SHARED_PADDING_LIMIT, f"test setup: only {rejected} drafts were rejected"
    for K, accepted in controller.updates:
        assert 1 <= K <= 4 and len(accepted) in (1, 2) and all(0 <= n <= K for n in accepted), (
            f"commit_round returns accepted = [n_b for every row b of the round], 0 <= n_b <= K: "
            f"the controller was told {accepted} for K = {K}")
    told = sum(sum(accepted) for _, accepted in controller.updates)
    assert told == scheduler.stats.accepted == sum(r.stats.accepted for r in requests), (
        f"the accepted counts commit_round returns ({told} in all) must be the n it recorded in the "
        f"request's and the scheduler's stats ({scheduler.stats.accepted})")


def test_task_5_a_cancelled_row_leaves_at_the_next_step(impl, use_ref, llama_models):
    """A request cancelled while it runs leaves at the start of the next step, with its Event;
    the others go on, exactly."""
    use_ref(*BEFORE_4, TASK_4)
    draft, target = llama_models
    S = impl.serving
    scheduler = S.Scheduler(target, draft, lookahead=3, max_batch=4)
    prompts = [[3, 1, 4], [1], [5, 9, 2, 6]]
    requests = [scheduler.submit(S.Request(p, max_tokens=12)) for p in prompts]
    scheduler.step()
    scheduler.step()
    requests[1].cancel()
    events = scheduler.step()
    cancelled = [e for e in events if e.request is requests[1]]
    assert [e.finish_reason for e in cancelled] == ["cancelled"], (
        "a running request that was cancelled leaves at the next step: that step returns its Event "
        f"with finish_reason 'cancelled'; got {[(e.tokens, e.finish_reason) for e in cancelled]}")
    assert requests[1] not in scheduler.rows and requests[1].finish_reason == "cancelled", (
        "the cancelled row leaves the batch before the round (keep_rows), so it decodes no more")
    run_all(scheduler, {}, check=True)
    for r in (requests[0], requests[2]):
        assert r.output == mlx_lm_greedy(target, r.prompt, 12), (
            f"the rows that stay after a cancellation must finish with their solo greedy output: "
            f"{r.prompt} got {r.output}")


def test_task_5_round_seconds_come_from_the_clock(impl, use_ref, llama_models, monkeypatch):
    """record_round gets the draft seconds (drafting, up to the drafts evaluated; a plain round's
    draft feed) and the verify seconds (the target call and commit_round), both read with
    time.perf_counter. A fake clock that only the models move makes them exact: each draft call
    takes 1 s, each target call 10 s, admission's prefill happens before the round."""
    use_ref(*BEFORE_4, TASK_4)
    draft, target = llama_models
    S = impl.serving
    clock = [0.0]

    class Timed:
        def __init__(self, model, seconds: float):
            self.model, self.seconds = model, seconds

        def __call__(self, *args, **kwargs):
            clock[0] += self.seconds
            return self.model(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.model, name)

    class TimedController(ScriptedController):
        def update(self, num_drafted, num_accepted, draft_time_s=None, verify_time_s=None):
            self.seconds = getattr(self, "seconds", []) + [(num_drafted, draft_time_s, verify_time_s)]
            return super().update(num_drafted, num_accepted, draft_time_s, verify_time_s)

    fake = lambda: clock[0]  # noqa: E731
    monkeypatch.setattr(S, "time", type("FakeTime", (), {"perf_counter": staticmethod(fake)}))
    if hasattr(S, "perf_counter"):  # `from time import perf_counter` works too
        monkeypatch.setattr(S, "perf_counter", fake)
    controller = TimedController([2, 0, 3])
    scheduler = S.Scheduler(Timed(target, 10.0), Timed(draft, 1.0), lookahead=3, max_batch=2,
                            controller=controller)
    scheduler.submit(S.Request([1, 2, 3], max_tokens=30))
    for _ in range(6):
        scheduler.step()
    want = [(K, float(K) if K else None, 10.0) for K in [2, 0, 3, 2, 0, 3]]
    got = controller.seconds
    assert got == want, (
        f"each round's (K, draft seconds, verify seconds) as the controller sees them: expected "
        f"{want} (a draft call takes 1 s, a target call 10 s), got {got}. Read "
        "time.perf_counter() before drafting, after the drafts are evaluated (a plain round's "
        "draft feed counts as drafting), and after commit_round; admission is not timed")
    assert scheduler.stats.draft_time_s == pytest.approx(2 + 1 + 3 + 2 + 1 + 3), (
        f"draft seconds of a plain round count too (its draft feed): {scheduler.stats.draft_time_s}")


# Server tests (kit HTTP layer over the implementation under test) ------------------------------------
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role[0] }}: {{ m.content }}\n{% endfor %}a:"
CONTEXT = 256


@pytest.fixture(scope="module")
def server(request):
    """A real `python -m specdec.kit.server` on 127.0.0.1 with the toy llamas; always terminated."""
    proc, base = start_server(request.config.getoption("--impl"), "--no-fallback", "--max-batch", "8",
                              "--chat-template", CHAT_TEMPLATE, context=CONTEXT)
    try:
        yield base
    finally:
        stop_server(proc)


def post(base: str, path: str, body, timeout: float = 30) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(base: str, path: str) -> str:
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return r.read().decode()


def client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)


def toy_text(tokens: list[int]) -> str:
    from specdec.kit.server import CharTokenizer

    return CharTokenizer().decode(tokens)


def test_server_openai_client_sync_stream_chat(server, llama_models):
    _, target = llama_models
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["toy-llama"], "GET /v1/models lists the model"
    prompt = "speculative decoding"
    from specdec.kit.server import CharTokenizer

    want = toy_text(mlx_lm_greedy(target, CharTokenizer().encode(prompt), 24))
    done = c.completions.create(model="toy-llama", prompt=prompt, max_tokens=24, temperature=0)
    assert done.choices[0].text == want and done.choices[0].finish_reason == "length", (
        f"POST /v1/completions at temperature 0 must return the greedy text {want!r}, got "
        f"{done.choices[0].text!r}")
    assert done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens == 24
    spec = done.model_extra["speculative"]
    assert {"drafted", "accepted", "acceptance_rate", "tokens_per_target_call", "lookahead",
            "fallback_rounds"} <= set(spec) and spec["drafted"] > 0 and spec["lookahead"] == 3, (
        f"every response carries a `speculative` object; got {spec}")
    chunks = list(c.completions.create(model="toy-llama", prompt=prompt, max_tokens=24,
                                       temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want and len(chunks) > 1, (
        "stream: true must send the same text in several SSE chunks")
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 24
    tokens = [int(t) for t in CharTokenizer().encode("hi")]
    by_ids = c.completions.create(model="toy-llama", prompt=tokens, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == toy_text(mlx_lm_greedy(target, tokens, 5)), (
        "a prompt may be a list of token ids")
    chat = c.chat.completions.create(model="toy-llama", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=8, temperature=0)
    chat_prompt = CharTokenizer().encode("u: hi\na:")
    assert chat.choices[0].message.content == toy_text(mlx_lm_greedy(target, chat_prompt, 8)), (
        "chat completions apply the chat template to the messages")
    streamed = c.chat.completions.create(model="toy-llama", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == chat.choices[0].message.content
    stopped = c.completions.create(model="toy-llama", prompt=prompt, max_tokens=24, temperature=0,
                                   stop=[want[5:8]])
    assert stopped.choices[0].text == want[: want.find(want[5:8])], (
        "a stop string ends the completion and is not returned")
    assert stopped.choices[0].finish_reason == "stop"
    health = json.loads(get(server, "/health"))
    assert health["status"] == "ok"
    metrics = get(server, "/metrics")
    assert "specdec_spec_decode_num_accepted_tokens_total" in metrics, "GET /metrics is Prometheus text"


def test_server_concurrent_requests_are_exact(server, llama_models):
    """32 requests from 8 threads at once, temperature 0: each returns its solo greedy output."""
    _, target = llama_models
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 5, 12, 30]))) for _ in range(32)]
    max_tokens = [rng.choice([1, 3, 8, 20]) for _ in prompts]
    from specdec.kit.server import CharTokenizer

    tok = CharTokenizer()
    want = [toy_text(mlx_lm_greedy(target, tok.encode(p), m)) for p, m in zip(prompts, max_tokens)]
    got: dict[int, str] = {}
    errors: list[str] = []
    c = client(server)

    def worker(t: int) -> None:
        for i in range(t, len(prompts), 8):
            try:
                if i % 2:
                    r = c.completions.create(model="toy-llama", prompt=prompts[i],
                                             max_tokens=max_tokens[i], temperature=0)
                    got[i] = r.choices[0].text
                else:
                    stream = c.completions.create(model="toy-llama", prompt=prompts[i],
                                                  max_tokens=max_tokens[i], temperature=0, stream=True)
                    got[i] = "".join(ch.choices[0].text for ch in stream)
            except Exception as e:  # noqa: BLE001
                errors.append(f"request {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, f"concurrent requests failed: {errors[:3]}"
    wrong = [i for i in range(len(prompts)) if got.get(i) != want[i]]
    assert not wrong, (
        f"{len(wrong)} of 32 concurrent requests differ from their solo greedy output, e.g. "
        f"request {wrong[0]} ({prompts[wrong[0]]!r}): expected {want[wrong[0]]!r}, got "
        f"{got.get(wrong[0])!r}. Continuous batching must not change any row's tokens"
    )


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "toy-llama", "prompt": ', 400, "body"),
    ({"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "toy-llama", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "toy-llama", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "toy-llama", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"model": "toy-llama", "prompt": ""}, 400, "prompt"),
    ({"model": "toy-llama", "prompt": []}, 400, "prompt"),
    ({"model": "toy-llama", "prompt": [1, 2, 999]}, 400, "prompt"),
    ({"model": "toy-llama", "prompt": "a" * (CONTEXT + 10)}, 400, "prompt"),
    ({"model": "toy-llama", "prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"model": "toy-llama", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": "toy-llama", "prompt": "hi", "n": 3}, 400, "n"),
])
def test_server_bad_input_is_a_4xx_naming_the_field(server, body, status, param):
    code, answer = post(server, "/v1/completions", body)
    assert code == status and answer.get("error", {}).get("param") == param, (
        f"bad input {body!r} must get HTTP {status} with an OpenAI-style error naming "
        f"{param!r}; got {code} {answer}")
    assert answer["error"]["message"], "the error says what is wrong"
    code, answer = post(server, "/v1/completions", {"model": "toy-llama", "prompt": "ok", "max_tokens": 2})
    assert code == 200 and len(answer["choices"][0]["text"]) == 2, "the server keeps serving after bad input"


def test_server_chat_without_messages_or_template(server):
    code, answer = post(server, "/v1/chat/completions", {"model": "toy-llama", "messages": []})
    assert code == 400 and answer["error"]["param"] == "messages"
    from specdec.kit.server import APIError, CharTokenizer, TextCodec, Validator

    validator = Validator(TextCodec(CharTokenizer()), "toy-llama", 64, CONTEXT, 16)
    with raises(APIError, "a tokenizer without a chat template cannot serve chat: a clear 400",
                match="chat template") as caught:
        validator.chat({"model": "toy-llama", "messages": [{"role": "user", "content": "hi"}]})
    assert caught.value.status == 400 and caught.value.param == "messages"


def test_server_disconnect_frees_the_row(server):
    def cancelled_count() -> float:
        for line in get(server, "/metrics").splitlines():
            if line.startswith('specdec_requests_total{finish_reason="cancelled"}'):
                return float(line.split()[-1])
        return 0.0

    before = cancelled_count()
    body = json.dumps({"model": "toy-llama", "prompt": "x", "max_tokens": CONTEXT - 2,
                       "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(server + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(req, timeout=30)
    assert response.readline().startswith(b"data: "), "the stream starts with an SSE data line"
    response.close()  # the client goes away mid-stream
    deadline = time.time() + 20
    while cancelled_count() < before + 1:
        assert time.time() < deadline, (
            "a client that disconnects must free its row: the request should end as 'cancelled'")
        time.sleep(0.1)
    assert json.loads(get(server, "/health"))["running"] == 0, "no row is left running"


# Day 5 key discipline (issue 19): keys from the seed and the row's progress, never reused ---------
def chi_square_p(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square p-value, cells with expected < 5 pooled into one."""
    counts, expected = counts.ravel(), expected.ravel()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    return float(scipy_stats.chi2.sf(chi2, keep.sum() - 1))


def test_task_5_later_tokens_follow_the_joint_law(impl, use_ref, markov_serving_models):
    """Tokens 2 and 3 of 1,280 seeded requests at lookahead 1: their joint law is the target's.

    A row that reuses its keys (never advanced, or the same keys every round) draws the same
    noise for consecutive tokens: each token's marginal can look right while pairs do not. The
    seeds are fixed, so the result is deterministic; a correct implementation fails with
    probability 1e-3 (the chi-square threshold), whatever order it splits its keys in.
    """
    use_ref(*BEFORE_4, TASK_4)
    draft, target = markov_serving_models
    S = impl.serving
    start, N, T = 4, 1280, 1.0
    scheduler = S.Scheduler(target, draft, lookahead=1, max_batch=64)
    requests = [S.Request([start], max_tokens=3, temperature=T, seed=7919 * i + 13) for i in range(N)]
    run_all(scheduler, {k: requests[64 * k: 64 * (k + 1)] for k in range(N // 64 + 1)})
    p = np.array(target.transitions, dtype=np.float64)
    first = np.eye(12)[start] @ p[0]  # output token 0 (position 1)
    second = first @ p[1]  # output token 1 (position 2)
    joint = second[:, None] * p[2]  # (output 1, output 2)
    counts = np.zeros((12, 12))
    for r in requests:
        counts[r.output[1], r.output[2]] += 1
    p_value = chi_square_p(counts, joint * N)
    assert p_value > 1e-3, (
        f"output tokens 1 and 2 (lookahead 1, T = {T}) are not jointly distributed as the target "
        f"(chi-square p = {p_value:.1e}): a row must draw fresh numbers every round. Take each "
        "round's keys from self.round_keys(request) — derived from its seed and len(output) — never "
        "the same key twice (e.g. splitting request.key without replacing it)")


def test_task_5_seeded_sampling_ignores_admission_order(impl, use_ref, markov_serving_models):
    """The same seeded request, admitted first or fourth, in any order: the same tokens."""
    use_ref(*BEFORE_4, TASK_4)
    draft, target = markov_serving_models
    S = impl.serving

    def run(before: int) -> list[int]:
        scheduler = S.Scheduler(target, draft, lookahead=2, max_batch=8)
        others = [S.Request([i % 12, 3], max_tokens=30, temperature=0.9, seed=555 + 101 * i)
                  for i in range(before)]
        me = S.Request([4, 7], max_tokens=30, temperature=0.9, seed=2024)
        run_all(scheduler, {0: others + [me]})
        return me.output

    alone, fourth = run(0), run(3)
    assert alone == fourth, (
        "a seeded request's tokens must not depend on when it was admitted or which row it took: "
        f"alone {alone}, admitted after 3 others {fourth}. Its key is mx.random.key(request.seed), "
        "and each round's keys come from self.round_keys(request) — never from the admission "
        "order, the row index or a counter of the scheduler")


def test_task_4_a_failing_row_fails_alone(impl, use_ref, llama_models):
    """One request whose round raises: it ends with 'error'; its batch-mates finish exactly."""
    use_ref(*BEFORE_4, TASK_5)
    draft, target = llama_models
    S = impl.serving

    class PoisonedStops(tuple):
        """Stop strings that raise when read: emit() fails for this request only."""

        def __iter__(self):
            raise RuntimeError("poisoned stop strings")

    decode = lambda tokens: "".join(chr(65 + t % 26) for t in tokens)  # noqa: E731
    scheduler = S.Scheduler(target, draft, lookahead=3, max_batch=4, decode=decode)
    good = [scheduler.submit(S.Request(p, max_tokens=10)) for p in ([1, 2, 3], [9, 9])]
    bad = S.Request([5, 6, 7], max_tokens=10, stop=PoisonedStops(("x",)))
    scheduler.waiting.insert(1, bad)  # past submit's checks, between the good ones
    finishes = {}
    steps = 0
    while scheduler.has_work:
        try:
            events = scheduler.step()
        except NotImplementedError:
            raise
        except Exception as error:  # noqa: BLE001
            pytest.fail(f"step() raised {type(error).__name__}: {error} — one failing request never "
                        "fails another: in commit_round, catch what verifying or emitting a row "
                        "raises, end that request alone (finish(request, 'error', message)) and go "
                        "on with the others")
        for event in events:
            if event.finish_reason is not None:
                finishes[id(event.request)] = event.finish_reason
        check_invariant(scheduler)
        steps += 1
        assert steps < 200, "the scheduler never finished"
    assert finishes.get(id(bad)) == "error" and "poisoned" in (bad.error or ""), (
        "a request whose round raises (here in emit) must end alone with finish_reason 'error' and "
        f"the message in request.error; got {finishes.get(id(bad))!r}, {bad.error!r}")
    for r in good:
        assert r.output == mlx_lm_greedy(target, r.prompt, 10) and finishes[id(r)] == "length", (
            "one failing request never fails another: its batch-mates must finish with their solo "
            f"greedy output; {r.prompt} got {r.output} ({finishes.get(id(r))})")


COUPLING = ("coupling.gumbel_noise", "coupling.gumbel_sample", "coupling.seeded_generate",
            "coupling.coupled_draft", "coupling.verify_coupled")


def test_task_4_coupled_rows_are_plain_seeded_decoding(impl, use_ref, ref, markov_serving_models):
    """A row with the coupled rule (a seeded server request) gets exactly `seeded_generate`'s
    tokens, whatever K the controller picks (0 included) and whoever shares its batch. The Markov
    pair's logits are table lookups, exact on every backend."""
    use_ref(*BEFORE_4, TASK_5, *COUPLING)
    draft, target = markov_serving_models
    S = impl.serving
    seeds, T = [3, 77, 2024], 0.9
    want = {s: list(ref.coupling.seeded_generate(target, mx.array([4, 7]), 25, s, temperature=T))
            for s in seeds}
    for script in ([3], [0, 2, 4, 0, 1]):
        scheduler = S.Scheduler(target, draft, lookahead=4, max_batch=8,
                                controller=ScriptedController(list(script)))
        mine = [S.Request([4, 7], max_tokens=25, temperature=T, seed=s, sampling=S.COUPLED) for s in seeds]
        mates = [S.Request([1, 2, 3], max_tokens=9, temperature=0.7, seed=5),  # rejection sampling
                 S.Request([9], max_tokens=30),  # greedy
                 S.Request([6, 6], max_tokens=12, temperature=1.3, top_p=0.8, seed=8, sampling=S.COUPLED)]
        run_all(scheduler, {0: mine[:1] + mates[:1], 2: mine[1:], 3: mates[1:]})
        for s, r in zip(seeds, mine):
            assert r.output == want[s], (
                f"a coupled row (seed {s}, K script {script}, with batch-mates) must emit exactly the "
                f"tokens of plain seeded decoding {want[s]}, got {r.output}. Verify every row with "
                "self.verify_row(request, target_logits[b], draft_tokens[b], q_draft[b]) — it asks the "
                "row's sampling rule — never verify_speculation or sample_token directly")
        assert mates[1].output == mlx_lm_greedy(target, [9], 30), (
            "a greedy row beside coupled rows must stay exactly greedy")


def test_task_5_coupled_identical_draft_is_always_accepted(impl, use_ref, markov_serving_models):
    """With the target as its own draft, a coupled row's drafts use the noise its rule verifies
    with, so every draft is accepted (the Markov pair's logits are exact on every backend)."""
    use_ref(*BEFORE_4, TASK_4, *COUPLING)
    target = markov_serving_models[1]
    S, T = impl.serving, 0.9
    scheduler = S.Scheduler(target, target, lookahead=3, max_batch=4)
    same = S.Request([4, 7], max_tokens=13, temperature=T, seed=11, sampling=S.COUPLED)
    run_all(scheduler, {0: [same, S.Request([5], max_tokens=13, temperature=0.8, seed=2)]})
    assert same.stats.drafted > 0 and same.stats.accepted == same.stats.drafted, (
        f"with the target as its own draft a coupled row must accept every draft, accepted "
        f"{same.stats.accepted}/{same.stats.drafted}: draft row b with noise b = "
        "self.draft_noise(request, K), the same noise its rule verifies with (draft noise different "
        "from the target's?)")
