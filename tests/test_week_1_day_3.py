"""Week 1 Day 3 — the cost of a forward pass: time_forward and the cost curve t(k) / t(1).

Wall-clock timings of a real model depend on the machine (and on whatever else it runs), so
these tests grade the *contract* with a fake clock: the `fake_time` fixture replaces
`time.perf_counter` (and the time module's other clocks) with a clock that moves only when a
fake model "runs" — `a + b * num_tokens` seconds per call — so every time is exact, on any
machine, under any load. Only the test that MLX's lazy work is timed uses the real clock, with a
margin that load cannot break. Chapter: book/src/week1-03-forward-cost.md. Grade one task with
    pytest tests/test_week_1_day_3.py --impl student -k task_1
"""

import time
import timeit

import mlx.core as mx
import pytest

from specdec.kit.models import MarkovLM
from support import raises

CHAPTER = "see book/src/week1-03-forward-cost.md"
MS = 1e-3
CLOCKS = ("perf_counter", "monotonic", "time")  # each with its *_ns twin


class FakeTime:
    """Seconds that pass only when `advance` says so (a fake model's forward)."""

    def __init__(self):
        self.now = 1000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def seconds(self) -> float:
        return self.now

    def nanoseconds(self) -> int:
        return round(self.now * 1e9)


@pytest.fixture
def fake_time(impl, monkeypatch):
    """Every clock of the time module (and timeit's, and copies in cost.py) reads FakeTime."""
    clock = FakeTime()
    originals = {}
    for name in CLOCKS:
        for variant, fake in ((name, clock.seconds), (f"{name}_ns", clock.nanoseconds)):
            originals[getattr(time, variant)] = fake
            monkeypatch.setattr(time, variant, fake)
    monkeypatch.setattr(timeit, "default_timer", clock.seconds)
    for attr, value in list(vars(impl.cost).items()):  # `from time import perf_counter` copies
        if callable(value) and value in originals:
            monkeypatch.setattr(impl.cost, attr, originals[value])
    return clock


class SleepyModel:
    """A model (mlx-lm interface) whose call takes `a + b * num_tokens` seconds of fake time.

    `extra` maps a call number (0-based, counting only calls of `slow_tokens` tokens) to extra
    seconds, to plant a cold first call or an outlier. Every call is logged as
    (tokens fed, cache offset before the call).
    """

    def __init__(self, clock: FakeTime, a: float, b: float, slow_tokens: int = 0,
                 extra: dict | None = None):
        self.clock, self.a, self.b, self.slow_tokens, self.extra = clock, a, b, slow_tokens, extra or {}
        self.inner = MarkovLM(mx.full((12, 12), 1 / 12))
        self.vocab_size = self.inner.vocab_size
        self.calls: list[tuple[int, int]] = []

    def __call__(self, inputs, cache=None):
        num_tokens = int(inputs.shape[-1])
        if num_tokens == self.slow_tokens:
            n = sum(1 for L, _ in self.calls if L == num_tokens)
            self.clock.advance(self.extra.get(n, 0.0))
        self.calls.append((num_tokens, cache[0].offset if cache else 0))
        self.clock.advance(self.a + self.b * num_tokens)
        return self.inner(inputs, cache=cache)

    def make_cache(self):
        return self.inner.make_cache()

    def calls_of(self, num_tokens: int) -> list[int]:
        """Cache offsets seen by the calls that fed `num_tokens` tokens."""
        return [offset for L, offset in self.calls if L == num_tokens]


class LazyModel:
    """A model whose work happens only when its logits are evaluated (like every MLX model)."""

    def __init__(self):
        self.inner = MarkovLM(mx.full((12, 12), 1 / 12))
        self.vocab_size = self.inner.vocab_size
        self.weight = mx.random.normal((256, 256), key=mx.random.key(0)) / 16.0
        mx.eval(self.weight)

    def work(self) -> mx.array:
        x = self.weight
        for _ in range(3):  # ~0.1 GFLOP: a few ms to tens of ms depending on the BLAS
            x = x @ self.weight
        return x.sum()

    def __call__(self, inputs, cache=None):
        return self.inner(inputs, cache=cache) + 0.0 * self.work()  # same logits, lazy cost

    def make_cache(self):
        return self.inner.make_cache()


# Task 1: time_forward ---------------------------------------------------------------------------
def test_task_1_returns_the_median(impl, fake_time):
    # 2 ms + 1 ms/token, fed 4 tokens: 6 ms. One timed call is a 100 ms outlier (call 3 of
    # the 4-token calls: the warm-up is call 0): a median ignores it (6 ms), a mean would not (26 ms).
    model = SleepyModel(fake_time, a=2 * MS, b=1 * MS, slow_tokens=4, extra={3: 100 * MS})
    t = impl.cost.time_forward(model, 4, context_len=10, repeats=5)
    assert isinstance(t, float), f"time_forward returns seconds as a python float, got {type(t)}"
    assert t == pytest.approx(6 * MS, rel=1e-6), (
        f"a forward that takes 6 ms (one repeat in five an outlier of 106 ms) measured "
        f"{t * 1e3:.3f} ms: time each repeat alone with time.perf_counter (this test's clock "
        f"moves only while the model runs) and return the median, in seconds — {CHAPTER}"
    )


def test_task_1_every_repeat_sees_the_same_context(impl, fake_time):
    model = SleepyModel(fake_time, a=0.5 * MS, b=0.0)
    impl.cost.time_forward(model, 3, context_len=7, repeats=4)
    offsets = model.calls_of(3)
    assert len(offsets) == 5, (
        f"expected one warm-up and 4 timed calls of 3 tokens, got {len(offsets)} calls "
        f"(all calls as (tokens, offset): {model.calls})"
    )
    assert offsets == [7] * 5, (
        f"every call of 3 tokens must come after exactly context_len = 7 cached tokens, but the "
        f"cache offsets before them were {offsets}: fill the cache once, then trim it back to "
        f"context_len after each call — {CHAPTER}"
    )


def test_task_1_warm_up_is_not_timed(impl, fake_time):
    # The first 3-token call is "cold" (+150 ms), like a first call that allocates buffers.
    model = SleepyModel(fake_time, a=1 * MS, b=0.0, slow_tokens=3, extra={0: 150 * MS})
    t = impl.cost.time_forward(model, 3, context_len=8, repeats=1)
    assert t == pytest.approx(1 * MS, rel=1e-6), (
        f"measured {t * 1e3:.0f} ms for a 1 ms forward whose first call is 150 ms slow: make one "
        f"untimed warm-up call before the timed repeats — {CHAPTER}"
    )


def test_task_1_evaluates_the_output(impl):
    # The real clock, with a margin load cannot break: other processes only ever make a call
    # slower, so the fastest of six evaluations (three before, three after) is at most a few
    # times the work itself, while a correct time_forward times at least the work. Not
    # evaluating times only the building of a graph: well under a hundredth of it.
    model = LazyModel()

    def evaluation_seconds() -> float:
        start = time.perf_counter()
        mx.eval(model(mx.array([[1, 2]])))
        return time.perf_counter() - start

    cost = [evaluation_seconds() for _ in range(3)]
    t = impl.cost.time_forward(model, 2, context_len=4, repeats=3)
    cost += [evaluation_seconds() for _ in range(3)]
    assert t >= 0.2 * min(cost), (
        f"time_forward measured {t * 1e3:.3f} ms for a forward whose evaluation takes at least "
        f"{min(cost) * 1e3:.2f} ms: MLX is lazy, so the timed region must `mx.eval` the logits "
        f"— {CHAPTER}"
    )


def test_task_1_runs_on_a_real_model(impl, llama_models):
    t = impl.cost.time_forward(llama_models[1], 4, context_len=16, repeats=2)
    assert isinstance(t, float) and 0 < t < 1.0, f"a tiny llama forward took {t!r} s?"


def test_task_1_bad_arguments_raise(impl, fake_time):
    model = SleepyModel(fake_time, a=0.0, b=0.0)
    with raises(ValueError, "num_tokens=0 must be refused: a timed call feeds num_tokens >= 1"):
        impl.cost.time_forward(model, 0)
    with raises(ValueError, "repeats=0 must be refused: the median needs repeats >= 1 timed calls"):
        impl.cost.time_forward(model, 2, repeats=0)


# Task 2: verify_cost_curve ----------------------------------------------------------------------
def test_task_2_curve_of_a_known_cost(impl, use_ref, fake_time):
    use_ref("cost.time_forward")
    a, b = 10 * MS, 2 * MS  # t(k) = a + b k, so t(k) / t(1) = (a + b k) / (a + b)
    model = SleepyModel(fake_time, a=a, b=b)
    curve = impl.cost.verify_cost_curve(model, [1, 2, 4, 8], context_len=6, repeats=5)
    assert sorted(curve) == [1, 2, 4, 8], f"one entry per k in ks, got keys {sorted(curve)}"
    assert curve[1] == pytest.approx(1.0, abs=1e-12), (
        f"curve[1] = t(1) / t(1) is 1 by definition (measure t(1) once), got {curve[1]}"
    )
    for k in (2, 4, 8):
        expected = (a + b * k) / (a + b)
        assert curve[k] == pytest.approx(expected, rel=1e-6), (
            f"for a forward costing {a * 1e3:.0f} ms + {b * 1e3:.0f} ms per token, curve[{k}] = "
            f"t({k}) / t(1) = {expected:.2f}, got {curve[k]:.2f} — {CHAPTER}"
        )


def test_task_2_passes_context_and_repeats_on(impl, use_ref, fake_time):
    use_ref("cost.time_forward")
    model = SleepyModel(fake_time, a=1 * MS, b=1 * MS)
    curve = impl.cost.verify_cost_curve(model, [3, 5], context_len=9, repeats=2)
    assert sorted(curve) == [3, 5], (
        f"ks = [3, 5] gives keys [3, 5] (t(1) is measured but not returned), got {sorted(curve)}"
    )
    for k in (1, 3, 5):
        offsets = model.calls_of(k)
        assert offsets and set(offsets) == {9}, (
            f"time_forward({k}) must run with context_len=9: its calls saw offsets {offsets}"
        )
    assert len(model.calls_of(3)) == 3, (
        f"repeats=2 means one warm-up and 2 timed calls of 3 tokens, got {len(model.calls_of(3))}"
    )
