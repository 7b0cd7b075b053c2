"""How much code each task asks a student to write, per task and per day, from the reference.

    python scripts/task_sizes.py            # every task of the registry, day totals, flags
    python scripts/task_sizes.py --week 4   # one week

The rule: a task's size is the number of lines of the reference (`solutions/specdec_ref/`) bodies
of the task's functions (its entry in `src/specdec/kit/tasks.py`) that are not blank, not a
comment, and not the docstring; the `def` line and its signature do not count (the stub gives them).
A private helper the reference module defines but the student module does not (a `_name` the
student must write too) counts towards the first task, in registry order, whose code calls it
(directly or through another such helper). Code the student module already provides (the kit, or a
function whose stub is not a stub) does not count: the student reads it, not writes it.

A day is flagged when its total exceeds MAX_DAY_LINES or its largest task exceeds MAX_RATIO times
its smallest: the course's sizing target (a day is one sitting; within a day, tasks of comparable
weight). tests/test_task_sizes.py holds Week 4 to it.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "src", ROOT / "solutions"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from specdec.kit.tasks import TASKS, Task  # noqa: E402

MAX_DAY_LINES = 250
MAX_RATIO = 3.0


def _code_lines(node: ast.AST, source_lines: list) -> int:
    """Lines of `node`'s body that are code: not blank, not a comment, not the docstring."""
    body = list(node.body)
    first_value = body[0].value if body and isinstance(body[0], ast.Expr) else None
    if isinstance(first_value, ast.Constant) and isinstance(first_value.value, str):
        body = body[1:]
    if not body:
        return 0
    first, last = body[0].lineno, max(n.end_lineno for n in body)
    count = 0
    for line in source_lines[first - 1:last]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            count += 1
    return count


def _definitions(tree: ast.Module) -> dict:
    """{qualname: function node} for module functions and methods of module classes."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{child.name}"] = child
    return out


def _names_used(node: ast.AST) -> set:
    """Bare names and attribute names a function mentions (`_helper(...)`, `self._helper(...)`)."""
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            names.add(sub.attr)
    return names


@dataclass
class TaskSize:
    task: Task
    lines: int  # the task's functions plus the helpers charged to it
    functions: dict  # {qualname: lines}, helpers included


def _module_sources(module: str) -> tuple:
    ref = importlib.import_module(f"specdec_ref.{module}")
    student = importlib.import_module(f"specdec.{module}")
    ref_src = inspect.getsource(ref)
    ref_tree = ast.parse(ref_src)
    student_defs = _definitions(ast.parse(inspect.getsource(student)))
    return ref_src.splitlines(), _definitions(ref_tree), student_defs


def task_sizes(tasks=TASKS) -> list:
    """A TaskSize for every task, in registry order."""
    cache: dict = {}
    charged: set = set()  # (module, helper qualname) already counted for an earlier task
    out = []
    for task in tasks:
        if task.module not in cache:
            cache[task.module] = _module_sources(task.module)
        lines, ref_defs, student_defs = cache[task.module]
        sizes = {}
        todo = list(task.functions)
        seen = set()
        while todo:
            name = todo.pop(0)
            if name in seen or name not in ref_defs:
                continue
            seen.add(name)
            node = ref_defs[name]
            if name not in task.functions:  # a helper: count it once, for the first caller
                if (task.module, name) in charged:
                    continue
                charged.add((task.module, name))
            sizes[name] = _code_lines(node, lines)
            cls = name.rsplit(".", 1)[0] + "." if "." in name else ""
            for used in _names_used(node):
                for candidate in (used, cls + used):
                    if (candidate in ref_defs and candidate not in student_defs
                            and candidate.rsplit(".", 1)[-1].startswith("_")
                            and not candidate.rsplit(".", 1)[-1].startswith("__")):
                        todo.append(candidate)
        out.append(TaskSize(task, sum(sizes.values()), sizes))
    return out


@dataclass
class DaySize:
    week: int
    day: int
    tasks: list  # TaskSize, in task order

    @property
    def total(self) -> int:
        return sum(t.lines for t in self.tasks)

    @property
    def ratio(self) -> float:
        sizes = [t.lines for t in self.tasks]
        return max(sizes) / max(1, min(sizes))

    @property
    def problems(self) -> list:
        out = []
        if self.total > MAX_DAY_LINES:
            out.append(f"{self.total} lines > {MAX_DAY_LINES}")
        if len(self.tasks) > 1 and self.ratio > MAX_RATIO:
            big = max(self.tasks, key=lambda t: t.lines)
            small = min(self.tasks, key=lambda t: t.lines)
            out.append(f"Task {big.task.task} ({big.lines}) is {self.ratio:.1f}x Task {small.task.task} "
                       f"({small.lines}) > {MAX_RATIO:g}x")
        return out


def day_sizes(tasks=TASKS) -> list:
    """A DaySize for every day of the registry, in course order."""
    days: dict = {}
    for size in task_sizes(tasks):
        days.setdefault((size.task.week, size.task.day), []).append(size)
    return [DaySize(w, d, sizes) for (w, d), sizes in sorted(days.items())]


def report(days: list) -> str:
    rows = []
    for day in days:
        flag = "  <-- " + "; ".join(day.problems) if day.problems else ""
        rows.append(f"Week {day.week} Day {day.day}: {day.total} lines, max/min {day.ratio:.1f}x "
                    f"({day.tasks[0].task.chapter}){flag}")
        for size in day.tasks:
            parts = ", ".join(f"{name} {n}" for name, n in size.functions.items())
            name = size.task.name if len(size.task.name) <= 40 else size.task.name[:37] + "..."
            rows.append(f"    Task {size.task.task} {name:<40} {size.lines:4d}   ({parts})")
    flagged = [d for d in days if d.problems]
    rows.append(f"{len(days)} days, {len(flagged)} flagged (> {MAX_DAY_LINES} lines or > {MAX_RATIO:g}x)"
                + (": " + ", ".join(f"W{d.week}D{d.day}" for d in flagged) if flagged else ""))
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--week", type=int, help="only this week")
    args = parser.parse_args(argv)
    tasks = [t for t in TASKS if args.week is None or t.week == args.week]
    if not tasks:
        parser.error(f"no task in Week {args.week}: the registry has weeks "
                     f"{sorted({t.week for t in TASKS})}")
    print(report(day_sizes(tasks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
