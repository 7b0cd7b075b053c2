"""Shared fixtures and the two switches of the graded tests.

    pytest                         # checks the reference solution (the course itself)
    pytest --impl student          # grades your tree (src/specdec)
    pytest --impl student -k "week_2_day_3 and task_1"

`--stub-check` (used by CI) inverts the grading of `test_task_*` tests: each must fail with the
NotImplementedError of its *own* stub ("Week W Day D Task T: ..."). It proves that the student
tree holds no solution and that every task's test reaches its own stub.

`--isolate` (with `--impl student`; run by tests/test_isolation.py) checks the course's promise
that a stuck task never blocks the next: for each graded test, the test's own task runs the
reference's code (as if the student had written it, in the student's module) and every other
task's student functions (kit/tasks.py) raise an AssertionError naming the call, so a test that
reaches another task's student code without `use_ref(...)` fails. Tests that are not
`test_task_*` are deselected under `--isolate`.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types

import mlx.core as mx
import pytest

from specdec.kit.impl import EXERCISE_MODULES, get_impl
from specdec.kit.models import markov_pair, tiny_llama_pair
from specdec.kit.tasks import TASKS, find_task
from support import replace_everywhere, tree_modules


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
    parser.addoption(
        "--isolate",
        action="store_true",
        help="(with --impl student) run each test_task_* with its own task's reference and every "
        "other task's student functions raising: proves no test needs another task's work",
    )


def pytest_report_header(config):
    isolate = " (--isolate: other tasks' student functions raise)" if config.getoption("--isolate") else ""
    return f"specdec implementation under test: {config.getoption('--impl')}{isolate}"


def pytest_configure(config):
    if config.getoption("--isolate") and config.getoption("--impl") != "student":
        raise pytest.UsageError("--isolate patches the student tree: use it with --impl student")
    if config.getoption("--isolate") and config.getoption("--stub-check"):
        raise pytest.UsageError("--isolate and --stub-check are two different checks: use one")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--isolate"):
        return
    kept = [item for item in items if graded_task(item) is not None]
    config.hook.pytest_deselected(items=[item for item in items if graded_task(item) is None])
    items[:] = kept


@pytest.fixture(scope="session", autouse=True)
def _every_exercise_module_imported_first():
    """Import both trees' exercise modules before any test patches anything: a module imported
    for the first time inside a test would copy that test's fakes (`from .cost import
    time_forward`, a default `clock=time.perf_counter`) and keep them for every later test, so a
    task's tests would pass or fail depending on which tests ran before them."""
    for package in ("specdec_ref", "specdec"):
        for name in EXERCISE_MODULES:
            try:
                importlib.import_module(f"{package}.{name}")
            except Exception:  # a student module that does not import yet: its own tests say so
                if package == "specdec_ref":
                    raise


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
        modules = tree_modules(impl)
        for path in dotted:
            module_name, *attrs = path.split(".")
            parent, ref_parent = impl.module(module_name), ref.module(module_name)
            for attr in attrs[:-1]:
                parent, ref_parent = getattr(parent, attr), getattr(ref_parent, attr)
            replacement = inspect.getattr_static(ref_parent, attrs[-1])
            replace_everywhere(monkeypatch, impl, path, replacement, modules)

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


def _week_day_task(item) -> tuple | None:
    """(W, D, T) of a graded test `test_task_T_*` in tests/test_week_W_day_D.py, else None."""
    f, t = _FILE.search(str(item.fspath)), _TASK.match(item.originalname or item.name)
    return (int(f.group(1)), int(f.group(2)), int(t.group(1))) if f and t else None


def expected_stub_tag(item) -> str | None:
    """'Week W Day D Task T:' for a graded test, from its file and function names."""
    wdt = _week_day_task(item)
    return None if wdt is None else "Week {} Day {} Task {}:".format(*wdt)


def graded_task(item):
    """The kit/tasks.py entry a `test_task_*` test grades, or None for any other test."""
    wdt = _week_day_task(item)
    return None if wdt is None else find_task(*wdt)


# --isolate --------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _isolate_other_tasks(request, monkeypatch):
    """Under --isolate: the test's own task runs the reference, every other task's student
    functions raise (and are recorded, in case the code under test swallows the error)."""
    own = graded_task(request.node) if request.config.getoption("--isolate") else None
    if own is None:
        yield
        return
    student, reference = get_impl("student"), get_impl("ref")
    calls: list[str] = []
    modules = tree_modules(student)  # once: nothing is imported while the loop replaces
    for task in TASKS:
        for qualname in task.functions:
            dotted = f"{task.module}.{qualname}"
            ref_parent, student_parent = reference.module(task.module), student.module(task.module)
            *owners, attr = qualname.split(".")
            for owner in owners:
                ref_parent, student_parent = getattr(ref_parent, owner), getattr(student_parent, owner)
            if task.key == own.key:
                replacement = _transplant(inspect.getattr_static(ref_parent, attr), student_parent,
                                          student.module(task.module), reference.module(task.module),
                                          monkeypatch)
            else:
                raw = inspect.getattr_static(student_parent, attr)
                replacement = _raiser(raw, own, task, dotted, calls)
            replace_everywhere(monkeypatch, student, dotted, replacement, modules)
    yield
    if calls and not getattr(request.node, "_isolation_call_failed", False):  # swallowed: say so
        pytest.fail(
            f"isolation: this test of {own.tag} reached other tasks' student code: "
            + "; ".join(dict.fromkeys(calls)) + ". Call use_ref(...) on them in the test, so a "
            "stuck earlier task cannot fail this one.", pytrace=False)


def _transplant(raw, student_owner, student_module, ref_module, monkeypatch):
    """The reference's function, run as if it were written in the student's module.

    Its global names (`time_forward`, another task's function, a provided helper) are looked up
    in the student's module, exactly as the student's own code would look them up — so another
    task's student function is reached (and caught) and a test's fakes in the student's module
    are seen. Names only the reference's module has are lent to the student's module for the
    test; `super()` in a method refers to the student's class.
    """
    for kind in (property, staticmethod, classmethod):
        if isinstance(raw, kind):
            if kind is property:
                parts = [raw.fget, raw.fset, raw.fdel]
                return property(*[_transplant(f, student_owner, student_module, ref_module, monkeypatch)
                                  if f is not None else None for f in parts], raw.__doc__)
            return kind(_transplant(raw.__func__, student_owner, student_module, ref_module, monkeypatch))
    if not isinstance(raw, types.FunctionType):
        return raw
    for name, value in vars(ref_module).items():
        if not hasattr(student_module, name):
            monkeypatch.setattr(student_module, name, value, raising=False)
    closure = raw.__closure__
    if closure and "__class__" in raw.__code__.co_freevars and isinstance(student_owner, type):
        cells = list(closure)
        cells[raw.__code__.co_freevars.index("__class__")] = types.CellType(student_owner)
        closure = tuple(cells)
    moved = types.FunctionType(raw.__code__, vars(student_module), raw.__name__, raw.__defaults__, closure)
    moved.__kwdefaults__, moved.__qualname__, moved.__doc__ = raw.__kwdefaults__, raw.__qualname__, raw.__doc__
    moved.__dict__.update(raw.__dict__)
    moved.__wrapped_reference__ = raw
    return moved


def _raiser(raw, own, task, dotted: str, calls: list):
    """A stand-in for another task's student function: records the call and raises."""
    message = (f"test of {own.tag} called {task.tag}'s student function {dotted}: "
               f"use use_ref({dotted!r}) in the test")

    def called_another_task(*args, **kwargs):
        calls.append(message)
        raise AssertionError(message)

    for kind in (property, staticmethod, classmethod):
        if isinstance(raw, kind):
            return kind(called_another_task)
    return called_another_task


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call" and call.excinfo is not None:
        item._isolation_call_failed = True
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
