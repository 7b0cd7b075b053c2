"""Helpers shared by the graded tests (not tests themselves).

pytest puts this folder on sys.path, so test files import it as `from support import ...`.
"""

import contextlib
import re

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step


def mlx_lm_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Plain greedy decoding by mlx-lm's own loop: the ground truth speculative decoding and
    every other decoder in the course must reproduce token for token."""
    steps = generate_step(
        mx.array(prompt, dtype=mx.int32), model, max_tokens=max_tokens,
        sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
    )
    return [int(token) for token, _ in steps]


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
