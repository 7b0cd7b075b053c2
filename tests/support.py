"""Helpers shared by the graded tests (not tests themselves).

pytest puts this folder on sys.path, so test files import it as `from support import ...`.
"""

import mlx.core as mx
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
