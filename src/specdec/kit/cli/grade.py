"""`specdec grade`: run the graded tests on your tree and print the scoreboard (kit.grade)."""

from __future__ import annotations

import argparse

from specdec.kit.cli.common import CLIError


def add_parser(sub) -> None:
    gr = sub.add_parser("grade", help="run the graded tests on your tree and print a scoreboard")
    gr.add_argument("--week", type=int, default=None, help="only this week (1-4)")
    gr.add_argument("--day", type=int, default=None, help="only this day (with --week)")
    gr.add_argument("-v", "--verbose", action="store_true", help="also show pytest's failure details")
    gr.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.week is not None and args.week < 1:
        problems.append(f"--week must be >= 1, got {args.week}: the course has weeks 1 to 4")
    if args.day is not None and args.day < 1:
        problems.append(f"--day must be >= 1, got {args.day}: days count from 1")
    if args.day is not None and args.week is None:
        problems.append(f"--day {args.day} needs --week: e.g. --week 2 --day {args.day}")
    return problems


def run(args: argparse.Namespace) -> int:
    from specdec.kit.grade import grade

    try:
        return grade(week=args.week, day=args.day, verbose=args.verbose)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from e
