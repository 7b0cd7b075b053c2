"""Pick the implementation under test: the reference solution or the student's tree.

    impl = get_impl("student")
    impl.sampling.sample_token(...)      # imports specdec.sampling on first use

Both packages have the same exercise modules with the same public names (a test checks it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

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
]


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


def get_impl(name: str) -> Impl:
    return Impl(name)
