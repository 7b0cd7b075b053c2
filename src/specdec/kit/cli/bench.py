"""`specdec bench`: plain vs speculative decoding over held-out code prompts, same settings."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Callable

from specdec.kit.cli.common import (Models, acceptance_by_position, add_decoding_flags,
                                    bench_prompts, blas_note, describe_mode,
                                    fallback_off_reason, format_positions,
                                    heldout_prompts,  # noqa: F401  (re-exported: kit.cli, notebooks)
                                    load_models, make_controller, make_key, needs_draft_model,
                                    plain_stream, prepare, prepare_drafter, rounds_of,
                                    run_batched, speculative_stream, SCHEDULED_DRAFTERS)
from specdec.kit.timing import blas_info


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="plain vs speculative decoding over held-out code prompts")
    add_decoding_flags(b)
    b.add_argument("--prompts", type=int, default=10, help="prompts (batches with --batch), default 10")
    b.add_argument("--eos", action="store_true", help="stop at EOS (default: ignore it, equal lengths)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--suite", action="store_true",
                   help="the full benchmark suite of Week 4 Day 6 instead (JSON, Markdown, plots; "
                        "its own flags: `specdec bench --suite --help`)")
    b.set_defaults(func=run)


def run_suite(argv: list[str]) -> int:
    """`specdec bench --suite ...`: hand the other arguments to kit.suite, which owns its flags."""
    from specdec.kit.suite import main as suite_main

    try:
        return suite_main(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)


# Runs --------------------------------------------------------------------------------------------
# The modes a bench compares: plain decoding, speculative decoding as the flags set it with the
# fallback controller off (fixed K, or adaptive K, trees, n-grams), and -- unless --no-fallback
# (or a drafter/policy it does not drive) -- the same with the fallback controller on.
SPEC_KEYS = ["tokens_per_s", "speedup", "acceptance_rate", "alpha", "mean_accepted_length",
             "tokens_per_target_call"]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_modes(config) -> list[str]:
    return ["plain", "speculative"] + (["fallback"] if config.fallback else [])


def bench_one(impl, models: Models, prompt_ids: list[int], config, eos) -> tuple[dict, dict]:
    """One prompt, every mode with the same settings: (row, {mode: SpecStats})."""
    import mlx.core as mx

    from specdec.kit.stats import SpecStats

    prompt = mx.array(prompt_ids, dtype=mx.int32)
    outputs, seconds, stats = {}, {}, {}
    for mode in bench_modes(config):
        key = make_key(config)  # the same random stream for every mode
        if mode == "plain":
            outputs[mode], seconds[mode] = timed(
                lambda: [t for t, _ in plain_stream(impl, models, prompt, config, key, eos)])
            continue
        stats[mode] = SpecStats()
        controller = make_controller(impl, config) if mode == "fallback" else None
        outputs[mode], seconds[mode] = timed(lambda: [t for t, _ in speculative_stream(
            impl, models, prompt, config, stats[mode], key, eos, controller)])
    return bench_row(impl, len(prompt_ids), outputs, seconds, stats, config), stats


def bench_batch(impl, models: Models, rows: list[list[int]], config, eos) -> tuple[dict, dict]:
    """One batch of prompts, every mode (plain batched decoding is greedy)."""
    from specdec.kit.stats import SpecStats

    outputs, seconds, stats = {}, {}, {}
    for mode in bench_modes(config):
        key = make_key(config)
        mode_stats = None if mode == "plain" else stats.setdefault(mode, SpecStats())
        controller = make_controller(impl, config) if mode == "fallback" else None
        out, seconds[mode] = timed(lambda: run_batched(impl, models, rows, config, key, mode_stats,
                                                       eos, mode, controller))
        outputs[mode] = [[int(t) for t in r] for r in out]
    return bench_row(impl, sum(map(len, rows)), outputs, seconds, stats, config), stats


def bench_row(impl, prompt_tokens: int, outputs: dict, seconds: dict, stats: dict, config) -> dict:
    """One line of the benchmark: for each mode its throughput; for the speculative modes their
    speedup over plain, their statistics, and whether their greedy output equals plain's."""

    greedy, tree = config.temperature == 0, config.drafter == "tree"

    def count(out) -> int:
        return sum(map(len, out)) if out and isinstance(out[0], list) else len(out)

    def rate(mode) -> float:
        return count(outputs[mode]) / seconds[mode] if seconds[mode] > 0 else 0.0

    row: dict = {"prompt_tokens": prompt_tokens,
                 "plain": {"tokens": count(outputs["plain"]), "tokens_per_s": rate("plain")}}
    for mode, s in stats.items():
        plain_tps = rate("plain")
        row[mode] = {
            "tokens": count(outputs[mode]),
            "tokens_per_s": rate(mode),
            "speedup": rate(mode) / plain_tps if plain_tps > 0 else 0.0,
            "acceptance_rate": s.acceptance_rate,
            "alpha": s.alpha_estimate,
            "mean_accepted_length": s.mean_accepted_length,
            "tokens_per_target_call": s.tokens_per_round,
            # A tree's K counts nodes, not positions along one chain: no per-position figure.
            "acceptance_per_position": None if tree else acceptance_by_position(impl, s),
            "identical": (outputs[mode] == outputs["plain"]) if greedy else None,
        }
        if mode == "fallback":
            row[mode].update(rounds=s.rounds, plain_rounds=s.fallback_rounds)
    return row


def run(args: argparse.Namespace) -> int:
    impl, config = prepare(args)
    models = load_models(args.target, args.draft, need_draft=needs_draft_model(config.drafter))
    notes = prepare_drafter(impl, models, config, args)
    batch = args.batch or 0
    pool = bench_prompts(models.target_name, args.prompts * max(batch, 1))
    encoded = [(name, models.encode(text)) for name, text in pool]
    eos = models.eos_token_ids if args.eos else []  # ignored by default: equal lengths to compare
    modes = bench_modes(config)

    def one(i: int, max_tokens: int) -> tuple[dict, dict]:
        settings = dataclasses.replace(config, max_tokens=max_tokens)
        if batch:
            group = encoded[i * batch : (i + 1) * batch]
            return bench_batch(impl, models, [ids for _, ids in group], settings, eos)
        return bench_one(impl, models, encoded[i][1], settings, eos)

    if not args.json:
        print(f"# specdec bench: target {models.target_name}, draft {models.draft_name or '-'}, "
              f"impl {impl.name}, {describe_mode(config, fallback_off_reason(args))}, "
              f"temperature {config.temperature}, {config.max_tokens} tokens per prompt, "
              f"EOS {'honoured' if args.eos else 'ignored'}")
        print(f"# {blas_note()}")
        for note in notes:
            print(note)
        if batch and config.drafter in SCHEDULED_DRAFTERS:
            print(f"# --drafter {config.drafter} batches through Week 4 Day 5's scheduler: plain is the "
                  "same scheduler with no draft (each request prefilled alone), not batched_plain_decode")
        print(f"# modes: {', '.join(modes)}; speedup = tokens/s over plain's, same prompt; "
              "accept/alpha/tok/call of the speculative mode")
        print("# warm-up run ...", flush=True)
    one(0, min(config.max_tokens, 16))  # compiles kernels, fills allocator caches

    results, all_stats = [], {mode: [] for mode in modes[1:]}
    for i in range(args.prompts):
        row, stats = one(i, config.max_tokens)
        # A batch is named by its first prompt: "copy.py +3" is copy.py and the next 3.
        row = {"prompt": f"{encoded[i * batch][0]} +{batch - 1}" if batch else encoded[i][0], **row}
        results.append(row)
        for mode, s in stats.items():
            all_stats[mode].append(s)
        if not args.json:
            if i == 0:
                print(table_header(modes))
            print(format_row(str(i + 1), row["prompt"], row, modes), flush=True)
    median = {"plain": {"tokens_per_s": statistics.median(r["plain"]["tokens_per_s"] for r in results)}}
    for mode in modes[1:]:
        median[mode] = {k: statistics.median(r[mode][k] for r in results) for k in SPEC_KEYS}
        identical = [r[mode]["identical"] for r in results]
        median[mode]["identical"] = None if None in identical else all(identical)
    by_position = {mode: None if config.drafter == "tree" else
                   acceptance_by_position(impl, rounds_of(all_stats[mode])) for mode in modes[1:]}
    report = {
        "target": models.target_name,
        "draft": models.draft_name,
        "drafter": {"name": config.drafter, "notes": [n.lstrip("# ") for n in notes]},
        "impl": impl.name,
        "config": config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config),
        "modes": modes,
        "eos": args.eos,
        "blas": blas_info(),
        "prompts": results,
        "median": median,
        "acceptance_per_position": by_position,  # all prompts rounds_of, per speculative mode
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(format_row("", "median", median, modes))
    for mode in modes[1:] if config.drafter != "tree" else []:
        print(f"# {mode}: acceptance by draft position, P(accept i | reached i), all prompts: "
              f"{format_positions(by_position[mode])}")
    if "fallback" in modes:
        rounds = sum(r["fallback"]["rounds"] for r in results)
        plain = sum(r["fallback"]["plain_rounds"] for r in results)
        print(f"# fallback: {plain} of {rounds} {'row-rounds' if batch else 'rounds'} plain (K = 0)")
    return 0


def table_header(modes: list[str]) -> str:
    cols = f"{'#':>3} {'prompt':<28} {'plain tok/s':>11}"
    for mode in modes[1:]:
        label = "spec" if mode == "speculative" else mode
        cols += f" {label + ' tok/s':>{max(10, len(label) + 6)}} {'speedup':>8}"
    return cols + f" {'accept':>7} {'alpha':>6} {'mean acc':>8} {'tok/call':>8} {'identical':>9}"


def format_row(index: str, name: str, row: dict, modes: list[str]) -> str:
    name = name if len(name) <= 28 else "…" + name[-27:]
    line = f"{index:>3} {name:<28} {row['plain']['tokens_per_s']:>11.1f}"
    for mode in modes[1:]:
        label = "spec" if mode == "speculative" else mode
        line += f" {row[mode]['tokens_per_s']:>{max(10, len(label) + 6)}.1f} {row[mode]['speedup']:>7.2f}x"
    spec = row["speculative"]
    same = [row[mode]["identical"] for mode in modes[1:]]
    verdict = "n/a" if None in same else ("yes" if all(same) else "NO")
    return (line + f" {spec['acceptance_rate']:>7.1%} {spec['alpha']:>6.3f} "
            f"{spec['mean_accepted_length']:>8.2f} {spec['tokens_per_target_call']:>8.2f} {verdict:>9}")
