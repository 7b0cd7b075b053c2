"""Shared fixtures and the two switches of the graded tests.

    pytest                         # checks the reference solution (the course itself)
    pytest --impl student          # grades your tree (src/specdec)
    pytest --impl student -k "week_2_day_3 and task_1"

`--stub-check` (used by CI) inverts the grading of `test_task_*` tests: each must fail with the
NotImplementedError of its *own* stub ("Week W Day D Task T: ..."). It proves that the student
tree holds no solution and that every task's test reaches its own stub.
"""

from __future__ import annotations

import re
import sys

import mlx.core as mx
import pytest

from specdec.kit.impl import get_impl
from specdec.kit.models import markov_pair, tiny_llama_pair


def pytest_addoption(parser):
    parser.addoption(
        "--impl",
        choices=["ref", "student"],
        default="ref",
        help="implementation to grade: ref (solutions/specdec_ref, default) or student (src/specdec)",
    )
    parser.addoption(
        "--stub-check",
        action="store_true",
        help="require every test_task_* to fail with its own task's NotImplementedError",
    )


def pytest_report_header(config):
    return f"specdec implementation under test: {config.getoption('--impl')}"


@pytest.fixture(scope="session")
def impl(request):
    """The implementation under test: `impl.sampling`, `impl.verify`, ..."""
    return get_impl(request.config.getoption("--impl"))


@pytest.fixture(scope="session")
def ref():
    """The reference implementation, for the tasks a test is *not* grading."""
    return get_impl("ref")


@pytest.fixture
def use_ref(impl, ref, monkeypatch):
    """Replace earlier tasks' functions in the student tree by the reference ones.

    `use_ref("verify.verify_speculation", "draft.SpeculativeDecoder.__init__")` makes the task
    under test independent of those tasks: one stuck task does not fail the rest.
    A no-op when grading the reference.
    """

    def patch(*dotted: str) -> None:
        if impl.name == "ref":
            return
        for path in dotted:
            module_name, *attrs = path.split(".")
            student_parent, ref_parent = impl.module(module_name), ref.module(module_name)
            for attr in attrs[:-1]:
                student_parent, ref_parent = getattr(student_parent, attr), getattr(ref_parent, attr)
            original = getattr(student_parent, attrs[-1])
            replacement = getattr(ref_parent, attrs[-1])
            monkeypatch.setattr(student_parent, attrs[-1], replacement)
            if len(attrs) == 1:  # also rebind `from .module import name` copies in the tree
                for name, mod in list(sys.modules.items()):
                    if name.startswith(impl.package + ".") and getattr(mod, attrs[-1], None) is original:
                        monkeypatch.setattr(mod, attrs[-1], replacement)

    return patch


# Models -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def markov_models():
    """(draft, target) Markov-chain LMs, V = 12, with a period-3 position dependence."""
    return markov_pair(vocab_size=12, seed=3, mix=0.4, period=3)


@pytest.fixture(scope="session")
def llama_models():
    """(draft, target) tiny random-weight mlx-lm llamas, V = 64."""
    return tiny_llama_pair(seed=0)


@pytest.fixture
def key():
    """A fresh, fixed PRNG key for each test: tests never depend on global random state."""
    return mx.random.key(1234)


# --stub-check -----------------------------------------------------------------------------------
_FILE = re.compile(r"test_week_(\d+)_day_(\d+)\.py$")
_TASK = re.compile(r"^test_task_(\d+)_")


def expected_stub_tag(item) -> str | None:
    """'Week W Day D Task T:' for a graded test, from its file and function names."""
    f, t = _FILE.search(str(item.fspath)), _TASK.match(item.originalname or item.name)
    if not (f and t):
        return None
    return f"Week {int(f.group(1))} Day {int(f.group(2))} Task {int(t.group(1))}:"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if not item.config.getoption("--stub-check") or call.when != "call":
        return
    tag = expected_stub_tag(item)
    if tag is None:
        return
    report = outcome.get_result()
    exc = call.excinfo.value if call.excinfo is not None else None
    if isinstance(exc, NotImplementedError) and str(exc).startswith(tag):
        report.outcome, report.longrepr = "passed", None
        return
    report.outcome = "failed"
    got = "it passed" if exc is None else f"got {type(exc).__name__}: {str(exc)[:300]}"
    report.longrepr = (
        f"stub check: against the student stubs this test must raise "
        f"NotImplementedError('{tag} ...'), but {got}. Either the student tree holds a "
        "solution, or the test does not reach its own task's stub first (use the `use_ref` "
        "fixture for earlier tasks)."
    )
