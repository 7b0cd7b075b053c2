"""Speculate — the student package.

Your exercises live in the modules beside this file, one per idea, in course order:
`sampling`, `generate`, `cost`, `kv_cache` (Week 1), `draft`, `verify`, `speculative`,
`theory` (Week 2). Each stub raises `NotImplementedError("Week W Day D Task T: ...")` until you
fill it in; `specdec grade` shows your progress.

`specdec.kit` is the provided kit (models, loading, CLI, grading): you never edit it.
"""

__version__ = "0.1.0"
