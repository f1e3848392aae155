"""The `sae-circuits` command line: one sub-module per command, each with `register(subparsers)`.

Only the module of the command being run is imported (and its parser built), so that `--help`
and argument errors answer at once; the others appear in the top-level help by their line below.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence

from sae_circuits.errors import UserInputError

# Command -> (sub-module of sae_circuits.cli whose `register(subparsers)` adds its parser, one-line
# help). The parser sets `run=<callable(args) -> int | None>` as default.
COMMANDS = {
    "demo": ("demo_cmd", "a one-minute tour on the embedded model"),
    "train": ("train_cmd", "train dictionaries on a model's activations"),
    "harvest": (
        "harvest_cmd",
        "harvest activations once into shards that train --from-shards reads",
    ),
    "eval": ("eval_cmd", "evaluate dictionaries spliced into a model"),
    "ioi": (
        "ioi_cmd",
        "patching curves on IOI: SAE features vs PCA, neurons and random directions",
    ),
    "circuit": ("circuit_cmd", "find a circuit of dictionary features"),
    "inspect": (
        "inspect_cmd",
        "inspect a feature (contexts, histogram, logit effects) or a dictionary's frequencies",
    ),
    "select": (
        "select_cmd",
        "choose dictionary size and sparsity on a model (dead features, SSLL, MMCS)",
    ),
    "toy": (
        "toy_cmd",
        "sweep dictionaries on synthetic data with known features (MMCS, selection methods)",
    ),
    "build-model": (
        "build_model_cmd",
        "rebuild the embedded model (corpus, tokenizer, training, evaluation) on CPU",
    ),
    "explain": (
        "explain_cmd",
        "explain features (or neurons, PCA directions) from their top-activating contexts",
    ),
    "score": (
        "explain_cmd",
        "score explanations (simulation, detection, fuzzing); mean and 95%% CI per basis",
    ),
    "export": ("export_cmd", "write a dictionary in SAELens or sparsify format"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command (for parsing: the command list then has no help lines), or
    with `command` only that command's full parser and the others as one-line entries (`""`:
    none, for the top-level help)."""
    parser = argparse.ArgumentParser(
        prog="sae-circuits",
        description=(
            "Sparse dictionaries spliced into language models with nnsight: train, evaluate, "
            "patch and ablate features, and discover feature circuits. Every command works offline "
            "on the embedded model; --model takes a local folder or a hub name. "
            "Results go to stdout, progress and warnings to stderr."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    modules = [module for name, (module, _) in COMMANDS.items() if command in (None, name)]
    for module in dict.fromkeys(modules):
        importlib.import_module(f"sae_circuits.cli.{module}").register(subparsers)
    for name, (_, help_text) in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning(args.command)
        try:
            return int(args.run(args) or 0)
        except (UserInputError, FileNotFoundError) as error:
            print(f"sae-circuits {args.command}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"sae-circuits {args.command}: interrupted", file=sys.stderr)
            return 130


def _one_line_warning(command: str) -> Callable[..., None]:
    """A `warnings.showwarning` that prints `sae-circuits COMMAND: warning: message` on stderr."""

    def show(message: Warning | str, *args: object, **kwargs: object) -> None:
        print(f"sae-circuits {command}: warning: {message}", file=sys.stderr)

    return show


if __name__ == "__main__":
    sys.exit(main())
