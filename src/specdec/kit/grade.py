"""The scoreboard behind `specdec grade`: run the graded tests on your tree, one line per task.

Graded tests live in `tests/test_week_W_day_D.py` and are named `test_task_T_<what>`; all tests
of one task must pass for the task to count. A task whose test fails with that task's own
`NotImplementedError("Week W Day D Task T: ...")` is "not started": its stub is still a stub.
Each line is labelled from the task registry (`specdec.kit.tasks`), so a task keeps its name
once you have filled it in.
"""

from __future__ import annotations

import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from specdec.kit.tasks import TASKS, find_task

FILE_RE = re.compile(r"test_week_(\d+)_day_(\d+)\.py$")
TASK_RE = re.compile(r"^test_task_(\d+)_(\w+?)(\[.*\])?$")
NUMPY_HEADERS = ("Not equal to tolerance", "Arrays are not", "Items are not equal")
NUMPY_DETAILS = ("Mismatched elements", "Max absolute difference", "x:", "ACTUAL:", "(shapes")
WIDTH = 100  # failure messages are wrapped to this many columns


def tests_dir() -> Path:
    """The repository's tests/ folder (the package is installed editable from the repo)."""
    import specdec

    path = Path(specdec.__file__).resolve().parents[2] / "tests"
    if not (path / "conftest.py").is_file():
        raise FileNotFoundError(
            f"no graded tests at {path}: `specdec grade` runs from a checkout of the course "
            "repository installed with `pip install -e .` (run it inside the repo)"
        )
    return path


@dataclass
class TaskResult:
    week: int
    day: int
    task: int
    test_names: list = field(default_factory=list)  # the <what> of each test_task_T_<what>
    outcomes: dict = field(default_factory=dict)  # test node id -> passed | failed | stub
    first_failure: str = ""  # "test name: ExceptionType: first line of its message"

    @property
    def name(self) -> str:
        """The task's registry label (stable whether or not the stub is filled in).

        A task missing from the registry is named by the common start of its tests' names.
        """
        entry = find_task(self.week, self.day, self.task)
        if entry is not None:
            return entry.name
        words = [n.split("_") for n in self.test_names]
        common = []
        for group in zip(*words):
            if len(set(group)) > 1:
                break
            common.append(group[0])
        return "_".join(common) or (self.test_names[0] if self.test_names else "?")

    @property
    def command(self) -> str:
        return f"pytest tests/test_week_{self.week}_day_{self.day}.py --impl student -k task_{self.task}"

    @property
    def status(self) -> str:
        values = list(self.outcomes.values())
        if values and all(v == "passed" for v in values):
            return "passed"
        if "stub" in values:
            return "not started"
        return "failed"


class Collector:
    """A pytest plugin: records each graded test's outcome, spotting its own stub's error."""

    def __init__(self):
        self.tasks: dict[tuple[int, int, int], TaskResult] = {}
        self.collection_errors: list[str] = []  # "tests/x.py: ImportError: ..."

    def _task(self, item) -> Optional[TaskResult]:
        f = FILE_RE.search(str(item.path))
        t = TASK_RE.match(item.name)
        if not (f and t):
            return None
        key = (int(f.group(1)), int(f.group(2)), int(t.group(1)))
        task = self.tasks.setdefault(key, TaskResult(*key))
        if t.group(2) not in task.test_names:
            task.test_names.append(t.group(2))
        return task

    def pytest_collection_modifyitems(self, items):
        for item in items:
            self._task(item)  # every collected task shows up, even if it never runs

    def pytest_collectreport(self, report):
        if report.failed:
            f = FILE_RE.search(report.nodeid)
            if f:  # the file's tasks still get a line on the scoreboard
                for task in TASKS:
                    if (task.week, task.day) == (int(f.group(1)), int(f.group(2))):
                        self.tasks.setdefault(task.key, TaskResult(*task.key, first_failure=(
                            f"{Path(report.nodeid).name} could not be loaded (see the top)")))
            text = str(report.longrepr).strip().splitlines()
            # The last line of a collection error names the exception: "E   ImportError: ...".
            last = next((line for line in reversed(text) if line.startswith("E ")), text[-1] if text else "")
            self.collection_errors.append(f"{report.nodeid or 'tests'}: {last.lstrip('E').strip()}")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        yield
        task = self._task(item)
        if task is None:
            return
        if call.when == "call" or call.excinfo is not None:
            exc = call.excinfo.value if call.excinfo is not None else None
            tag = f"Week {task.week} Day {task.day} Task {task.task}:"
            if exc is None:
                outcome = "passed"
            elif isinstance(exc, NotImplementedError) and str(exc).startswith(tag):
                outcome = "stub"
            else:
                outcome = "failed"
                if not task.first_failure:
                    task.first_failure = failure_line(item.name, exc)
            # A failure in setup/teardown counts too; never let a later phase undo a failure.
            if task.outcomes.get(item.nodeid) in (None, "passed"):
                task.outcomes[item.nodeid] = outcome


def failure_line(test_name: str, exc: BaseException) -> str:
    """'test: ExceptionType: the first line of its message', in full (the hint is at its end)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else "(no message)"
    # numpy.testing puts its own header first and the test's err_msg (the hint) on line 2.
    if first.startswith(NUMPY_HEADERS) and len(lines) > 1 and not lines[1].startswith(NUMPY_DETAILS):
        first = f"{lines[1]} ({first})"
    return f"{test_name}: {type(exc).__name__}: {first}"


def select_files(tests: Path, week: Optional[int], day: Optional[int]) -> list[Path]:
    files = []
    for path in sorted(tests.glob("test_week_*_day_*.py")):
        m = FILE_RE.search(path.name)
        if m and (week is None or int(m.group(1)) == week) and (day is None or int(m.group(2)) == day):
            files.append(path)
    return sorted(files, key=lambda p: tuple(int(x) for x in FILE_RE.search(p.name).groups()))


def grade(week: Optional[int] = None, day: Optional[int] = None, verbose: bool = False) -> int:
    """Run the graded tests with `--impl student` in this process and print the scoreboard.

    Only the scoreboard is printed; verbose adds pytest's own report (failure details) above it.
    Returns 0 when every selected task passes, 1 otherwise (2 if nothing was selected).
    """
    try:
        tests = tests_dir()
    except FileNotFoundError as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2
    files = select_files(tests, week, day)
    if not files:
        what = " ".join(f"{k} {v}" for k, v in (("week", week), ("day", day)) if v is not None)
        weeks = sorted({int(FILE_RE.search(p.name).group(1)) for p in select_files(tests, None, None)})
        print(f"specdec: error: no graded test files for {what or 'the course'} in {tests}: "
              f"weeks {weeks[0]}-{weeks[-1]} have them" if weeks else "", file=sys.stderr)
        return 2
    collector = Collector()
    args = [str(f) for f in files] + ["--impl", "student", "-p", "no:cacheprovider",
                                      "--rootdir", str(tests.parent), "-o", "addopts=",
                                      "--continue-on-collection-errors"]  # one broken file only
    # pytest's own report ("45 failed") reads as alarming for a tree of fresh stubs: without
    # -v the terminal reporter is off and the scoreboard is the whole output.
    args += ["-q", "--tb=short", "-rfE"] if verbose else ["-p", "no:terminal"]
    print(f"Grading your tree (src/specdec) on {len(files)} test file(s) ...", flush=True)
    code = pytest.main(args, plugins=[collector])
    if code in (pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR):
        print(f"specdec: error: pytest stopped ({code.name}); rerun with -v to see why", file=sys.stderr)
        return 2
    print_scoreboard(collector.tasks, collector.collection_errors)
    done = [t for t in collector.tasks.values() if t.status == "passed"]
    ok = collector.tasks and len(done) == len(collector.tasks) and not collector.collection_errors
    return 0 if ok else 1


def print_scoreboard(tasks: dict, collection_errors: Optional[list] = None) -> None:
    print()
    print("Scoreboard")
    print("==========")
    for error in collection_errors or []:
        print(textwrap.fill(f"could not load {error}", WIDTH, initial_indent="! ",
                            subsequent_indent="    "))
    counts = {"passed": 0, "failed": 0, "not started": 0}
    for key in sorted(tasks):
        task = tasks[key]
        status = task.status
        counts[status] += 1
        passed = sum(v == "passed" for v in task.outcomes.values())
        tests = f"{passed}/{len(task.outcomes)} tests"
        mark = {"passed": "✔", "failed": "✘", "not started": "·"}[status]
        name = task.name if len(task.name) <= 39 else task.name[:38] + "…"
        print(f"{mark} Week {task.week} Day {task.day} Task {task.task}  {name:<40}{status:<12} {tests}")
        if status == "failed" and task.first_failure:
            print(textwrap.fill(task.first_failure, WIDTH, initial_indent=" " * 6,
                                subsequent_indent=" " * 8, break_on_hyphens=False))
            print(f"      details: {task.command}")
    total = len(tasks)
    print(f"\n{counts['passed']}/{total} tasks passed, {counts['failed']} failed, "
          f"{counts['not started']} not started")
    if counts["not started"]:
        print("Not started: the task's stub still raises its NotImplementedError (see its chapter).")
    if counts["failed"] or counts["not started"]:
        print("Details: pytest tests/test_week_W_day_D.py --impl student -k task_T (or grade -v)")
