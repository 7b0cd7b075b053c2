"""`specdec serve`: the OpenAI-compatible server of Week 4 Day 5 (kit.server owns its flags)."""

from __future__ import annotations


def add_parser(sub) -> None:
    # Listed here for `specdec --help`; `main` hands every argument after `serve` to
    # kit.server.main, whose own parser documents them (`specdec serve --help`).
    sub.add_parser("serve", add_help=False,
                   help="an OpenAI-compatible HTTP server with continuous batching (Week 4 Day 5)")


def run(argv: list[str]) -> int:
    from specdec.kit.server import main

    try:
        return main(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)


def is_serve(argv: list[str]) -> bool:
    return bool(argv) and argv[0] == "serve"

