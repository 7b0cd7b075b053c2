"""Week 4 Day 4 — fallback: loops that never lose. Chapter: book/src/week4-04-fallback-loops.md

Task 1: fallback_generate (K = 0 rounds, exact across switches, faults survived)
Task 2: batched_fallback_decode (one K for the batch)

The controller is Day 3's (tests/test_week_4_day_3.py); here it is a scripted stand-in
(`ScheduleController`) or the reference's, so a Day 3 you have not finished never blocks these
tasks. The provided fault handling (specdec/kit/fallback_policy.py) has its own kit tests in
tests/test_fallback_policy.py.

Grade one task with
    pytest tests/test_week_4_day_4.py --impl student -k task_1
No assertion depends on how long anything took: K follows a script (or, in one test, the
reference controller, whose choices change the speed, never the tokens).
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache
from scipy import stats as scipy_stats

from specdec.kit.models import markov_pair, tiny_llama_pair
from specdec.kit.stats import SpecStats
from support import BATCHED_FOUNDATIONS, CallCounter, forced, mlx_lm_greedy, raises

CHAPTER = "book/src/week4-04-fallback-loops.md"
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
EARLIER_WEEKS = BATCHED_FOUNDATIONS + (
    "speculative.commit_round", "draft.SpeculativeDecoder.__init__",
    "draft.SpeculativeDecoder.draft_generation",
)
OOM = "[metal::malloc] Unable to allocate 1073741824 bytes"


# Task 1: the single-stream loop -------------------------------------------------------------------
class ScheduleController:
    """A controller that ignores the evidence: K follows `schedule` round by round (cycling)."""

    needs_draft_step = False

    def __init__(self, schedule):
        self.schedule, self.i, self.updates, self.faults = list(schedule), 0, [], []

    @property
    def lookahead(self):
        return self.schedule[self.i % len(self.schedule)]

    def update(self, num_drafted, num_accepted, draft_time_s=None, verify_time_s=None):
        self.updates.append((num_drafted, num_accepted, draft_time_s, verify_time_s))
        self.i += 1
        return self.lookahead

    def observe_prefill(self, num_tokens, seconds):
        self.prefill = (num_tokens, seconds)
        self.i += 1

    def observe_draft_step(self, seconds):
        return self.lookahead

    def report(self, message):
        self.faults.append(message)

    def disable_draft(self, reason):
        self.faults.append(reason)
        self.schedule, self.i = [0], 0

    def memory_pressure(self):
        self.faults.append("memory")
        self.schedule = [min(k, 1) for k in self.schedule]
        return True


SCHEDULES = [[0, 0, 3, 0, 1, 2, 0, 0, 0, 5], [4, 0, 1], [0]]


def run_single(impl, ref, models, controller, prompt=PROMPT, max_tokens=40, **kwargs):
    draft, target = models
    decoder = ref.draft.SpeculativeDecoder(draft, target, lookahead=2)
    return list(impl.fallback.fallback_generate(decoder, controller, mx.array(prompt), max_tokens, **kwargs))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["mixed", "spec-first", "plain"])
@pytest.mark.parametrize("pair", ["llama", "markov"])
def test_task_1_greedy_equals_plain_across_switches(impl, ref, use_ref, pair, schedule, llama_models, markov_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    models = {"llama": llama_models, "markov": markov_models}[pair]
    expected = mlx_lm_greedy(models[1], PROMPT, 40)
    controller, stats = ScheduleController(schedule), SpecStats()
    out = run_single(impl, ref, models, controller, stats=stats)
    got = [t for t, _ in out]
    assert got == expected, (
        f"{pair}, K schedule {schedule}: the output must be the target's greedy output token for "
        f"token whatever K the controller picks, 0 (plain) included.\n got      {got}\n expected "
        f"{expected}\nAfter plain rounds the draft cache lags: feed it every unseen token ({CHAPTER})"
    )
    ks = stats.lookahead_per_round
    assert stats.emitted == 40 and len(ks) == stats.rounds
    plain_rounds = [u for u in controller.updates if u[0] == 0]
    assert sum(k == 0 for k in ks) == len(plain_rounds) + (schedule[0] == 0), (
        "every plain round is recorded as stats.record_round(0, 0, 1) and reported as "
        "controller.update(0, 0, None, seconds) — except the prompt's own call, which goes to "
        "observe_prefill"
    )
    if schedule[0] == 0:
        assert controller.prefill[0] == len(PROMPT), "observe_prefill(L, seconds) for the prompt's call"
    assert all(u[3] is not None and u[3] >= 0 for u in controller.updates), "every round is timed"


def test_task_1_calls(impl, ref, use_ref, llama_models):
    """Plain rounds cost one target call and no draft call; the draft catches up in one call."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    draft, target = CallCounter(llama_models[0]), CallCounter(llama_models[1])
    schedule = [0, 0, 0, 0, 2, 0, 0, 0, 3]
    controller, stats = ScheduleController(schedule), SpecStats()
    run_single(impl, ref, (draft, target), controller, max_tokens=30, stats=stats)
    ks = stats.lookahead_per_round
    assert target.calls == stats.rounds, (
        f"one target call per round, plain or speculative: {target.calls} calls for {stats.rounds} rounds"
    )
    assert draft.calls == sum(ks), (
        f"the draft runs only in speculative rounds, K calls each (sum K = {sum(ks)}), got "
        f"{draft.calls}: catch up on the tokens of the plain rounds inside the first draft call, "
        "not one call per token"
    )
    assert [k for k, _, _, _ in controller.updates if k] == [k for k in ks if k], (
        "controller.update(K, n, ...) after every speculative round, with the K actually drafted"
    )


def test_task_1_the_draft_catches_up(impl, ref, use_ref):
    """A draft equal to the target accepts every greedy draft, if it has seen every token."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    stats = SpecStats()
    run_single(impl, ref, tiny_llama_pair(seed=0, noise=0.0), ScheduleController([0, 0, 0, 3, 0, 0, 4]),
               max_tokens=40, stats=stats)
    assert stats.drafted > 0 and stats.accepted == stats.drafted, (
        f"an identical draft rejected {stats.drafted - stats.accepted} of {stats.drafted} drafts: "
        "after plain rounds, feed the draft every committed token its cache has not seen "
        f"(its offset tells how many it has) before drafting ({CHAPTER})"
    )


def test_task_1_never_drafts_what_it_cannot_emit(impl, ref, use_ref):
    """K = min(controller.lookahead, tokens still wanted - 1), with a draft that is always right."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    for max_tokens, want in [(8, [5, 1]), (6, [5]), (3, [2]), (14, [5, 5, 1])]:
        stats = SpecStats()
        got = run_single(impl, ref, tiny_llama_pair(seed=0, noise=0.0), ScheduleController([5]),
                         max_tokens=max_tokens, stats=stats)
        assert stats.lookahead_per_round == want, (
            f"max_tokens = {max_tokens}, the controller asks for K = 5 every round and every draft "
            f"is accepted: the rounds must draft {want}, got {stats.lookahead_per_round}. A round "
            "makes at most K + 1 tokens, so draft K = min(controller.lookahead, tokens still "
            f"wanted - 1): a draft token that cannot be emitted is wasted work ({CHAPTER})"
        )
        assert len(got) == max_tokens, f"max_tokens = {max_tokens}: exactly that many tokens, got {len(got)}"


def test_task_1_plain_rounds_are_pipelined(impl, ref, use_ref, llama_models, monkeypatch):
    """While the next round is plain too, its target call is queued before the token is handed out."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    queued = []
    real_async_eval = mx.async_eval

    def spy(*arrays):
        queued.append(len(arrays))
        return real_async_eval(*arrays)

    monkeypatch.setattr(mx, "async_eval", spy)
    target = CallCounter(llama_models[1])
    decoder = ref.draft.SpeculativeDecoder(llama_models[0], target, lookahead=2)
    stream = impl.fallback.fallback_generate(decoder, ScheduleController([0]), mx.array(PROMPT), 5)
    seen = []
    for i, _ in enumerate(stream):
        seen.append((target.calls, len(queued)))
    want_calls = [2, 3, 4, 5, 5]
    assert [calls for calls, _ in seen] == want_calls, (
        f"target calls made when each of 5 plain tokens was handed out: {[c for c, _ in seen]}, "
        f"expected {want_calls}: before yielding a plain token whose next round is plain too, "
        "build the next target call and queue it with mx.async_eval (as generate_tokens does), "
        f"so the next token computes while the consumer reads this one; none after the last ({CHAPTER})"
    )
    assert all(n >= i + 1 for i, (_, n) in enumerate(seen[:4])), (
        f"mx.async_eval calls seen at each token: {[n for _, n in seen]}: every queued plain step "
        "must be started with mx.async_eval, not left lazy until .item()"
    )


def test_task_1_a_catch_up_is_not_a_draft_step(impl, ref, use_ref, llama_models):
    """A draft that caught up on more than 2 tokens did not make K draft steps: no draft seconds."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    controller = ScheduleController([0, 0, 0, 2, 2, 0, 0, 2, 3])
    run_single(impl, ref, llama_models, controller, max_tokens=24)
    spec = [(k, d) for k, _, d, _ in controller.updates if k > 0]
    assert spec[:3] and spec[0][1] is None, (
        f"the first speculative round follows 3 plain rounds: its draft call also read the "
        f"{len(PROMPT)}-token prompt and 2 tokens, so its seconds are not K draft steps; report "
        f"draft_time_s=None (got {spec[0][1]}) ({CHAPTER})"
    )
    assert spec[1][1] is not None and spec[1][1] >= 0, (
        "a speculative round right after another fed the draft at most 2 unseen tokens: report its "
        f"draft seconds (got {spec[1][1]})"
    )
    assert spec[2][1] is None, (
        "after two plain rounds the draft lags by 3 tokens: a catch-up again, draft_time_s=None "
        f"(got {spec[2][1]})"
    )


def test_task_1_max_tokens_and_eos(impl, ref, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    expected = mlx_lm_greedy(llama_models[1], PROMPT, 30)
    for schedule in ([0], [5], [0, 3]):
        for n in (1, 2, 7):
            got = [t for t, _ in run_single(impl, ref, llama_models, ScheduleController(schedule), max_tokens=n)]
            assert got == expected[:n], f"schedule {schedule}, max_tokens={n}: exactly {n} tokens"
        eos = expected[9]
        first = expected.index(eos)
        got = [t for t, _ in run_single(impl, ref, llama_models, ScheduleController(schedule), eos_token_ids=[eos])]
        assert got == expected[: first + 1], f"schedule {schedule}: stop right after the first EOS"
    assert run_single(impl, ref, llama_models, ScheduleController([2]), max_tokens=0) == []
    with raises(ValueError, "an empty prompt is refused"):
        run_single(impl, ref, llama_models, ScheduleController([0]), prompt=[])
    with raises(ValueError, "temperature > 0 without a key is refused"):
        run_single(impl, ref, llama_models, ScheduleController([0]), temperature=1.0)


def exact_marginals(model, prompt, num_tokens):
    """The exact distribution of each of the first num_tokens tokens (Markov chain)."""
    transitions = np.array(model.transitions, dtype=np.float64)
    dist = np.eye(model.vocab_size)[prompt[-1]]
    out = []
    for j in range(num_tokens):
        dist = dist @ transitions[(len(prompt) - 1 + j) % model.period]
        out.append(dist)
    return out


def chi_square_p(samples, probs):
    """Chi-square goodness of fit; cells expected below 5 are pooled into one."""
    observed = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    expected = probs * len(samples)
    big = expected >= 5
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return scipy_stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


SAMPLING_PROMPT, NUM_SAMPLES, SAMPLED_TOKENS = [2, 5], 1200, 4


@pytest.fixture(scope="module")
def sampling_pair():
    """V = 8, period 3, a draft far from the target (acceptance ~ 0.5): rejections are common."""
    return markov_pair(vocab_size=8, seed=11, mix=0.6, period=3, concentration=0.5)


def test_task_1_samples_follow_the_target_across_switches(impl, ref, use_ref, sampling_pair):
    """Tokens 1-4 come from plain rounds, accepted drafts, corrections and bonus tokens, mixed."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    keys = mx.random.split(mx.random.key(77), NUM_SAMPLES)
    samples = []
    for i in range(NUM_SAMPLES):
        schedule = [[0, 2, 0, 1], [2, 0, 1], [0, 0, 1]][i % 3]
        out = run_single(impl, ref, sampling_pair, ScheduleController(schedule), SAMPLING_PROMPT,
                         SAMPLED_TOKENS, temperature=1.0, key=keys[i])
        samples.append([t for t, _ in out])
    samples = np.array(samples)
    # 5 tests at 1e-5 each: a correct loop fails with probability under 5e-5, whatever order it
    # splits its keys in (seeded: the outcome is also deterministic).
    for j, p_j in enumerate(exact_marginals(sampling_pair[1], SAMPLING_PROMPT, SAMPLED_TOKENS)):
        p_value = chi_square_p(samples[:, j], p_j)
        assert p_value > 1e-5, (
            f"token {j + 1} over {NUM_SAMPLES} sampled runs with forced switches does not follow "
            f"the target's distribution (chi-square p = {p_value:.1e}): a plain round samples "
            "make_probs(logits, T) with a fresh split of the key; a speculative round splits "
            "the key for drafting and verifying, as in Week 2"
        )
    first = exact_marginals(sampling_pair[1], SAMPLING_PROMPT, 1)[0]
    joint = first[:, None] * np.array(sampling_pair[1].transitions, dtype=np.float64)[len(SAMPLING_PROMPT) % 3]
    p_value = chi_square_p(samples[:, 0] * 8 + samples[:, 1], joint.reshape(-1))
    assert p_value > 1e-5, (
        f"the pair (token 1, token 2) does not follow the target's joint law (chi-square p = "
        f"{p_value:.1e}): consecutive plain rounds must each split the key, never reuse it"
    )


class FlakyModel(CallCounter):
    """A model that raises `error` on its calls number `on` (1-based).

    An allocation failure strikes while the call runs: the model has already written its new
    keys and values into the cache when it raises (a draft fault raises before).
    """

    def __init__(self, model, on, error):
        super().__init__(model)
        self.on, self.error = set(on), error

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.on:
            if "malloc" in str(self.error):
                self.model(*args, **kwargs)
            raise self.error
        return self.model(*args, **kwargs)


class StickyCache(KVCache):
    """A KVCache that refuses to roll back once it holds `limit` tokens (a wrapped window)."""

    limit = 14

    def is_trimmable(self):
        return self.offset < self.limit


class StickyModel(CallCounter):
    def make_cache(self):
        return [StickyCache() for _ in self.model.layers]


def fault_run(impl, ref, draft, target, schedule=(0, 0, 3, 2, 0, 4), **kwargs):
    controller = forced(ref, list(schedule))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [t for t, _ in run_single(impl, ref, (draft, target), controller, max_tokens=40, **kwargs)]
    return got, controller, caught


def test_task_1_survives_a_draft_that_raises(impl, ref, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    expected = mlx_lm_greedy(llama_models[1], PROMPT, 40)
    draft = FlakyModel(llama_models[0], on=[6], error=ValueError("draft weights went missing"))
    got, controller, caught = fault_run(impl, ref, draft, llama_models[1])
    assert got == expected, (
        "when the draft raises mid-generation, continue on the target alone: nothing emitted may "
        f"be lost or repeated.\n got      {got}\n expected {expected} ({CHAPTER})"
    )
    assert not controller.draft_ok and any("draft weights went missing" in f for f in controller.faults), (
        "report it: controller.disable_draft(reason) with the draft's error in the reason"
    )
    assert draft.calls == 6, "after the failure the draft is never called again"


@pytest.mark.parametrize("who", ["target", "draft"])
def test_task_1_memory_pressure_lowers_k_and_retries(impl, ref, use_ref, llama_models, who):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    expected = mlx_lm_greedy(llama_models[1], PROMPT, 40)
    draft, target = llama_models
    if who == "target":  # calls 1-3 are plain (prefill, then two queued steps); 4 verifies K = 3
        target = FlakyModel(target, on=[4, 5], error=RuntimeError(OOM))
    else:
        draft = FlakyModel(draft, on=[2], error=RuntimeError(OOM))
    try:
        got, controller, _ = fault_run(impl, ref, draft, target)
    except NotImplementedError:
        raise
    except Exception as error:
        pytest.fail(f"after an allocation failure in the {who} model the loop raised "
                    f"{type(error).__name__}({error}): in a K > 0 round, put both caches back to "
                    "their lengths before the round (the failed call may have written to them), "
                    "call controller.memory_pressure() and run the round again")
    assert got == expected, (
        f"an allocation failure in the {who} model must not lose or repeat tokens: put both caches "
        "back to their lengths before the round, lower K (controller.memory_pressure()) and run "
        f"the round again.\n got      {got}\n expected {expected}"
    )
    assert controller.cap < 8 and any("memory" in f for f in controller.faults), (
        "the failure must reach controller.memory_pressure()"
    )
    assert controller.draft_ok, "memory pressure is not a broken draft: keep speculating at a smaller K"


def test_task_1_memory_limit(impl, ref, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    expected = mlx_lm_greedy(llama_models[1], PROMPT, 40)
    got, controller, _ = fault_run(impl, ref, *llama_models, memory_limit_mb=1e-6)
    assert got == expected
    assert controller.cap == 0, (
        "memory_limit_mb: after every speculative round whose active memory (mx.get_active_memory) "
        "exceeds the limit, call memory_pressure(): K goes down to 0"
    )


def test_task_1_a_cache_that_cannot_roll_back(impl, ref, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    draft, target = llama_models
    expected = mlx_lm_greedy(target, PROMPT, 40)
    for schedule in ([0, 0, 3, 2, 0, 4], [2, 3]):  # wraps before a round / during one
        got, controller, caught = fault_run(impl, ref, draft, StickyModel(target), schedule)
        assert got == expected, (
            f"schedule {schedule}: a cache that cannot roll back must finish the request with plain "
            f"decoding, not an error nor a wrong token.\n got      {got}\n expected {expected}. A "
            "target cache left holding rejected drafts must be rebuilt from the committed tokens"
        )
        assert not controller.draft_ok and any("roll back" in f or "trim" in f for f in controller.faults), (
            "say so clearly: controller.disable_draft with a reason that names the rollback"
        )


def test_task_1_with_the_controller(impl, ref, use_ref, llama_models):
    """The real controller (the reference's) on tiny llamas: any decision, same tokens."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    expected = mlx_lm_greedy(llama_models[1], PROMPT, 40)
    controller, stats = ref.fallback.FallbackController(calibration_rounds=1), SpecStats()
    got = [t for t, _ in run_single(impl, ref, llama_models, controller, stats=stats)]
    assert got == expected
    assert stats.lookahead_per_round[0] == 0, "a fresh controller says K = 0 first (calibration)"
    assert controller.prefill is not None and controller.prefill[0] == len(PROMPT)
    assert controller.draft_step_s is not None, (
        "before the first draft round, time one draft call on a throwaway cache "
        "(controller.observe_draft_step) when controller.needs_draft_step"
    )


# Task 2: the batched loop -------------------------------------------------------------------------
BATCH = [[5], [1, 5, 7], [3, 9, 2, 7, 11, 4, 0, 6, 8], [2, 2]]


def run_batch(impl, models, controller, prompts=BATCH, max_tokens=24, **kwargs):
    draft, target = models
    return impl.fallback.batched_fallback_decode(
        [list(p) for p in prompts], draft, target, controller, max_tokens, **kwargs)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["mixed", "spec-first", "plain"])
@pytest.mark.parametrize("pair", ["llama", "markov"])
def test_task_2_rows_equal_plain_greedy(impl, use_ref, pair, schedule, llama_models, markov_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    models = {"llama": llama_models, "markov": markov_models}[pair]
    controller, stats = ScheduleController(schedule), SpecStats()
    got = run_batch(impl, models, controller, stats=stats)
    for i, prompt in enumerate(BATCH):
        expected = mlx_lm_greedy(models[1], prompt, 24)
        assert got[i] == expected, (
            f"{pair}, schedule {schedule}, row {i} (prompt length {len(prompt)}): each row must be "
            f"its prompt's greedy output.\n got      {got[i]}\n expected {expected}\nAfter m plain "
            "rounds every row's draft lags by m + 2 tokens: feed them in one [B, m + 2] call "
            f"({CHAPTER})"
        )
    spec = [u for u in controller.updates if u[0] > 0]
    assert all(isinstance(u[1], (list, tuple)) for u in spec), (
        "a batched round reports one accepted count per live row: update(K, [n_0, n_1, ...], ...)"
    )
    assert stats.emitted == 24 * len(BATCH)


def test_task_2_the_draft_catches_up(impl, use_ref):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    stats = SpecStats()
    run_batch(impl, tiny_llama_pair(seed=0, noise=0.0), ScheduleController([0, 0, 3, 0, 0, 0, 2]), stats=stats)
    assert stats.drafted > 0 and stats.accepted == stats.drafted, (
        f"an identical draft rejected {stats.drafted - stats.accepted} of {stats.drafted} drafts: "
        "after m plain rounds every row's draft lags by m + 2 tokens; feed all of them"
    )


class InputWidths(CallCounter):
    """A model that records how many tokens each of its calls was fed (the input's width)."""

    def __init__(self, model):
        super().__init__(model)
        self.widths = []

    def __call__(self, inputs, *args, **kwargs):
        self.widths.append(inputs.shape[1])
        return super().__call__(inputs, *args, **kwargs)


def test_task_2_the_draft_catches_up_on_a_window(impl, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    draft, target = llama_models
    window = impl.fallback.DRAFT_WINDOW
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, size=n).tolist() for n in (window + 30, window + 5, 7)]
    spy, lag = InputWidths(draft), window + 2  # plain rounds: then the draft lags window + 4 tokens
    schedule = [0, 2] + [0] * lag + [2] + [0] * 40
    got = impl.fallback.batched_fallback_decode(prompts, spy, target, ScheduleController(schedule), lag + 12)
    for i, prompt in enumerate(prompts):
        assert got[i] == mlx_lm_greedy(target, prompt, lag + 12), f"row {i}: not its greedy output"
    assert spy.widths == [window, 1, window, 1], (
        f"draft calls were fed {spy.widths} tokens wide; expected {[window, 1, window, 1]}: the draft's "
        f"first round sees each row's last DRAFT_WINDOW = {window} tokens (prompts of {window + 30} "
        f"and {window + 5} tokens would cost it their whole length), and after {lag} plain rounds "
        f"the lag ({lag} + 2) exceeds the window, so the draft cache is made again from the window "
        f"instead of catching up ({CHAPTER})"
    )


def test_task_2_a_catch_up_is_not_a_draft_step(impl, use_ref, llama_models):
    """Draft seconds are reported only when the draft was fed at most 2 tokens a row."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    controller = ScheduleController([0, 2, 2, 0, 2, 0, 0, 2])
    run_batch(impl, llama_models, controller, max_tokens=20)
    spec = [d for k, _, d, _ in controller.updates if k > 0]
    want = [None, "seconds", None, None]
    got = [None if d is None else "seconds" for d in spec[:4]]
    assert got == want, (
        f"draft_time_s per speculative round: {got}, expected {want}. The first draft round makes "
        "the draft cache from each row's window (a catch-up, not K draft steps: None); right after "
        "a speculative round every row's draft lags by 2 tokens (report the seconds); after m "
        f"plain rounds by m + 2 > 2 (None) ({CHAPTER})"
    )


def test_task_2_never_drafts_what_no_row_can_emit(impl, use_ref):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    stats = SpecStats()
    run_batch(impl, tiny_llama_pair(seed=0, noise=0.0), ScheduleController([5]), BATCH[:2], max_tokens=8,
              stats=stats)
    ks = sorted(set(stats.lookahead_per_round))
    assert ks == [1, 5], (
        f"every draft accepted, max_tokens = 8, the controller asks for K = 5: the batch drafts 5, "
        f"then min(5, 8 - 6 - 1) = 1; got K values {ks}. K = min(controller.lookahead, r - 1) "
        f"with r the most tokens a live row still needs ({CHAPTER})"
    )


def test_task_2_rows_leave_at_eos(impl, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    full = [mlx_lm_greedy(llama_models[1], p, 24) for p in BATCH]
    eos = full[1][5]
    got = run_batch(impl, llama_models, ScheduleController([0, 2, 0, 0, 3]), eos_token_ids=[eos])
    for i, row in enumerate(full):
        cut = row[: row.index(eos) + 1] if eos in row else row
        assert got[i] == cut, f"row {i} stops right after its first EOS ({eos}); the others go on"


def exact_pair(model, prompt, j):
    """The exact joint law of tokens j and j + 1 (0-based) after `prompt`, flattened [V * V]."""
    first = exact_marginals(model, prompt, j + 1)[j]
    step = np.array(model.transitions, dtype=np.float64)[(len(prompt) + j) % model.period]
    return (first[:, None] * step).reshape(-1)


# Each row's tokens 1-4 (marginals) and the pairs (1, 2), (2, 3), (3, 4) (joint laws), for two
# prompts: 14 chi-square tests at 1e-5 each, so a correct loop fails with probability under
# 1.4e-4 whatever its key discipline (any order of splits that never reuses a key gives another
# sample of the same law). Seeded, so the outcome is also deterministic.
BATCH_SAMPLING_ALPHA = 1e-5


def test_task_2_samples_follow_the_target_per_row(impl, use_ref, sampling_pair):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    copies, vocab = 1000, sampling_pair[1].vocab_size
    # Plain rounds back to back, then speculative rounds back to back: a key reused by either
    # kind of round shows in the pairs.
    for p, (prompt, schedule) in enumerate([([2, 5], [0, 0, 2, 0]), ([1, 3, 4], [0, 1, 1, 1])]):
        got = run_batch(impl, sampling_pair, ScheduleController(schedule), [prompt] * copies,
                        SAMPLED_TOKENS, temperature=1.0, key=mx.random.key(5 + p))
        samples = np.array(got)
        for j, probs in enumerate(exact_marginals(sampling_pair[1], prompt, SAMPLED_TOKENS)):
            p_value = chi_square_p(samples[:, j], probs)
            assert p_value > BATCH_SAMPLING_ALPHA, (
                f"prompt {prompt}, K schedule {schedule}, token {j + 1}: over {copies} rows the "
                f"tokens do not follow the target (chi-square p = {p_value:.1e}, threshold "
                f"{BATCH_SAMPLING_ALPHA:.0e}); each row samples with its own key, split every "
                "round, in plain rounds too"
            )
        for j in range(SAMPLED_TOKENS - 1):
            pairs = samples[:, j] * vocab + samples[:, j + 1]
            p_value = chi_square_p(pairs, exact_pair(sampling_pair[1], prompt, j))
            assert p_value > BATCH_SAMPLING_ALPHA, (
                f"prompt {prompt}, K schedule {schedule}, tokens ({j + 1}, {j + 2}): each token alone may look right, but "
                f"the pair does not follow the target's joint law (chi-square p = {p_value:.1e}): "
                "a key used for one draw is used again for another; split the row's key every "
                f"round, plain or speculative ({CHAPTER})"
            )


def test_task_2_faults(impl, ref, use_ref, llama_models):
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    draft, target = llama_models
    expected = [mlx_lm_greedy(target, p, 24) for p in BATCH]
    cases = {
        "draft raises": (FlakyModel(draft, [4], ValueError("draft lost")), target, [0, 2, 3], {}),
        "OOM in a speculative round": (draft, FlakyModel(target, [3], RuntimeError(OOM)), [0, 0, 3], {}),
        "OOM at K = 0 (halve the batch)": (draft, FlakyModel(target, [3, 4], RuntimeError(OOM)), [0], {}),
        "memory limit": (draft, target, [0, 2], dict(memory_limit_mb=1e-6)),
    }
    for name, (d, t, schedule, kwargs) in cases.items():
        controller = forced(ref, schedule)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            got = run_batch(impl, (d, t), controller, **kwargs)
        assert got == expected, (
            f"{name}: every row must still be its prompt's greedy output, nothing lost or "
            f"repeated.\n got      {got}\n expected {expected} ({CHAPTER})"
        )
        assert controller.faults, f"{name}: the fault must be reported through the controller"


def test_task_2_a_batch_reports_how_far_its_shortest_row_moved(impl, use_ref, markov_models, monkeypatch):
    """A batch ends when its last row does: each speculative round reports one count, d - 1,
    where d is how far the shortest live row's length moved (a row stopped by EOS is done)."""
    use_ref(*EARLIER_WEEKS, "fallback.is_out_of_memory")
    verified = []
    real_verify = impl.fallback.verify_speculation

    def spy(*args, **kwargs):
        n, tokens = real_verify(*args, **kwargs)
        verified.append(n)
        return n, tokens

    monkeypatch.setattr(impl.fallback, "verify_speculation", spy)
    max_tokens = 24
    free = run_batch(impl, markov_models, ScheduleController([0]), max_tokens=max_tokens)
    eos_token = free[0][9]  # a token the first row emits mid-way: rows stop at different times
    seen = {"drifted": False, "eos": False}
    for eos in ([], [eos_token]):
        verified.clear()
        controller = ScheduleController([0, 0, 3])
        outputs = run_batch(impl, markov_models, controller, max_tokens=max_tokens, eos_token_ids=eos)
        first = 1 if hasattr(controller, "prefill") else 0  # the prompts' plain call: one token each
        lengths, live, calls = [first] * len(BATCH), list(range(len(BATCH))), iter(verified)
        done = {r for r in live if first and outputs[r][0] in eos}

        def advance(r, gained):
            """Row r's length after gaining up to `gained` tokens (cut at max_tokens and EOS)."""
            new = outputs[r][lengths[r] : min(lengths[r] + gained, max_tokens)]
            cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            if new[cut - 1] in eos:
                done.add(r)
            return lengths[r] + cut

        live = [r for r in live if r not in done]
        for k, counts, _, _ in controller.updates:
            if k == 0:
                for r in list(live):
                    lengths[r] = advance(r, 1)
            else:
                ns = {r: next(calls) for r in live}
                behind = min(lengths[r] for r in live)
                seen["drifted"] |= len({lengths[r] for r in live}) > 1
                for r in live:
                    lengths[r] = advance(r, ns[r] + 1)
                lowest = min(max_tokens if r in done else lengths[r] for r in live)
                seen["eos"] |= any(r in done and lengths[r] < max_tokens for r in live)
                want = [min(lowest - behind, k + 1) - 1]
                assert list(counts) == want, (
                    f"a batched round drafting {k} (eos {eos}): the shortest of rows {live} held "
                    f"{behind} tokens before the round; after it the rows hold "
                    f"{[lengths[r] for r in live]} (accepted {[ns[r] for r in live]}, done "
                    f"{sorted(done & set(live))}), so the shortest live row moved d = "
                    f"{want[0] + 1}: report [d - 1] = {want}, not {list(counts)}. The batch ends "
                    f"when its last row does: that is the progress a round buys ({CHAPTER})"
                )
            live = [r for r in live if lengths[r] < max_tokens and r not in done]
    assert seen["drifted"], "the test needs rows that drift apart (check the Markov pair's acceptance)"
    assert seen["eos"], "the test needs a row stopped by EOS while others decode (check eos_token)"
