"""The `sae-circuits` command line: one sub-module per command, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from sae_circuits.errors import UserInputError

# Sub-modules of sae_circuits.cli, each defining `register(subparsers)`; the parser it adds sets
# `run=<callable(args) -> int | None>` as default.
COMMAND_MODULES = (
    "demo_cmd",
    "train_cmd",
    "eval_cmd",
    "ioi_cmd",
    "circuit_cmd",
    "inspect_cmd",
    "toy_cmd",
    "build_model_cmd",
    "explain_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-circuits",
        description=(
            "Sparse dictionaries spliced into language models with nnsight: train, evaluate, "
            "patch and ablate features, and discover feature circuits. Every command works offline "
            "on the embedded model; --model takes a local folder or a hub name."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(f"sae_circuits.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except (UserInputError, FileNotFoundError) as error:
        print(f"sae-circuits {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sae-circuits {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
