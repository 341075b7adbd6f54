"""`optictx ...` sub-commands.

Each command lives in ``optictx/commands/<name>.py`` and exposes ``register(subparsers)``; this file only
dispatches, so commands load lazily and one broken optional dependency never breaks the others.
User mistakes (``OptictxError``) print one clear line and exit non-zero, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from optictx.errors import OptictxError

COMMANDS = ["budget", "render", "ocr", "data", "train", "eval", "serve", "memory", "reason"]


def _set_env_defaults() -> None:
    for k, v in {"ORT_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optictx",
        description="Context optical compression (DeepSeek-OCR) and visual-primitives reasoning, on CPU or GPU.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"optictx.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"optictx.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _set_env_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except OptictxError as e:
        print(f"optictx: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("optictx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
