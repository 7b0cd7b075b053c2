"""Provided code: the coupled rule through draft faults (src/specdec/kit/coupled_faults.py).

Not a graded day: `coupled_generate_surviving_faults` is provided (Week 5 Day 1 meets Week 4 Day 3),
and these checks hold it to the day's promise: a draft that raises mid-request changes nothing in
the text — the output is plain seeded decoding's (`seeded_generate`), token for token — and the
fault is reported (the controller's `disable_draft`, or a FallbackWarning). Run with
    pytest tests/test_coupled_faults.py -q
The Markov pair's logits are table lookups, exact on every backend.
"""

import warnings

import mlx.core as mx
import pytest

from specdec.kit.coupled_faults import (GuardedDraft, batched_coupled_decode_surviving_faults,
                                        coupled_generate_surviving_faults,
                                        coupled_tree_generate_surviving_faults)
from specdec.kit.errors import FallbackWarning
from specdec.kit.stats import SpecStats
from test_week_5_day_1 import ScriptedController, first_difference, seeded

CHAPTER = "book/src/week5-01-drafter-invariant-sampling.md"
PROMPT = [1, 2, 3, 1, 2]
SEEDS = range(5)
FAILS_AT = 3


class FaultyDraft:
    """A draft model that works for its first FAILS_AT - 1 calls, then raises on every call."""

    def __init__(self, model, fails_at: int = FAILS_AT, error: type = RuntimeError):
        self.model, self.fails_at, self.error, self.calls = model, fails_at, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.fails_at:
            raise self.error(f"injected fault at draft call {self.calls}")
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)

    @property
    def __class__(self):  # a MarkovLM stays one for coupled_tree's isinstance check
        return self.model.__class__


class ReportingController(ScriptedController):
    """A scripted controller that records disable_draft and goes plain after it."""

    def __init__(self, script):
        super().__init__(script)
        self.reasons = []

    @property
    def lookahead(self) -> int:
        return 0 if self.reasons else super().lookahead

    def disable_draft(self, reason: str) -> None:
        self.reasons.append(reason)


def faulty_decoders(ref, draft, target, K):
    """Every single-stream drafter, each failing at its FAILS_AT-th draft call."""
    class FaultyNgram(ref.drafters.NgramDrafter):
        calls = 0

        def draft(self, *args, **kwargs):
            FaultyNgram.calls += 1
            if FaultyNgram.calls >= FAILS_AT:
                raise RuntimeError(f"injected fault at drafter call {FaultyNgram.calls}")
            return super().draft(*args, **kwargs)

    return {
        "SpeculativeDecoder": ref.draft.SpeculativeDecoder(FaultyDraft(draft), target, K),
        "ModelDrafter": ref.drafters.DrafterDecoder(ref.drafters.ModelDrafter(FaultyDraft(draft)),
                                                    target, K),
        "NgramDrafter": ref.drafters.DrafterDecoder(FaultyNgram(), target, K),
    }


def run(decoder, seed, max_tokens=24, controller=None, stats=None, eos=()):
    return list(coupled_generate_surviving_faults(
        decoder, mx.array(PROMPT, dtype=mx.int32), max_tokens, seed, 0.8, eos_token_ids=eos,
        controller=controller, stats=stats))


@pytest.mark.parametrize("K", [1, 2, 4])
def test_a_draft_fault_keeps_plain_seeded_text_and_is_reported(ref, markov_models, K):
    """K moves the fault: round 3 (K = 1), round 2 (K = 2) or the first round (K = 4)."""
    draft, target = markov_models
    for seed in SEEDS:
        want = seeded(ref, target, PROMPT, 24, seed, 0.8)
        for name, decoder in faulty_decoders(ref, draft, target, K).items():
            controller, stats = ReportingController([K]), SpecStats()
            out = run(decoder, seed, controller=controller, stats=stats)
            got = [token for token, _ in out]
            assert got == want, (
                f"{name}, K={K}, seed {seed}, draft failing at call {FAILS_AT}: "
                f"{first_difference(got, want)}. After a draft fault the rest is plain seeded "
                f"decoding from the committed sequence (prompt + tokens emitted), positions "
                f"included ({CHAPTER})")
            assert len(controller.reasons) == 1 and "injected fault" in controller.reasons[0], (
                f"{name}, K={K}: the fault must reach controller.disable_draft once, naming the "
                f"error; got {controller.reasons}")
            first_ok = stats.lookahead_per_round[0] > 0 or K >= FAILS_AT  # K = 4: fails in round 1
            assert first_ok and stats.lookahead_per_round[-1] == 0, (
                f"{name}, K={K}: speculative rounds before the fault, plain rounds (K = 0) after "
                f"it; stats recorded K per round {stats.lookahead_per_round}")
            assert stats.emitted == len(got), (
                f"stats count {stats.emitted} tokens, the run yielded {len(got)}")
            assert not any(from_draft for _, from_draft in out[-3:]), (
                "tokens after the fault are the target's (from_draft False)")
            draft_model = getattr(decoder, "draft_model", None) or getattr(decoder.drafter, "draft_model", None)
            assert not isinstance(draft_model, GuardedDraft) and "draft_generation" not in vars(decoder), (
                "the decoder must be left as it was given (its draft unwrapped)")


def test_a_draft_fault_reaches_the_real_fallback_controller(ref, markov_models):
    draft, target = markov_models
    want = seeded(ref, target, PROMPT, 24, 7, 0.8)
    controller = ref.fallback.FallbackController(max_lookahead=4, calibration_rounds=1)
    decoder = ref.draft.SpeculativeDecoder(FaultyDraft(draft, fails_at=1), target, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [token for token, _ in run(decoder, 7, controller=controller)]
    assert got == want, f"with a FallbackController: {first_difference(got, want)}"
    assert any("injected fault" in fault for fault in controller.faults), (
        f"the controller must record the fault it survived: faults {controller.faults}")
    assert controller.lookahead == 0, "after disable_draft the controller's K is 0 (plain)"
    assert any(issubclass(w.category, FallbackWarning) for w in caught), "faults are issued as FallbackWarning"


def test_a_draft_fault_without_a_controller_warns_and_stops_at_eos(ref, markov_models):
    draft, target = markov_models
    want = seeded(ref, target, PROMPT, 24, 2, 0.8)
    eos = (want[10],)
    want = want[: want.index(eos[0]) + 1]
    decoder = ref.draft.SpeculativeDecoder(FaultyDraft(draft), target, 1)
    with pytest.warns(FallbackWarning, match="injected fault"):
        got = [token for token, _ in run(decoder, 2, eos=eos)]
    assert got == want, f"with an EOS after the fault: {first_difference(got, want)}"


def test_not_implemented_is_not_a_fault(ref, markov_models):
    """An unfinished task must surface, not be survived as a draft fault."""
    draft, target = markov_models
    decoder = ref.draft.SpeculativeDecoder(FaultyDraft(draft, error=NotImplementedError), target, 2)
    with pytest.raises(NotImplementedError, match="injected fault"):
        run(decoder, 0, controller=ReportingController([2]))


def test_target_errors_propagate(ref, markov_models):
    draft, target = markov_models
    decoder = ref.draft.SpeculativeDecoder(draft, FaultyDraft(target, fails_at=2), 2)
    with pytest.raises(RuntimeError, match="injected fault"):
        run(decoder, 0, controller=ReportingController([2]))


@pytest.mark.parametrize("widths", [(2, 2), (3, 1, 1)])
def test_a_draft_fault_in_a_token_tree_keeps_plain_seeded_text(ref, markov_models, widths):
    """One draft call per tree level: the 3rd call fails in round 2 ((2, 2)) or round 1 ((3, 1, 1))."""
    draft, target = markov_models
    for seed in SEEDS:
        want = seeded(ref, target, PROMPT, 24, seed, 0.8)
        controller, stats = ReportingController([0]), SpecStats()
        out = list(coupled_tree_generate_surviving_faults(
            FaultyDraft(draft), target, mx.array(PROMPT, dtype=mx.int32), 24, seed, 0.8,
            widths=widths, controller=controller, stats=stats))
        got = [token for token, _ in out]
        assert got == want, (
            f"token tree {widths}, seed {seed}, draft failing at call {FAILS_AT}: "
            f"{first_difference(got, want)}. After a draft fault the rest is plain seeded decoding "
            f"from the committed sequence ({CHAPTER})")
        assert len(controller.reasons) == 1 and "injected fault" in controller.reasons[0], (
            f"token tree {widths}: the fault must reach controller.disable_draft once: {controller.reasons}")
        assert stats.emitted == len(got) and stats.lookahead_per_round[-1] == 0, (
            f"stats: {stats.emitted} tokens for {len(got)} yielded, K per round {stats.lookahead_per_round}")


@pytest.mark.parametrize("fails_at", [3, 10**9])
def test_a_draft_fault_in_a_batch_keeps_every_row_plain_seeded(ref, markov_models, fails_at):
    """A batch of 3 rows with their own seeds; a draft failing at call 3 (or never: the control)."""
    draft, target = markov_models
    prompts, seeds = [[1, 2, 3], [4, 5], [6, 1, 2, 3]], [11, 12, 13]
    want = [seeded(ref, target, p, 16, s, 0.8) for p, s in zip(prompts, seeds)]
    controller, stats = ReportingController([2]), SpecStats()
    got = batched_coupled_decode_surviving_faults(prompts, seeds, FaultyDraft(draft, fails_at),
                                                  target, 16, 2, 0.8, controller=controller,
                                                  stats=stats)
    for row, (g, w) in enumerate(zip(got, want)):
        assert g == w, (f"batch row {row}, seed {seeds[row]}, draft failing at call {fails_at}: "
                        f"{first_difference(g, w)}: every row is its seed's plain seeded text ({CHAPTER})")
    faults = 1 if fails_at == 3 else 0
    assert len(controller.reasons) == faults, (
        f"a draft fault reaches disable_draft once, no fault never: {controller.reasons}")
    assert stats.emitted == sum(map(len, got)), (
        f"stats count {stats.emitted} tokens for {sum(map(len, got))} returned (a failed batched "
        "run's rounds must not be counted)")
