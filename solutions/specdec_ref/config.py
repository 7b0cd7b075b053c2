"""Week 4 Day 1 — configuration: one frozen, validated `SpeculativeConfig` for the whole decoder.

Every knob of the course in one place: the lookahead and its bounds, the adaptive policy, the
sampling settings, the drafter, the batch, the fallback controller, the memory limit, the seed.
A config that exists is valid: construction runs `validate()` and raises `ConfigError` listing
EVERY problem at once, one line each, naming the field, the value and the fix. It round-trips
through a dict and JSON, so a run can be saved, diffed and replayed; the CLI builds from it.
"""

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

# Provided code lives once, in the kit; re-exported here (specdec.config.type_problems, ...).
from specdec.kit.config import (
    ALLOWED,
    AT_LEAST_ONE,
    BATCHED_DRAFTERS,
    DEFAULTS,
    DRAFTERS,
    MAX_SEED,
    POLICIES,
    ConfigFields,
    a_type,
    range_problems,
    type_problems,
)
from specdec.kit.errors import ConfigError


@dataclass(frozen=True)
class SpeculativeConfig(ConfigFields):
    """Everything the decoder and the CLI take, validated once (frozen: change it with
    `dataclasses.replace(config, lookahead=6)`, which validates again).

    lookahead        K: the fixed K, or the start of an adaptive / fallback run
    min_lookahead    the smallest K an adaptive policy may pick (>= 1)
    max_lookahead    the largest K an adaptive policy or the fallback controller may pick
    adaptive         None (fixed K) or a Week 3 Day 1 policy: "threshold", "heuristic", "goodput"
    window           rounds the threshold policy averages over (>= 1)
    raise_above      threshold policy: K + 1 when the mean acceptance is above this
    lower_below      threshold policy: K - 1 when it is below this (0 <= lower <= raise <= 1)
    temperature      0 = greedy; > 0 samples (Week 1 Day 1)
    top_k            keep the k most probable tokens; 0 = off
    top_p            nucleus mass in (0, 1]; 1.0 = off
    max_tokens       tokens to generate per prompt (>= 1)
    drafter          "model" (a draft model), "ngram" (prompt lookup), "tree" (token trees),
                     "medusa", "eagle", "layerskip" (Week 5: kit/drafter_registry.py builds them)
    max_ngram        n-gram drafter: longest suffix to look up
    min_ngram        n-gram drafter: shortest suffix (1 <= min_ngram <= max_ngram)
    tree_branching   tree drafter: children per node on its first two levels (depth = lookahead)
    batch_size       prompts decoded together (Week 3 Day 2)
    fallback         use the Week 4 Day 3 controller (K may drop to 0 = plain decoding)
    fallback_window  rounds of history for the controller's estimates (>= 1)
    fallback_margin  hysteresis in [0, 1): leave below 1, come back above 1 + margin
    probe_every      while plain, try speculation again every this many tokens (>= 1)
    probe_budget     in (0, 1]: the most a failed probe may cost, as a share of the plain time
                     before it (the controller waits longer between probes that cost more)
    memory_limit_mb  None, or a limit in MB (> 0) above which the decoder lowers K and the batch
    seed             PRNG seed, 0 .. 2**64 - 1
    check_contracts  check every core function's contract (Week 4 Day 1 contracts; slow)

    Cross-field rules (`validate` reports each broken one as a problem naming the fields
    involved and their values):
      - min_lookahead <= max_lookahead;
      - min_lookahead <= lookahead <= max_lookahead, checked only when the bounds are in order
        (with min_lookahead > max_lookahead there is no range for K: that is one problem, the
        bounds, not a second one about lookahead);
      - lower_below <= raise_above (otherwise K would rise and fall at once);
      - min_ngram <= max_ngram;
      - drafter "tree" needs temperature 0 (greedy only) and adaptive None (its depth is fixed);
      - batch_size > 1 needs a drafter in BATCHED_DRAFTERS (all but "tree": those that draft
        every row of a batch at once) and adaptive None (fixed K).

    The fields, their defaults, `__post_init__` (runs `validate`, raises ConfigError), `to_json`
    and `from_json` are provided by `ConfigFields` (`specdec.kit.config`), with the helpers
    `type_problems`, `range_problems`, `POLICIES`, `DRAFTERS`, `BATCHED_DRAFTERS`, `MAX_SEED`, `ALLOWED`, `DEFAULTS`,
    `AT_LEAST_ONE`.
    """

    def validate(self) -> list[str]:
        """Every problem with this config, one string each; [] when it is valid.

        Each problem names the field and its value, then ": ", then the fix, e.g.
        "min_lookahead 6 > max_lookahead 4: swap them, or lower min_lookahead to at most 4".
        Checks, all of them every time (never stop at the first problem):
          - types: int fields hold ints (not bools, not floats, not strings); float fields hold
            finite ints or floats (not bools, not NaN or inf); fallback and check_contracts hold
            bools; adaptive is None or a str; memory_limit_mb is None or a finite number. A field
            of the wrong type gets one problem, and the checks below skip it (never a TypeError).
            Provided: `problems, bad = type_problems(self)`, bad the names of those fields;
          - ranges, one field at a time (lookahead >= 1, 0 < top_p <= 1, drafter in DRAFTERS,
            ...). Provided: `range_problems(self, bad)`, whose docstring lists every range;
          - every cross-field rule of the class docstring, skipping a rule that involves a field
            in `bad`: one problem per broken rule, naming each field involved and its value.
        """
        problems, bad_type = type_problems(self)
        problems += range_problems(self, bad_type)

        def typed(*names: str) -> bool:  # may these fields be compared? (their type is right)
            return not bad_type.intersection(names)

        # Cross-field rules.
        if typed("min_lookahead", "max_lookahead") and self.min_lookahead > self.max_lookahead:
            problems.append(f"min_lookahead {self.min_lookahead} > max_lookahead "
                            f"{self.max_lookahead}: swap them, or lower min_lookahead to at most "
                            f"{self.max_lookahead}")
        elif typed("lookahead", "min_lookahead", "max_lookahead") and not (
            self.min_lookahead <= self.lookahead <= self.max_lookahead
        ):
            problems.append(f"lookahead {self.lookahead} is outside [min_lookahead "
                            f"{self.min_lookahead}, max_lookahead {self.max_lookahead}]: pick K "
                            "inside the bounds, or widen them")
        if typed("lower_below", "raise_above") and self.lower_below > self.raise_above:
            problems.append(f"lower_below {self.lower_below} > raise_above {self.raise_above}: "
                            "K would rise and fall at once; swap them")
        if typed("min_ngram", "max_ngram") and self.min_ngram > self.max_ngram:
            problems.append(f"min_ngram {self.min_ngram} > max_ngram {self.max_ngram}: swap them")
        if typed("drafter", "temperature") and self.drafter == "tree" and self.temperature > 0:
            problems.append(f"drafter 'tree' with temperature {self.temperature}: the tree drafter "
                            "is greedy only; set temperature=0 or use drafter='model'")
        if typed("drafter", "adaptive") and self.drafter == "tree" and self.adaptive is not None:
            problems.append(f"drafter 'tree' with adaptive {self.adaptive!r}: the tree's depth "
                            "is fixed; set adaptive=None or use drafter='model'")
        if typed("batch_size", "drafter", "adaptive") and self.batch_size > 1 and (
            self.drafter not in BATCHED_DRAFTERS or self.adaptive is not None
        ):
            problems.append(f"batch_size {self.batch_size} with drafter {self.drafter!r} and "
                            f"adaptive {self.adaptive!r}: batched decoding drafts every row in "
                            f"one call with a fixed K; set drafter to one of "
                            f"{', '.join(map(repr, BATCHED_DRAFTERS))} and adaptive=None, or "
                            "batch_size=1")
        return problems

    def to_dict(self) -> dict:
        """{field name: value} for every field, in declaration order: plain Python values
        (int, float, str, bool, None) that `json.dumps` accepts. A fresh dict each call."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SpeculativeConfig":
        """The config `data` describes; fields it leaves out keep their defaults.

        Raises ConfigError listing every problem at once: each unknown key (naming it, and the
        closest field name if one is close, e.g. "unknown field 'lookahed': did you mean
        'lookahead'?") together with every problem `validate` finds in the known fields.
        `data` that is not a mapping is one problem too. `data` is not modified.
        """
        if not isinstance(data, Mapping):
            raise ConfigError([f"config {data!r} is {a_type(data)}, not a dict: pass a dict of "
                               "field names to values, e.g. {'lookahead': 4}"])
        names = [f.name for f in dataclasses.fields(cls)]
        problems = []
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(names)}"
                problems.append(f"unknown field {key!r}: {hint}")
        try:
            config = cls(**{k: v for k, v in data.items() if k in names})
        except ConfigError as e:
            problems += e.problems
        if problems:
            raise ConfigError(problems)
        return config
