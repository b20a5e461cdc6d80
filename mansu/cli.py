"""`python -m mansu <command>`: the backend's command line.

Each command lives in `mansu/commands/<name>.py` with `register(subparsers)`; modules stay cheap to
import (torch and friends load inside the handlers). A user error (ValueError, FileNotFoundError)
prints one `error: ...` line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("demo", "eval", "attribute", "runs", "run", "compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mansu",
                                     description="Quantization-permanent LLM unlearning (MANSU): backend commands.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"mansu.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"mansu.commands.{name}":
                raise
            continue  # a command whose module has not landed yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
