"""`specdec generate`: decode one prompt (or a batch), colour-coding draft vs target tokens."""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

from specdec.kit.cli.common import (BUILTIN_PROMPTS, DEFAULT_PROMPT, GREEN, RESET, Models,
                                    acceptance_by_position, add_decoding_flags, batched_drafter,
                                    blas_note, CLIError, describe_mode, fallback_off_reason, feature,
                                    format_positions, load_models, make_controller, make_decoder,
                                    make_key, needs_draft_model, plain_stream, prepare,
                                    prepare_drafter, run_batched, speculative_stream,
                                    SCHEDULED_DRAFTERS)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="decode one prompt, colour-coding draft vs target tokens")
    add_decoding_flags(g)
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue")
    g.add_argument("--plain", action="store_true", help="plain target decoding (no draft)")
    g.add_argument("--no-color", action="store_true", help="no ANSI colours")
    # An explicit --seed with --temperature > 0 selects the coupled rule (Week 5 Day 1): the text
    # is plain seeded decoding's for any --k, --drafter, --batch, fallback or not. Without
    # --seed, sampling keeps exact rejection sampling (seed 0), which accepts more.
    g.set_defaults(func=run, seed=None)


class Printer:
    """Streams text as tokens arrive; accepted draft tokens in green, target tokens plain."""

    def __init__(self, tokenizer, color: bool, out=None):
        self.out = out or sys.stdout
        self.color = color
        self.detok = tokenizer.detokenizer if tokenizer is not None else None
        self.count = 0

    def _write(self, text: str, green: bool) -> None:
        if text:
            self.out.write(f"{GREEN}{text}{RESET}" if green and self.color else text)
            self.out.flush()

    def prompt(self, tokens: list[int]) -> None:
        # Feeding the prompt through the detokenizer keeps spaces at the seam exactly right.
        if self.detok is None:
            self._write("prompt: " + " ".join(map(str, tokens)) + "\noutput:", False)
            return
        for t in tokens:
            self.detok.add_token(t)
        self.detok.finalize()
        self._write(self.detok.last_segment, False)

    def add(self, token: int, from_draft: bool) -> None:
        self.count += 1
        if self.detok is None:
            self._write(f" {token}", from_draft)
            return
        self.detok.add_token(token)
        self._write(self.detok.last_segment, from_draft)

    def finish(self) -> None:
        if self.detok is not None:
            self.detok.finalize()
            self._write(self.detok.last_segment, False)
        self.out.write("\n")
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from specdec.kit.stats import SpecStats

    coupled = args.seed is not None and args.temperature > 0
    seeded = args.seed is not None
    args.seed = 0 if args.seed is None else args.seed
    if coupled and args.seed + (args.batch or 1) - 1 >= 2**32:
        raise CLIError(f"--seed {args.seed}: a seeded sampled run uses the coupled rule, whose "
                       "noise is keyed by (seed, position) with 0 <= seed < 2**32; pick a smaller seed")
    # SpeculativeConfig refuses sampled trees: Week 3 Day 4's tree verification is greedy. The
    # coupled rule's is greedy too (on log p + noise, kit/coupled_tree.py), so a seeded sampled
    # tree run validates as the greedy tree it is and samples at `temperature`, kept apart.
    temperature = args.temperature
    coupled_tree = coupled and args.drafter == "tree" and not args.plain and math.isfinite(temperature)
    if coupled_tree:
        args.temperature = 0.0
    try:
        impl, config = prepare(args)
    except CLIError as e:
        if args.drafter == "tree" and temperature > 0 and not seeded:
            raise CLIError(f"{e}\n--drafter tree samples with --seed S only (the coupled rule, "
                           "Week 5 Day 1): add --seed, or use --temperature 0") from None
        raise
    finally:
        args.temperature = temperature
    need_draft = not args.plain and needs_draft_model(config.drafter)
    models = load_models(args.target, args.draft, need_draft)
    notes = [] if args.plain else prepare_drafter(impl, models, config, args)
    key = make_key(config)
    color = not args.no_color and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    mode = "plain" if args.plain else describe_mode(config, fallback_off_reason(args))
    print(f"# target {models.target_name}, draft {models.draft_name or '-'}, impl {impl.name}, "
          f"{mode}, temperature {temperature}")
    for note in notes:
        print(note)
    if coupled:
        print(f"# sampling rule: coupled (Gumbel noise keyed by seed {config.seed} and position): the "
              "same text for any --k, --drafter, --batch, fallback or --no-fallback, and --plain")
    elif config.fallback and config.temperature > 0:
        print("# note: with the fallback controller, K follows timings measured as it runs, so one "
              "--seed can give other (equally distributed) tokens from run to run; --no-fallback "
              "repeats exactly")
    if args.batch:
        return generate_batch(impl, models, config, args.prompt, key, coupled)

    prompt_ids = models.encode(args.prompt)
    prompt = mx.array(prompt_ids, dtype=mx.int32)
    if color and not args.plain:
        print(f"# {GREEN}green{RESET}: draft tokens the target accepted; "
              "default colour: the target's own tokens (corrections, bonus tokens, plain rounds)")
    stats = SpecStats()
    controller = None if args.plain else make_controller(impl, config)
    start = time.perf_counter()
    if coupled:
        stream = coupled_stream(impl, models, prompt, config, stats, controller, args.plain,
                                temperature)
    elif args.plain:
        stream = plain_stream(impl, models, prompt, config, key, models.eos_token_ids)
    else:
        stream = speculative_stream(impl, models, prompt, config, stats, key, models.eos_token_ids,
                                    controller)
    printer = Printer(models.tokenizer, color)
    printer.prompt(prompt_ids)
    for token, from_draft in stream:
        printer.add(token, from_draft)
    wall = time.perf_counter() - start
    printer.finish()

    print("# ---")
    if args.plain:
        print(f"# {printer.count} tokens in {printer.count} target calls (plain decoding)")
    else:
        print_run_stats(impl, stats, config, controller)
    print_rule(config, coupled)
    tps = printer.count / wall if wall > 0 else 0.0
    print(f"# {tps:.1f} tokens/s, wall {wall:.2f} s (prefill included); {blas_note()}")
    return 0


def print_run_stats(impl, stats, config, controller, per: str = "") -> None:
    """The summary lines of a speculative run: counts, per-position acceptance, K, fallback."""
    summary = stats.summary()
    print(f"# {per}{summary.replace('target calls', 'row-rounds') if per else summary}")
    if config.drafter != "tree":  # a tree's K counts nodes, not positions along one chain
        print(f"# acceptance by draft position, P(accept i | reached i): "
              f"{format_positions(acceptance_by_position(impl, stats))}")
    ks = stats.lookahead_per_round
    if ks and (config.adaptive or controller is not None):
        print(f"# lookahead per round: mean {statistics.mean(ks):.2f}, min {min(ks)}, max {max(ks)}")
    if controller is not None:
        rounds = "row-rounds" if per else "rounds"
        print(f"# fallback: {stats.fallback_rounds} of {stats.rounds} {rounds} plain (K = 0)")
        for fault in getattr(controller, "faults", []):
            print(f"# fallback survived: {fault}")


def print_rule(config, coupled: bool) -> None:
    """Which sampling rule ran (sampled runs only)."""
    if coupled:
        print(f"# sampling rule: coupled, seed {config.seed} (reproducible across --k, --drafter, "
              "--batch, --plain and fallback)")
    elif config.temperature > 0:
        print("# sampling rule: exact rejection sampling (no --seed; with --seed S the coupled rule "
              "makes the text reproducible)")


def tree_widths(branching: int, depth: int) -> list[int]:
    """The widths of the tree `tree_speculative_generate` builds: [branching] * 2 + [1, 1, ...]
    (`depth` levels; the first two branch)."""
    return [branching if level < 2 else 1 for level in range(depth)]


def coupled_stream(impl, models: Models, prompt, config, stats, controller, plain: bool,
                   temperature: float):
    """(token, from_draft) of the coupled rule at `temperature`: plain seeded decoding (--plain),
    `coupled_tree_generate` (--drafter tree) or coupled_generate, both through draft faults."""
    from specdec.kit.coupled_faults import (coupled_generate_surviving_faults,
                                            coupled_tree_generate_surviving_faults)

    feature(impl, "coupling", "coupled_generate", "--seed with --temperature")
    coupling = impl.coupling
    eos = models.eos_token_ids
    if plain:
        tokens = coupling.seeded_generate(models.target, prompt, config.max_tokens, config.seed,
                                          temperature, eos_token_ids=eos)
        return ((t, False) for t in tokens)
    if config.drafter == "tree":
        feature(impl, "tree", "verify_tree_greedy", "--drafter tree with --seed")
        widths = tree_widths(config.tree_branching, config.lookahead)
        return coupled_tree_generate_surviving_faults(
            models.draft, models.target, prompt, config.max_tokens, config.seed, temperature,
            config.top_k, config.top_p, eos_token_ids=eos, widths=widths, stats=stats,
            package=impl.package)
    decoder = make_decoder(impl, models, config)  # any drafter of kit/drafter_registry.py
    # A draft that raises mid-run costs speed, not text: the rest is plain seeded decoding.
    return coupled_generate_surviving_faults(decoder, prompt, config.max_tokens, config.seed,
                                             temperature, eos_token_ids=eos,
                                             controller=controller, stats=stats,
                                             package=impl.package)


def batch_prompt_texts(first: str, n: int) -> list[str]:
    others = [p for p in BUILTIN_PROMPTS if p != first]
    return [first] + [others[i % len(others)] for i in range(n - 1)]


def generate_batch(impl, models: Models, config, first_prompt: str, key, coupled: bool = False) -> int:
    from specdec.kit.stats import SpecStats

    texts = batch_prompt_texts(first_prompt, config.batch_size)
    rows = [models.encode(t) for t in texts]
    stats = SpecStats()
    controller = make_controller(impl, config)
    start = time.perf_counter()
    mode = "fallback" if controller is not None else "speculative"
    if coupled and config.drafter in SCHEDULED_DRAFTERS:  # the scheduler, with the coupled rule
        outputs = run_batched(impl, models, rows, config, key, stats, models.eos_token_ids, mode,
                              controller, sampling=impl.serving.COUPLED)
    elif coupled:  # row i samples with seed + i, whatever its batch-mates
        from specdec.kit.coupled_faults import batched_coupled_decode_surviving_faults

        feature(impl, "coupling", "batched_coupled_decode", "--seed with --batch")
        draft = models.draft if config.drafter == "model" else batched_drafter(impl, models, config)
        outputs = batched_coupled_decode_surviving_faults(
            rows, [config.seed + i for i in range(len(rows))], draft, models.target,
            config.max_tokens, config.lookahead, config.temperature,
            eos_token_ids=models.eos_token_ids, controller=controller, stats=stats,
            package=impl.package)
    else:
        outputs = run_batched(impl, models, rows, config, key, stats, models.eos_token_ids, mode, controller)
    wall = time.perf_counter() - start
    total = 0
    for i, (prompt_ids, out) in enumerate(zip(rows, outputs)):
        out = [int(t) for t in out]
        total += len(out)
        print(f"# --- row {i} ({len(out)} tokens)")
        if models.tokenizer is None:
            print(models.decode(prompt_ids) + " |" + " " + models.decode(out))
        else:
            print(models.decode(prompt_ids + out))
    print("# ---")
    # The batched loops record one round per live row per batched call: "target calls" in the
    # summary are row-rounds, so tokens/call reads per row, as in unbatched decoding.
    print_run_stats(impl, stats, config, controller, per="per row: ")
    print_rule(config, coupled)
    print(f"# {total} tokens over {len(rows)} rows, {total / wall:.1f} tokens/s, wall {wall:.2f} s; "
          f"{blas_note()}")
    return 0
