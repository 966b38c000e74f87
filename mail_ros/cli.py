"""``mail-ros``: the command-line entry point.

Each sub-command lives in its own module under ``mail_ros.commands`` and exposes
``register(subparsers)`` (adds its parser and sets ``func``). Sub-command modules are imported
lazily so that ``mail-ros checkpoint info`` does not pay for importing rclpy or MuJoCo.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module under mail_ros.commands
COMMANDS = {
    "checkpoint": "checkpoint",
    "convert": "convert",
    "train": "train",
    "eval-bag": "eval_bag",
    "record": "record",
    "collect": "collect",
    "demo": "demo",
    "prompt": "prompt",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mail-ros", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            subparsers.add_parser(name, help=f"(run 'mail-ros {name} --help')")
            continue
        importlib.import_module(f"mail_ros.commands.{module}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the sub-command being run (when it is known).
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
