"""Week 4 Day 1 — contracts: the docstrings' promises as checks you can switch on.

Each `check_*` states one promise of a core function and raises `ContractError` naming what
broke and its likely cause. `CONTRACTS` says which function gets which check. Switching checking
on (`set_contract_checking(True)` or `with contract_checking():`) replaces those functions, in
every module of the package, by checked wrappers; switching it off puts the very same original
function objects back, so the hot path then runs exactly the code it ran before: no cost at all.
Shapes: `K` draft length, `V` vocabulary.
"""

import contextlib
import functools
import importlib
import inspect
import sys
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from specdec.kit.errors import ContractError


def check_probs(probs: mx.array, name: str = "probs", axis: int = -1, atol: float = 1e-3) -> None:
    """Check that `probs` (float [..., V]) holds probability distributions along `axis`.

    Raises ContractError, starting with `name`, when: probs is empty or 0-d; any value is NaN or
    infinite; any value is negative; or any row's sum along `axis` differs from 1 by more than
    atol. The message gives the first offending index and value (or row and sum) and the likely
    cause. One host sync when everything is fine.
    """
    raise NotImplementedError(
        "Week 4 Day 1 Task 3: check_probs — see book/src/week4-01-config-contracts.md"
    )


def check_verification(
    num_accepted: int,
    tokens: list[int],
    draft_tokens: Sequence[int],
    vocab_size: Optional[int] = None,
    name: str = "verification",
) -> None:
    """Check a verification result (n, tokens) against the K drafts it verified.

    num_accepted: n, a python int (not a bool, not an mx.array) in [0, K], K = len(draft_tokens)
    (draft_tokens: int [K] as an mx.array or python ints). tokens: a list of python ints of
    length n + 1 whose first n are draft_tokens[:n]; with vocab_size V, every token in [0, V).
    Raises ContractError, starting with `name`, naming the first broken promise and its likely
    cause.
    """
    raise NotImplementedError(
        "Week 4 Day 1 Task 3: check_verification — see book/src/week4-01-config-contracts.md"
    )


def check_committed(decoder, num_committed: int, draft_unseen: Sequence[int]) -> None:
    """Check a decoder's caches after `commit_round`: together with the tokens each model is fed
    next, each cache holds exactly the committed sequence (its first `num_committed` tokens).

    decoder: has `target_cache` and `draft_cache` (lists of layers with an `offset`; a
    `draft_cache` of [] — a drafter without state — is not checked). draft_unseen: what
    commit_round returned, the 1 or 2 tokens the draft is fed next. The target is fed the newest
    token next, so it must hold num_committed - 1; the draft must hold num_committed -
    len(draft_unseen). All layers of a cache must hold the same number of tokens.
    Raises ContractError naming the cache, its length, the expected length and the likely cause.
    """
    raise NotImplementedError(
        "Week 4 Day 1 Task 4: check_committed — see book/src/week4-01-config-contracts.md"
    )


def check_lookahead(lookahead: int, min_lookahead: int, max_lookahead: int, name: str = "lookahead") -> None:
    """Check that a policy's K is a python int (not a bool) in [min_lookahead, max_lookahead].

    Raises ContractError starting with `name`, giving K, the bounds and the likely cause.
    """
    raise NotImplementedError(
        "Week 4 Day 1 Task 4: check_lookahead — see book/src/week4-01-config-contracts.md"
    )


def check_batched_rows(
    outputs: list[list[int]],
    batch_prompts: list[list[int]],
    max_tokens: int,
    eos_token_ids: Sequence[int] = (),
    decode_one: Optional[Callable[[list[int]], list[int]]] = None,
) -> None:
    """Check the rows of a batched decode: each row is its own prompt's, whatever its neighbours.

    outputs must be a list of len(batch_prompts) lists of python ints, in prompt order. Each row
    has at most max_tokens tokens, nothing after its first EOS (a token of eos_token_ids), and
    exactly max_tokens unless it ends with an EOS. With decode_one (prompt -> tokens: the same
    decoder on that prompt alone, at temperature 0), row i must equal decode_one(prompt i).
    Raises ContractError naming the row, the first offending position and the likely cause.
    """
    raise NotImplementedError(
        "Week 4 Day 1 Task 4: check_batched_rows — see book/src/week4-01-config-contracts.md"
    )


def _length(cache: list, role: str) -> int:
    """The common `offset` of a cache's layers; ContractError if they disagree (provided)."""
    offsets = [int(layer.offset) for layer in cache]
    if not offsets or any(o != offsets[0] for o in offsets):
        raise ContractError(f"the {role} cache's layers hold {offsets} tokens: every layer must "
                            "hold the same tokens (fed and trimmed together)")
    return offsets[0]


# Which function gets which check (provided). Each entry is `around(fn, call) -> result`: it runs
# fn on the call's arguments (a dict by parameter name, defaults filled in) and checks the result.
def _probs_out(name: str):
    def around(fn, call):
        probs = fn(**call)
        check_probs(probs, name)
        return probs
    return around


def _verified(fn, call):
    n, tokens = fn(**call)
    check_verification(n, tokens, call["draft_tokens"], call["target_logits"].shape[-1], fn.__name__)
    return n, tokens


def _drafted(fn, call):
    draft_tokens, q_draft = fn(**call)
    k, vocab = draft_tokens.shape[0], call["self"].vocab_size
    if draft_tokens.ndim != 1 or not 1 <= k <= call["num_tokens"] or tuple(q_draft.shape) != (k, vocab):
        raise ContractError(f"draft_generation returned tokens {tuple(draft_tokens.shape)} and q "
                            f"{tuple(q_draft.shape)} for num_tokens = {call['num_tokens']}: expected "
                            f"[k'] and [k', {vocab}] with 1 <= k' <= num_tokens")
    check_probs(q_draft, "draft_generation: q_draft")
    return draft_tokens, q_draft


def _committed(fn, call):
    # The target scored all K drafts, so before the call it holds S + K; S + n + 1 are committed.
    before = _length(call["decoder"].target_cache, "target")
    unseen = fn(**call)
    check_committed(call["decoder"], before - len(call["draft_tokens"]) + call["num_accepted"] + 1, unseen)
    return unseen


def _bounded(fn, call):
    k = fn(**call)
    check_lookahead(k, call["min_lookahead"], call["max_lookahead"], "best_lookahead")
    return k


def _updated(fn, call):
    k, speculator = fn(**call), call["self"]
    check_lookahead(k, speculator.min_lookahead, speculator.max_lookahead,
                    f"AdaptiveSpeculator.update ({speculator.policy})")
    if k != speculator.lookahead:
        raise ContractError(f"AdaptiveSpeculator.update returned K = {k} but lookahead is "
                            f"{speculator.lookahead}: store the new K before returning it")
    return k


def _batched(fn, call):
    outputs = fn(**call)
    decode_one = None
    if call["temperature"] == 0 and len(call["batch_prompts"]) > 1:  # greedy: rows are comparable
        def decode_one(prompt):
            return fn(**{**call, "batch_prompts": [prompt], "stats": None})[0]
    check_batched_rows(outputs, call["batch_prompts"], call["max_tokens"], call["eos_token_ids"], decode_one)
    return outputs


CONTRACTS = {
    "sampling.make_probs": _probs_out("make_probs"),
    "verify.residual_distribution": _probs_out("residual_distribution"),
    "verify.verify_greedy": _verified,
    "verify.verify_speculation": _verified,
    "draft.SpeculativeDecoder.draft_generation": _drafted,
    "drafters.DrafterDecoder.draft_generation": _drafted,
    "speculative.commit_round": _committed,
    "adaptive.best_lookahead": _bounded,
    "adaptive.AdaptiveSpeculator.update": _updated,
    "batched.batched_speculative_decode": _batched,
}


# The switch -------------------------------------------------------------------------------------
_originals: dict = {}  # package -> {checked wrapper: original function}, while checking is on


def checked(fn: Callable, around: Callable) -> Callable:
    """fn with its contract checked: a wrapper that binds its arguments and returns around(fn, call).

    The wrapper takes fn's arguments (positional or by name), binds them to fn's parameters with
    `inspect.signature(fn)` (defaults filled in) into a dict `call` {name: value}, and returns
    `around(fn, call)` — which calls fn(**call) and checks what it returns. It carries fn's
    name and docstring and `__wrapped__ = fn` (`functools.wraps`).
    """
    raise NotImplementedError(
        "Week 4 Day 1 Task 5: checked — see book/src/week4-01-config-contracts.md"
    )


def set_contract_checking(on: bool, package: Optional[str] = None) -> bool:
    """Turn contract checking on or off for `package` (default: this module's own package, so
    `specdec` for the student tree, `specdec_ref` for the reference). Returns the previous state.

    On: for each "module.function" or "module.Class.method" in CONTRACTS, look up the current
    object in `package` (`_lookup`), wrap it with `checked(original, around)`, and `_rebind` every
    reference to it in the package's loaded modules (copies made by `from .verify import ...`
    included); remember {wrapper: original} in `_originals[package]`. Off: `_rebind` the wrappers
    back to the originals, so every name refers to the very same object as before: no cost left.
    Turning on what is on, or off what is off, changes nothing (never wrap a wrapper).
    """
    raise NotImplementedError(
        "Week 4 Day 1 Task 5: set_contract_checking — see book/src/week4-01-config-contracts.md"
    )


def contracts_enabled(package: Optional[str] = None) -> bool:
    """Whether contract checking is on for `package` (default: this module's): whether its
    verify_speculation is a checked wrapper now (it has `__wrapped__`) (provided)."""
    return hasattr(_lookup(package or __package__, "verify.verify_speculation"), "__wrapped__")


@contextlib.contextmanager
def contract_checking(on: bool = True, package: Optional[str] = None):
    """`with contract_checking():` checks every call inside the block, then restores the previous
    state, even if the block raises (provided). package: as in `set_contract_checking`."""
    package = package or __package__
    was_on = set_contract_checking(on, package)
    try:
        yield
    finally:
        set_contract_checking(was_on, package)


def _lookup(package: str, dotted: str) -> Callable:
    """The function "module.function" or "module.Class.method" names in `package` (provided)."""
    module_name, *attrs = dotted.split(".")
    owner = importlib.import_module(f"{package}.{module_name}")
    for attr in attrs[:-1]:
        owner = getattr(owner, attr)
    return vars(owner)[attrs[-1]] if inspect.isclass(owner) else getattr(owner, attrs[-1])


def _rebind(package: str, swaps: dict) -> None:
    """In every loaded module of `package` and every class it defines, replace each attribute
    that IS (identity) a key of `swaps` by its value (provided)."""
    by_id = {id(old): new for old, new in swaps.items()}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        owners = [module] + [c for c in vars(module).values()
                             if inspect.isclass(c) and c.__module__ == name]
        for owner in owners:
            for attr, value in list(vars(owner).items()):
                if id(value) in by_id:
                    setattr(owner, attr, by_id[id(value)])
