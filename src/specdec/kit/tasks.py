"""The course's tasks, one entry each: where the stub lives, what it is called, which chapter.

`specdec grade` labels its scoreboard from this list, so a task keeps its name whether its stub
is still a stub or already your code. A kit test (tests/test_grade.py) checks that every stub
tag in the student tree, `NotImplementedError("Week W Day D Task T: name — see book/src/....md")`,
matches an entry here, and that every entry has graded tests `test_task_T_*` in
`tests/test_week_W_day_D.py`. `python -m specdec.kit.tasks` prints the entries the student
tree's stubs describe (to extend this list when a chapter gains tasks).
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from typing import Iterator, Optional

STUB_MESSAGE = re.compile(
    r"^Week (\d+) Day (\d+) Task (\d+): ([A-Za-z_][\w.]*) — see (book/src/[\w.-]+\.md)$")


@dataclass(frozen=True)
class Task:
    week: int
    day: int
    task: int
    module: str  # exercise module, e.g. "verify"
    functions: tuple  # qualified names of the task's stubs: ("verify_speculation",)
    chapter: str  # "book/src/week2-03-speculative-sampling.md"
    label: str = ""  # scoreboard name when the task has several stubs

    @property
    def key(self) -> tuple:
        return (self.week, self.day, self.task)

    @property
    def tag(self) -> str:
        return f"Week {self.week} Day {self.day} Task {self.task}"

    @property
    def name(self) -> str:
        return self.label or self.functions[0]

    @property
    def test_file(self) -> str:
        return f"tests/test_week_{self.week}_day_{self.day}.py"

    @property
    def command(self) -> str:
        """The exact command that grades this task."""
        return f"pytest {self.test_file} --impl student -k task_{self.task}"


def _tasks(week: int, day: int, module: str, chapter: str, *entries) -> list:
    """Entries of one day, tasks 1, 2, ...: each a function name, or (label, function, ...).

    A name "other_module:function" puts that task in another module than the day's `module`.
    """
    out = []
    for number, entry in enumerate(entries, start=1):
        label, *functions = ("", entry) if isinstance(entry, str) else entry
        where = module
        if ":" in functions[0]:
            where = functions[0].split(":")[0]
            functions = [f.split(":")[-1] for f in functions]
        out.append(Task(week, day, number, where, tuple(functions), f"book/src/{chapter}.md", label))
    return out


TASKS: tuple = tuple(
    _tasks(1, 1, "sampling", "week1-01-sampling",
           "logits_to_probs", "top_k_filter", "top_p_filter", "sample_token")
    + _tasks(1, 2, "generate", "week1-02-autoregressive-loop", "prefill", "generate_tokens")
    + _tasks(1, 3, "cost", "week1-03-forward-cost", "time_forward", "verify_cost_curve")
    + _tasks(1, 4, "kv_cache", "week1-04-kv-rollback", "cache_length", "rollback")
    + _tasks(2, 1, "draft", "week2-01-draft-integration",
             "SpeculativeDecoder.__init__", "SpeculativeDecoder.draft_generation")
    + _tasks(2, 2, "verify", "week2-02-parallel-verification", "verify_greedy")
    + _tasks(2, 3, "verify", "week2-03-speculative-sampling",
             "residual_distribution", "verify_speculation")
    + _tasks(2, 4, "speculative", "week2-04-full-loop", "commit_round", "speculative_generate")
    + _tasks(2, 5, "theory", "week2-05-theory",
             "acceptance_rate", "expected_tokens_per_round", "expected_speedup")
    + _tasks(3, 1, "adaptive", "week3-01-adaptive-lookahead",
             ("AdaptiveSpeculator: window, threshold", "AdaptiveSpeculator.__init__",
              "AdaptiveSpeculator.update", "AdaptiveSpeculator.threshold_step"),
             "AdaptiveSpeculator.heuristic_step", "best_lookahead", "AdaptiveSpeculator.goodput_step")
    + _tasks(3, 2, "batched", "week3-02-batched",
             "left_pad", "rollback_rows", "draft_batch", "batched_speculative_decode")
    + _tasks(3, 3, "drafters", "week3-03-ngram-drafting",
             "find_ngram_continuation", "NgramDrafter.draft",
             ("DrafterDecoder", "DrafterDecoder.__init__", "DrafterDecoder.reset",
              "DrafterDecoder.draft_generation"))
    + _tasks(3, 4, "tree", "week3-04-token-trees",
             ("tree_depths, tree_attention_mask", "tree_depths", "tree_attention_mask"),
             "tree_forward", "build_draft_tree", "verify_tree_greedy", "commit_tree_path",
             "tree_speculative_generate")
    + _tasks(4, 1, "config", "week4-01-config-contracts",
             "SpeculativeConfig.validate",
             ("SpeculativeConfig.to_dict, from_dict", "SpeculativeConfig.to_dict",
              "SpeculativeConfig.from_dict"),
             ("check_probs, check_verification", "contracts:check_probs",
              "contracts:check_verification"),
             ("contracts: committed, lookahead, rows", "contracts:check_committed",
              "contracts:check_lookahead", "contracts:check_batched_rows"),
             ("checked, set_contract_checking", "contracts:checked",
              "contracts:set_contract_checking"))
    + _tasks(4, 2, "metrics", "week4-02-metrics",
             ("acceptance_per_position", "position_counts", "acceptance_per_position"),
             "measure", "MetricsAggregator.add",
             ("measure_plain_baseline, honest_speedup", "measure_plain_baseline", "honest_speedup"))
    + _tasks(4, 3, "fallback", "week4-03-fallback",
             ("FallbackController: the estimates", "FallbackController.alpha",
              "FallbackController.step_time", "FallbackController.draft_cost",
              "FallbackController.verify_line", "FallbackController.goodput",
              "FallbackController.best_lookahead"),
             ("FallbackController: update, decide", "FallbackController.update",
              "FallbackController.decide"))
    + _tasks(4, 4, "fallback", "week4-04-fallback-loops",
             "fallback_generate", "batched_fallback_decode")
    + _tasks(4, 5, "serving", "week4-05-serving",
             "find_stop", "prefill_request", "Scheduler.admit", "Scheduler.commit_round",
             "Scheduler.step")
    + _tasks(4, 6, "benchmark", "week4-06-benchmarking",
             "time_decode",
             ("costs, compare_to_theory, sample_match",
              "measure_costs", "compare_to_theory", "sample_match_acceptance"))
    + _tasks(5, 1, "coupling", "week5-01-drafter-invariant-sampling",
             "gumbel_noise",
             ("gumbel_sample, seeded_generate", "gumbel_sample", "seeded_generate"),
             ("coupled_draft, verify_coupled", "coupled_draft", "verify_coupled"),
             "coupled_generate", "batched_coupled_decode")
    + _tasks(5, 2, "medusa", "week5-02-medusa-heads",
             ("MedusaHeads", "MedusaHeads.__init__", "MedusaHeads.__call__"),
             "medusa_loss", "medusa_tree", "medusa_generate", "medusa_sample_generate")
    + _tasks(5, 3, "eagle", "week5-03-eagle",
             ("EagleLayer", "EagleLayer.__init__", "EagleLayer.fuse_features",
              "EagleLayer.__call__"),
             "eagle_loss", "eagle_draft", "EagleDrafter.draft")
    + _tasks(5, 4, "layerskip", "week5-04-layer-skipping",
             ("LayerSkipModel", "LayerSkipModel.__init__", "LayerSkipModel.__call__"),
             "greedy_agreement", "choose_layers_to_skip",
             ("LayerSkipDrafter", "shareable_layers", "LayerSkipDrafter.__init__"))
    + _tasks(5, 5, "bakeoff", "week5-05-bakeoff",
             "expected_tokens_from_curve",
             ("predicted_speedup, best_lookahead", "predicted_speedup", "best_lookahead"),
             "break_even_draft_cost", "paired_comparison")
)

_BY_KEY = {t.key: t for t in TASKS}


def find_task(week: int, day: int, task: int) -> Optional[Task]:
    """The registry entry of Week `week` Day `day` Task `task`, or None."""
    return _BY_KEY.get((week, day, task))


# Reading the stubs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StubTag:
    """One `raise NotImplementedError("Week W Day D Task T: name — see chapter")` in a module."""

    module: str
    qualname: str  # where the raise is: "SpeculativeDecoder.draft_generation"
    week: int
    day: int
    task: int
    name: str  # the name the message gives
    chapter: str


def stub_tags(package: str = "specdec", modules: Optional[list] = None) -> Iterator[StubTag]:
    """Every stub message in the exercise modules of `package`, read from the source (nothing runs).

    Also finds messages that do not follow the format exactly (they come back with chapter "",
    and a test reports them).
    """
    import importlib

    from specdec.kit.impl import EXERCISE_MODULES

    for module in modules or EXERCISE_MODULES:
        tree = ast.parse(inspect.getsource(importlib.import_module(f"{package}.{module}")))
        for node, qualname in _functions(tree):
            for sub in ast.walk(node):
                if not (isinstance(sub, ast.Raise) and isinstance(sub.exc, ast.Call)
                        and getattr(sub.exc.func, "id", None) == "NotImplementedError" and sub.exc.args
                        and isinstance(sub.exc.args[0], ast.Constant)
                        and isinstance(sub.exc.args[0].value, str)):
                    continue
                message = sub.exc.args[0].value
                m = STUB_MESSAGE.match(message)
                if m:
                    w, d, t, name, chapter = m.groups()
                    yield StubTag(module, qualname, int(w), int(d), int(t), name, chapter)
                elif re.match(r"Week \d+ Day \d+ Task \d+", message):
                    w, d, t = (int(x) for x in re.findall(r"\d+", message)[:3])
                    yield StubTag(module, qualname, w, d, t, message, "")


def _functions(tree: ast.Module) -> Iterator[tuple]:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.name
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield child, f"{node.name}.{child.name}"


def registry_source(tags: list) -> str:
    """Python lines for TASKS, from stub tags (a starting point when a chapter gains tasks)."""
    days: dict = {}
    for tag in tags:
        days.setdefault((tag.week, tag.day), []).append(tag)
    lines = []
    for (week, day), day_tags in sorted(days.items()):
        chapter = day_tags[0].chapter.removeprefix("book/src/").removesuffix(".md")
        entries = []
        for number in sorted({t.task for t in day_tags}):
            names = [(t.qualname if t.module == day_tags[0].module else f"{t.module}:{t.qualname}")
                     for t in day_tags if t.task == number]
            entries.append(repr(names[0]) if len(names) == 1 else repr(("LABEL", *names)))
        lines.append(f"    + _tasks({week}, {day}, {day_tags[0].module!r}, {chapter!r},\n"
                     f"             {', '.join(entries)})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(registry_source(list(stub_tags())))
