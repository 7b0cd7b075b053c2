"""Exceptions and warnings shared by the student tree and the reference.

They live in the kit, not in the exercise modules, so that one class is raised whichever tree a
function comes from: when an unfinished task runs the reference (`use_reference_for_unfinished`),
your `except ContractError` still catches what the reference raises.
"""


class ConfigError(ValueError):
    """An invalid configuration. `problems`: every problem found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"{count} in SpeculativeConfig:\n" + "\n".join(f"  - {p}" for p in self.problems))


class ContractError(AssertionError):
    """A function broke its documented contract; the message says what broke and the likely cause."""


class FallbackWarning(RuntimeWarning):
    """A fault the decoder survived (draft failure, memory pressure, a cache that cannot roll back)."""
