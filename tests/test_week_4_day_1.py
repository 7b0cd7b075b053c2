"""Week 4 Day 1 — configuration and contracts. Chapter: book/src/week4-01-config-contracts.md

Task 1: SpeculativeConfig.validate (every problem at once, each naming field, value and fix)
Task 2: SpeculativeConfig.to_dict / from_dict (round trips through a dict and JSON)
Task 3: check_probs, check_verification (the promises of the math)
Task 4: check_committed, check_lookahead, check_batched_rows (the promises of the loops)
Task 5: checked, set_contract_checking (the switch: every call checked when on, zero cost off)

Most tests are property-based (hypothesis): a strategy draws many cases — random and adversarial
distributions, random acceptance sequences, random configs — and the test states what must hold
for all of them. `derandomize=True` makes the examples a fixed function of the test, so CI sees
the same cases on every run; a failure prints the smallest example hypothesis found.
A check is graded both ways: it must accept every correct output of the reference (no false
alarms) and reject every broken variant of it (no missed bugs).
"""

import dataclasses
import json
import re
from collections import Counter
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import trim_prompt_cache

from specdec.kit import config as kit_config
from specdec.kit import contracts as kit_contracts
from specdec.kit.impl import get_impl
from support import raises

CHAPTER = "book/src/week4-01-config-contracts.md"
VALIDATE = ("config.SpeculativeConfig.validate",)
CHECKS = ("check_probs", "check_verification", "check_committed", "check_lookahead", "check_batched_rows")


def prop(max_examples: int):
    """Hypothesis settings for this file: deterministic (derandomize), no deadline, no database."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# Configs ----------------------------------------------------------------------------------------
POLICIES = ("threshold", "heuristic", "goodput")
DRAFTERS = ("model", "ngram", "tree")
BATCHED_DRAFTERS = kit_config.BATCHED_DRAFTERS  # every drafter but "tree"
NAN, INF = float("nan"), float("inf")
# Values that are wrong for a field whatever the other fields hold.
INVALID = {
    "lookahead": [0, -3, "4", 2.5, True],
    "min_lookahead": [0, -1, "1", None],
    "max_lookahead": [0, 8.0, "8"],
    "adaptive": ["greedy", "", 3, "Threshold"],
    "window": [0, -5, 2.0],
    "raise_above": [1.5, -0.1, NAN, "high"],
    "lower_below": [-0.1, 1.2, INF],
    "temperature": [-0.5, NAN, INF, "0.7", True],
    "top_k": [-1, 3.0, "10"],
    "top_p": [0, 0.0, -0.2, 1.5, NAN],
    "max_tokens": [0, -10, 12.0, None],
    "drafter": ["fast", "Model", None, 1],
    "max_ngram": [0, "3"],
    "min_ngram": [0, -1, 1.0],
    "tree_branching": [0, -2, "2"],
    "batch_size": [0, -1, 2.0],
    "fallback": ["yes", 1, None],
    "fallback_window": [0, -16, 16.5],
    "fallback_margin": [-0.1, 1.0, 2, NAN],
    "probe_every": [0, "32"],
    "probe_budget": [0, 0.0, -0.05, 1.5, NAN, "0.05"],
    "memory_limit_mb": [0, -100, NAN, "1GB", True],
    "seed": [-1, 2**64, 1.5, "0"],
    "check_contracts": ["no", 0, None],
}
DEFAULTS = dict(lookahead=4, min_lookahead=1, max_lookahead=8, adaptive=None, window=10,
                raise_above=0.85, lower_below=0.60, temperature=0.0, top_k=0, top_p=1.0,
                max_tokens=128, drafter="model", max_ngram=3, min_ngram=1, tree_branching=2,
                batch_size=1, fallback=True, fallback_window=16, fallback_margin=0.05,
                probe_every=32, probe_budget=0.02, memory_limit_mb=None, seed=0,
                check_contracts=False)


@st.composite
def valid_configs(draw) -> dict:
    """Keyword arguments of a valid SpeculativeConfig (every field, cross-field rules kept)."""
    lo = draw(st.integers(1, 4))
    hi = draw(st.integers(lo, 16))
    lower = draw(st.floats(0.0, 1.0))
    min_ngram = draw(st.integers(1, 4))
    kwargs = dict(
        lookahead=draw(st.integers(lo, hi)), min_lookahead=lo, max_lookahead=hi,
        adaptive=draw(st.sampled_from([None, *POLICIES])), window=draw(st.integers(1, 50)),
        raise_above=draw(st.floats(lower, 1.0)), lower_below=lower,
        temperature=draw(st.sampled_from([0.0, 0, 0.7, 1]) | st.floats(0.0, 2.0)),
        top_k=draw(st.integers(0, 100)), top_p=draw(st.floats(0.0, 1.0, exclude_min=True)),
        max_tokens=draw(st.integers(1, 4096)), drafter=draw(st.sampled_from(DRAFTERS)),
        max_ngram=draw(st.integers(min_ngram, 6)), min_ngram=min_ngram,
        tree_branching=draw(st.integers(1, 4)), batch_size=draw(st.integers(1, 8)),
        fallback=draw(st.booleans()), fallback_window=draw(st.integers(1, 64)),
        fallback_margin=draw(st.floats(0.0, 0.99)), probe_every=draw(st.integers(1, 256)),
        probe_budget=draw(st.floats(0.0, 1.0, exclude_min=True)),
        memory_limit_mb=draw(st.none() | st.floats(0.5, 1e6)), seed=draw(st.integers(0, 2**64 - 1)),
        check_contracts=draw(st.booleans()),
    )
    if kwargs["drafter"] == "tree":  # greedy only, fixed depth
        kwargs.update(temperature=0.0, adaptive=None)
    if kwargs["batch_size"] > 1:  # batched decoding: a drafter that drafts every row, fixed K
        kwargs.update(adaptive=None)
        if kwargs["drafter"] not in BATCHED_DRAFTERS:
            kwargs.update(drafter="model")
    return kwargs


def naming(problems: list[str], field: str, value) -> list[str]:
    """The problem lines that name `field` (as a whole word) and show `value`."""
    word = re.compile(rf"(?<!\w){re.escape(field)}(?!\w)")
    return [p for p in problems if word.search(p) and str(value) in p]


def config_error(impl, why: str, build):
    """The ConfigError that `build()` must raise, with its problems checked for form."""
    with raises(impl.config.ConfigError, why) as caught:
        try:
            build()
        except TypeError as e:
            pytest.fail(f"TypeError ({e}) instead of ConfigError: {why}. A field of the wrong type is "
                        "one problem, and the range and cross-field checks must skip it (type_problems "
                        f"returns the names of such fields) ({CHAPTER}, Task 1)")
    error = caught.value
    problems = error.problems
    assert isinstance(problems, list) and problems and all(isinstance(p, str) for p in problems), (
        f"ConfigError.problems must be the non-empty list of problem strings, got {problems!r}"
    )
    for p in problems:
        assert "\n" not in p and re.search(r": \S", p) and p in str(error), (
            f"each problem is one line, 'what is wrong: the fix', and appears in the message; got "
            f"{p!r} ({CHAPTER}, Task 1)"
        )
    return problems


# Task 1 -----------------------------------------------------------------------------------------
def test_task_1_defaults_are_valid_and_frozen(impl):
    Config = impl.config.SpeculativeConfig
    config = Config()
    assert config.validate() == [], f"the defaults are valid: validate() must return [], got {config.validate()!r}"
    for name, value in DEFAULTS.items():
        assert getattr(config, name) == value, f"default {name} should be {value!r}"
    with raises(dataclasses.FrozenInstanceError, "a SpeculativeConfig is frozen: fields cannot be set"):
        config.lookahead = 6
    assert dataclasses.replace(config, lookahead=6).lookahead == 6
    config_error(impl, "dataclasses.replace(config, lookahead=0) must validate again and raise",
                 lambda: dataclasses.replace(config, lookahead=0))


@pytest.mark.parametrize("field", sorted(INVALID))
def test_task_1_each_problem_names_field_value_and_fix(impl, field):
    Config = impl.config.SpeculativeConfig
    for value in INVALID[field]:
        problems = config_error(
            impl, f"SpeculativeConfig({field}={value!r}) is invalid and must raise ConfigError "
            f"({CHAPTER}, Task 1): a problem of one field alone is what the provided "
            f"type_problems(self) and range_problems(self, bad) report; does validate add both?",
            lambda: Config(**{field: value}))
        assert naming(problems, field, value), (
            f"SpeculativeConfig({field}={value!r}): one problem line must name the field "
            f"{field!r} and show the value {value!r}; got {problems}"
        )


def test_task_1_the_issue_example(impl):
    problems = config_error(impl, "min_lookahead 6 > max_lookahead 4 must be refused",
                            lambda: impl.config.SpeculativeConfig(min_lookahead=6, max_lookahead=4))
    assert [p for p in naming(problems, "min_lookahead", 6) if p in naming(problems, "max_lookahead", 4)], (
        f"a problem line must name both bounds and their values, like 'min_lookahead 6 > "
        f"max_lookahead 4: ...'; got {problems}"
    )
    about_k = [p for p in problems if p.startswith("lookahead ")]
    assert not about_k, (
        f"with min_lookahead 6 > max_lookahead 4 there is no range to put K in: the class "
        f"docstring says lookahead is checked against its bounds only when they are in order, so "
        f"this is one problem (the bounds), not a second one about lookahead; got {about_k} "
        f"({CHAPTER}, Task 1)"
    )


CROSS_FIELD = [
    (dict(lookahead=9), ["lookahead", "max_lookahead"]),
    (dict(lookahead=2, min_lookahead=3), ["lookahead", "min_lookahead"]),
    (dict(lower_below=0.9, raise_above=0.8), ["lower_below", "raise_above"]),
    (dict(min_ngram=4, max_ngram=2), ["min_ngram", "max_ngram"]),
    (dict(drafter="tree", temperature=0.7), ["drafter", "temperature"]),
    (dict(drafter="tree", adaptive="heuristic"), ["drafter", "adaptive"]),
    (dict(batch_size=3, drafter="tree"), ["batch_size", "drafter"]),
    (dict(batch_size=2, adaptive="goodput"), ["batch_size", "adaptive"]),
]


def test_the_class_docstring_lists_every_cross_field_rule(impl):
    """The failure below says "breaks a cross-field rule of the class docstring": make it true."""
    doc = impl.config.SpeculativeConfig.__doc__
    assert "Cross-field rules" in doc, "SpeculativeConfig's docstring has a 'Cross-field rules' list"
    rules = doc.split("Cross-field rules", 1)[1].split("\n\n", 1)[0]
    items = [" ".join(item.split()) for item in rules.split("\n      - ")[1:]]
    for kwargs, fields in CROSS_FIELD:
        assert any(all(re.search(rf"(?<!\w){f}(?!\w)", item) for f in fields) for item in items), (
            f"the class docstring's cross-field rules must state the rule that "
            f"SpeculativeConfig({kwargs}) breaks (one item naming {fields}); items: {items}"
        )


@pytest.mark.parametrize("drafter", BATCHED_DRAFTERS)
def test_task_1_every_batched_drafter_may_batch(impl, drafter):
    try:
        impl.config.SpeculativeConfig(batch_size=4, drafter=drafter)
    except impl.config.ConfigError as e:
        raise AssertionError(
            f"SpeculativeConfig(batch_size=4, drafter={drafter!r}) is valid: every drafter in "
            f"BATCHED_DRAFTERS {BATCHED_DRAFTERS} drafts a whole batch ({CHAPTER}, Task 1); got {e}"
        ) from None


@pytest.mark.parametrize("kwargs, fields", CROSS_FIELD)
def test_task_1_cross_field_rules(impl, kwargs, fields):
    problems = config_error(impl, f"SpeculativeConfig({kwargs}) breaks a cross-field rule of the "
                            f"class docstring ({CHAPTER}, Task 1)",
                            lambda: impl.config.SpeculativeConfig(**kwargs))
    lines = [p for p in problems if all(naming([p], f, kwargs.get(f, "")) for f in fields)]
    assert lines, f"SpeculativeConfig({kwargs}): a problem must name {fields} (with the values set); got {problems}"


def test_task_1_wrong_types_are_problems_not_type_errors(impl):
    bad = dict(lookahead="4", min_lookahead=None, max_lookahead=8.0, temperature="hot",
               drafter=None, batch_size="2", adaptive=3, window=0)
    problems = config_error(impl, "values of the wrong type must be reported, not crash the "
                            "comparisons (skip a field whose type is wrong)",
                            lambda: impl.config.SpeculativeConfig(**bad))
    missing = [f for f, v in bad.items() if not naming(problems, f, v)]
    assert not missing, f"every wrong field must be reported at once; missing {missing} in {problems}"


def test_task_1_validate_returns_the_list(impl):
    config = impl.config.SpeculativeConfig()
    object.__setattr__(config, "window", 0)  # bypass frozen to test validate() on its own
    problems = config.validate()
    assert isinstance(problems, list) and len(problems) == 1 and naming(problems, "window", 0), (
        f"validate() returns the problems as a list of strings (window=0 -> one problem naming "
        f"it); got {problems!r}"
    )


def test_task_1_random_configs_all_problems_at_once(impl):
    Config = impl.config.SpeculativeConfig
    Config()  # an unfinished task fails here at once, not deep in hypothesis's search

    @prop(150)
    @given(base=valid_configs(), data=st.data())
    def check(base, data):
        broken = data.draw(st.lists(st.sampled_from(sorted(INVALID)), unique=True, max_size=5), "broken")
        kwargs = dict(base)
        for field in broken:
            kwargs[field] = data.draw(st.sampled_from(INVALID[field]), field)
        if not broken:
            config = Config(**kwargs)  # must not raise: a valid config
            assert config.validate() == [], f"a valid config: validate() must return [], got {config.validate()}"
            return
        problems = config_error(impl, f"SpeculativeConfig with invalid {broken} must raise",
                                lambda: Config(**kwargs))
        missing = [f"{f}={kwargs[f]!r}" for f in broken if not naming(problems, f, kwargs[f])]
        assert not missing, (
            f"validation must report EVERY problem at once: no line names {missing}; got {problems} "
            f"({CHAPTER}, Task 1)"
        )

    check()


# Task 2 -----------------------------------------------------------------------------------------
def test_task_2_to_dict_is_plain_and_complete(impl, use_ref):
    use_ref(*VALIDATE)
    config = impl.config.SpeculativeConfig(lookahead=6, adaptive="goodput", temperature=0.7,
                                           memory_limit_mb=2048.0, seed=2**63)
    d = config.to_dict()
    names = [f.name for f in dataclasses.fields(config)]
    assert isinstance(d, dict) and list(d) == names, (
        f"to_dict must return a dict of every field, in declaration order; got keys {list(d)}"
    )
    assert all(d[n] == getattr(config, n) for n in names), "to_dict values must be the field values"
    assert json.loads(json.dumps(d)) == d, "to_dict must hold plain values json.dumps accepts"
    d["lookahead"] = 99
    assert config.to_dict()["lookahead"] == 6, "to_dict must return a fresh dict each call"


def test_task_2_round_trips_through_dict_and_json(impl, use_ref):
    use_ref(*VALIDATE)
    impl.config.SpeculativeConfig().to_dict()  # an unfinished task fails here at once

    @prop(100)
    @given(kwargs=valid_configs())
    def check(kwargs):
        Config = impl.config.SpeculativeConfig
        config = Config(**kwargs)
        back = Config.from_dict(config.to_dict())
        assert type(back) is Config and back == config, (
            f"from_dict(to_dict(c)) must equal c; got {back} for {config}"
        )
        again = Config.from_json(config.to_json())
        assert again == config, f"from_json(to_json(c)) must equal c; got {again} for {config}"

    check()


def test_task_2_from_dict_fills_in_defaults_and_keeps_its_input(impl, use_ref):
    use_ref(*VALIDATE)
    Config = impl.config.SpeculativeConfig
    data = {"lookahead": 6, "temperature": 0.5}
    snapshot = dict(data)
    assert Config.from_dict(data) == Config(lookahead=6, temperature=0.5), (
        "fields from_dict does not get keep their defaults"
    )
    assert data == snapshot, "from_dict must not modify the dict it is given"
    assert Config.from_dict({}) == Config(), "from_dict({}) is the default config"


def test_task_2_unknown_keys_and_bad_values_reported_together(impl, use_ref):
    use_ref(*VALIDATE)
    Config = impl.config.SpeculativeConfig
    problems = config_error(impl, "from_dict with unknown keys must raise ConfigError",
                            lambda: Config.from_dict({"lookahed": 3, "temprature": 0.5, "zzz": 1, "window": 0}))
    for key, hint in (("lookahed", "lookahead"), ("temprature", "temperature"), ("zzz", None)):
        lines = [p for p in problems if key in p]
        assert lines, f"the unknown key {key!r} must be named in a problem; got {problems}"
        if hint:
            assert any(re.search(rf"(?<!\w){hint}(?!\w)", p) for p in lines), (
                f"the problem for {key!r} should suggest the closest field {hint!r}; got {lines}"
            )
    assert naming(problems, "window", 0), (
        f"unknown keys and invalid values are reported together (window=0 too); got {problems}"
    )


def test_task_2_from_dict_and_json_refuse_what_is_not_an_object(impl, use_ref):
    use_ref(*VALIDATE)
    Config = impl.config.SpeculativeConfig
    config_error(impl, "from_dict of a list is a problem too (a dict of fields is expected)",
                 lambda: Config.from_dict([("lookahead", 4)]))
    config_error(impl, "from_json of a JSON array must raise ConfigError", lambda: Config.from_json("[4]"))
    config_error(impl, "from_json of text that is not JSON must raise ConfigError",
                 lambda: Config.from_json("{lookahead: 4"))


# Task 3: adversarial distributions -----------------------------------------------------------------
MODES = ("random", "sparse", "q_zero", "disjoint", "equal", "near_one_hot", "one_hot")


def row_pair(rng: np.random.Generator, V: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """One row of (p, q), float64 [V], each summing to 1, in one of the adversarial MODES."""
    def dist(support=None):
        w = rng.exponential(size=V) * (1.0 if support is None else support)
        return w / w.sum()

    def some(size_low=1):  # a random non-empty proper subset mask (V >= 2)
        mask = np.zeros(V, bool)
        mask[rng.permutation(V)[: rng.integers(size_low, V)]] = True
        return mask

    if mode == "random":
        return dist(), dist()
    if mode == "sparse":
        return dist(some()), dist(some())
    if mode == "q_zero":  # q = 0 on tokens where p > 0
        return dist(), dist(~some())
    if mode == "disjoint":
        a = some()
        return dist(a), dist(~a)
    if mode == "equal":
        p = dist()
        return p, p.copy()
    hot_p, hot_q = rng.integers(V), rng.integers(V)
    if mode == "near_one_hot":
        eps_p, eps_q = 10 ** rng.uniform(-7, -2, size=2)
        return ((1 - eps_p) * np.eye(V)[hot_p] + eps_p / V, (1 - eps_q) * np.eye(V)[hot_q] + eps_q / V)
    return np.eye(V)[hot_p], np.eye(V)[hot_q]


@st.composite
def rounds(draw):
    """One verification round: p [K + 1, V], q [K, V], drafts [K], their modes, a PRNG seed."""
    V, K = draw(st.integers(2, 16)), draw(st.integers(1, 6))
    modes = draw(st.lists(st.sampled_from(MODES), min_size=K + 1, max_size=K + 1))
    anywhere = draw(st.lists(st.booleans(), min_size=K, max_size=K))  # drafts q could not draw
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pairs = [row_pair(rng, V, m) for m in modes]
    p, q = np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])[:K]
    drafts = [int(rng.integers(V)) if anywhere[i] else int(rng.choice(V, p=q[i])) for i in range(K)]
    return SimpleNamespace(V=V, K=K, p=p, q=q, drafts=drafts, modes=modes, seed=draw(st.integers(0, 2**31)))


def verify_round(ref, case):
    """Run the reference's verification on a round; return (logits, q, greedy, sampled results)."""
    logits = mx.array(np.where(case.p > 0, np.log(np.maximum(case.p, 1e-300)), -np.inf), dtype=mx.float32)
    q = mx.array(case.q, dtype=mx.float32)
    drafts = mx.array(case.drafts, dtype=mx.int32)
    sampled = ref.verify.verify_speculation(drafts, logits, q, 1.0, mx.random.key(case.seed))
    greedy = ref.verify.verify_greedy(drafts, logits)
    return logits, q, greedy, sampled


def no_false_alarm(check, what: str, *args):
    """Run a student's check on a CORRECT output: it must stay silent."""
    try:
        check(*args)
    except AssertionError as e:  # ContractError is an AssertionError
        pytest.fail(f"{check.__name__} raised on a correct output ({what}): a check must not cry "
                    f"wolf. It said: {e} ({CHAPTER})")


def test_task_3_check_probs_accepts_distributions(impl, ref):
    logits = mx.random.normal((3, 5, 64), key=mx.random.key(0)) * 4
    logits = mx.where(mx.arange(64) % 7 == 0, -mx.inf, logits)  # impossible tokens
    cases = {f"make_probs(T={t}, top_k={k}, top_p={p})": ref.sampling.make_probs(logits, t, k, p)
             for t, k, p in [(0.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 5, 1.0), (2.0, 0, 0.8), (1.0, 3, 0.5)]}
    cases["one-hot row"] = mx.eye(8)[3]
    cases["float16 rows"] = ref.sampling.make_probs(logits, 1.0).astype(mx.float16)
    for what, probs in cases.items():
        no_false_alarm(impl.contracts.check_probs, what, probs, what)
    columns = mx.softmax(mx.random.normal((6, 4), key=mx.random.key(1)), axis=0)
    no_false_alarm(impl.contracts.check_probs, "columns summing to 1, axis=0", columns, "columns", 0)
    with raises(impl.contracts.ContractError, "columns sum to 1, rows do not: check_probs(axis=-1) "
                "must check the axis it is given", match="sum"):
        impl.contracts.check_probs(columns, "rows", -1)


@pytest.mark.parametrize("what, values, match", [
    ("a NaN", [[0.5, NAN, 0.5]], r"(?i)finite|nan"),
    ("an infinity", [[0.5, INF, 0.0]], r"(?i)finite|inf"),
    ("a negative probability", [[0.6, -0.1, 0.5]], r"(?i)negative"),
    ("a row summing to 0.5", [[0.25, 0.25, 0.0], [0.2, 0.3, 0.5]], r"(?i)sum"),
    ("an all-zero row (a residual left unnormalised)", [[0.2, 0.3, 0.5], [0.0, 0.0, 0.0]], r"(?i)sum"),
    ("a row summing to 1.5", [[1.0, 0.5, 0.0]], r"(?i)sum"),
])
def test_task_3_check_probs_names_each_violation(impl, what, values, match):
    with raises(impl.contracts.ContractError, f"check_probs must reject {what} ({CHAPTER}, Task 3)",
                match=match) as caught:
        impl.contracts.check_probs(mx.array(values, dtype=mx.float32), "my_probs")
    assert "my_probs" in str(caught.value), (
        f"the message must name what was checked (name='my_probs'); got {caught.value}"
    )
    for shape in [(), (0,)]:
        with raises(impl.contracts.ContractError, f"an array of shape {shape} holds no distribution"):
            impl.contracts.check_probs(mx.zeros(shape), "empty")


def test_task_3_verification_on_adversarial_p_and_q(impl, ref):
    """The reference's verify_greedy / verify_speculation / residual_distribution keep their
    contracts on q = 0 where p > 0, disjoint supports, q = p, near one-hot rows, ... — and your
    checks say so (no false alarm)."""
    impl.contracts.check_probs(mx.eye(3), "eye")  # an unfinished task fails here at once

    @prop(120)
    @given(case=rounds())
    def check(case):
        logits, q, greedy, sampled = verify_round(ref, case)
        residual = ref.verify.residual_distribution(mx.softmax(logits[: case.K], axis=-1), q)
        no_false_alarm(impl.contracts.check_probs, "residual_distribution", residual, "residual_distribution")
        no_false_alarm(impl.contracts.check_verification, f"verify_speculation -> {sampled}",
                       *sampled, mx.array(case.drafts), case.V, "verify_speculation")
        no_false_alarm(impl.contracts.check_verification, f"verify_greedy -> {greedy}",
                       *greedy, case.drafts, case.V, "verify_greedy")
        # What the adversarial cases pin down about the reference itself (Week 2 Day 3):
        n, tokens = sampled
        p_of, q_of = case.p[range(case.K), case.drafts], case.q[range(case.K), case.drafts]
        sure_reject = [i for i in range(case.K) if q_of[i] == 0 or p_of[i] == 0]
        sure_accept = [i for i in range(case.K) if q_of[i] > 0 and p_of[i] >= q_of[i]]
        if sure_reject:
            assert n <= sure_reject[0], f"a draft with q = 0 or p = 0 is never accepted: n = {n}, rows {sure_reject}"
        first_open = next((i for i in range(case.K) if i not in sure_accept), case.K)
        assert n >= first_open, f"a draft with p >= q > 0 (e.g. q = p) is always accepted: n = {n} < {first_open}"
        assert case.p[n][tokens[n]] > 0, f"the correction/bonus token {tokens[n]} has target probability 0"

    check()


def test_task_3_checks_reject_every_broken_output(impl, ref):
    impl.contracts.check_verification(0, [1], [2])  # an unfinished task fails here at once

    @prop(100)
    @given(case=rounds())
    def check(case):
        logits, q, _, (n, tokens) = verify_round(ref, case)
        K, V, drafts = case.K, case.V, case.drafts
        ContractError = impl.contracts.ContractError
        mutants = [
            ("n = K + 1", K + 1, drafts + [0, 0]),
            ("n = -1", -1, []),
            ("one token too many", n, tokens + [0]),
            ("the correction/bonus token missing", n, tokens[:-1]),
            ("n as an mx.array", mx.array(n), tokens),
            ("n as a float", float(n), tokens),
            ("tokens as an mx.array", n, mx.array(tokens)),
            ("a token outside the vocabulary", n, tokens[:-1] + [V]),
        ]
        if n > 0:
            i = n - 1
            mutants.append((f"accepted token {i} replaced", n, tokens[:i] + [(drafts[i] + 1) % V] + tokens[i + 1:]))
        for what, bad_n, bad_tokens in mutants:
            with raises(ContractError, f"check_verification must reject {what} (drafts {drafts}, "
                        f"correct result ({n}, {tokens})) ({CHAPTER}, Task 3)", match="verify_speculation"):
                impl.contracts.check_verification(bad_n, bad_tokens, drafts, V, "verify_speculation")
        probs = np.array(mx.softmax(logits, axis=-1))
        row, col = case.seed % probs.shape[0], case.seed % V
        broken = {"a NaN": NAN, "an infinity": INF, "a negative value": -0.25}
        for what, value in broken.items():
            bad = probs.copy()
            bad[row, col] = value
            with raises(ContractError, f"check_probs must reject {what} at [{row}, {col}]"):
                impl.contracts.check_probs(mx.array(bad), "p")
        for scale in (0.5, 0.99, 1.01, 2.0):
            bad = probs.copy()
            bad[row] *= scale
            with raises(ContractError, f"check_probs must reject row {row} scaled by {scale} (it sums to {scale})"):
                impl.contracts.check_probs(mx.array(bad), "p")

    check()


def test_task_3_check_verification_edge_cases(impl):
    check = impl.contracts.check_verification
    for n, tokens, drafts in [(0, [5], [3]), (1, [3, 5], [3]), (0, [3], [3, 4]), (2, [3, 4, 3], [3, 4])]:
        no_false_alarm(check, f"n={n}, tokens={tokens}, drafts={drafts}", n, tokens, drafts)
        no_false_alarm(check, "drafts as an mx.array", n, tokens, mx.array(drafts, dtype=mx.int32), 8)
    with raises(impl.contracts.ContractError, "n = True is a bool, not an int: reject it"):
        check(True, [3, 5], [3])


# Task 4 -----------------------------------------------------------------------------------------
class Layer:
    """A KV cache layer reduced to what commit_round touches: offset, is_trimmable, trim."""

    def __init__(self, offset: int):
        self.offset = offset

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        return n


def fake_decoder(S: int, K: int, layers: int):
    """A decoder after a round's target call: target holds S + K, draft S + K - 1."""
    return SimpleNamespace(target_cache=[Layer(S + K) for _ in range(layers)],
                           draft_cache=[Layer(S + K - 1) for _ in range(layers)])


def test_task_4_check_committed_after_random_rounds(impl, ref):
    # all K accepted; an unfinished task fails here at once
    impl.contracts.check_committed(fake_decoder(2, 1, 1), 4, [5, 6])

    @prop(100)
    @given(S=st.integers(1, 40), K=st.integers(1, 8), layers=st.integers(1, 3), data=st.data())
    def check(S, K, layers, data):
        n = data.draw(st.integers(0, K), "num_accepted")
        drafts, committed = list(range(10, 10 + K)), S + n + 1
        decoder = fake_decoder(S, K, layers)
        unseen = ref.speculative.commit_round(decoder, drafts, n, 7)
        no_false_alarm(impl.contracts.check_committed, f"S={S}, K={K}, n={n}", decoder, committed, unseen)
        stateless = SimpleNamespace(target_cache=decoder.target_cache, draft_cache=[])
        no_false_alarm(impl.contracts.check_committed, "a drafter without state (draft_cache [])",
                       stateless, committed, unseen)

        def off_by(role: str, delta: int, layer=None):
            d = fake_decoder(S, K, layers)
            ref.speculative.commit_round(d, drafts, n, 7)
            for i, c in enumerate(getattr(d, f"{role}_cache")):
                if layer is None or i == layer:
                    c.offset += delta
            return d

        # (what, decoder, fed, the word the message must hold: the cache it names, as promised)
        mutants = [(f"the {role} cache {delta:+d} token", off_by(role, delta), unseen, role)
                   for role in ("target", "draft") for delta in (-1, 1)]
        if layers > 1:
            mutants.append(("one target layer trimmed on its own", off_by("target", -1, layer=1), unseen,
                            "target"))
        mutants.append(("three tokens to feed the draft", decoder, [1, 2, 3], None))
        for what, d, fed, word in mutants:
            with raises(impl.contracts.ContractError, f"check_committed must reject {what} (S={S}, K={K}, "
                        f"n={n}: the committed sequence has {committed} tokens), naming the cache "
                        f"({word!r}) ({CHAPTER}, Task 4)", match=word):
                impl.contracts.check_committed(d, committed, fed)

    check()


def test_task_4_check_committed_on_real_caches(impl, ref, llama_models):
    """mlx-lm KVCache layers (offset = tokens held) after real rounds, greedy, K = 3."""
    draft_model, target_model = llama_models
    decoder = ref.draft.SpeculativeDecoder(draft_model, target_model, lookahead=3)
    committed, draft_unseen, target_unseen = [1, 2, 3, 4, 5], mx.array([1, 2, 3, 4, 5]), mx.array([1, 2, 3, 4, 5])
    for _ in range(4):
        drafts, q = decoder.draft_generation(draft_unseen, 3)
        logits = target_model(mx.concatenate([target_unseen, drafts])[None], cache=decoder.target_cache)[0, -4:]
        n, tokens = ref.verify.verify_greedy(drafts, logits)
        unseen = ref.speculative.commit_round(decoder, drafts.tolist(), n, tokens[-1])
        committed += tokens
        no_false_alarm(impl.contracts.check_committed, f"a real round (n={n})", decoder, len(committed), unseen)
        draft_unseen, target_unseen = mx.array(unseen), mx.array(tokens[-1:])
    trim_prompt_cache(decoder.draft_cache, 1)
    with raises(impl.contracts.ContractError, "the draft cache lost one token: check_committed must say so"):
        impl.contracts.check_committed(decoder, len(committed), unseen)


def test_task_4_adaptive_lookahead_stays_in_bounds(impl, ref):
    """Random acceptance sequences through every Week 3 policy: each K is in [lo, hi]."""
    impl.contracts.check_lookahead(2, 1, 3)  # an unfinished task fails here at once

    @prop(100)
    @given(policy=st.sampled_from(POLICIES), lo=st.integers(1, 4), span=st.integers(0, 8), data=st.data())
    def check(policy, lo, span, data):
        hi = lo + span
        lower = data.draw(st.floats(0.0, 1.0), "lower_below")
        speculator = ref.adaptive.AdaptiveSpeculator(
            data.draw(st.integers(lo, hi), "initial"), lo, hi, policy, data.draw(st.integers(1, 6), "window"),
            data.draw(st.floats(lower, 1.0), "raise_above"), lower)
        timing = st.none() | st.floats(1e-4, 0.1)
        rounds_ = data.draw(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 100), timing, timing),
                                     min_size=1, max_size=30), "rounds")
        for short, accepted, draft_s, verify_s in rounds_:
            drafted = max(1, speculator.lookahead - short % 2 * short)  # sometimes fewer (end of text)
            k = speculator.update(drafted, accepted % (drafted + 1), draft_s, verify_s)
            no_false_alarm(impl.contracts.check_lookahead, f"{policy} K={k}", k, lo, hi, policy)
        alpha, c, slope = (data.draw(st.floats(0.0, 1.0)), data.draw(st.floats(0.0, 2.0)),
                           data.draw(st.floats(0.0, 1.0)))
        k = ref.adaptive.best_lookahead(alpha, c, lambda K: 1.0 + slope * K, lo, hi)
        no_false_alarm(impl.contracts.check_lookahead, f"best_lookahead({alpha}, {c}) = {k}", k, lo, hi, "best_lookahead")
        for what, bad in [("K = hi + 1", hi + 1), ("K = lo - 1", lo - 1), ("a float K", float(k)),
                          ("a bool K", True), ("an mx.array K", mx.array(k))]:
            with raises(impl.contracts.ContractError, f"check_lookahead({bad!r}, {lo}, {hi}) must reject "
                        f"{what} ({CHAPTER}, Task 4)", match="goodput_test"):
                impl.contracts.check_lookahead(bad, lo, hi, "goodput_test")

    check()


PROMPTS = ([1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11])


def test_task_4_check_batched_rows_structure(impl):
    check, ContractError = impl.contracts.check_batched_rows, impl.contracts.ContractError
    good = [[1, 2, 3, 4], [5, 0], [6, 7, 8, 9]]  # 0 is EOS; max_tokens 4
    no_false_alarm(check, f"{good}", good, PROMPTS, 4, (0,))
    no_false_alarm(check, "max_tokens 0: empty rows", [[], [], []], PROMPTS, 0)
    for what, outputs in [
        ("two rows for three prompts", good[:2]),
        ("a row longer than max_tokens", [[1, 2, 3, 4, 5], [5, 0], [6, 7, 8, 9]]),
        ("a row going on after its EOS", [[1, 0, 3, 4], [5, 0], [6, 7, 8, 9]]),
        ("a row stopping early without EOS", [[1, 2, 3, 4], [5, 6], [6, 7, 8, 9]]),
        ("a row of mx.array tokens", [[1, 2, 3, 4], [5, 0], mx.array([6, 7, 8, 9])]),
    ]:
        with raises(ContractError, f"check_batched_rows must reject {what}: {outputs} ({CHAPTER}, Task 4)"):
            check(outputs, PROMPTS, 4, (0,))


def test_task_4_check_batched_rows_compares_rows_alone(impl, ref, markov_models):
    draft_model, target_model = markov_models
    outputs = ref.batched.batched_speculative_decode(list(PROMPTS), draft_model, target_model, 12, 3)
    calls = []

    def decode_one(prompt):
        calls.append(list(prompt))
        return ref.batched.batched_speculative_decode([prompt], draft_model, target_model, 12, 3)[0]

    no_false_alarm(impl.contracts.check_batched_rows, "the reference's batch", outputs, list(PROMPTS), 12, (), decode_one)
    assert sorted(calls) == sorted(map(list, PROMPTS)), (
        f"with decode_one, every prompt must be decoded alone once; got calls {calls}"
    )
    assert outputs[0] != outputs[2], "test setup: rows 0 and 2 differ"
    swapped = [outputs[2], outputs[1], outputs[0]]
    with raises(impl.contracts.ContractError, "rows 0 and 2 swapped: each row must equal its prompt "
                f"decoded alone ({CHAPTER}, Task 4)", match="row 0"):
        impl.contracts.check_batched_rows(swapped, list(PROMPTS), 12, (), decode_one)


# Task 5 -----------------------------------------------------------------------------------------
def test_task_5_checked_binds_arguments_by_name(impl):
    def f(a, b=2, *, c=3):
        """f's docstring."""
        return a + b + c

    seen = []

    def around(fn, call):
        seen.append(dict(call))
        return ("checked", fn(**call))

    wrapped = impl.contracts.checked(f, around)
    assert wrapped(1) == ("checked", 6) and wrapped(1, c=5, b=4) == ("checked", 10), (
        "the wrapper returns what around(fn, call) returns"
    )
    assert seen == [{"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 4, "c": 5}], (
        f"call must map every parameter name to its value, defaults filled in; got {seen}"
    )
    assert wrapped.__name__ == "f" and wrapped.__doc__ == "f's docstring." and wrapped.__wrapped__ is f, (
        "the wrapper carries fn's name and docstring and __wrapped__ = fn (functools.wraps)"
    )

    class Box:
        def get(self, x):
            return x

    Box.get = impl.contracts.checked(Box.get, around)
    box = Box()
    assert box.get(7) == ("checked", 7) and seen[-1] == {"self": box, "x": 7}, (
        "a checked method binds self like any other argument"
    )


def module_refs(package: str, obj) -> list[str]:
    """'module.name' for every attribute of a loaded module of `package` that IS obj."""
    import sys

    return sorted(f"{name}.{attr}" for name, mod in list(sys.modules.items())
                  if mod is not None and (name == package or name.startswith(package + "."))
                  for attr, value in list(vars(mod).items()) if value is obj)


def test_task_5_switch_wraps_everywhere_and_off_restores_identity(impl):
    contracts, package = impl.contracts, impl.package
    originals = {dotted: contracts.lookup(package, dotted) for dotted in contracts.CONTRACTS}
    homes = {dotted: module_refs(package, fn) for dotted, fn in originals.items()}
    try:
        assert contracts.set_contract_checking(True) is False, "set_contract_checking returns the previous state (off)"
        assert contracts.contracts_enabled(), "after set_contract_checking(True), checking is on"
        wrappers = {}
        for dotted, original in originals.items():
            wrapper = contracts.lookup(package, dotted)
            assert wrapper is not original and getattr(wrapper, "__wrapped__", None) is original, (
                f"with checking on, {package}.{dotted} must be a checked wrapper of the original"
            )
            if "." not in dotted.split(".", 1)[1]:  # module functions: every copy is the wrapper
                assert module_refs(package, wrapper) == homes[dotted] and not module_refs(package, original), (
                    f"every module that imported {dotted} must now see the wrapper (copies made by "
                    f"`from .{dotted.split('.')[0]} import ...` included): {homes[dotted]}"
                )
            wrappers[dotted] = wrapper
        assert contracts.set_contract_checking(True) is True, "turning on what is on returns True"
        assert all(contracts.lookup(package, d) is w for d, w in wrappers.items()), (
            "turning on twice must not wrap the wrappers"
        )
    finally:
        assert contracts.set_contract_checking(False) is True, "turning off returns the previous state (on)"
    assert not contracts.contracts_enabled()
    for dotted, original in originals.items():
        assert contracts.lookup(package, dotted) is original and module_refs(package, original) == homes[dotted], (
            f"off must put back the very same object everywhere ({dotted}): then the hot path runs "
            f"exactly the code it ran before — no cost ({CHAPTER}, Task 5)"
        )
    assert contracts.set_contract_checking(False) is False, "turning off what is off changes nothing"


def spy_on_checks(impl, ref, monkeypatch) -> Counter:
    """Replace the check functions the CONTRACTS table calls by counting (reference) ones."""
    counts = Counter()
    for name in CHECKS:
        real = getattr(ref.contracts, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(impl.contracts, name, spy)
    return counts


def test_task_5_checks_run_when_on_and_never_when_off(impl, ref, use_ref, monkeypatch):
    use_ref("sampling.logits_to_probs", "verify.verify_greedy")
    counts = spy_on_checks(impl, ref, monkeypatch)
    drafts, logits = mx.array([1, 2, 3]), mx.eye(8)[mx.array([1, 2, 5, 0])] * 5
    impl.verify.verify_greedy(drafts, logits)
    with impl.contracts.contract_checking():
        assert impl.verify.verify_greedy(drafts, logits) == (2, [1, 2, 5])
        assert counts["check_verification"] == 1, (
            f"with checking on, each call of verify_greedy runs check_verification once; counted "
            f"{counts['check_verification']}"
        )
    impl.verify.verify_greedy(drafts, logits)
    assert counts["check_verification"] == 1, "with checking off, no check may run"

    def broken_verify(draft_tokens, target_logits):  # a planted bug: one token too many
        return 2, [1, 2, 5, 6]

    monkeypatch.setattr(impl.verify, "verify_greedy", broken_verify)
    assert impl.verify.verify_greedy(drafts, logits) == (2, [1, 2, 5, 6]), "off: the bug goes unseen"
    with raises(impl.contracts.ContractError, f"with checking on, a verify_greedy returning 4 tokens "
                f"for n = 2 must raise ContractError ({CHAPTER}, Task 5)"):
        with impl.contracts.contract_checking():
            impl.verify.verify_greedy(drafts, logits)
    assert not impl.contracts.contracts_enabled(), "contract_checking() restores the state even on an error"


def test_task_5_every_loop_checked_on_the_reference(impl, ref, monkeypatch, markov_models):
    """Your switch, applied to the reference package (package="specdec_ref"): every loop of Weeks
    2-3 runs with its contracts checked, gives the same tokens, and a planted bug is caught."""
    draft_model, target_model = markov_models
    prompt = mx.array([1, 2, 3, 4], dtype=mx.int32)

    def run_all():
        def spec(decoder, T):
            return [t for t, _ in ref.speculative.speculative_generate(decoder, prompt, 24, T, mx.random.key(5))]
        out = [spec(ref.draft.SpeculativeDecoder(draft_model, target_model, 3), T) for T in (0.0, 1.0)]
        out.append(spec(ref.drafters.DrafterDecoder(ref.drafters.NgramDrafter(), target_model, 3), 0.0))
        speculator = ref.adaptive.AdaptiveSpeculator(policy="heuristic")  # timings never steer it
        decoder = ref.draft.SpeculativeDecoder(draft_model, target_model, 3)
        out.append([t for t, _ in ref.adaptive.adaptive_generate(decoder, speculator, prompt, 24, 1.0, mx.random.key(6))])
        out.append(ref.batched.batched_speculative_decode(list(PROMPTS), draft_model, target_model, 12, 3))
        return out

    expected = run_all()
    counts = spy_on_checks(impl, ref, monkeypatch)
    with impl.contracts.contract_checking(package=ref.package):
        got = run_all()
    assert got == expected, "checking contracts must never change what the decoder produces"
    missing = [name for name in CHECKS if counts[name] == 0]
    assert not missing, (
        f"with checking on for {ref.package}, every loop's contracts run; these checks never ran: "
        f"{missing} (counts {dict(counts)}) ({CHAPTER}, Task 5)"
    )
    assert not impl.contracts.contracts_enabled(ref.package)
    real_commit = ref.speculative.commit_round

    def commit_one_short(decoder, draft_tokens, num_accepted, new_token):  # a planted bug
        unseen = real_commit(decoder, draft_tokens, num_accepted, new_token)
        trim_prompt_cache(decoder.target_cache, 1)  # the target loses a committed token
        return unseen

    monkeypatch.setattr(ref.speculative, "commit_round", commit_one_short)
    decoder = ref.draft.SpeculativeDecoder(draft_model, target_model, 3)
    with raises(impl.contracts.ContractError, "a commit_round that drops one committed token from the "
                "target cache must be caught at that round by check_committed", match="target"):
        with impl.contracts.contract_checking(package=ref.package):
            list(ref.speculative.speculative_generate(decoder, prompt, 24))


# The kit ------------------------------------------------------------------------------------------
def test_provided_code_lives_once_in_the_kit():
    """Provided code is one copy (specdec/kit/config.py, contracts.py) that both trees import."""
    for impl in (get_impl("student"), get_impl("ref")):
        config, contracts = impl.config, impl.contracts
        assert issubclass(config.SpeculativeConfig, kit_config.ConfigFields), (
            f"{config.__name__}.SpeculativeConfig must build on the kit's ConfigFields (fields, JSON)")
        assert config.type_problems is kit_config.type_problems and config.POLICIES is kit_config.POLICIES
        assert config.range_problems is kit_config.range_problems, (
            f"{config.__name__}.range_problems must be the kit's, not a copy")
        assert (contracts.lookup, contracts.rebind, contracts.cache_offset) == (
            kit_contracts.lookup, kit_contracts.rebind, kit_contracts.cache_offset), (
            f"{contracts.__name__} must re-export the kit's lookup, rebind and cache_offset, not copies")
        assert sorted(contracts.CONTRACTS) == sorted(kit_contracts.contract_table(contracts)), (
            f"{contracts.__name__}.CONTRACTS must be the kit's contract_table of its own checks")
