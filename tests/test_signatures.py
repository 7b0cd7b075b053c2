"""The student tree and the reference stay in sync: same modules, names, signatures, docstrings.

If this fails after you edited a stub's signature, put it back: the graded tests call the
functions exactly as the docstrings describe.
"""

import inspect

import pytest

from specdec.kit.impl import EXERCISE_MODULES, get_impl


def public_api(module):
    """{name: object} for the functions and classes a module defines (not what it imports)."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    }


def members(cls):
    return {
        name: obj
        for name, obj in vars(cls).items()
        if inspect.isfunction(obj) and (not name.startswith("_") or name == "__init__")
    }


@pytest.mark.parametrize("module_name", EXERCISE_MODULES)
def test_student_and_reference_apis_match(module_name):
    student = public_api(get_impl("student").module(module_name))
    reference = public_api(get_impl("ref").module(module_name))
    assert sorted(student) == sorted(reference), (
        f"{module_name}: the student module defines {sorted(student)}, the reference "
        f"{sorted(reference)} — they must define the same public functions and classes"
    )
    for name, ref_obj in reference.items():
        stu_obj = student[name]
        pairs = [(name, stu_obj, ref_obj)]
        if inspect.isclass(ref_obj):
            stu_members, ref_members = members(stu_obj), members(ref_obj)
            assert sorted(stu_members) == sorted(ref_members), (
                f"{module_name}.{name}: methods {sorted(stu_members)} != reference {sorted(ref_members)}"
            )
            pairs += [(f"{name}.{m}", stu_members[m], ref_members[m]) for m in ref_members]
        for qualname, s, r in pairs:
            if not inspect.isclass(r):
                assert str(inspect.signature(s)) == str(inspect.signature(r)), (
                    f"{module_name}.{qualname}: signature {inspect.signature(s)} differs from "
                    f"the reference {inspect.signature(r)}"
                )
            assert inspect.getdoc(s) == inspect.getdoc(r), (
                f"{module_name}.{qualname}: the docstring (the task's contract) differs from the reference's"
            )


@pytest.mark.parametrize("module_name", EXERCISE_MODULES)
def test_module_docstrings_match(module_name):
    s = get_impl("student").module(module_name)
    r = get_impl("ref").module(module_name)
    assert inspect.getdoc(s) == inspect.getdoc(r), f"{module_name}: module docstrings differ"
