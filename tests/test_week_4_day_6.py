"""Week 4 Day 6 — benchmarking you can defend: timed sweeps, and the theory next to them.

Book: book/src/week4-06-benchmarking.md. Grade with
    pytest tests/test_week_4_day_6.py --impl student -k task_1

The timing tasks are graded with a fake clock and fake decoders, so they are exact and fast;
the suite itself (kit) is checked end to end on toy models by `test_suite_quick_*`.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from support import raises, replace_everywhere

N = 8  # tokens per fake decode


class FakeClock:
    """A clock that only moves when a fake decoder says so."""

    def __init__(self):
        self.now, self.reads = 100.0, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def fake_decoder(clock: FakeClock, seconds: dict, warmup_seconds: float = 1000.0):
    """decode(prompt, max_tokens): takes seconds[prompt] (warmup_seconds on a call flagged as a
    warm-up) and returns max_tokens tokens that name the prompt. Records every call."""
    calls = []

    def decode(prompt, max_tokens):
        calls.append((prompt, max_tokens))
        warm = len(calls) <= decode.warmup
        clock.now += warmup_seconds if warm else seconds[prompt]
        return [ord(prompt[0])] * max_tokens

    decode.calls, decode.warmup = calls, 0
    return decode


# Task 1: time_decode ------------------------------------------------------------------------------
def test_task_1_medians_over_prompts(impl):
    clock = FakeClock()
    seconds = {"a": 1.0, "b": 2.0, "c": 8.0}  # tokens/s 8, 4, 1: median 4, mean 4.33
    decode = fake_decoder(clock, seconds)
    decode.warmup = 2
    result = impl.benchmark.time_decode(decode, ["a", "b", "c"], N, warmup=2, clock=clock)
    assert decode.calls[:2] == [("a", N), ("a", N)], (
        f"warm-up: `warmup` untimed calls decode(prompts[0], max_tokens) come first; calls were "
        f"{decode.calls}")
    assert decode.calls[2:] == [("a", N), ("b", N), ("c", N)], (
        f"then one timed call per prompt, in order, each with max_tokens; calls were {decode.calls}")
    assert result["per_prompt"] == pytest.approx([8.0, 4.0, 1.0]), (
        f"per_prompt is max_tokens / seconds of each timed call (the warm-up's 1000 s must not be "
        f"timed), expected [8, 4, 1], got {result['per_prompt']}")
    assert result["seconds"] == pytest.approx([1.0, 2.0, 8.0]), f"seconds per prompt: got {result['seconds']}"
    assert result["tokens_per_s"] == pytest.approx(4.0), (
        f"tokens_per_s is the MEDIAN of per_prompt (4.0), not the mean (4.33) or total tokens / "
        f"total time (2.18): one slowed-down prompt must not move it; got {result['tokens_per_s']}")
    assert result["outputs"] == [[ord(p)] * N for p in "abc"], (
        "outputs: the tokens each timed call returned, one list per prompt (the suite compares them "
        "with plain decoding's)")


def test_task_1_no_warmup_and_one_clock_pair_per_call(impl):
    clock = FakeClock()
    decode = fake_decoder(clock, {"x": 0.5, "y": 0.25})
    result = impl.benchmark.time_decode(decode, ["x", "y"], N, warmup=0, clock=clock)
    assert decode.calls == [("x", N), ("y", N)], f"warmup=0 means no untimed call; calls: {decode.calls}"
    assert result["per_prompt"] == pytest.approx([16.0, 32.0]) and result["tokens_per_s"] == pytest.approx(24.0), (
        f"two prompts: the median is the mean of the two, 24 tokens/s; got {result}")
    assert clock.reads == 4, (
        f"read the clock exactly once before and once after each timed call (2 prompts -> 4 reads), "
        f"read {clock.reads} times: anything else between the reads is timed too")


def test_task_1_equal_output_lengths(impl):
    clock = FakeClock()

    def short_on_b(prompt, max_tokens):
        clock.now += 1.0
        return [0] * (max_tokens - 3 if prompt == "b" else max_tokens)

    with raises(ValueError, "a timed call that returns fewer than max_tokens tokens (an EOS) makes "
                "tokens/s incomparable: raise ValueError naming the prompt (its index, 1)", match=r"\b1\b"):
        impl.benchmark.time_decode(short_on_b, ["a", "b"], N, warmup=0, clock=clock)


@pytest.mark.parametrize("prompts, max_tokens, warmup", [([], N, 1), (["a"], 0, 1), (["a"], N, -1)])
def test_task_1_rejects_bad_arguments(impl, prompts, max_tokens, warmup):
    clock = FakeClock()
    decode = fake_decoder(clock, {"a": 1.0})
    with raises(ValueError, f"prompts={prompts}, max_tokens={max_tokens}, warmup={warmup}: "
                "no prompts, max_tokens < 1 and warmup < 0 must be refused"):
        impl.benchmark.time_decode(decode, prompts, max_tokens, warmup=warmup, clock=clock)


def test_task_1_real_decoder(impl, llama_models):
    """A real (lazy) decoder: the loop must evaluate what it times; outputs stay exact."""
    from support import mlx_lm_greedy

    _, target = llama_models

    def decode(prompt, max_tokens):
        return mlx_lm_greedy(target, prompt, max_tokens)

    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    result = impl.benchmark.time_decode(decode, prompts, 6, warmup=1)
    assert result["outputs"] == [mlx_lm_greedy(target, p, 6) for p in prompts]
    assert all(t > 0 for t in result["per_prompt"]), f"tokens/s must be positive: {result['per_prompt']}"


# Task 2: the theory beside it (measure_costs, compare_to_theory, sample_match_acceptance) --------
def test_task_2_costs_from_time_forward(impl, monkeypatch):
    draft, target = object(), object()
    table = {(id(target), 1): 0.010, (id(draft), 1): 0.002, (id(target), 2): 0.011,
             (id(target), 3): 0.012, (id(target), 4): 0.014, (id(target), 5): 0.015}
    calls = []

    def fake_time_forward(model, num_tokens, context_len=64, repeats=5):
        calls.append((model, num_tokens, context_len, repeats))
        if (id(model), num_tokens) not in table:
            pytest.fail(f"time_forward was called with num_tokens={num_tokens}: the costs need "
                        "t_target(1), t_draft(1) and t_target(K + 1) for each K in ks")
        return table[id(model), num_tokens]

    # The task may call it either way, `from .cost import time_forward` or `cost.time_forward`:
    # replace it in cost.py and in every module that copied it, whatever was imported first.
    replace_everywhere(monkeypatch, impl, "cost.time_forward", fake_time_forward)
    costs = impl.benchmark.measure_costs(draft, target, [1, 2, 4], context_len=32, repeats=3)
    assert costs["c"] == pytest.approx(0.2), (
        f"c = t_draft(1) / t_target(1) = 0.002 / 0.010 = 0.2, got {costs['c']}")
    assert set(costs["v"]) == {1, 2, 4}, f"v has one entry per K in ks: got keys {sorted(costs['v'])}"
    expected_v = {1: 1.1, 2: 1.2, 4: 1.5}
    for k, v in expected_v.items():
        assert costs["v"][k] == pytest.approx(v), (
            f"v({k}) = t_target({k} + 1) / t_target(1): verifying K drafts is ONE call over K + 1 "
            f"tokens (the bonus position too); expected {v}, got {costs['v'][k]}")
    assert costs["target_step_s"] == pytest.approx(0.010) and costs["draft_step_s"] == pytest.approx(0.002)
    assert all(c[2:] == (32, 3) for c in calls), (
        f"pass context_len and repeats through to time_forward; calls were {[c[1:] for c in calls]}")


def test_task_2_rejects_bad_ks(impl, llama_models):
    draft, target = llama_models
    for ks in ([], [0, 2]):
        with raises(ValueError, f"ks={ks}: K counts drafted tokens, every K must be >= 1 and there "
                    "must be at least one"):
            impl.benchmark.measure_costs(draft, target, ks, repeats=1)


def test_task_2_real_models(impl, use_ref, llama_models):
    use_ref("cost.time_forward")
    draft, target = llama_models
    costs = impl.benchmark.measure_costs(draft, target, [2], context_len=8, repeats=1)
    assert costs["c"] > 0 and costs["v"][2] > 0, f"measured costs must be positive: {costs}"


def test_task_2_compare_prediction_and_relative_error(impl, ref, use_ref):
    use_ref("theory.expected_speedup", "theory.expected_tokens_per_round")
    got = impl.benchmark.compare_to_theory(0.8, 4, 0.1, 1.2, 1.5)
    predicted = ref.theory.expected_speedup(0.8, 4, 0.1, 1.2)  # 3.3616 / 1.6 = 2.101
    assert got["predicted"] == pytest.approx(predicted), (
        f"predicted = expected_speedup(alpha, K, c, v) = E / (K c + v) = {predicted:.4f} for alpha "
        f"0.8, K 4, c 0.1, v 1.2; got {got['predicted']}")
    assert got["measured"] == 1.5
    assert got["relative_error"] == pytest.approx((1.5 - predicted) / predicted), (
        f"relative_error = (measured - predicted) / predicted = {(1.5 - predicted) / predicted:.4f} "
        f"(negative: slower than predicted); got {got['relative_error']}")
    faster = impl.benchmark.compare_to_theory(0.5, 1, 0.0, 1.0, 2.0)  # predicted 1.5
    assert faster["relative_error"] == pytest.approx(1 / 3), (
        f"measured 2.0 against predicted 1.5 is +33%, got {faster['relative_error']}")


def test_task_2_compare_rejects_bad_arguments(impl, use_ref):
    use_ref("theory.expected_speedup", "theory.expected_tokens_per_round")
    with raises(ValueError, "a measured speed-up is a ratio of tokens/s: <= 0 is a broken measurement"):
        impl.benchmark.compare_to_theory(0.8, 4, 0.1, 1.2, 0.0)
    with raises(ValueError, "alpha = 1.5 is not a probability: expected_speedup refuses it, and so "
                "must compare_to_theory"):
        impl.benchmark.compare_to_theory(1.5, 4, 0.1, 1.2, 1.0)


def test_task_2_sample_match_examples(impl):
    V = 8
    uniform = mx.full((V,), 1 / V)
    one_hot = mx.array([0, 0, 1, 0, 0, 0, 0, 0], dtype=mx.float32)
    other = mx.array([0, 0, 0, 0, 0, 1, 0, 0], dtype=mx.float32)
    cases = [(uniform, uniform, 1 / V, "p = q uniform: exact sampling accepts always (sum min = 1), "
              "sample-and-match only when two independent draws agree, 1/V"),
             (one_hot, one_hot, 1.0, "p = q one-hot (temperature 0): both rules accept always"),
             (one_hot, other, 0.0, "disjoint supports: no draft is ever accepted"),
             (uniform, one_hot, 1 / V, "q one-hot, p uniform: the target's sample hits it w.p. 1/V")]
    for p, q, expected, why in cases:
        got = impl.benchmark.sample_match_acceptance(p, q)
        assert got.shape == () and got.dtype == mx.float32, (
            f"one [V] row in, a float32 scalar out; got shape {got.shape} dtype {got.dtype}")
        assert got.item() == pytest.approx(expected, abs=1e-6), f"{why}: expected {expected}, got {got.item()}"


def test_task_2_sample_match_never_above_exact_acceptance(impl, ref):
    rng = np.random.default_rng(0)
    p = mx.array(rng.dirichlet(np.full(16, 0.3), size=(3, 5)).astype(np.float16))
    q = mx.array(rng.dirichlet(np.full(16, 0.3), size=(3, 5)).astype(np.float16))
    got = impl.benchmark.sample_match_acceptance(p, q)
    assert got.shape == (3, 5) and got.dtype == mx.float32, (
        f"[..., V] rows in -> [...] out, float32 whatever the input dtype; got {got.shape} {got.dtype}")
    expected = (np.array(p).astype(np.float32) * np.array(q).astype(np.float32)).sum(-1)
    assert np.allclose(np.array(got), expected, atol=1e-5), "sum_x p(x) q(x) over the last axis"
    exact = np.array(ref.theory.acceptance_rate(p, q))
    assert np.all(np.array(got) <= exact + 1e-6), (
        "p(x) q(x) <= min(p(x), q(x)) for probabilities, so sample-and-match never accepts more "
        "often than exact rejection sampling")


def test_task_2_matches_simulated_sample_and_match(impl):
    """Simulate mlx-lm's rule: draft x ~ q, target y ~ p independently, accept iff x == y."""
    p = mx.array([0.5, 0.3, 0.1, 0.1])
    q = mx.array([0.2, 0.5, 0.2, 0.1])
    n = 20000
    key_draft, key_target = mx.random.split(mx.random.key(7))
    x = mx.random.categorical(mx.log(q), num_samples=n, key=key_draft)
    y = mx.random.categorical(mx.log(p), num_samples=n, key=key_target)
    rate = (x == y).astype(mx.float32).mean().item()
    predicted = impl.benchmark.sample_match_acceptance(p, q).item()
    sigma = (predicted * (1 - predicted) / n) ** 0.5
    # 4.5 sigma: a correct implementation fails this with probability < 1e-5 (fixed seed anyway).
    assert abs(rate - predicted) < 4.5 * sigma, (
        f"simulated sample-and-match accepts {rate:.4f} of drafts; your formula says {predicted:.4f} "
        f"(expected sum p q = {0.5 * 0.2 + 0.3 * 0.5 + 0.1 * 0.2 + 0.1 * 0.1:.2f})")


# The suite (kit) ----------------------------------------------------------------------------------
def test_suite_quick_writes_json_markdown_and_plots(tmp_path, capsys):
    from specdec.kit import suite

    code = suite.main(["--quick", "--target", "toy-llama", "--impl", "ref", "--no-progress",
                       "--max-tokens", "8", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "suite.json").read_text())
    assert set(suite.SECTIONS) <= set(report["results"]), (
        f"every section runs in --quick: missing {set(suite.SECTIONS) - set(report['results'])}")
    assert report["environment"]["blas"] and report["environment"]["device"], "record device and BLAS"
    for section in ("k_sweep", "adaptive", "fallback", "drafters", "batch", "long_prompts"):
        for row in report["results"][section]:
            assert row["identical"] is True, (
                f"{section} / {row['label']}: greedy speculative output must equal plain decoding's")
    for row in report["results"]["k_sweep"]:
        assert row["predicted"] > 0 and row["relative_error"] is not None, (
            f"every fixed-K row has the prediction at the measured alpha, c, v(K): {row}")
    mlx_lm = report["results"]["mlx_lm"][0]
    assert mlx_lm["identical"] is True, "at temperature 0 ours and mlx-lm's outputs must be identical"
    assert mlx_lm["ratio"] > 0
    assert mlx_lm["alpha_sample_match_t1"] <= mlx_lm["alpha_exact_t1"] + 1e-6, (
        "sum p q can never exceed sum min(p, q)")
    memory = report["results"]["memory"][0]
    assert memory["peak_speculative_mb"] > 0 and memory["peak_plain_mb"] > 0
    for row in report["results"]["long_prompts"]:
        assert row["alpha"] is not None, "the long-prompt rows carry alpha (the chapter says: watch it)"
    for section in ("k_sweep", "batch", "long_prompts"):
        for row in report["results"][section]:
            assert len(row["speedup_per_prompt"]) == 2 and len(row["tokens_per_s_per_prompt"]) == 2, (
                f"{section} / {row['label']}: the per-prompt values behind each median are kept (the "
                "plots show their spread)")
    markdown = (tmp_path / "suite.md").read_text()
    assert suite.QUICK_NOTE in markdown, "a --quick report says it is a pipeline check, not for conclusions"
    for heading in ("Fixed K", "Adaptive", "Fallback", "Drafters", "Temperature", "Batch sizes",
                    "Long prompts", "Peak memory", "mlx-lm"):
        assert heading in markdown, f"suite.md lacks its {heading!r} table"
    for name in ("k_sweep.png", "settings.png", "batch.png", "long_prompts.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
    assert "suite.md" in capsys.readouterr().out, "main prints where it wrote the report"


def test_suite_quick_sections_flag(tmp_path):
    from specdec.kit import suite

    with raises(SystemExit, "an unknown section name must be refused, naming the known ones"):
        suite.main(["--quick", "--sections", "k_sweep,nonsense", "--out", str(tmp_path)])


def test_suite_and_bench_share_one_default_impl_and_one_blas_thread(monkeypatch):
    """`specdec bench --suite`, `specdec bench` and `python -m specdec.kit.suite` measure the same
    implementation by default, and the bench commands re-run themselves with
    OPENBLAS_NUM_THREADS=1 (the chapter's rule table) unless the user set it."""
    import argparse

    from specdec.kit import suite, timing
    from specdec.kit.cli import bench, common

    import inspect

    assert "kit.cli.bench" not in inspect.getsource(suite), (
        "kit/suite.py must not import kit/cli/bench.py, which imports the suite: no import circle")
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    bench_default = parser.parse_args(["bench"]).impl
    assert suite.SuiteSettings().impl == bench_default == "ref", (
        f"one default --impl: the suite's is {suite.SuiteSettings().impl!r}, bench's {bench_default!r}")

    class Exec(Exception):
        pass

    def fake_execve(path, argv, env):
        raise Exec(argv, env)

    monkeypatch.setattr(timing, "find_openblas", lambda: "/fake/libopenblas.so.0")
    monkeypatch.setattr(common.sys, "platform", "linux")
    monkeypatch.setattr(common.os, "execve", fake_execve)
    for name in ("OPENBLAS_NUM_THREADS", "SPECDEC_REEXEC", "SPECDEC_NO_OPENBLAS", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    for run, argv in ((common.maybe_reexec_with_openblas, ["bench", "--suite", "--quick"]),
                      (suite.reexec_with_openblas, ["--quick"])):
        with raises(Exec, f"{argv}: re-run with the system OpenBLAS preloaded") as caught:
            run(argv)
        new_argv, env = caught.value.args
        assert env.get("OPENBLAS_NUM_THREADS") == "1" and "/fake/libopenblas.so.0" in env["LD_PRELOAD"], (
            f"{argv}: the re-run must set OPENBLAS_NUM_THREADS=1 and preload OpenBLAS, got "
            f"OPENBLAS_NUM_THREADS={env.get('OPENBLAS_NUM_THREADS')!r}, LD_PRELOAD={env.get('LD_PRELOAD')!r}")
        assert new_argv[-len(argv):] == argv, f"the re-run keeps the arguments: {new_argv}"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")  # the user's choice wins
    with raises(Exec, "bench re-runs with OpenBLAS") as caught:
        common.maybe_reexec_with_openblas(["bench"])
    assert caught.value.args[1]["OPENBLAS_NUM_THREADS"] == "4", "a value the user set is kept"
