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

COMMANDS = ("demo", "eval", "attribute", "runs", "run", "compare", "report", "diagnose", "gptq_env", "export", "attack",
            "sweep")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (`error: <what was wrong>`, exit 2) instead of the usage dump."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m mansu",
                                     description="Quantization-permanent LLM unlearning (MANSU): backend commands.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"mansu.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a parse error already printed as one line
        return int(exc.code or 0)
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


def entry_point() -> None:
    """The `mansu` console script."""
    raise SystemExit(main())
