"""The `specdec` command runs end to end on the toy pair (not graded: these test the kit).

In-process calls of `main([...])` (fast, no re-exec), plus one real subprocess for the
`python -m specdec.kit.cli` entry point.
"""

import json
import os
import subprocess
import sys

from specdec.kit.cli import main
from specdec.kit.grade import Task

TOY = ["--target", "toy-llama", "--draft", "toy-llama"]


def test_generate_speculative_on_the_toy_pair(capsys):
    assert main(["generate", *TOY, "--max-tokens", "8", "--no-color"]) == 0
    out = capsys.readouterr().out
    generated = out.split("output:")[1].splitlines()[0].split()
    assert len(generated) == 8 and all(t.isdigit() for t in generated), out
    assert "target calls" in out and "tokens/s" in out and "BLAS" in out, out
    assert "\x1b[" not in out, "--no-color must print no ANSI escapes"


def test_generate_plain_and_speculative_agree_when_greedy(capsys):
    main(["generate", *TOY, "--max-tokens", "12", "--no-color", "--plain"])
    plain = capsys.readouterr().out.split("output:")[1].splitlines()[0]
    main(["generate", *TOY, "--max-tokens", "12", "--no-color", "--k", "3"])
    speculative = capsys.readouterr().out.split("output:")[1].splitlines()[0]
    assert plain == speculative, "greedy speculative decoding must reproduce plain greedy decoding"


def test_bench_json(capsys):
    assert main(["bench", *TOY, "--prompts", "2", "--max-tokens", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"target", "draft", "impl", "k", "blas", "prompts", "median"} <= set(report)
    assert len(report["prompts"]) == 2
    for row in report["prompts"]:
        assert row["plain_tokens"] == row["speculative_tokens"] == 16, "EOS is ignored by default"
        assert row["identical"] is True, "greedy speculative output must equal plain greedy output"
        assert 0.0 <= row["acceptance_rate"] <= 1.0 and row["tokens_per_target_call"] >= 1.0
    assert report["median"]["all_identical"] is True
    assert "blas" in report["blas"]


def test_doctor(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for field in ("mlx", "mlx-lm", "device", "BLAS", "matmul", "embedded"):
        assert field in out, f"doctor must report {field!r}:\n{out}"


def test_user_errors_are_one_line_messages(capsys):
    assert main(["generate", "--target", "toy-llama", "--draft", "some/other-model"]) == 2
    assert "toy-llama" in capsys.readouterr().err
    assert main(["generate", *TOY, "--k", "0"]) == 2


def test_grade_task_status():
    task = Task(1, 1, 1, test_names=["softmax", "temperature"])
    task.outcomes = {"a": "passed", "b": "passed"}
    assert task.status == "passed"
    task.outcomes = {"a": "passed", "b": "failed"}
    assert task.status == "failed"
    task.outcomes = {"a": "stub", "b": "stub"}
    assert task.status == "not started", "failing with its own NotImplementedError = not started"
    assert task.name == "softmax", "no stub name known: the first test's name"
    task.stub_name = "logits_to_probs"
    assert task.name == "logits_to_probs"


def test_module_entry_point():
    env = dict(os.environ, SPECDEC_NO_OPENBLAS="1")
    run = subprocess.run(
        [sys.executable, "-m", "specdec.kit.cli", "generate", *TOY, "--max-tokens", "4", "--no-color"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "output:" in run.stdout
