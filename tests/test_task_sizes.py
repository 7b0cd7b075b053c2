"""A course day is one sitting: Week 4 stays within its size (scripts/task_sizes.py; not graded).

Every Week 4 day asks at most MAX_DAY_LINES lines of student code (the reference's task bodies,
counted by the script's rule), and within a day no task is more than MAX_RATIO times another.
A day that breaks it needs rebalancing (merge a trivial task into its neighbour, split an
oversized one, or move boilerplate into provided kit code), not a larger bound.
"""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sizes():
    spec = importlib.util.spec_from_file_location("task_sizes", ROOT / "scripts" / "task_sizes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("task_sizes", module)
    spec.loader.exec_module(module)
    return module


def test_the_rule_counts_code_lines_only(sizes):
    source = '''
def f(x):
    """A docstring,

    over lines."""
    # a comment

    y = (x +
         1)  # a trailing comment is still code
    text = """not a docstring"""
    return y
'''
    node = ast.parse(source).body[0]
    assert sizes._code_lines(node, source.splitlines()) == 4, (
        "the rule: lines of the body that are not blank, not a comment and not the docstring")


def test_a_helper_counts_once_for_its_first_caller(sizes):
    from specdec.kit.tasks import Task

    tasks = [Task(2, 4, 1, "speculative", ("commit_round",), "book/src/week2-04-full-loop.md"),
             Task(2, 4, 2, "speculative", ("speculative_generate",), "book/src/week2-04-full-loop.md")]
    first, second = sizes.task_sizes(tasks)
    assert "_trim" in first.functions and "_trim" not in second.functions, (
        f"the reference's private helper _trim (absent from the stub) counts for commit_round, its "
        f"first caller, once: {first.functions}, {second.functions}")


def test_every_week_4_day_fits_one_sitting(sizes):
    from specdec.kit.tasks import TASKS

    days = sizes.day_sizes([t for t in TASKS if t.week == 4])
    assert len(days) >= 5, f"Week 4 has its days in the registry: {[(d.week, d.day) for d in days]}"
    report = sizes.report(days)
    too_big = [f"Week 4 Day {d.day}: {'; '.join(d.problems)}" for d in days if d.problems]
    assert not too_big, (
        f"a Week 4 day is over {sizes.MAX_DAY_LINES} lines of student code or has a task more "
        f"than {sizes.MAX_RATIO:g}x another: " + " | ".join(too_big) + ". Rebalance it (merge a "
        "trivial task into its neighbour, split an oversized one, or move boilerplate into the "
        "kit).\n" + report)
