"""A fork server for tests/test_isolation.py: ~70 fresh course processes for the price of one start-up.

Each isolation job must run in a process where nothing of the course was imported, patched or
cached first. A new interpreter gives that, but spends most of its ~2.5 s on importing the same
third-party libraries every time (pytest, scipy.stats, MLX, mlx-lm and transformers). This server
imports ONLY those libraries, never the course (`specdec`, `specdec_ref`, `conftest`, `support`, a
test file), and then forks one child per job: the child starts from the server's pristine memory,
so it holds every third-party module already and, as in a fresh `python -m pytest`, nothing of
the course when pytest starts.

    python tests/forkserver.py          # started by tests/test_isolation.py, cwd = the repository

Protocol: one JSON line per job on stdin, `{"args": [pytest arguments], "output": file}`; the server
forks, answers the child's pid on a line, waits for it, then answers a line "STATUS CPU": its exit
status (a negative status -N: killed by signal N) and its CPU seconds (user + system). The child
runs `pytest.main(args)` with stdout and stderr written to `output`. Jobs run one at a time per
server; run several servers for parallelism.

The server itself never computes anything: the threads a library may start at import (MLX,
OpenBLAS) sit idle when it forks, so no child inherits a held lock; tests/test_isolation.py's
`test_jobs_start_fresh` runs MLX in a forked job to prove it. Linux only: fork after MLX's
import is not safe on macOS (Metal, Objective-C runtime) and Windows has no fork, so
tests/test_isolation.py starts fresh interpreters there instead.
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import json
import os
import sys
import traceback

# Third-party modules the course's tests import (what `python -X importtime -m pytest ...` shows
# costing most of a start-up). Course modules must never appear here.
PRELOAD = [
    "pytest", "numpy", "scipy.stats", "mlx.core", "mlx.nn", "mlx.optimizers", "mlx_lm",
    "mlx_lm.generate", "mlx_lm.utils", "mlx_lm.sample_utils", "mlx_lm.tokenizer_utils",
    "mlx_lm.models.cache", "mlx_lm.models.llama", "hypothesis", "hypothesis.strategies",
    "prometheus_client",
]
COURSE = ("specdec", "specdec_ref", "conftest", "support")


def course_modules() -> list:
    """Names in sys.modules that belong to the course or its tests (must be none here)."""
    return sorted(name for name in sys.modules
                  if name.split(".")[0] in COURSE or name.split(".")[0].startswith("test_"))


def preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional library missing: the child imports what it needs itself
            pass
    for entry in importlib.metadata.entry_points(group="pytest11"):  # pytest's plugins (their modules)
        if entry.value.split(".")[0] not in COURSE:
            try:
                importlib.import_module(entry.value.split(":")[0])
            except Exception:
                pass
    stray = course_modules()
    if stray:
        raise SystemExit(f"forkserver: course modules imported before any job: {stray}")
    gc.collect()
    gc.freeze()  # the libraries' objects live on: a child's collections need not walk them again


def child(args: list, output: str) -> None:
    """The forked job: pytest.main(args), output to a file, exit with its status. Never returns."""
    code = 3
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(null, 0)  # the server's job pipe is not the child's to read
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        sys.argv = ["pytest", *args]
        code = int(pytest_main(args))
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def pytest_main(args: list) -> int:
    import pytest

    return pytest.main(args)


def serve() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        stray = course_modules()  # the server never runs a job itself: this stays empty
        if stray:
            raise SystemExit(f"forkserver: course modules in the server: {stray}")
        pid = os.fork()
        if pid == 0:
            child(job["args"], job["output"])
        print(pid, flush=True)
        _, status, usage = os.wait4(pid, 0)
        print(os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, flush=True)


if __name__ == "__main__":
    # As `python -m pytest` run from the repository: the working directory first on sys.path,
    # not this file's folder (pytest's conftest handling puts tests/ there itself, as usual).
    sys.path[0] = os.getcwd()
    preload()
    print("ready", flush=True)
    serve()
