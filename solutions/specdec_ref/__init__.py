"""Speculate — the reference solution.

The same exercise modules as `specdec` (the student package), with the same names, signatures
and docstrings, complete. Tests run against it by default (`pytest`); engineers use it as an
exact speculative decoder for any mlx-lm model pair. It imports the kit from `specdec.kit`.
"""

__version__ = "0.1.0"
