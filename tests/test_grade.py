"""The task registry and the scoreboard of `specdec grade` (not graded: these test the kit)."""

import ast
import re
from pathlib import Path


from specdec.kit.grade import TaskResult, failure_line, print_scoreboard
from specdec.kit.impl import EXERCISE_MODULES, get_impl
from specdec.kit.tasks import TASKS, find_task, stub_tags

ROOT = Path(__file__).resolve().parents[1]


def graded_tasks() -> dict:
    """{(week, day, task): [test names]} from the test_task_N_* functions of every graded file."""
    found = {}
    for path in ROOT.glob("tests/test_week_*_day_*.py"):
        week, day = (int(x) for x in re.findall(r"\d+", path.name))
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            m = re.match(r"test_task_(\d+)_", getattr(node, "name", ""))
            if isinstance(node, ast.FunctionDef) and m:
                found.setdefault((week, day, int(m.group(1))), []).append(node.name)
    return found


def defines(module, qualname) -> bool:
    """Does `module` define `qualname` (a function, a class, or a method or property of one)?"""
    obj = module
    for part in qualname.split("."):
        if part not in vars(obj):
            return False
        obj = vars(obj)[part]
    return True


def test_every_stub_tag_matches_the_registry():
    tags = list(stub_tags("specdec"))
    for tag in tags:
        where = f"src/specdec/{tag.module}.py, {tag.qualname}"
        assert tag.chapter, (
            f"{where}: stub message {tag.name!r} does not read "
            "'Week W Day D Task T: name — see book/src/<chapter>.md'")
        entry = find_task(tag.week, tag.day, tag.task)
        assert entry is not None, (
            f"{where}: Week {tag.week} Day {tag.day} Task {tag.task} is not in the task registry "
            "(specdec/kit/tasks.py): add it (`python -m specdec.kit.tasks` prints entries)")
        assert tag.module == entry.module and tag.qualname in entry.functions, (
            f"{where}: the registry puts {entry.tag} in {entry.module}: {entry.functions}")
        assert tag.name == tag.qualname, f"{where}: its stub message names {tag.name!r}"
        assert tag.chapter == entry.chapter, f"{where}: chapter {tag.chapter}, registry {entry.chapter}"
        assert (ROOT / tag.chapter).is_file(), f"{where}: chapter {tag.chapter} does not exist"


def test_every_registry_task_exists_in_both_trees_and_is_graded():
    graded = graded_tasks()
    keys = [t.key for t in TASKS]
    assert len(keys) == len(set(keys)), "a task appears twice in the registry"
    for task in TASKS:
        assert task.module in EXERCISE_MODULES, f"{task.tag}: {task.module} is not an exercise module"
        for tree in ("student", "ref"):
            module = get_impl(tree).module(task.module)
            for qualname in task.functions:
                assert defines(module, qualname), f"{task.tag}: {tree} {task.module} lacks {qualname}"
        assert task.key in graded, (
            f"{task.tag} ({task.name}) has no graded test: expected test_task_{task.task}_* in "
            f"{task.test_file}")
    for key, names in sorted(graded.items()):
        assert find_task(*key) is not None, (
            f"{names[0]} (Week {key[0]} Day {key[1]}) grades a task missing from the registry "
            "(specdec/kit/tasks.py)")


def test_every_registry_function_exists_and_is_a_stub_as_shipped(request):
    """Every registry function exists in both trees; with --stub-check (CI, on the repository as
    shipped) every one of them must still be a stub. A student's filled-in stubs are fine."""
    import importlib

    for task in TASKS:
        for tree in ("specdec", "specdec_ref"):
            module = importlib.import_module(f"{tree}.{task.module}")
            for qualname in task.functions:
                obj = module
                for part in qualname.split("."):
                    obj = getattr(obj, part, None)
                assert obj is not None, f"{tree}.{task.module}.{qualname} (registry) does not exist"
    if request.config.getoption("--stub-check"):
        stubs = {(t.module, t.qualname) for t in stub_tags("specdec")}
        started = [f"{t.module}.{f}" for t in TASKS for f in t.functions if (t.module, f) not in stubs]
        assert not started, f"the shipped student tree must hold only stubs; these are not: {started}"


def test_task_label_is_stable_and_status_reads_outcomes():
    task = TaskResult(1, 1, 1, test_names=["softmax_matches_exact", "temperature_scaling"])
    assert task.name == "logits_to_probs", "the registry's function name, stub or not"
    task.outcomes = {"a": "passed", "b": "passed"}
    assert task.status == "passed"
    task.outcomes = {"a": "passed", "b": "failed"}
    assert task.status == "failed"
    task.outcomes = {"a": "stub", "b": "stub"}
    assert task.status == "not started", "failing with its own NotImplementedError = not started"
    unknown = TaskResult(9, 9, 1, test_names=["softmax_exact", "softmax_dtype"])
    assert unknown.name == "softmax", "not in the registry: the common start of the test names"


def test_failure_line_keeps_the_hint():
    long_hint = "x" * 150 + " — see book/src/week1-01-sampling.md"
    line = failure_line("test_task_1_a", AssertionError(f"{long_hint}\nassert 1 == 2"))
    assert line.endswith("week1-01-sampling.md"), "the whole first line, hint included"
    numpy_style = AssertionError("\nNot equal to tolerance rtol=0, atol=1e-06\nmust be softmax — see X\n"
                                 "Mismatched elements: 3 / 3")
    assert "must be softmax — see X" in failure_line("t", numpy_style), "numpy's err_msg is the hint"


def test_scoreboard_wraps_long_failures(capsys):
    task = TaskResult(1, 1, 2, test_names=["a"], outcomes={"x": "failed"},
                      first_failure="test_task_2_a: AssertionError: " + "word " * 60 + "— see the chapter")
    print_scoreboard({(1, 1, 2): task})
    out = capsys.readouterr().out
    assert "top_k_filter" in out and "— see the chapter" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "pytest tests/test_week_1_day_1.py --impl student -k task_2" in out
