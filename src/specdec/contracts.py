"""Week 4 Day 1 — contracts: the docstrings' promises as checks you can switch on.

Each `check_*` states one promise of a core function and raises `ContractError` naming what
broke and its likely cause. `CONTRACTS` says which function gets which check. Switching checking
on (`set_contract_checking(True)` or `with contract_checking():`) replaces those functions, in
every module of the package, by checked wrappers; switching it off puts the very same original
function objects back, so the hot path then runs exactly the code it ran before: no cost at all.
Shapes: `K` draft length, `V` vocabulary.
"""

import functools
import inspect
import sys
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

# Provided code lives once, in the kit; re-exported here (specdec.contracts.lookup, ...).
from specdec.kit import contracts as _kit
from specdec.kit.contracts import cache_offset, checking_block, contract_table, lookup, rebind
from specdec.kit.errors import ContractError


def check_probs(probs: mx.array, name: str = "probs", axis: int = -1, atol: float = 1e-3) -> None:
    """Check that `probs` (float [..., V]) holds probability distributions along `axis`.

    Raises ContractError, starting with `name`, when: probs is empty or 0-d; any value is NaN or
    infinite; any value is negative; or any row's sum along `axis` differs from 1 by more than
    atol. The message gives the first offending index and value (or row and sum) and the likely
    cause, and says what broke in these words (the tests search for them, case-insensitively):
    "not finite" for a NaN or an infinity, "negative" for a negative value, "sums to" for a row
    whose sum is off. One host sync when everything is fine.
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
    Raises ContractError naming the cache (the word "target" or "draft"), its length, the
    expected length and the likely cause.
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
    Raises ContractError naming the row as "row i" (0-based, as in outputs), the first offending
    position and the likely cause.
    """
    raise NotImplementedError(
        "Week 4 Day 1 Task 4: check_batched_rows — see book/src/week4-01-config-contracts.md"
    )


# Which function gets which check (provided: `contract_table` in specdec.kit.contracts). Each entry
# is `around(fn, call) -> result`: it runs fn on the call's arguments (a dict by parameter name,
# defaults filled in) and checks the result with this module's check_* functions.
CONTRACTS = contract_table(sys.modules[__name__])


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
    object in `package` (`lookup`), wrap it with `checked(original, around)`, and `rebind` every
    reference to it in the package's loaded modules (copies made by `from .verify import ...`
    included); remember {wrapper: original} in `_originals[package]`. Off: `rebind` the wrappers
    back to the originals, so every name refers to the very same object as before: no cost left.
    Turning on what is on, or off what is off, changes nothing (never wrap a wrapper).
    """
    raise NotImplementedError(
        "Week 4 Day 1 Task 5: set_contract_checking — see book/src/week4-01-config-contracts.md"
    )


def contracts_enabled(package: Optional[str] = None) -> bool:
    """Whether contract checking is on for `package` (default: this module's): whether its
    verify_speculation is a checked wrapper now (it has `__wrapped__`) (provided)."""
    return _kit.contracts_enabled(package or __package__)


def contract_checking(on: bool = True, package: Optional[str] = None):
    """`with contract_checking():` checks every call inside the block, then restores the previous
    state, even if the block raises (provided). package: as in `set_contract_checking`."""
    return checking_block(set_contract_checking, on, package or __package__)
