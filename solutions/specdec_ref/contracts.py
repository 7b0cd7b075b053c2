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
    probs = mx.array(probs).astype(mx.float32)
    if probs.ndim == 0 or probs.size == 0:
        raise ContractError(f"{name}: expected probabilities [..., V], got shape {tuple(probs.shape)}")
    finite, sums = mx.isfinite(probs), probs.sum(axis=axis)
    all_finite, smallest, worst = mx.all(finite), mx.min(probs), mx.max(mx.abs(sums - 1))
    mx.eval(all_finite, smallest, worst)
    if not all_finite.item():
        where = tuple(int(i) for i in np.argwhere(~np.array(finite))[0])
        raise ContractError(
            f"{name}: value {np.array(probs)[where]} at index {where} is not finite; likely cause: "
            "NaN or inf logits, 0/0 when a row has no mass left (normalise only rows whose sum is "
            "> 0), or log-probabilities where probabilities belong"
        )
    if smallest.item() < 0:
        where = tuple(int(i) for i in np.argwhere(np.array(probs) < 0)[0])
        raise ContractError(
            f"{name}: negative probability {np.array(probs)[where]:.4g} at index {where}; likely "
            "cause: p - q without max(0, .), or logits used as probabilities"
        )
    if worst.item() > atol:
        deviation = np.abs(np.array(sums) - 1)
        row = tuple(int(i) for i in np.unravel_index(int(deviation.argmax()), deviation.shape))
        raise ContractError(
            f"{name}: row {row} sums to {np.array(sums)[row]:.6g} along axis {axis}, not 1 "
            f"(tolerance {atol}); likely cause: a filter or residual not renormalised, or the "
            "normalisation done over the wrong axis"
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
    if isinstance(draft_tokens, mx.array):
        draft_tokens = draft_tokens.reshape(-1).tolist()
    drafts, K, n = list(draft_tokens), len(draft_tokens), num_accepted
    if isinstance(n, bool) or not isinstance(n, int):
        raise ContractError(f"{name}: n = {n!r} is {type(n).__name__}, not a python int; likely "
                            "cause: an mx.array left unconverted (use .item())")
    if not 0 <= n <= K:
        raise ContractError(f"{name}: n = {n} accepted drafts, outside [0, K = {K}]; likely cause: "
                            "an off-by-one in the index of the first rejection")
    if not isinstance(tokens, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
        raise ContractError(f"{name}: tokens must be a list of python ints, got {tokens!r}; likely "
                            "cause: an mx.array left unconverted (use .tolist())")
    if len(tokens) != n + 1:
        raise ContractError(f"{name}: {len(tokens)} tokens for n = {n} accepted drafts; a round "
                            f"commits the accepted drafts plus exactly one target token (n + 1 = "
                            f"{n + 1}); likely cause: the correction or bonus token missing or doubled")
    for i in range(n):
        if tokens[i] != drafts[i]:
            raise ContractError(f"{name}: token {i} is {tokens[i]} but draft {i} is {drafts[i]}; the "
                                "first n tokens must be the accepted drafts; likely cause: n counts "
                                "a rejected draft, or the target's token replaced an accepted draft")
    if vocab_size is not None:
        for i, t in enumerate(tokens):
            if not 0 <= t < vocab_size:
                raise ContractError(f"{name}: token {i} = {t} is outside the vocabulary [0, "
                                    f"{vocab_size}); likely cause: an index into a flattened array")


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
    unseen = draft_unseen.tolist() if isinstance(draft_unseen, mx.array) else list(draft_unseen)
    if not 1 <= len(unseen) <= 2:
        raise ContractError(f"commit_round returned {unseen} for the draft to be fed next; it must "
                            "be [new_token], or [last draft, new_token] when all K were accepted")
    target = cache_offset(decoder.target_cache, "target")
    if target != num_committed - 1:
        raise ContractError(f"after commit_round the target cache holds {target} tokens; with "
                            f"{num_committed} committed it must hold {num_committed - 1} (all but "
                            "the newest token, fed next round); likely cause: not trimming exactly "
                            "the K - n rejected drafts")
    if decoder.draft_cache:
        draft = cache_offset(decoder.draft_cache, "draft")
        if draft != num_committed - len(unseen):
            raise ContractError(f"after commit_round the draft cache holds {draft} tokens; with "
                                f"{num_committed} committed and {len(unseen)} fed next it must hold "
                                f"{num_committed - len(unseen)}; likely cause: the draft trims K - 1 "
                                "- n after a rejection, and nothing when all K were accepted")


def check_lookahead(lookahead: int, min_lookahead: int, max_lookahead: int, name: str = "lookahead") -> None:
    """Check that a policy's K is a python int (not a bool) in [min_lookahead, max_lookahead].

    Raises ContractError starting with `name`, giving K, the bounds and the likely cause.
    """
    if isinstance(lookahead, bool) or not isinstance(lookahead, int):
        raise ContractError(f"{name}: K = {lookahead!r} is {type(lookahead).__name__}, not a python "
                            "int; likely cause: a float from a mean or an mx.array left unconverted")
    if not min_lookahead <= lookahead <= max_lookahead:
        raise ContractError(f"{name}: K = {lookahead} is outside [{min_lookahead}, {max_lookahead}]; "
                            "likely cause: a step not clamped to the bounds")


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
    if not isinstance(outputs, list) or len(outputs) != len(batch_prompts):
        raise ContractError(f"batched decode returned {len(outputs)} rows for {len(batch_prompts)} "
                            "prompts: one list per prompt, in order, even for rows that stop early")
    eos = set(eos_token_ids)
    for i, row in enumerate(outputs):
        if not isinstance(row, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in row):
            raise ContractError(f"row {i} must be a list of python ints, got {row!r}")
        stops = [j for j, t in enumerate(row) if t in eos]
        if len(row) > max_tokens:
            raise ContractError(f"row {i} has {len(row)} tokens, more than max_tokens = {max_tokens}")
        if stops and stops[0] != len(row) - 1:
            raise ContractError(f"row {i} goes on after the EOS at position {stops[0]}; likely "
                                "cause: the row was not removed from the batch when it finished")
        if not stops and len(row) < max_tokens:
            raise ContractError(f"row {i} stops at {len(row)} < max_tokens = {max_tokens} tokens "
                                "without an EOS; likely cause: rows mixed up when the batch shrank")
    if decode_one is None:
        return
    for i, prompt in enumerate(batch_prompts):
        alone, row = list(decode_one(list(prompt))), outputs[i]
        if alone != row:
            j = next((j for j, (a, b) in enumerate(zip(alone, row)) if a != b), min(len(alone), len(row)))
            raise ContractError(
                f"row {i} differs from decoding its prompt alone from position {j} (batched "
                f"{row[j:j + 3]}, alone {alone[j:j + 3]}): rows must not influence each other; "
                "likely cause: one rollback for all rows instead of per row, a padding or RoPE "
                "offset off by the row's left padding, or rows reordered when the batch shrank"
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
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return around(fn, dict(bound.arguments))

    return wrapper


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
    package = package or __package__
    was_on = package in _originals
    if on and not was_on:
        swaps = {}
        for dotted, around in CONTRACTS.items():
            original = lookup(package, dotted)
            swaps[original] = checked(original, around)
        rebind(package, swaps)
        _originals[package] = {wrapper: original for original, wrapper in swaps.items()}
    elif not on and was_on:
        rebind(package, _originals.pop(package))
    return was_on


def contracts_enabled(package: Optional[str] = None) -> bool:
    """Whether contract checking is on for `package` (default: this module's): whether its
    verify_speculation is a checked wrapper now (it has `__wrapped__`) (provided)."""
    return _kit.contracts_enabled(package or __package__)


def contract_checking(on: bool = True, package: Optional[str] = None):
    """`with contract_checking():` checks every call inside the block, then restores the previous
    state, even if the block raises (provided). package: as in `set_contract_checking`."""
    return checking_block(set_contract_checking, on, package or __package__)
