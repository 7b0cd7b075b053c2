"""The provided half of Week 4 Day 1's `contracts.py`, shared by the student tree and the reference.

Each tree's `contracts.py` writes the checks (`check_*`) and the switch (`checked`,
`set_contract_checking`); this module holds what they build on: which function gets which check
(`contract_table`), finding a function by name (`lookup`), rebinding every reference to it
(`rebind`), the common length of a cache's layers (`cache_offset`), and the two conveniences
around the switch (`contracts_enabled`, `checking_block`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from types import ModuleType
from typing import Callable

from specdec.kit.errors import ContractError


def cache_offset(cache: list, role: str) -> int:
    """The common `offset` of a cache's layers; ContractError naming `role` if they disagree."""
    offsets = [int(layer.offset) for layer in cache]
    if not offsets or any(o != offsets[0] for o in offsets):
        raise ContractError(f"the {role} cache's layers hold {offsets} tokens: every layer must "
                            "hold the same tokens (fed and trimmed together)")
    return offsets[0]


def contract_table(checks: ModuleType) -> dict:
    """{"module.function" or "module.Class.method": around} — which core function gets which check.

    `checks` is a tree's `contracts` module: each `around(fn, call) -> result` runs fn on the
    call's arguments (a dict by parameter name, defaults filled in) and checks the result with
    that module's `check_*`, looked up when the call happens (so the tree's own checks run,
    as they are at that moment).
    """

    def probs_out(name: str):
        def around(fn, call):
            probs = fn(**call)
            checks.check_probs(probs, name)
            return probs
        return around

    def verified(fn, call):
        n, tokens = fn(**call)
        checks.check_verification(n, tokens, call["draft_tokens"], call["target_logits"].shape[-1],
                                  fn.__name__)
        return n, tokens

    def drafted(fn, call):
        draft_tokens, q_draft = fn(**call)
        k, vocab = draft_tokens.shape[0], call["self"].vocab_size
        if draft_tokens.ndim != 1 or not 1 <= k <= call["num_tokens"] or tuple(q_draft.shape) != (k, vocab):
            raise ContractError(f"draft_generation returned tokens {tuple(draft_tokens.shape)} and q "
                                f"{tuple(q_draft.shape)} for num_tokens = {call['num_tokens']}: expected "
                                f"[k'] and [k', {vocab}] with 1 <= k' <= num_tokens")
        checks.check_probs(q_draft, "draft_generation: q_draft")
        return draft_tokens, q_draft

    def committed(fn, call):
        # The target scored all K drafts, so before the call it holds S + K; S + n + 1 are committed.
        before = cache_offset(call["decoder"].target_cache, "target")
        unseen = fn(**call)
        checks.check_committed(call["decoder"],
                               before - len(call["draft_tokens"]) + call["num_accepted"] + 1, unseen)
        return unseen

    def bounded(fn, call):
        k = fn(**call)
        checks.check_lookahead(k, call["min_lookahead"], call["max_lookahead"], "best_lookahead")
        return k

    def updated(fn, call):
        k, speculator = fn(**call), call["self"]
        checks.check_lookahead(k, speculator.min_lookahead, speculator.max_lookahead,
                               f"AdaptiveSpeculator.update ({speculator.policy})")
        if k != speculator.lookahead:
            raise ContractError(f"AdaptiveSpeculator.update returned K = {k} but lookahead is "
                                f"{speculator.lookahead}: store the new K before returning it")
        return k

    def batched(fn, call):
        outputs = fn(**call)
        decode_one = None
        if call["temperature"] == 0 and len(call["batch_prompts"]) > 1:  # greedy: rows are comparable
            def decode_one(prompt):
                return fn(**{**call, "batch_prompts": [prompt], "stats": None})[0]
        checks.check_batched_rows(outputs, call["batch_prompts"], call["max_tokens"],
                                  call["eos_token_ids"], decode_one)
        return outputs

    return {
        "sampling.make_probs": probs_out("make_probs"),
        "verify.residual_distribution": probs_out("residual_distribution"),
        "verify.verify_greedy": verified,
        "verify.verify_speculation": verified,
        "draft.SpeculativeDecoder.draft_generation": drafted,
        "drafters.DrafterDecoder.draft_generation": drafted,
        "speculative.commit_round": committed,
        "adaptive.best_lookahead": bounded,
        "adaptive.AdaptiveSpeculator.update": updated,
        "batched.batched_speculative_decode": batched,
    }


def lookup(package: str, dotted: str) -> Callable:
    """The function "module.function" or "module.Class.method" names in `package` (a method is
    read from the class's own `__dict__`, as defined there)."""
    module_name, *attrs = dotted.split(".")
    owner = importlib.import_module(f"{package}.{module_name}")
    for attr in attrs[:-1]:
        owner = getattr(owner, attr)
    return vars(owner)[attrs[-1]] if inspect.isclass(owner) else getattr(owner, attrs[-1])


def rebind(package: str, swaps: dict) -> None:
    """In every loaded module of `package` and every class it defines, replace each attribute
    that IS (identity) a key of `swaps` by its value."""
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


def contracts_enabled(package: str) -> bool:
    """Whether contract checking is on for `package`: whether its verify_speculation is a checked
    wrapper now (it has `__wrapped__`)."""
    return hasattr(lookup(package, "verify.verify_speculation"), "__wrapped__")


@contextlib.contextmanager
def checking_block(set_contract_checking: Callable[[bool, str], bool], on: bool, package: str):
    """Switch checking to `on` for `package` with the given switch for the block, then restore the
    previous state, even if the block raises."""
    was_on = set_contract_checking(on, package)
    try:
        yield
    finally:
        set_contract_checking(was_on, package)
