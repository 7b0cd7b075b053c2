"""The scoreboard behind `specdec grade`: run the graded tests on your tree, one line per task.

Graded tests live in `tests/test_week_W_day_D.py` and are named `test_task_T_<what>`; all tests
of one task must pass for the task to count. A task whose test fails with that task's own
`NotImplementedError("Week W Day D Task T: ...")` is "not started": its stub is still a stub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

STUB_RE = re.compile(r"Week (\d+) Day (\d+) Task (\d+): ([A-Za-z_][\w.]*)")
FILE_RE = re.compile(r"test_week_(\d+)_day_(\d+)\.py$")
TASK_RE = re.compile(r"^test_task_(\d+)_(\w+?)(\[.*\])?$")


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
class Task:
    week: int
    day: int
    task: int
    test_names: list = field(default_factory=list)  # the <what> of each test_task_T_<what>
    stub_name: str = ""  # the function named by the task's stub ("logits_to_probs"), if known
    outcomes: dict = field(default_factory=dict)  # test node id -> passed | failed | stub
    first_failure: str = ""

    @property
    def name(self) -> str:
        """The stub's function name if known, else the common start of the tests' names."""
        if self.stub_name:
            return self.stub_name
        words = [n.split("_") for n in self.test_names]
        common = []
        for group in zip(*words):
            if len(set(group)) > 1:
                break
            common.append(group[0])
        return "_".join(common) or self.test_names[0]

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

    def __init__(self, stub_names: Optional[dict] = None):
        self.tasks: dict[tuple[int, int, int], Task] = {}
        self.stub_names = stub_names or {}

    def _task(self, item) -> Optional[Task]:
        f = FILE_RE.search(str(item.path))
        t = TASK_RE.match(item.name)
        if not (f and t):
            return None
        week, day, num = int(f.group(1)), int(f.group(2)), int(t.group(1))
        key = (week, day, num)
        task = self.tasks.setdefault(key, Task(week, day, num, stub_name=self.stub_names.get(key, "")))
        if t.group(2) not in task.test_names:
            task.test_names.append(t.group(2))
        return task

    def pytest_collection_modifyitems(self, items):
        for item in items:
            self._task(item)  # every collected task shows up, even if it never runs

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
                m = STUB_RE.match(str(exc))
                task.stub_name = task.stub_name or (m.group(4) if m else "")
            else:
                outcome = "failed"
                if not task.first_failure:
                    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    task.first_failure = f"{item.name}: {type(exc).__name__}: {first_line}"[:160]
            # A failure in setup/teardown counts too; never let a later phase undo a failure.
            if task.outcomes.get(item.nodeid) in (None, "passed"):
                task.outcomes[item.nodeid] = outcome


def stub_names() -> dict:
    """{(week, day, task): function name} for the stubs still in the student tree."""
    import specdec

    names = {}
    for path in sorted(Path(specdec.__file__).parent.glob("*.py")):
        for m in STUB_RE.finditer(path.read_text(encoding="utf-8")):
            names.setdefault(tuple(int(x) for x in m.groups()[:3]), m.group(4))
    return names


def select_files(tests: Path, week: Optional[int], day: Optional[int]) -> list[Path]:
    files = []
    for path in sorted(tests.glob("test_week_*_day_*.py")):
        m = FILE_RE.search(path.name)
        if m and (week is None or int(m.group(1)) == week) and (day is None or int(m.group(2)) == day):
            files.append(path)
    return sorted(files, key=lambda p: tuple(int(x) for x in FILE_RE.search(p.name).groups()))


def grade(week: Optional[int] = None, day: Optional[int] = None, verbose: bool = False) -> int:
    """Run the graded tests with `--impl student` in this process and print the scoreboard.

    Returns 0 when every selected task passes, 1 otherwise (2 if nothing was selected).
    """
    try:
        tests = tests_dir()
    except FileNotFoundError as e:
        print(f"specdec grade: {e}")
        return 2
    files = select_files(tests, week, day)
    if not files:
        what = " ".join(f"{k} {v}" for k, v in (("week", week), ("day", day)) if v is not None)
        print(f"specdec grade: no graded test files for {what or 'the course'} in {tests}")
        return 2
    collector = Collector(stub_names())
    args = [str(f) for f in files] + ["--impl", "student", "-q", "-p", "no:cacheprovider",
                                      "--rootdir", str(tests.parent), "-o", "addopts="]
    args += ["--tb=short", "-rfE"] if verbose else ["--tb=no", "-rN", "--no-header"]
    print(f"Grading your tree (src/specdec) on {len(files)} test file(s) ...", flush=True)
    pytest.main(args, plugins=[collector])
    print_scoreboard(collector.tasks)
    done = [t for t in collector.tasks.values() if t.status == "passed"]
    return 0 if collector.tasks and len(done) == len(collector.tasks) else 1


def print_scoreboard(tasks: dict) -> None:
    print()
    print("Scoreboard")
    print("==========")
    counts = {"passed": 0, "failed": 0, "not started": 0}
    for (week, day, num) in sorted(tasks):
        task = tasks[(week, day, num)]
        status = task.status
        counts[status] += 1
        passed = sum(v == "passed" for v in task.outcomes.values())
        tests = f"{passed}/{len(task.outcomes)} tests"
        mark = {"passed": "✔", "failed": "✘", "not started": "·"}[status]
        name = task.name if len(task.name) <= 36 else task.name[:35] + "…"
        print(f"{mark} Week {week} Day {day} Task {num}  {name:<36} {status:<12} {tests}")
        if status == "failed" and task.first_failure:
            print(f"      {task.first_failure}")
    total = len(tasks)
    print(f"\n{counts['passed']}/{total} tasks passed, {counts['failed']} failed, "
          f"{counts['not started']} not started")
    if counts["failed"] or counts["not started"]:
        print("Details for one task: pytest tests/test_week_W_day_D.py --impl student -k task_T")
