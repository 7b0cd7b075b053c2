"""The benchmark suite: `specdec bench --suite`, or `python -m specdec.kit.suite`.

Every setting the course built, measured the same way (Week 4 Day 6): the same held-out prompts,
outputs of equal length (EOS ignored), a warm-up first, medians over prompts, and the Week 2 Day 5
prediction at the measured alpha, c and v(K) next to each fixed-K speed-up. Sections:

    k_sweep       fixed K = 1..8, temperature 0: measured vs predicted speed-up
    adaptive      Week 3 Day 1 policies (threshold, heuristic, goodput)
    fallback      the Week 4 Day 3 controller (K may drop to 0 = plain decoding)
    drafters      every drafter at the same K: model, n-gram, token tree, and Week 5's Medusa
                  heads (embedded target), layer skipping and EAGLE (when the course has it),
                  every one built by `drafter_registry.build_decoder`; with
                  tokens per call, accepted per round and acceptance per draft position
    temperature   fixed K at temperature 0 and 1 (speed-up over plain at the same temperature)
    batch         batched speculative vs batched plain decoding, batch sizes 1/2/4/8
    long_prompts  prompts of 256 / 1024 / 2048 tokens
    memory        peak memory of plain decoding (target only) and of speculative (target + draft)
    mlx_lm        side by side with mlx-lm's own `speculative_generate_step` at equal K, in the
                  same process, interleaved: tokens/s, identical greedy outputs, and acceptance at
                  temperature 1 (exact rejection sampling vs mlx-lm's sample-and-match)

Writes suite.json (everything), suite.md (the tables) and PNG plots into --out (drafters.png:
every drafter's speed-up with its per-prompt points, and its acceptance per draft position). The measurement
core (timing, costs, theory, sample-and-match acceptance) is the student's `specdec.benchmark`
with --impl student (the reference stands in for unfinished tasks); reporting and plotting are kit.

    python -m specdec.kit.suite --out bench-out                  # full (long); = specdec bench --suite
    python -m specdec.kit.suite --quick --out /tmp/suite         # pipeline check, ~30 s of CPU

On Linux it re-launches itself with the system OpenBLAS and OPENBLAS_NUM_THREADS=1 (unless set).
Default --impl ref, as every specdec command; --impl student measures your tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

SECTIONS = ["k_sweep", "adaptive", "fallback", "drafters", "temperature", "batch", "long_prompts",
            "memory", "mlx_lm"]


@dataclass
class SuiteSettings:
    """What the suite runs. `quick_settings()` is a tiny version for tests and smoke runs."""

    target: Optional[str] = None  # None: the embedded pair (toy-llama when it is not installed)
    draft: Optional[str] = None
    # "ref", as every specdec command: numbers anyone can compare. "student": your tree, the
    # reference standing in for unfinished tasks.
    impl: str = "ref"
    prompts: int = 5  # held-out prompts per measurement (medians over them)
    max_tokens: int = 128  # every run produces exactly this many tokens
    ks: tuple = (1, 2, 3, 4, 5, 6, 7, 8)
    lookahead: int = 4  # K of every other section (start / upper bound for adaptive, fallback)
    policies: tuple = ("threshold", "heuristic", "goodput")
    batch_sizes: tuple = (1, 2, 4, 8)
    long_prompt_lengths: tuple = (256, 1024, 2048)
    long_max_tokens: int = 64
    temperatures: tuple = (0.0, 1.0)
    mlx_lm_repeats: int = 3  # interleaved ref / mlx-lm passes over the prompts
    warmup: int = 1
    cost_repeats: int = 5  # time_forward repeats for c and v(K)
    seed: int = 0
    sections: tuple = tuple(SECTIONS)
    progress: bool = True
    quick: bool = False  # a pipeline check: the report and the plots say it is not for conclusions


def quick_settings(**overrides: Any) -> SuiteSettings:
    """A tiny suite: 2 prompts x 16 tokens, K in {1, 2}, batch {1, 2}, short "long" prompts —
    about a minute of CPU on the embedded models (every section still loads, warms up and runs).
    For tests and for checking the pipeline, not for numbers."""
    quick = dict(prompts=2, max_tokens=16, ks=(1, 2), lookahead=2, batch_sizes=(1, 2),
                 long_prompt_lengths=(32, 64), long_max_tokens=8, mlx_lm_repeats=1, cost_repeats=2,
                 quick=True)
    quick.update(overrides)
    return SuiteSettings(**quick)


# Running ----------------------------------------------------------------------------------------
class _Runner:
    """The models, the prompts and the plain baselines shared by every section."""

    def __init__(self, settings: SuiteSettings):
        import mlx.core as mx

        from specdec.kit.cli.common import bench_prompts, load_models
        from specdec.kit.impl import get_impl

        self.mx, self.s = mx, settings
        self.impl = get_impl(settings.impl, fallback=settings.impl == "student")
        self.ref = get_impl("ref")
        self.models = load_models(settings.target, settings.draft, need_draft=True)
        pool = bench_prompts(self.models.target_name, max(settings.prompts, max(settings.batch_sizes)))
        self.prompt_names = [name for name, _ in pool]
        self.pool = [self.models.encode(text) for _, text in pool]
        self.prompts = self.pool[: settings.prompts]
        self.bench = self.impl.benchmark
        self.plain: dict = {}  # (temperature, prompt set) -> time_decode result
        self.costs: Optional[dict] = None

    # Settings and decoders ------------------------------------------------------------------
    def config(self, **fields: Any):
        fields.setdefault("lookahead", self.s.lookahead)
        fields.setdefault("fallback", False)
        fields.setdefault("max_lookahead", max(self.s.ks + (fields["lookahead"],)))
        fields.setdefault("seed", self.s.seed)
        return self.ref.config.SpeculativeConfig(**fields)  # settings, not a measured task

    def key(self, temperature: float):
        return self.mx.random.key(self.s.seed) if temperature > 0 else None

    def plain_decoder(self, temperature: float) -> Callable:
        def decode(prompt, max_tokens):
            tokens = self.impl.generate.generate_tokens(
                self.models.target, self.mx.array(prompt, dtype=self.mx.int32), max_tokens,
                temperature=temperature, key=self.key(temperature), eos_token_ids=[])
            return [int(t) for t in tokens]
        return decode

    def spec_decoder(self, config, runs: list) -> Callable:
        """A decode function for time_decode; each call appends its SpecStats to `runs`."""
        from specdec.kit.cli.common import make_controller, speculative_stream
        from specdec.kit.stats import SpecStats

        def decode(prompt, max_tokens):
            settings = dataclasses.replace(config, max_tokens=max_tokens)
            stats = SpecStats()
            controller = make_controller(self.impl, settings) if settings.fallback else None
            stream = speculative_stream(self.impl, self.models, self.mx.array(prompt, dtype=self.mx.int32),
                                        settings, stats, self.key(settings.temperature), [], controller)
            tokens = [int(t) for t, _ in stream]
            runs.append(stats)
            return tokens
        return decode

    def time(self, decode: Callable, prompts: Sequence, max_tokens: int) -> dict:
        return self.bench.time_decode(decode, prompts, max_tokens, warmup=self.s.warmup)

    def plain_baseline(self, temperature: float, prompts: Sequence, max_tokens: int, tag: str) -> dict:
        if (temperature, tag) not in self.plain:
            self.plain[temperature, tag] = self.time(self.plain_decoder(temperature), prompts, max_tokens)
        return self.plain[temperature, tag]

    # One measured row -------------------------------------------------------------------------
    def spec_row(self, label: str, config, prompts=None, max_tokens=None, tag="main", K=None,
                 make_decoder: Optional[Callable] = None) -> dict:
        """One timed setting against plain decoding. make_decoder(runs) -> decode, for a loop
        the config cannot describe (Week 5's drafters); default `spec_decoder(config, runs)`."""
        prompts = self.prompts if prompts is None else prompts
        max_tokens = self.s.max_tokens if max_tokens is None else max_tokens
        plain = self.plain_baseline(config.temperature, prompts, max_tokens, tag)
        runs: list = []
        decode = make_decoder(runs) if make_decoder else self.spec_decoder(config, runs)
        spec = self.time(decode, prompts, max_tokens)
        runs = runs[-len(prompts):]  # the timed calls only (warm-up calls come first)
        ratios = [s / p for s, p in zip(spec["per_prompt"], plain["per_prompt"])]
        row = {"label": label, "K": K, "temperature": config.temperature,
               "tokens_per_s": spec["tokens_per_s"], "plain_tokens_per_s": plain["tokens_per_s"],
               "tokens_per_s_per_prompt": spec["per_prompt"],
               "plain_tokens_per_s_per_prompt": plain["per_prompt"],
               "speedup": statistics.median(ratios), "speedup_per_prompt": ratios,
               **pooled(runs),
               "identical": spec["outputs"] == plain["outputs"] if config.temperature == 0 else None}
        if K is not None and self.costs is not None and row["alpha"] is not None:
            theory = self.bench.compare_to_theory(row["alpha"], K, self.costs["c"],
                                                  self.costs["v"][K], row["speedup"])
            row.update(predicted=theory["predicted"], relative_error=theory["relative_error"])
        return row

    # Sections (each a list of jobs: (label, fn -> row)) ----------------------------------------
    def jobs(self) -> list[tuple[str, str, Callable[[], Optional[dict]]]]:
        s, jobs = self.s, []
        add = lambda section, label, fn: jobs.append((section, label, fn))  # noqa: E731
        ks = sorted(set(s.ks) | {s.lookahead})
        if {"k_sweep", "temperature"} & set(s.sections):
            add("costs", "c and v(K)", self.measure_costs)
        if "k_sweep" in s.sections:
            for K in s.ks:
                add("k_sweep", f"K={K}", lambda K=K: self.spec_row(f"K={K}", self.config(lookahead=K), K=K))
        if "adaptive" in s.sections:
            for policy in s.policies:
                add("adaptive", policy, lambda p=policy: self.spec_row(
                    f"adaptive {p}", self.config(adaptive=p, min_lookahead=1, max_lookahead=max(ks))))
        if "fallback" in s.sections:
            add("fallback", "fallback", lambda: self.spec_row(
                f"fallback (K in 0..{s.lookahead})", self.config(fallback=True)))
        if "drafters" in s.sections:
            for drafter in ("model", "ngram", "tree"):
                add("drafters", drafter, lambda d=drafter: self.drafter_row(d))
            for drafter in self.week5_drafters():
                add("drafters", drafter, lambda d=drafter: self.drafter_row(d))
        if "temperature" in s.sections:
            for t in s.temperatures:
                add("temperature", f"t={t}", lambda t=t: self.spec_row(
                    f"temperature {t:g}", self.config(temperature=t), K=s.lookahead))
        if "batch" in s.sections:
            for B in s.batch_sizes:
                add("batch", f"batch {B}", lambda B=B: self.batch_row(B))
        if "long_prompts" in s.sections:
            for L in s.long_prompt_lengths:
                add("long_prompts", f"{L} tokens", lambda L=L: self.long_row(L))
        if "memory" in s.sections:
            add("memory", "peak memory", self.memory_row)
        if "mlx_lm" in s.sections:
            add("mlx_lm", "vs mlx-lm", self.mlx_lm_row)
        return jobs

    def measure_costs(self) -> dict:
        ks = sorted(set(self.s.ks) | {self.s.lookahead})
        self.costs = self.bench.measure_costs(self.models.draft, self.models.target, ks,
                                              repeats=self.s.cost_repeats)
        return {"label": "costs", "c": self.costs["c"], "v": self.costs["v"],
                "target_step_s": self.costs["target_step_s"], "draft_step_s": self.costs["draft_step_s"]}

    # The drafters section ----------------------------------------------------------------------
    def week5_drafters(self) -> list[str]:
        """Week 5's drafters that fit this target: layer skipping (any llama with 2+ layers),
        Medusa (heads trained for the embedded target only), EAGLE (when the drafter registry
        can build it: the course has Week 5 Day 3 and its drafter fits this target)."""
        from specdec.kit.drafter_registry import DrafterError, build_decoder
        from specdec.kit.layers import decoder_parts

        names = []
        if len(decoder_parts(self.models.target).layers) >= 2:
            names.append("layerskip")
        if self.models.target_name == "tiny-code":
            names.append("medusa")
        try:
            build_decoder(self.impl, "eagle", self.models.target, lookahead=self.s.lookahead)
            names.append("eagle")
        except DrafterError as e:
            self.eagle_note = str(e)
        return names

    def drafter_row(self, name: str) -> dict:
        """One drafter at K = lookahead (the tree: depth), greedy, with its acceptance curve.
        Week 5's drafters come from `drafter_registry.build_decoder`, as `--drafter` does."""
        from specdec.kit.cli.common import acceptance_by_position, rounds_of
        from specdec.kit.stats import SpecStats

        K, mx, target = self.s.lookahead, self.mx, self.models.target
        make_decoder, label = None, f"drafter {name}"
        if name in ("layerskip", "eagle", "medusa"):
            from specdec.kit.drafter_registry import DrafterOptions, build_decoder, load_medusa_heads

            options = DrafterOptions()
            if name == "layerskip":
                options = DrafterOptions(skip_layers=self.layer_to_skip())
                label = f"drafter layerskip {list(options.skip_layers)}"
            elif name == "medusa":
                options = DrafterOptions(heads=load_medusa_heads(self.impl, target))
                K = min(K, options.heads.num_heads)
            decoder = build_decoder(self.impl, name, target, lookahead=K, options=options)

            def make_decoder(runs):
                def decode(prompt, max_tokens):
                    stats = SpecStats()
                    stream = self.impl.speculative.speculative_generate(
                        decoder, mx.array(prompt, dtype=mx.int32), max_tokens, stats=stats)
                    tokens = [int(t) for t, _ in stream]
                    runs.append(stats)
                    return tokens
                return decode
            config = self.config()
        else:
            config = self.config(drafter=name)
        captured: list = []

        def capture(runs):  # keep the timed runs' SpecStats for the acceptance curve
            captured.append(runs)
            return make_decoder(runs) if make_decoder else self.spec_decoder(config, runs)

        row = self.spec_row(label, config, K=K if name == "model" else None, make_decoder=capture)
        timed = captured[0][-len(self.prompts):]
        row["drafter"], row["K"] = name, K
        row["accept_at_position"] = (None if name == "tree" else
                                     acceptance_by_position(self.ref, rounds_of(timed)))
        return row

    def layer_to_skip(self) -> tuple:
        """The one layer whose skip keeps greedy agreement highest (Week 5 Day 4), chosen on
        held-out text that no timed prompt comes from."""
        from specdec.kit.cli.common import heldout_prompts

        if not hasattr(self, "_skip"):
            timed = set(self.prompt_names)
            spare = [t for n, t in heldout_prompts(self.models.target_name, len(timed) + 4) if n not in timed]
            ids = sum((self.models.encode(t) for t in spare), [])[:512] or self.pool[-1]
            (self._skip, _), = self.ref.layerskip.choose_layers_to_skip(
                self.models.target, self.mx.array(ids, dtype=self.mx.int32), 1)
        return self._skip

    def batch_row(self, B: int) -> dict:
        """B prompts decoded together; tokens/s counts all B rows."""
        from specdec.kit.cli.common import run_batched
        from specdec.kit.stats import SpecStats

        groups = [[self.pool[(g * B + i) % len(self.pool)] for i in range(B)] for g in range(self.s.prompts)]
        config = self.config(batch_size=B)
        outputs: dict = {"plain": [], "speculative": []}
        runs: list = []

        def decoder(mode):
            def decode(rows, max_tokens):
                stats = SpecStats() if mode == "speculative" else None
                out = run_batched(self.impl, self.models, rows, dataclasses.replace(config, max_tokens=max_tokens),
                                  None, stats, [], mode)
                out = [[int(t) for t in r] for r in out]
                if any(len(r) != max_tokens for r in out):
                    raise ValueError(f"batched {mode} decoding returned rows of lengths "
                                     f"{[len(r) for r in out]}, not {max_tokens} each")
                outputs[mode].append(out)
                if stats is not None:
                    runs.append(stats)
                return out[0]  # every row has max_tokens tokens: time_decode counts one row
            return decode

        plain = self.time(decoder("plain"), groups, self.s.max_tokens)
        spec = self.time(decoder("speculative"), groups, self.s.max_tokens)
        runs = runs[-len(groups):]
        ratios = [a / b for a, b in zip(spec["per_prompt"], plain["per_prompt"])]
        return {"label": f"batch {B}", "batch_size": B, "tokens_per_s": B * spec["tokens_per_s"],
                "plain_tokens_per_s": B * plain["tokens_per_s"], "speedup": statistics.median(ratios),
                "tokens_per_s_per_prompt": [B * x for x in spec["per_prompt"]],
                "plain_tokens_per_s_per_prompt": [B * x for x in plain["per_prompt"]],
                "speedup_per_prompt": ratios, **pooled(runs),
                "identical": outputs["speculative"][-len(groups):] == outputs["plain"][-len(groups):]}

    def long_row(self, length: int) -> dict:
        flat = [t for p in self.pool for t in p]
        reps = length // max(len(flat), 1) + 1
        flat = (flat * reps)[: length + len(self.prompts)]
        prompts = [flat[i : i + length] for i in range(len(self.prompts))]  # shifted windows
        row = self.spec_row(f"prompt {length} tokens", self.config(), prompts, self.s.long_max_tokens,
                            tag=f"long{length}", K=self.s.lookahead)
        row["prompt_tokens"] = length
        return row

    def memory_row(self) -> dict:
        """Peak memory (MLX's allocator) while decoding: target alone, then target + draft."""
        from mlx.utils import tree_flatten

        mx = self.mx
        prompt = self.pool[0]
        if self.s.long_prompt_lengths:
            flat = [t for p in self.pool for t in p] * (max(self.s.long_prompt_lengths) // 8 + 1)
            prompt = flat[: max(self.s.long_prompt_lengths)]
        weights = {name: sum(v.nbytes for _, v in tree_flatten(m.parameters()))
                   for name, m in (("target", self.models.target), ("draft", self.models.draft))}
        peaks = {}
        for mode, decode in (("plain", self.plain_decoder(0.0)),
                             ("speculative", self.spec_decoder(self.config(), []))):
            mx.clear_cache()
            mx.reset_peak_memory()
            decode(prompt, self.s.long_max_tokens)
            peaks[mode] = mx.get_peak_memory()
        return {"label": "peak memory", "prompt_tokens": len(prompt),
                "peak_plain_mb": peaks["plain"] / 2**20, "peak_speculative_mb": peaks["speculative"] / 2**20,
                "overhead": peaks["speculative"] / peaks["plain"] - 1 if peaks["plain"] else None,
                "weights_target_mb": weights["target"] / 2**20, "weights_draft_mb": weights["draft"] / 2**20}

    def mlx_lm_row(self) -> dict:
        """The implementation under test vs mlx-lm's `speculative_generate_step` at equal K."""
        from mlx_lm.generate import speculative_generate_step
        from mlx_lm.sample_utils import make_sampler

        mx, K, N = self.mx, self.s.lookahead, self.s.max_tokens
        ours = self.spec_decoder(self.config(), [])

        def theirs(prompt, max_tokens, temperature=0.0, counts=None):
            sampler = make_sampler(temp=temperature) if temperature > 0 else None
            out = []
            for token, _, from_draft in speculative_generate_step(
                    mx.array(prompt, dtype=mx.int32), self.models.target, self.models.draft,
                    num_draft_tokens=K, max_tokens=max_tokens, sampler=sampler):
                out.append(int(token))
                if counts is not None:
                    counts["accepted" if from_draft else "rounds"] += 1
            return out

        for fn in (ours, theirs):  # warm-up
            for _ in range(self.s.warmup):
                fn(self.prompts[0], N)
        ratios, ours_tps, theirs_tps, identical = [], [], [], True
        for _ in range(self.s.mlx_lm_repeats):  # interleaved: both see the same machine load
            for prompt in self.prompts:
                a = _timed(ours, prompt, N)
                b = _timed(theirs, prompt, N)
                identical &= a[0] == b[0]
                ours_tps.append(N / a[1])
                theirs_tps.append(N / b[1])
                ratios.append(b[1] / a[1])
        # Temperature 1: accepted drafts per round, both verification rules on the same prompts.
        runs: list = []
        ours_t1 = self.spec_decoder(self.config(temperature=1.0), runs)
        counts = {"accepted": 0, "rounds": 0}
        mx.random.seed(self.s.seed)  # mlx-lm's sampler draws from the global PRNG
        for prompt in self.prompts:
            ours_t1(prompt, N)
            theirs(prompt, N, 1.0, counts)
        ours_pooled = pooled(runs)
        analytic = self.analytic_acceptance()
        return {"label": f"vs mlx-lm, K={K}", "K": K, "tokens_per_s": statistics.median(ours_tps),
                "mlx_lm_tokens_per_s": statistics.median(theirs_tps), "ratio": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios), "identical": bool(identical),
                "accepted_per_round_t1": ours_pooled["accepted_per_round"],
                "mlx_lm_accepted_per_round_t1": counts["accepted"] / max(counts["rounds"], 1),
                **analytic}

    def analytic_acceptance(self) -> dict:
        """Mean over positions of sum min(p, q) (exact rejection sampling) and sum p q (sample and
        match), p and q at temperature 1 along each prompt followed by the target's greedy text."""
        mx = self.mx
        exact, match = [], []
        for prompt in self.prompts:
            text = prompt + self.plain_decoder(0.0)(prompt, self.s.max_tokens)
            tokens = mx.array(text, dtype=mx.int32)[None]
            p = mx.softmax(self.models.target(tokens)[0, len(prompt) - 1 : -1].astype(mx.float32), axis=-1)
            q = mx.softmax(self.models.draft(tokens)[0, len(prompt) - 1 : -1].astype(mx.float32), axis=-1)
            exact.append(self.ref.theory.acceptance_rate(p, q))
            match.append(self.bench.sample_match_acceptance(p, q))
        exact_all, match_all = mx.concatenate(exact), mx.concatenate(match)
        return {"alpha_exact_t1": exact_all.mean().item(), "alpha_sample_match_t1": match_all.mean().item()}


def _timed(fn: Callable, prompt, max_tokens: int) -> tuple[list, float]:
    start = time.perf_counter()
    out = fn(prompt, max_tokens)
    return out, time.perf_counter() - start


def pooled(runs: list) -> dict:
    """alpha, acceptance and tokens per target call over several runs' SpecStats, pooled."""
    accepted = sum(r.accepted for r in runs)
    drafted = sum(r.drafted for r in runs)
    tested = accepted + sum(r.rejections for r in runs)
    rounds = sum(r.rounds for r in runs)
    emitted = sum(r.emitted for r in runs)
    ks = [k for r in runs for k in r.lookahead_per_round]
    return {"alpha": accepted / tested if tested else None,
            "acceptance_rate": accepted / drafted if drafted else None,
            "tokens_per_call": emitted / rounds if rounds else None,
            "accepted_per_round": accepted / rounds if rounds else None,
            "mean_K": statistics.mean(ks) if ks else None,
            "plain_rounds": sum(1 for k in ks if k == 0)}


def environment() -> dict:
    from specdec.kit.timing import blas_info

    try:
        from importlib.metadata import version
        mlx_lm_version = version("mlx-lm")
    except Exception:  # pragma: no cover - metadata missing
        mlx_lm_version = "?"
    return {**blas_info(), "mlx_lm": mlx_lm_version, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "processor": platform.processor() or platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_suite(settings: SuiteSettings) -> dict:
    """Run every section of `settings` and return the report (what suite.json holds)."""
    from tqdm import tqdm

    start = time.perf_counter()
    runner = _Runner(settings)
    jobs = runner.jobs()
    results: dict = {}
    bar = tqdm(jobs, desc="suite", unit="step", file=sys.stderr, disable=not settings.progress,
               dynamic_ncols=True)
    for section, label, fn in bar:
        bar.set_postfix_str(f"{section}: {label}")
        started = time.perf_counter()
        row = fn()
        row["job_s"] = time.perf_counter() - started  # wall time of this step, warm-up included
        results.setdefault(section, []).append(row)
    report = {"settings": dataclasses.asdict(settings), "impl": runner.impl.name,
              "target": runner.models.target_name, "draft": runner.models.draft_name,
              "prompts": runner.prompt_names[: settings.prompts], "environment": environment(),
              "seconds": time.perf_counter() - start, "results": results}
    if "drafters" in results:  # why the drafters section has no EAGLE row, when it has none
        report["eagle"] = getattr(runner, "eagle_note", "included")
    return report


# Reporting --------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".2f", suffix: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{x:{fmt}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows], ""]


QUICK_NOTE = ("--quick: a check that the pipeline runs (2 prompts x 16 tokens), not for "
              "conclusions: run the full suite for numbers.")

SPEC_HEADER = ["setting", "tok/s", "plain tok/s", "speed-up", "predicted", "rel. error", "alpha",
               "tok/call", "identical (t=0)"]


def _spec_rows(rows: list[dict]) -> list[list[str]]:
    return [[r["label"], _f(r["tokens_per_s"], ".1f"), _f(r["plain_tokens_per_s"], ".1f"),
             _f(r["speedup"], ".2f", "x"), _f(r.get("predicted"), ".2f", "x"),
             _f(r.get("relative_error"), "+.0%"), _f(r.get("alpha"), ".3f"),
             _f(r.get("tokens_per_call"), ".2f"), _f(r.get("identical"))] for r in rows]


def _drafter_table(rows: list[dict]) -> list[str]:
    """Every drafter at the same K: speed-up with its per-prompt range, and acceptance by position."""
    def positions(r):
        rates = r.get("accept_at_position")
        return "tree" if rates is None else " ".join(f"{x:.2f}" for x in rates[:6]) or "none"
    return ["## Drafters (temperature 0, the same K)", "", *_table(
        ["drafter", "K", "tok/s", "plain tok/s", "speed-up", "per-prompt range", "accepted/round",
         "tok/call", "acceptance by position (0 = first draft)", "identical (t=0)"],
        [[r["label"], str(r.get("K")), _f(r["tokens_per_s"], ".1f"), _f(r["plain_tokens_per_s"], ".1f"),
          _f(r["speedup"], ".2f", "x"),
          f"{min(r['speedup_per_prompt']):.2f}-{max(r['speedup_per_prompt']):.2f}",
          _f(r.get("accepted_per_round"), ".2f"), _f(r.get("tokens_per_call"), ".2f"), positions(r),
          _f(r.get("identical"))] for r in rows]),
        "A tree's rounds verify several branches, so its acceptance by position is not a chain's: "
        "read its tokens per call. `scripts/bench_drafters.py` runs the full bake-off (each "
        "drafter at its own best K, sampled, batch 8, the fallback controller).", ""]


def markdown_report(report: dict) -> str:
    """The tables of suite.md."""
    s, env, res = report["settings"], report["environment"], report["results"]
    lines = [f"# Speculative decoding benchmark: {report['target']} / {report['draft']}", ""]
    if s.get("quick"):
        lines += [f"> {QUICK_NOTE}", ""]
    lines += [
             f"- implementation: {report['impl']}; {s['prompts']} held-out prompts, {s['max_tokens']} "
             f"tokens each (EOS ignored), {s['warmup']} warm-up call(s), medians over prompts",
             f"- device {env['device']}, BLAS {env['blas']}, OPENBLAS_NUM_THREADS="
             f"{env['openblas_num_threads']}, {env['cpu_count']} CPUs, mlx {env['mlx']}, mlx-lm "
             f"{env['mlx_lm']}, {env['platform']}, {env['date']}",
             "- speed-up: median over prompts of tokens/s over plain decoding's on the same prompt; "
             "predicted: E / (K c + v(K)) at the measured alpha, c, v(K) (Week 2 Day 5)",
             f"- suite time {report['seconds']:.0f} s", ""]
    if "costs" in res:
        c = res["costs"][0]
        lines += ["## Measured costs", "",
                  f"target step {c['target_step_s'] * 1e3:.2f} ms, draft step {c['draft_step_s'] * 1e3:.2f} ms, "
                  f"c = {c['c']:.3f}; v(K) = " + ", ".join(f"{k}: {v:.2f}" for k, v in c["v"].items()), ""]
    titles = {"k_sweep": "Fixed K (temperature 0)", "adaptive": "Adaptive K policies",
              "fallback": "Fallback controller", "drafters": "Drafters",
              "temperature": "Temperature", "long_prompts": "Long prompts"}
    for section, title in titles.items():
        if section == "drafters" and section in res:
            lines += _drafter_table(res[section])
            if report.get("eagle", "included") != "included":
                lines += [f"No EAGLE row: {report['eagle']}", ""]
        elif section in res:
            lines += [f"## {title}", "", *_table(SPEC_HEADER, _spec_rows(res[section]))]
    if "batch" in res:
        lines += ["## Batch sizes (tokens/s over all rows)", "", *_table(
            ["batch", "tok/s", "plain tok/s", "speed-up", "alpha", "tok/call", "identical"],
            [[str(r["batch_size"]), _f(r["tokens_per_s"], ".1f"), _f(r["plain_tokens_per_s"], ".1f"),
              _f(r["speedup"], ".2f", "x"), _f(r["alpha"], ".3f"), _f(r["tokens_per_call"], ".2f"),
              _f(r["identical"])] for r in res["batch"]])]
    if "memory" in res:
        m = res["memory"][0]
        lines += ["## Peak memory", "", *_table(
            ["prompt tokens", "plain (target only)", "speculative (target + draft)", "overhead",
             "weights target", "weights draft"],
            [[str(m["prompt_tokens"]), _f(m["peak_plain_mb"], ".1f", " MB"),
              _f(m["peak_speculative_mb"], ".1f", " MB"), _f(m["overhead"], "+.0%"),
              _f(m["weights_target_mb"], ".1f", " MB"), _f(m["weights_draft_mb"], ".1f", " MB")]])]
    if "mlx_lm" in res:
        m = res["mlx_lm"][0]
        lines += ["## Side by side with mlx-lm (same process, interleaved, equal K)", "", *_table(
            ["K", "ours tok/s", "mlx-lm tok/s", "ratio (ours / mlx-lm)", "range", "identical (t=0)",
             "accepted/round t=1: ours", "mlx-lm", "sum min(p,q)", "sum p*q"],
            [[str(m["K"]), _f(m["tokens_per_s"], ".1f"), _f(m["mlx_lm_tokens_per_s"], ".1f"),
              _f(m["ratio"], ".2f", "x"), f"{m['ratio_min']:.2f}-{m['ratio_max']:.2f}",
              _f(m["identical"]), _f(m["accepted_per_round_t1"], ".2f"),
              _f(m["mlx_lm_accepted_per_round_t1"], ".2f"), _f(m["alpha_exact_t1"], ".3f"),
              _f(m["alpha_sample_match_t1"], ".3f")]]),
            "mlx-lm accepts a draft only when the target's own sample equals it (acceptance "
            "sum p*q per position); exact rejection sampling accepts with probability sum min(p, q). "
            "Both are exact at temperature 0.", ""]
    return "\n".join(lines)


def write_plots(report: dict, out: Path) -> list[Path]:
    """PNG plots (matplotlib, no display needed) of the sections that ran.

    A median is drawn with the per-prompt values it is the median of (small points); K and batch
    sizes get integer ticks; the line at 1.0 is plain decoding's speed; a --quick run says in
    every title that it is not for conclusions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, paths = report["results"], []
    quick = "\n(--quick: pipeline check, not for conclusions)" if report["settings"].get("quick") else ""

    def save(fig, name):
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    def per_prompt(ax, xs, rows, key, color, label, horizontal=False):
        """The per-prompt values behind each median, as small points."""
        px = [x for x, r in zip(xs, rows) for _ in r.get(key) or []]
        py = [v for r in rows for v in r.get(key) or []]
        if px:
            args = (py, px) if horizontal else (px, py)
            ax.plot(*args, ".", color=color, alpha=0.45, ms=5, label=label)

    if "k_sweep" in res:
        rows = res["k_sweep"]
        ks = [r["K"] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ks, [r["speedup"] for r in rows], "o-", color="C0", label="measured (median)")
        per_prompt(ax, ks, rows, "speedup_per_prompt", "C0", "measured, per prompt")
        if all(r.get("predicted") is not None for r in rows):
            ax.plot(ks, [r["predicted"] for r in rows], "s--", color="C1",
                    label="predicted E/(Kc+v(K))")
        ax.axhline(1.0, color="gray", lw=0.8, label="1.0 = plain decoding")
        ax.set_xticks(ks)
        ax.set(xlabel="K (draft length)", ylabel="speed-up over plain",
               title="Fixed K, temperature 0" + quick)
        ax.legend(fontsize=8)
        save(fig, "k_sweep.png")
    spec_sections = [s for s in ("k_sweep", "adaptive", "fallback", "drafters", "temperature") if s in res]
    if spec_sections:
        rows = [r for s in spec_sections for r in res[s]]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.6))
        ys = list(range(len(rows)))
        ax.barh(ys, [r["speedup"] for r in rows], color="C0", alpha=0.7, label="median over prompts")
        per_prompt(ax, ys, rows, "speedup_per_prompt", "black", "per prompt", horizontal=True)
        ax.set_yticks(ys, [r["label"] for r in rows])
        ax.axvline(1.0, color="gray", lw=0.8, label="1.0 = plain decoding")
        ax.invert_yaxis()
        ax.set(xlabel="speed-up over plain", title="Every setting" + quick)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09 - 1.2 / fig.get_figheight() / 4),
                  ncol=3, frameon=False)
        save(fig, "settings.png")

    if "drafters" in res:
        rows = res["drafters"]
        fig, (ax, pos_ax) = plt.subplots(1, 2, figsize=(10, 0.3 * len(rows) + 2.6),
                                         gridspec_kw={"width_ratios": [1.1, 1]})
        ys = list(range(len(rows)))
        ax.barh(ys, [r["speedup"] for r in rows], color="C0", alpha=0.7, label="median over prompts")
        per_prompt(ax, ys, rows, "speedup_per_prompt", "black", "per prompt", horizontal=True)
        ax.set_yticks(ys, [r["label"].removeprefix("drafter ") for r in rows])
        ax.axvline(1.0, color="gray", lw=0.8, ls="--", label="1.0 = plain decoding")
        ax.invert_yaxis()
        ax.set(xlabel="speed-up over plain (tokens/s ratio)", title="Drafters, same K, T = 0" + quick)
        ax.legend(fontsize=7, loc="lower right")
        for i, r in enumerate(rows):
            rates = r.get("accept_at_position")
            if rates:
                pos_ax.plot(range(len(rates)), rates, "o-", color=f"C{i}", label=ax.get_yticklabels()[i].get_text())
        pos_ax.set_xticks(range(max([len(r.get("accept_at_position") or []) for r in rows] + [1])))
        pos_ax.set(xlabel="draft position (0 = first draft)", ylabel="P(accepted | reached)",
                   ylim=(0, 1.05), title="Acceptance by position" + quick)
        if pos_ax.lines:
            pos_ax.legend(fontsize=7)
        save(fig, "drafters.png")

    def plain_vs_speculative(section: str, x_key: str, title: str, **axes):
        rows = res[section]
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r[x_key] for r in rows]
        ax.plot(xs, [r["plain_tokens_per_s"] for r in rows], "o-", color="C1", label="plain (median)")
        per_prompt(ax, xs, rows, "plain_tokens_per_s_per_prompt", "C1", None)
        ax.plot(xs, [r["tokens_per_s"] for r in rows], "s-", color="C0", label="speculative (median)")
        per_prompt(ax, xs, rows, "tokens_per_s_per_prompt", "C0", "per prompt")
        ax.set(title=title + quick, **axes)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        return fig, ax

    if "batch" in res:
        fig, ax = plain_vs_speculative("batch", "batch_size", "Batched decoding",
                                       xlabel="batch size", ylabel="tokens/s (all rows)")
        ax.legend(fontsize=8)
        save(fig, "batch.png")
    if "long_prompts" in res:
        fig, ax = plain_vs_speculative("long_prompts", "prompt_tokens", "Long prompts", xlabel="prompt tokens", ylabel="tokens/s",
                                       xscale="log")
        rows = res["long_prompts"]
        alpha_ax = ax.twinx()  # the chapter says: watch alpha as the prompt grows
        alpha_ax.plot([r["prompt_tokens"] for r in rows],
                      [r["alpha"] if r.get("alpha") is not None else float("nan") for r in rows],
                      "^:", color="C2", label="alpha (right axis)")
        alpha_ax.set(ylabel="alpha (acceptance per draft)", ylim=(0, 1.05))
        handles = ax.get_legend_handles_labels()
        more = alpha_ax.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="lower left")
        save(fig, "long_prompts.png")
    return paths


def write_report(report: dict, out: str | Path) -> dict:
    """Write suite.json, suite.md and the PNG plots into `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "suite.json", out / "suite.md"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path.write_text(markdown_report(report))
    return {"json": json_path, "markdown": md_path, "plots": write_plots(report, out)}


# Command line -----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The suite's flags (`specdec bench --suite` can reuse them)."""
    p.add_argument("--out", default="bench-suite", help="folder for suite.json, suite.md, *.png")
    p.add_argument("--quick", action="store_true", help="a tiny suite (~30 s of CPU): checks the pipeline, not for conclusions")
    p.add_argument("--target", default=None, help="target model (default: the embedded tiny-code)")
    p.add_argument("--draft", default=None, help="draft model (default: the embedded tiny-code-draft)")
    p.add_argument("--impl", choices=["student", "ref"], default=None,
                   help="ref (default, as every specdec command: numbers anyone can compare) or "
                        "student (your tree, the reference for unfinished tasks)")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts per measurement")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per run (equal lengths)")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> SuiteSettings:
    overrides: dict = {}
    for name in ("target", "draft", "impl", "prompts", "max_tokens"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "sections", None):
        sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
        unknown = [x for x in sections if x not in SECTIONS]
        if unknown:
            raise SystemExit(f"specdec suite: error: unknown section(s) {unknown}: choose from {SECTIONS}")
        overrides["sections"] = sections
    overrides["progress"] = not getattr(args, "no_progress", False)
    return quick_settings(**overrides) if getattr(args, "quick", False) else SuiteSettings(**overrides)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the suite for parsed flags, write the report, print it and where it went.

    For `specdec bench --suite`: any Namespace works; missing attributes take the defaults of
    `add_arguments` (target, draft, impl, prompts, max_tokens, sections, quick, no_progress, out).
    """
    if os.environ.get("OPENBLAS_NUM_THREADS") is None:
        print("note: set OPENBLAS_NUM_THREADS=1 for steadier timings", file=sys.stderr)
    report = run_suite(settings_from_args(args))
    paths = write_report(report, getattr(args, "out", None) or "bench-suite")
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']}, " + ", ".join(str(p) for p in paths["plots"]))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specdec.kit.suite", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


def reexec_with_openblas(argv: list[str]) -> None:
    """Run `python -m specdec.kit.suite` again with the system OpenBLAS preloaded and
    OPENBLAS_NUM_THREADS=1 (Linux), exactly as `specdec bench --suite` does: MLX's bundled BLAS
    hides the point of speculative decoding, and both settings are read only at process start.
    SPECDEC_NO_OPENBLAS=1 turns this off."""
    from specdec.kit.cli.common import reexec_for_speed

    reexec_for_speed("specdec.kit.suite", argv, one_blas_thread=True)


if __name__ == "__main__":
    reexec_with_openblas(sys.argv[1:])
    sys.exit(main())
