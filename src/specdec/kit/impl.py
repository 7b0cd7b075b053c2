"""Pick the implementation under test: the reference solution or the student's tree.

    impl = get_impl("student")
    impl.sampling.sample_token(...)      # imports specdec.sampling on first use

Both packages have the same exercise modules with the same public names (a test checks it).

Unfinished tasks need not block finished ones. `use_reference_for_unfinished()` finds every
stub in the student tree that still raises its `NotImplementedError("Week W Day D Task T: ...")`
and swaps in the reference function in its place, saying so in one line:

    from specdec.kit.impl import use_reference_for_unfinished
    use_reference_for_unfinished()       # your finished tasks run; the rest come from the reference
    from specdec.speculative import speculative_generate

`get_impl("student", fallback=True)` does the same; the CLI and the notebooks use it. The graded
tests never do: they grade each task on its own with the `use_ref` fixture instead.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

PACKAGES = {"ref": "specdec_ref", "student": "specdec"}

# The exercise modules, in course order. The kit is not among them.
EXERCISE_MODULES = [
    "sampling",
    "generate",
    "cost",
    "kv_cache",
    "draft",
    "verify",
    "speculative",
    "theory",
    "adaptive",
    "batched",
    "drafters",
    "tree",
    "config",
    "contracts",
    "metrics",
    "fallback",
    "serving",
    "benchmark",
    "coupling",
    "medusa",
    "eagle",
    "layerskip",
    "bakeoff",
]

_STUB_TAG = re.compile(r"^(Week \d+ Day \d+ Task \d+): ")


class Impl:
    """Attribute access to one implementation's exercise modules: `impl.verify`, `impl.draft`."""

    def __init__(self, name: str):
        if name not in PACKAGES:
            raise ValueError(f"unknown implementation {name!r}: choose one of {sorted(PACKAGES)}")
        self.name = name
        self.package = PACKAGES[name]

    def module(self, module: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{module}")

    def __getattr__(self, module: str) -> ModuleType:
        if module.startswith("_"):
            raise AttributeError(module)
        try:
            return self.module(module)
        except ModuleNotFoundError as e:
            if e.name == f"{self.package}.{module}":
                raise AttributeError(f"{self.package} has no exercise module {module!r}") from e
            raise

    def __repr__(self) -> str:
        return f"Impl({self.name!r})"


def get_impl(name: str, fallback: bool = False) -> Impl:
    """The implementation called `name` ("ref" or "student").

    fallback=True (student only): first replace every unfinished stub by the reference
    (`use_reference_for_unfinished`), so a command never stops at a task not done yet.
    """
    impl = Impl(name)
    if fallback and name == "student":
        use_reference_for_unfinished()
    return impl


# Falling back to the reference for unfinished tasks ---------------------------------------------
@dataclass(frozen=True)
class Stub:
    """One function or method of the student tree whose body is still the task's stub."""

    module: str  # exercise module, e.g. "verify"
    qualname: str  # "verify_speculation" or "SpeculativeDecoder.draft_generation"
    task: str  # "Week 2 Day 3 Task 2"


def _stub_task(node: ast.AST) -> Optional[str]:
    """'Week W Day D Task T' if the function's body is only `raise NotImplementedError("...")`."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    if len(body) != 1 or not isinstance(body[0], ast.Raise):
        return None
    exc = body[0].exc
    if not (isinstance(exc, ast.Call) and getattr(exc.func, "id", None) == "NotImplementedError"):
        return None
    if not exc.args or not isinstance(exc.args[0], ast.Constant) or not isinstance(exc.args[0].value, str):
        return None
    match = _STUB_TAG.match(exc.args[0].value)
    return match.group(1) if match else None


def unfinished_stubs(modules: Optional[list[str]] = None) -> list[Stub]:
    """The stubs of the student tree that still raise their task's NotImplementedError.

    Read from the source files (nothing is run): a function or a method of a top-level class
    whose body, after its docstring, is one `raise NotImplementedError("Week W Day D Task T: ...")`.
    """
    stubs = []
    for name in modules or EXERCISE_MODULES:
        module = importlib.import_module(f"{PACKAGES['student']}.{name}")
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            children = node.body if isinstance(node, ast.ClassDef) else [node]
            prefix = f"{node.name}." if isinstance(node, ast.ClassDef) else ""
            for child in children:
                task = _stub_task(child)
                if task:
                    stubs.append(Stub(name, prefix + child.name, task))
    return stubs


_swapped: dict[tuple[str, str], object] = {}  # (module, qualname) -> the student's stub


def use_reference_for_unfinished(quiet: bool = False) -> list[Stub]:
    """Replace every unfinished student stub by the reference's function, in place.

    Module-level functions are rebound in their module and in every student module that
    imported them (`from .verify import verify_speculation`); methods are rebound on the
    student's class. Finished tasks keep the student's code. Prints one line to stderr naming
    the tasks that now run the reference (unless quiet). Calling it again changes nothing.
    Returns the stubs replaced.
    """
    stubs = unfinished_stubs()
    fresh = [s for s in stubs if (s.module, s.qualname) not in _swapped]
    for stub in fresh:
        student = importlib.import_module(f"{PACKAGES['student']}.{stub.module}")
        ref = importlib.import_module(f"{PACKAGES['ref']}.{stub.module}")
        if "." in stub.qualname:
            cls_name, attr = stub.qualname.split(".")
            cls, ref_cls = getattr(student, cls_name), getattr(ref, cls_name)
            _swapped[(stub.module, stub.qualname)] = cls.__dict__[attr]
            setattr(cls, attr, ref_cls.__dict__[attr])
            continue
        original, replacement = getattr(student, stub.qualname), getattr(ref, stub.qualname)
        _swapped[(stub.module, stub.qualname)] = original
        for mod_name, mod in list(sys.modules.items()):
            if mod_name == PACKAGES["student"] or mod_name.startswith(PACKAGES["student"] + "."):
                if getattr(mod, stub.qualname, None) is original:
                    setattr(mod, stub.qualname, replacement)
    if fresh and not quiet:
        tasks = sorted({s.task for s in fresh}, key=lambda t: [int(x) for x in re.findall(r"\d+", t)])
        short = ", ".join(re.sub(r"Week (\d+) Day (\d+) Task (\d+)", r"W\1D\2T\3", t) for t in tasks)
        print(f"specdec: using the reference for {len(tasks)} task(s) not implemented yet in "
              f"src/specdec: {short}", file=sys.stderr)
    return stubs
