"""The course's promise "a stuck task never blocks the next", checked mechanically for every task.

For every task of `specdec/kit/tasks.py`, in a fresh process (nothing imported, patched or cached
by another task's tests first):

    pytest tests/test_week_W_day_D.py -k task_N --impl student --isolate

passes. Under `--isolate` (tests/conftest.py) each graded test runs its own task's reference code
as if written in the student's module, and every other task's student function raises: a test
that needs another task's work without `use_ref(...)` fails, naming the call. So one run proves
both halves of the promise: the chapter's `-k task_N` selection passes alone, and it never calls
another task's student code. One `--collect-only` run over every day file then checks that each
`-k task_N` selects exactly task N's tests (`-k task_1` must not pick up a `task_10`, nor miss one
of task 1's tests).

These check the course's tests, not a student's tree: they run with the default `--impl ref` and
are skipped, saying so, under `--impl student`. The runs go two (or more, on more cores) at a time.

On Linux the fresh processes are forked from tests/forkserver.py, which has imported only
third-party libraries (pytest, scipy, MLX, mlx-lm, ...) and nothing of the course, so each job
skips the ~1-2 s of imports every start-up repeats; `test_jobs_start_fresh` checks that a
forked job sees no course module. Elsewhere (macOS: fork after MLX's import is unsafe; Windows),
or with SPECDEC_ISOLATION_FORK=0, each job is a new `python -m pytest` process. Either way a
failure prints the command that reproduces it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from specdec.kit.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
# Plugins the day files do not need, off for start-up speed: nbmake costs ~1.3 s of CPU a
# process, hypothesis's pytest plugin ~1 s (@given works without it). 77 processes.
FAST = ["-p", "no:cacheprovider", "-p", "no:nbmake", "-p", "no:hypothesispytest"]
WORKERS = max(2, min(8, os.cpu_count() or 2))
TIMEOUT_S = 600
_RESULT = re.compile(r"^(tests/test_week_\d+_day_\d+\.py::(.+?)) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?= |$)",
                     re.MULTILINE)  # a parameter id may hold spaces: the outcome ends the name
_SUMMARY = re.compile(r"^(?:FAILED|ERROR) .*$", re.MULTILINE)


@dataclass
class Run:
    command: str  # what to type to reproduce it
    returncode: int
    output: str

    @property
    def results(self) -> dict:
        """{test name: outcome} from pytest -v's lines (a teardown ERROR overrides PASSED)."""
        out: dict = {}
        for _, name, outcome in _RESULT.findall(self.output):
            out[name] = outcome if out.get(name) in (None, "PASSED") else out[name]
        return out

    def why(self) -> str:
        lines = _SUMMARY.findall(self.output)
        if not lines:
            lines = self.output.strip().splitlines()[-3:]
        return "\n      ".join(line[:400] for line in lines[:8])


FORK = sys.platform == "linux" and os.environ.get("SPECDEC_ISOLATION_FORK", "1") != "0"
ENV = {**os.environ, "COLUMNS": "400"}  # whole failure lines


def _fresh(args: list, command: str) -> Run:
    """One job in a new interpreter: `python -m pytest ARGS`."""
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", *args, "-v", *FAST], cwd=ROOT,
                              capture_output=True, text=True, timeout=TIMEOUT_S, env=ENV)
    except subprocess.TimeoutExpired as e:
        return Run(command, -1, f"timed out after {TIMEOUT_S} s\n{e.stdout or ''}")
    return Run(command, done.returncode, done.stdout + done.stderr)


class ForkServer:
    """tests/forkserver.py in a child process: runs one pytest job at a time, each in a fork."""

    def __init__(self, scratch: str):
        self.scratch = scratch
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py")],
                                     cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            self.close()
            raise RuntimeError(f"tests/forkserver.py did not start (said {ready!r}; exit {self.proc.returncode})")

    def run(self, args: list) -> tuple:
        """(exit status, stdout + stderr, CPU seconds) of `pytest ARGS` in a fork; a negative
        status -N: killed by signal N."""
        fd, output = tempfile.mkstemp(".txt", "job-", self.scratch)
        os.close(fd)
        self.proc.stdin.write(json.dumps({"args": args, "output": output}) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        timer = threading.Timer(TIMEOUT_S, os.kill, (pid, signal.SIGKILL))
        timer.start()
        try:
            status, cpu = self.proc.stdout.readline().split()
        finally:
            timer.cancel()
        with open(output, errors="replace") as f:
            text = f.read()
        os.unlink(output)
        if int(status) == -signal.SIGKILL:
            text = f"timed out after {TIMEOUT_S} s (or killed)\n{text}"
        return int(status), text, float(cpu)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()  # its children's CPU time counts in RUSAGE_CHILDREN only once it is reaped


class Runner:
    """Runs jobs WORKERS at a time: forked from fork servers (Linux), else fresh interpreters."""

    def __init__(self, fork: bool):
        self.fork = fork
        self.scratch = tempfile.mkdtemp(prefix="isolation-")
        self.idle: queue.Queue = queue.Queue()
        self.servers: list = []
        self.lock = threading.Lock()
        self.forked_cpu = 0.0  # CPU seconds of the forked jobs (the servers reap them, not us)

    def _server(self):
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            server = ForkServer(self.scratch)
            with self.lock:
                self.servers.append(server)
            return server

    def __call__(self, args: list, command: str) -> Run:
        if not self.fork:
            return _fresh(args, command)
        server = self._server()
        try:
            status, output, cpu = server.run([*args, "-v", *FAST])
        except (OSError, ValueError):  # the server died: this job (only) in a new interpreter
            return _fresh(args, command)
        with self.lock:
            self.forked_cpu += cpu
        self.idle.put(server)
        return Run(command, status, output)

    def close(self) -> None:
        for server in self.servers:
            try:
                server.close()
            except OSError:  # a server that died: nothing left to close
                pass
        os.rmdir(self.scratch)


@pytest.fixture(scope="module")
def runner(request):
    if request.config.getoption("--impl") != "ref":
        pytest.skip("the isolation check grades the course's tests, not your tree: it runs with "
                    "the default --impl ref (pytest tests/test_isolation.py)")
    runner = Runner(FORK)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def runs(runner):
    jobs = {}
    for task in TASKS:
        args = [task.test_file, "-k", f"task_{task.task}", "--impl", "student", "--isolate"]
        jobs[("alone", task.key)] = (args, "pytest " + " ".join(args))
    files = sorted({task.test_file for task in TASKS})
    jobs[("collect", None)] = ([*files, "--collect-only", "-qq"], "pytest <every day file> --collect-only -q")
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    forked_before = runner.forked_cpu
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {key: pool.submit(runner, *job) for key, job in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
           + runner.forked_cpu - forked_before)
    how = "forked from fork servers" if runner.fork else "fresh interpreters"
    print(f"\nisolation: {len(jobs)} pytest runs ({how}), {WORKERS} at a time: "
          f"{time.perf_counter() - start:.0f} s wall, {cpu:.0f} s CPU (jobs; the servers' start-up "
          "not counted)")  # shown with -s
    return results


def _task_tests(names, number: int) -> set:
    return {name for name in names if re.match(rf"test_task_{number}_", name)}


def _collected(runs, test_file: str) -> set:
    """Names of every test `pytest --collect-only -q` found in `test_file`."""
    prefix = test_file + "::"
    return {line[len(prefix):].strip() for line in runs[("collect", None)].output.splitlines()
            if line.startswith(prefix)}


def test_each_task_passes_alone_and_isolated(runs):
    failing = []
    for task in TASKS:
        run = runs[("alone", task.key)]
        outcomes = run.results
        bad = {name: outcome for name, outcome in outcomes.items() if outcome != "PASSED"}
        if run.returncode != 0 or bad or not outcomes:
            failing.append(f"{task.tag} ({task.name}) fails alone (exit {run.returncode}, "
                           f"{len(outcomes)} test(s)). Reproduce: {run.command}\n      {run.why()}")
    assert not failing, (
        f"{len(failing)} of {len(TASKS)} tasks fail when their tests run alone, in a fresh process, "
        "with their own task on the reference and every other task's student functions raising: "
        "a test leans on what another task's tests imported, patched or cached first, or calls "
        "another task's student code (fix: `use_ref(...)` for it in the test):\n  "
        + "\n  ".join(failing))


def test_each_selection_is_exactly_its_task(runs):
    assert runs[("collect", None)].returncode == 0, (
        "collecting the day files failed: " + runs[("collect", None)].why())
    wrong = []
    for task in TASKS:
        selected = set(runs[("alone", task.key)].results)
        graded = _task_tests(_collected(runs, task.test_file), task.task)
        strays = selected - _task_tests(selected, task.task)
        if strays or selected != graded or not graded:
            wrong.append(f"{task.command}: selects {len(selected)} test(s), task {task.task} has "
                         f"{len(graded)}; not task {task.task}'s: {sorted(strays)[:5]}; missed: "
                         f"{sorted(graded - selected)[:5]}")
    assert not wrong, (
        "`-k task_N` must select exactly task N's tests (all `test_task_N_*`, and nothing else: "
        "a `task_N` in another test's name or parameter id is picked up too):\n  " + "\n  ".join(wrong))


FRESH_CHECK = """
import sys

import mlx.core as mx


def test_fresh():
    course = [name for name in sys.modules if name.split(".")[0] in ("specdec", "specdec_ref", "support")
              or name.split(".")[0].startswith("test_week")]
    assert not course, f"course modules already imported: {course}"
    assert mx.sum(mx.arange(4)).item() == 6
"""


def test_jobs_start_fresh(runner, tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_fresh.py").write_text(FRESH_CHECK)
    args = [str(tmp_path / "test_fresh.py"), "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path)]
    run = runner(args, "pytest " + " ".join(args))
    how = "forked by tests/forkserver.py" if runner.fork else "started"
    assert run.returncode == 0 and re.search(r"test_fresh PASSED", run.output), (
        f"an isolation job {how} must be a fresh course process (no specdec, specdec_ref, support or "
        f"test module imported yet) where MLX works: {run.why()}")
