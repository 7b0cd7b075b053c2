"""The `specdec` command: generate, bench, serve, grade, doctor.

    specdec generate                       # speculative decoding on the embedded pair, colour-coded
    specdec generate --plain               # the target alone, one token per call
    specdec generate --impl student        # the same with your own tree (src/specdec)
    specdec bench --prompts 10             # plain vs speculative: tokens/s, speedup, acceptance
    specdec bench --suite --out report     # the Week 4 Day 6 suite: JSON, Markdown, plots
    specdec serve --port 8000              # an OpenAI-compatible server (Week 4 Day 5)
    specdec grade --week 2                 # your scoreboard
    specdec doctor                         # MLX, device, BLAS, embedded models

Models: `--target` / `--draft` take an embedded name (`tiny-code`, `tiny-code-draft`), a local
mlx-lm directory or a hub id, or `toy-llama` (a seeded random tiny llama pair, no tokenizer:
token ids are printed). `--impl student` runs your tree, with the reference standing in for the
tasks you have not implemented yet (one line on stderr names them). On Linux, `generate` and
`bench` re-run themselves with a system OpenBLAS preloaded when one is installed: MLX's bundled
CPU BLAS is far slower (see `specdec doctor`).

Speculative runs use the fallback controller (Week 4 Day 3: K in 0..--k each round, 0 = a plain
round) unless `--no-fallback`, `--adaptive` or `--drafter tree`; the first output line says
which. `--drafter` picks who drafts: model (default), ngram, tree, medusa (--heads DIR), eagle,
layerskip (--skip-layers); `kit/drafter_registry.py` builds each one, for the CLI and for your
own scripts. `generate` and `bench` print the acceptance at each draft position (Week 4 Day 2).

One module per command (`generate`, `bench`, `grade`, `doctor`), each with `add_parser(sub)`
and `run(args)`; `common` holds what generate and bench share: flags, the SpeculativeConfig
they build, models, decoding streams. Every bad input ends as `specdec: error: ...` lines (exit
status 2), one per problem, each naming the value and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from specdec.kit.cli import bench, doctor, generate, grade, serve
from specdec.kit.cli.bench import bench_prompts, heldout_prompts  # noqa: F401  (notebooks use them)
from specdec.kit.cli.common import CLIError, maybe_reexec_with_openblas

COMMANDS = [generate, bench, serve, grade, doctor]
# Flag checks that need nothing loaded; generate and bench check theirs (with the
# implementation's SpeculativeConfig) in `common.prepare`.
CHECKS = {"grade": grade.check_args}


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the same one-line `specdec: error: ...` form."""

    def error(self, message: str):
        self.exit(2, f"specdec: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specdec", description="Speculate: speculative decoding on MLX")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def report(problems: list[str]) -> int:
    for problem in problems:
        print(f"specdec: error: {problem}", file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    if argv is None:  # a real command line (not a test calling main): maybe get a fast BLAS first
        maybe_reexec_with_openblas(sys.argv[1:])
        argv = sys.argv[1:]
    if serve.is_serve(argv):  # the server parses its own flags
        return serve.run(argv[1:])
    if argv[:1] == ["bench"] and "--suite" in argv:  # so does the benchmark suite (kit.suite)
        return bench.run_suite([a for a in argv[1:] if a != "--suite"])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    problems = CHECKS.get(args.command, lambda a: [])(args)
    if problems:
        return report(problems)
    try:
        return args.func(args)
    except CLIError as e:
        return report(str(e).splitlines())
    except NotImplementedError as e:
        print(f"\nspecdec: {e}\nThat is one of your exercises, started but not finished: finish it, "
              "or put its stub back (the reference then stands in), or run with --impl ref.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `specdec bench --json | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
