"""Provided: the coupled rule through a draft that fails (Week 5 Day 1 meets Week 4 Day 3).

Under the coupled rule every emitted token is plain seeded decoding's token at its position,
whatever proposed the drafts. So a draft that raises in the middle of a request costs speed,
never text: the tokens already emitted stay, and the rest of the request is plain seeded
decoding (K = 0 from then on) from the committed sequence — exactly the tokens the coupled loop
would have emitted. The fault is reported, never hidden: through the controller's
`disable_draft(reason)` when there is one (Week 4 Day 3), else as a FallbackWarning.

Nothing here is a task: it wraps the day's `coupled_generate` (of `package`, the reference by
default). Checked by tests/test_coupled_faults.py:
    pytest tests/test_coupled_faults.py -q
"""

import importlib
import time
import warnings
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx

from specdec.kit.errors import FallbackWarning
from specdec.kit.stats import SpecStats


class DraftFault(Exception):
    """The draft raised `error` inside a coupled loop (also its __cause__)."""

    def __init__(self, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class GuardedDraft:
    """A draft model whose errors come out as DraftFault; everything else is the model's.

    NotImplementedError passes unchanged: an unfinished task is not a fault to survive.
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        try:
            return self.model(*args, **kwargs)
        except (NotImplementedError, DraftFault):
            raise
        except Exception as error:
            raise DraftFault(error) from error

    def __getattr__(self, name):
        return getattr(self.model, name)

    @property
    def __class__(self):  # isinstance(guarded, MarkovLM) as for the model (kit/coupled_tree.py)
        return self.model.__class__


def guard_draft(decoder) -> Callable[[], None]:
    """Route every way `coupled_generate` reaches the draft through GuardedDraft: the decoder's
    `draft_model` (SpeculativeDecoder), its drafter's `draft_model` (ModelDrafter) and its
    `draft_generation` (any other drafter, n-gram included). Returns the function that undoes it."""
    undo = []

    def swap(owner, name: str) -> None:
        if owner is None or getattr(owner, name, None) is None:
            return
        own = name in vars(owner)
        old = vars(owner)[name] if own else None
        setattr(owner, name, GuardedDraft(getattr(owner, name)))
        undo.append(lambda: setattr(owner, name, old) if own else delattr(owner, name))

    swap(decoder, "draft_model")
    swap(getattr(decoder, "drafter", None), "draft_model")
    swap(decoder, "draft_generation")

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def coupled_generate_surviving_faults(
    decoder,
    prompt_tokens: mx.array,
    max_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    controller=None,
    stats: Optional[SpecStats] = None,
    package: str = "specdec_ref",
) -> Iterator[tuple[int, bool]]:
    """`coupled_generate`, whose output stays `seeded_generate`'s when the draft raises.

    Arguments and yields as `coupled_generate`. When the draft (model or drafter) raises anything
    but NotImplementedError: the round it failed in emits nothing; the reason goes to
    `controller.disable_draft(reason)` (a controller without one, or None: a FallbackWarning);
    the remaining tokens are `seeded_generate` on the target from the committed sequence
    (prompt + tokens yielded), each yielded with from_draft False and recorded in stats as a
    plain round, record_round(0, 0, 1). Errors of the target propagate. The decoder is left as
    it was given (its draft unwrapped).
    """
    coupling = importlib.import_module(f"{package}.coupling")
    undo = guard_draft(decoder)
    try:
        run = coupling.coupled_generate(decoder, prompt_tokens, max_tokens, seed, temperature,
                                        top_k, top_p, eos_token_ids, controller, stats)
        yield from plain_after_fault(run, coupling, decoder.target_model, prompt_tokens,
                                     max_tokens, seed, temperature, top_k, top_p, eos_token_ids,
                                     controller, stats)
    finally:
        undo()


def coupled_tree_generate_surviving_faults(
    draft_model,
    target_model,
    prompt_tokens: mx.array,
    max_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    widths: Sequence[int] = (2, 2),
    controller=None,
    stats: Optional[SpecStats] = None,
    package: str = "specdec_ref",
) -> Iterator[tuple[int, bool]]:
    """`coupled_tree_generate` (kit/coupled_tree.py), surviving a draft that raises exactly as
    `coupled_generate_surviving_faults` does. controller: only told of the fault (the tree's
    shape is fixed), through `disable_draft(reason)`; None: a FallbackWarning."""
    from specdec.kit.coupled_tree import coupled_tree_generate

    coupling = importlib.import_module(f"{package}.coupling")
    run = coupled_tree_generate(GuardedDraft(draft_model), target_model, prompt_tokens, max_tokens,
                                seed, temperature, top_k, top_p, eos_token_ids, widths, stats,
                                package)
    yield from plain_after_fault(run, coupling, target_model, prompt_tokens, max_tokens, seed,
                                 temperature, top_k, top_p, eos_token_ids, controller, stats)


def batched_coupled_decode_surviving_faults(
    batch_prompts: list[list[int]],
    seeds: Sequence[int],
    draft_model,
    target_model,
    max_tokens: int = 100,
    lookahead: int = 4,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    controller=None,
    stats: Optional[SpecStats] = None,
    package: str = "specdec_ref",
) -> list[list[int]]:
    """`batched_coupled_decode`, whose rows stay `seeded_generate`'s when the draft raises.

    Arguments and result as `batched_coupled_decode`. The batched loop returns nothing until it
    is done, so after a draft fault (reported as in `coupled_generate_surviving_faults`) every
    row is decoded again by `seeded_generate` with its own seed: the same tokens, more time.
    stats: the batched run's rounds when it finishes; after a fault, one plain round
    record_round(0, 0, 1) per row per token instead (the failed run's rounds are dropped).
    """
    coupling = importlib.import_module(f"{package}.coupling")
    attempt = SpecStats()
    try:
        outputs = coupling.batched_coupled_decode(
            batch_prompts, seeds, GuardedDraft(draft_model), target_model, max_tokens, lookahead,
            temperature, top_k, top_p, eos_token_ids, controller, attempt)
    except DraftFault as fault:
        report_fault(controller, fault.error, f"all {len(batch_prompts)} rows again")
        outputs = []
        for prompt, seed in zip(batch_prompts, seeds):
            start = time.perf_counter()
            outputs.append([int(t) for t in coupling.seeded_generate(
                target_model, mx.array(prompt, dtype=mx.int32), max_tokens, seed, temperature,
                top_k, top_p, eos_token_ids)])
            if stats is not None:
                for _ in outputs[-1]:
                    stats.record_round(0, 0, 1)
                stats.verify_time_s += time.perf_counter() - start
        return outputs
    if stats is not None:
        _add_stats(stats, attempt)
    return outputs


def _add_stats(total: SpecStats, part: SpecStats) -> None:
    """Add `part`'s counts, times and per-round lists to `total`."""
    for name, value in vars(part).items():
        setattr(total, name, getattr(total, name) + value)


def report_fault(controller, error: Exception, what_follows: str) -> None:
    """The draft raised `error`: `controller.disable_draft(reason)`, or a FallbackWarning."""
    reason = (f"the draft raised {type(error).__name__}: {error}; {what_follows} by plain seeded "
              "decoding (K = 0): the same text, without the speed-up")
    if controller is not None and hasattr(controller, "disable_draft"):
        controller.disable_draft(reason)
    else:
        warnings.warn(reason, FallbackWarning, stacklevel=4)


def plain_after_fault(run: Iterator[tuple[int, bool]], coupling, target_model, prompt_tokens,
                      max_tokens: int, seed: int, temperature: float, top_k: int, top_p: float,
                      eos_token_ids: Sequence[int], controller, stats: Optional[SpecStats]
                      ) -> Iterator[tuple[int, bool]]:
    """`run`'s (token, from_draft) pairs until it raises DraftFault; then report the fault and
    yield the rest of the request from `coupling.seeded_generate` on the committed sequence."""
    committed = mx.array(prompt_tokens, dtype=mx.int32).reshape(-1).tolist()
    prompt_len = len(committed)
    try:
        for token, from_draft in run:
            committed.append(token)
            yield token, from_draft
        return
    except DraftFault as fault:
        error = fault.error
    emitted = len(committed) - prompt_len
    report_fault(controller, error, f"the rest of this request ({max_tokens - emitted} tokens)")
    rest = coupling.seeded_generate(target_model, mx.array(committed, dtype=mx.int32),
                                    max_tokens - emitted, seed, temperature, top_k, top_p,
                                    eos_token_ids)
    start = time.perf_counter()
    for token in rest:
        if stats is not None:
            stats.record_round(0, 0, 1)
            stats.verify_time_s += time.perf_counter() - start
        yield int(token), False
        start = time.perf_counter()
