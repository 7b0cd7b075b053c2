"""The provided half of Week 4 Day 1's `config.py`, shared by the student tree and the reference.

`ConfigFields` holds every field of `SpeculativeConfig` with its default, the `__post_init__`
that validates on construction, and the JSON round trip; each tree's `SpeculativeConfig`
subclasses it and adds the exercise methods `validate`, `to_dict` and `from_dict`. The helpers
below (`type_problems` and `range_problems`: the checks of one field at a time, the allowed
values, ready-made fixes) are what `validate` builds on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from specdec.kit.errors import ConfigError

POLICIES = ("threshold", "heuristic", "goodput")  # Week 3 Day 1
# Week 2 Day 1, Week 3 Days 3 and 4, Week 5 Days 2-4 (kit/drafter_registry.py builds each one)
DRAFTERS = ("model", "ngram", "tree", "medusa", "eagle", "layerskip")
# The drafters that draft every row of a batch at once (Week 3 Day 2, Week 4 Day 5; n-gram and
# Week 5's through kit/self_serving.py): batch_size > 1 needs one of them. Trees do not batch.
BATCHED_DRAFTERS = ("model", "ngram", "layerskip", "medusa", "eagle")
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class ConfigFields:
    """The fields of `SpeculativeConfig` and their defaults (its class docstring says what each
    holds). Not used alone: the subclass supplies `validate`, `to_dict` and `from_dict`."""

    lookahead: int = 4
    min_lookahead: int = 1
    max_lookahead: int = 8
    adaptive: Optional[str] = None
    window: int = 10
    raise_above: float = 0.85
    lower_below: float = 0.60
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 128
    drafter: str = "model"
    max_ngram: int = 3
    min_ngram: int = 1
    tree_branching: int = 2
    batch_size: int = 1
    fallback: bool = True
    fallback_window: int = 16
    fallback_margin: float = 0.05
    probe_every: int = 32
    probe_budget: float = 0.02
    memory_limit_mb: Optional[float] = None
    seed: int = 0
    check_contracts: bool = False

    def __post_init__(self):
        """Validate on construction: a config that exists is valid (ConfigError otherwise)."""
        problems = self.validate()
        if problems:
            raise ConfigError(problems)

    def to_json(self) -> str:
        """`to_dict()` as JSON text, one field per line."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str):
        """The config of a JSON object: `from_dict(json.loads(text))`.

        Text that is not JSON raises ConfigError too, naming the line and column."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError([f"config text is not JSON ({e.msg} at line {e.lineno}, column "
                               f"{e.colno}): write a JSON object such as {{\"lookahead\": 4}}"]) from None
        return cls.from_dict(data)


# What each field holds, for the type checks.
FIELD_KINDS = {
    "lookahead": "int", "min_lookahead": "int", "max_lookahead": "int",
    "adaptive": "optional str", "window": "int", "raise_above": "float", "lower_below": "float",
    "temperature": "float", "top_k": "int", "top_p": "float", "max_tokens": "int",
    "drafter": "str", "max_ngram": "int", "min_ngram": "int", "tree_branching": "int",
    "batch_size": "int", "fallback": "bool", "fallback_window": "int", "fallback_margin": "float",
    "probe_every": "int", "probe_budget": "float", "memory_limit_mb": "optional float", "seed": "int",
    "check_contracts": "bool",
}
# The values a str field may take, as a message lists them: "'model', 'ngram', 'tree'".
ALLOWED = {"adaptive": ", ".join(map(repr, POLICIES)), "drafter": ", ".join(map(repr, DRAFTERS))}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ConfigFields)}
# Ready-made fixes for the fields that must be >= 1: "lookahead 0 < 1: " + AT_LEAST_ONE["lookahead"].
AT_LEAST_ONE = {
    "lookahead": "K counts the tokens drafted per round (try 4)",
    "min_lookahead": "an adaptive policy drafts at least one token (try 1)",
    "max_lookahead": "the largest K a policy may pick (try 8)",
    "window": "the threshold policy averages over at least one round (try 10)",
    "max_tokens": "the number of tokens to generate (try 128)",
    "max_ngram": "the longest suffix the n-gram drafter looks up (try 3)",
    "min_ngram": "the shortest suffix the n-gram drafter looks up (try 1)",
    "tree_branching": "children per node of the draft tree (1 is a chain; try 2)",
    "batch_size": "the number of prompts decoded together (try 1)",
    "fallback_window": "the controller estimates from at least one round (try 16)",
    "probe_every": "tokens between two probes of speculation (try 32)",
}


def type_problems(config) -> tuple[list[str], set[str]]:
    """(problems, names): one problem per field whose value has the wrong type, and the names of
    those fields, so that `validate` can skip comparing them.

    int fields must hold ints (not bools, floats or strings); float fields finite ints or floats
    (not bools, NaN or inf); fallback and check_contracts bools; drafter a str; adaptive None or
    a str; memory_limit_mb None or a finite number.
    """
    problems: list[str] = []
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), FIELD_KINDS[f.name]
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            problems.append(f"{f.name} {value!r} is {a_type(value)}, not an int: write a whole number "
                            f"such as {f.default}")
        elif kind == "float" and not is_number(value):
            problems.append(f"{f.name} {value!r} is not a finite number: write a number such as "
                            f"{f.default}")
        elif kind == "bool" and not isinstance(value, bool):
            problems.append(f"{f.name} {value!r} is {a_type(value)}, not a bool: write True or False")
        elif kind == "str" and not isinstance(value, str):
            problems.append(f"{f.name} {value!r} is {a_type(value)}, not a str: write one of "
                            f"{ALLOWED[f.name]}")
        elif kind == "optional str" and value is not None and not isinstance(value, str):
            problems.append(f"{f.name} {value!r} is {a_type(value)}: write None or one of "
                            f"{ALLOWED[f.name]}")
        elif kind == "optional float" and value is not None and not is_number(value):
            problems.append(f"{f.name} {value!r} is not a finite number: write None (no limit) "
                            "or a size in MB such as 4096")
    return problems, {p.split(" ", 1)[0] for p in problems}


def range_problems(config, skip: set) -> list[str]:
    """One problem per field whose value is outside its range, for the fields not in `skip`
    (those whose type is wrong: `type_problems` returns their names). Each names the field and
    its value, then ": ", then the fix, e.g. "window 0 < 1: the threshold policy averages over at
    least one round (try 10)".

    The ranges: lookahead, min_lookahead, max_lookahead, window, max_tokens, max_ngram,
    min_ngram, tree_branching, batch_size, fallback_window, probe_every >= 1; top_k >= 0;
    0 <= raise_above <= 1 and 0 <= lower_below <= 1; temperature >= 0; 0 < top_p <= 1;
    0 <= fallback_margin < 1; 0 < probe_budget <= 1; memory_limit_mb > 0 (or None);
    0 <= seed <= 2**64 - 1; adaptive None or in POLICIES; drafter in DRAFTERS.
    One field at a time: the rules between fields are `validate`'s own.
    """
    problems: list[str] = []

    def out_of_range(name: str, ok) -> bool:  # a field of the right type that breaks its range
        return name not in skip and not ok(getattr(config, name))

    for name in AT_LEAST_ONE:
        if out_of_range(name, lambda v: v >= 1):
            problems.append(f"{name} {getattr(config, name)} < 1: {AT_LEAST_ONE[name]}")
    if out_of_range("top_k", lambda v: v >= 0):
        problems.append(f"top_k {config.top_k} < 0: use 0 to turn top-k off, or k >= 1 to keep "
                        "the k most probable tokens")
    for name in ("raise_above", "lower_below"):
        if out_of_range(name, lambda v: 0 <= v <= 1):
            problems.append(f"{name} {getattr(config, name)} is outside [0, 1]: it is a fraction "
                            f"of drafts accepted (default {DEFAULTS[name]})")
    if out_of_range("temperature", lambda v: v >= 0):
        problems.append(f"temperature {config.temperature} < 0: use 0 for greedy decoding or a "
                        "positive value such as 0.7 to sample")
    if out_of_range("top_p", lambda v: 0 < v <= 1):
        problems.append(f"top_p {config.top_p} is outside (0, 1]: 1.0 turns nucleus filtering "
                        "off, 0.9 keeps the most probable tokens up to 90% of the mass")
    if out_of_range("fallback_margin", lambda v: 0 <= v < 1):
        problems.append(f"fallback_margin {config.fallback_margin} is outside [0, 1): it is a "
                        "relative goodput margin such as 0.05")
    if out_of_range("probe_budget", lambda v: 0 < v <= 1):
        problems.append(f"probe_budget {config.probe_budget} is outside (0, 1]: it is the share "
                        "of plain time a failed probe may cost, such as 0.02")
    if out_of_range("memory_limit_mb", lambda v: v is None or v > 0):
        problems.append(f"memory_limit_mb {config.memory_limit_mb} <= 0: use None for no limit "
                        "or a positive size in MB such as 4096")
    if out_of_range("seed", lambda v: 0 <= v <= MAX_SEED):
        problems.append(f"seed {config.seed} is outside 0 .. 2**64 - 1: any non-negative "
                        "integer below 2**64 picks a reproducible random stream")
    if out_of_range("adaptive", lambda v: v is None or v in POLICIES):
        problems.append(f"adaptive {config.adaptive!r} is not a policy: use None (fixed K) or "
                        f"one of {ALLOWED['adaptive']}")
    if out_of_range("drafter", lambda v: v in DRAFTERS):
        problems.append(f"drafter {config.drafter!r} is not a drafter: use one of {ALLOWED['drafter']}")
    return problems


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def a_type(value: Any) -> str:
    """'a str', 'an int', 'a NoneType': the type of `value` with its article, for messages."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
