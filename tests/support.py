"""Helpers shared by the graded tests (not tests themselves).

pytest puts this folder on sys.path, so test files import it as `from support import ...`.
"""

import contextlib
import importlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from specdec.kit.impl import EXERCISE_MODULES


def mlx_lm_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Plain greedy decoding by mlx-lm's own loop: the ground truth speculative decoding and
    every other decoder in the course must reproduce token for token."""
    steps = generate_step(
        mx.array(prompt, dtype=mx.int32), model, max_tokens=max_tokens,
        sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
    )
    return [int(token) for token, _ in steps]


def tree_modules(impl) -> list:
    """Every module of `impl`'s tree, after importing each exercise module that imports."""
    for name in EXERCISE_MODULES:
        if f"{impl.package}.{name}" in sys.modules:
            continue
        try:
            importlib.import_module(f"{impl.package}.{name}")
        except Exception:  # a student module that does not import yet: its own tests say so
            pass
    return [mod for name, mod in list(sys.modules.items()) if name.startswith(impl.package + ".")]


def replace_everywhere(monkeypatch, impl, dotted: str, replacement, modules: list | None = None) -> None:
    """Set `module.name` (or `module.Class.method`) of `impl` to `replacement` for this test.

    A module-level function is also rebound in every module of the tree that copied it with
    `from .module import name`. Every exercise module that imports is imported first (here, and
    by conftest before any test), so no module imported later can copy the replacement and keep
    it after the test: monkeypatch undoes all of it. A caller replacing many names in a row
    passes `modules=tree_modules(impl)`, taken once (sys.modules holds thousands of modules).
    """
    if modules is None:
        modules = tree_modules(impl)
    module_name, *attrs = dotted.split(".")
    parent = impl.module(module_name)
    for attr in attrs[:-1]:
        parent = getattr(parent, attr)
    if isinstance(parent, type):  # a method: its class holds it (a descriptor stays a descriptor)
        monkeypatch.setattr(parent, attrs[-1], replacement)
        return
    original = getattr(parent, attrs[-1])
    monkeypatch.setattr(parent, attrs[-1], replacement)
    for mod in modules:
        if getattr(mod, attrs[-1], None) is original:
            monkeypatch.setattr(mod, attrs[-1], replacement)


# What every batched loop stands on (Week 1 Day 1 sampling, Week 2 verification, Week 3 Day 2's
# padding, rollback and drafting): tests of a later batched task take these from the reference.
BATCHED_FOUNDATIONS = (
    "sampling.logits_to_probs",
    "sampling.top_k_filter",
    "sampling.top_p_filter",
    "sampling.sample_token",
    "verify.verify_greedy",
    "verify.residual_distribution",
    "verify.verify_speculation",
    "batched.left_pad",
    "batched.rollback_rows",
    "batched.draft_batch",
)


class CallCounter:
    """A model that counts its forward calls; everything else is the wrapped model's."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


class Raised:
    """What `raises` caught: `.value` is the exception (None until the block raised)."""

    value: BaseException | None = None


@contextlib.contextmanager
def raises(expected, why: str, match: str | None = None):
    """Like `pytest.raises`, but a block that raises nothing fails with `why` — the contract in
    the book's words — instead of a bare "DID NOT RAISE".

        with raises(ValueError, "lookahead=0 must be refused: K counts drafted tokens, K >= 1"):
            SpeculativeDecoder(draft, target, lookahead=0)

    Any other exception (a stub's NotImplementedError included) passes through untouched.
    `match`: a regex the message must contain (re.search), with `why` in the failure too.
    """
    caught = Raised()
    try:
        yield caught
    except expected as e:
        caught.value = e
        if match is not None and not re.search(match, str(e)):
            pytest.fail(f"raised {type(e).__name__}({str(e)!r}), but the message should match "
                        f"{match!r}: {why}")
        return
    pytest.fail(f"expected {getattr(expected, '__name__', expected)}, but nothing was raised: {why}")


# Comparing floats on any backend ---------------------------------------------------------------
# A batched row and its unbatched run, a tree call and the plain forwards, a cache fed in pieces
# and one fresh forward: each pair batches its matrix products differently, so the last bits
# differ. On the CPU float32 keeps that tiny; a GPU may run float32 matmuls in TF32 (a 10-bit
# mantissa; MLX's CUDA backend does), which moves logits by up to ~1e-3 of their scale. A real bug
# (a cache holding the wrong tokens, a position off by one) is off by order 1 on the tiny llama,
# far beyond either tolerance. Tokens, offsets and shapes are always compared exactly.
ON_CPU = mx.default_device().type == mx.cpu
REL_TOL = 1e-5 if ON_CPU else 1e-2


def tolerance(want) -> float:
    """The largest |got - want| allowed: REL_TOL of the values' scale (at least 1)."""
    return REL_TOL * max(1.0, float(np.abs(np.asarray(want, dtype=np.float64)).max()))


def assert_close(got, want, message: str) -> None:
    """max |got - want| <= tolerance(want), else fail with `message` and the numbers."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    error, bound = np.abs(got - want).max(), tolerance(want)
    assert error <= bound, (
        f"{message} (max |difference| {error:.2e}, allowed {bound:.2e} on {mx.default_device()})"
    )


def forced(ref, schedule, **kwargs):
    """`ref`'s FallbackController forced through `schedule`: K follows it round by round
    (cycling), whatever the clock says, so a test of a loop never depends on the machine's load;
    its fault handling stays real (K = 0 once the draft is disabled, at most `cap`)."""

    class Forced(ref.fallback.FallbackController):
        needs_draft_step = False

        def decide(self):
            self.i = getattr(self, "i", 0) + 1
            if not self.draft_ok:
                return 0
            return min(schedule[self.i % len(schedule)], self.cap)

    c = Forced(**kwargs)
    c._lookahead = schedule[0]
    return c


def pooled_chisquare_p(counts, law) -> float:
    """Chi-square p-value of `counts` (one per token) against the distribution `law`, with every
    cell expected fewer than 5 times pooled into one cell (chi-square's rule of thumb)."""
    from scipy.stats import chisquare  # imported here: most test files never need scipy

    counts, law = np.asarray(counts, dtype=np.float64), np.asarray(law, dtype=np.float64)
    n = counts.sum()
    keep = law * n >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(law[keep], law[~keep].sum()) * n
    return float(chisquare(observed, expected).pvalue)


def laws_of_tokens_2_and_3(probs, prompt: list[int], vocab_size: int):
    """The exact marginal laws of the 2nd and 3rd sampled tokens after `prompt`, by enumeration.

    probs(batch of token lists) -> float64 [B, V], the next-token law after each list. Returns
    (law2, law3), each renormalised (float32 softmax rows sum to 1 only approximately).
    """
    V = vocab_size
    p1 = probs([prompt])[0]
    joint12 = p1[:, None] * probs([prompt + [a] for a in range(V)])  # [V, V]
    p3 = probs([prompt + [a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    law2, law3 = joint12.sum(0), (joint12[..., None] * p3).sum((0, 1))
    return law2 / law2.sum(), law3 / law3.sum()


def logits_atol(expected) -> float:
    """Absolute tolerance for logits computed two ways: 1e-4 on the CPU, 1e-2 of the row's scale
    on a GPU (TF32)."""
    if ON_CPU:
        return 1e-4
    return 1e-2 * max(1.0, float(np.abs(np.asarray(expected)).max()))


# A real server for the serving tests ------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(impl_name: str, *flags: str, context: int = 2048, env_extra: dict | None = None):
    """`python -m specdec.kit.server` on 127.0.0.1 with the toy llamas (K = 3) and `flags`, once
    /health answers: (process, base URL). Always pair with `stop_server(process)`."""
    port = free_port()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "specdec.kit.server", "--target", "toy-llama", "--port", str(port),
           "--impl", impl_name, "--k", "3", "--context", str(context), *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with status {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            pass
        if time.time() > deadline:
            stop_server(proc)
            pytest.fail("the server did not answer /health within 60 s")
        time.sleep(0.2)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
