"""Pieces shared by the CLI commands: rich console on stderr, JSON on stdout, common arguments."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

# Progress and tables go to stderr so that `--json` output on stdout stays machine-readable.
console = Console(stderr=True)


def print_json(obj: Any) -> None:
    """Write one JSON document to stdout."""
    json.dump(obj, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="local model folder or hub name (default: the embedded model shipped with the package)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print a machine-readable JSON result on stdout"
    )
