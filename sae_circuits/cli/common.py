"""Pieces shared by the CLI commands: rich console on stderr, JSON on stdout, common arguments."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console

from sae_circuits.dictionary import Dictionary, load_dictionaries
from sae_circuits.errors import UserInputError
from sae_circuits.nodes import Node
from sae_circuits.options import add_options
from sae_circuits.sites import Site
from sae_circuits.training import TrainSpec

# Progress and tables go to stderr so that `--json` output on stdout stays machine-readable.
console = Console(stderr=True)


def json_text(obj: Any) -> str:
    """`obj` as an indented JSON document; sites and nodes, also as keys, in their text form."""
    return json.dumps(_text_keys(obj), indent=2, default=_json_default)


def print_json(obj: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json_text(obj) + "\n")
    sys.stdout.flush()


def _text_keys(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k) if isinstance(k, Site | Node) else k: _text_keys(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_text_keys(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Site | Node):
        return str(obj)
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


def add_spec_options(
    parser: argparse.ArgumentParser,
    template: TrainSpec,
    names: Iterable[str],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    notes: Mapping[str, str] | None = None,
) -> None:
    """`--<field>` options for the `TrainSpec` fields `names`, defaults from `template`, in an
    argument group of their own (`overrides` and `notes` as in `options.add_options`)."""
    group = parser.add_argument_group("training (TrainSpec fields)")
    add_options(
        group,
        template,
        names,
        {**_SPEC_PARSERS, **(overrides or {})},
        {**_SPEC_NOTES, **(notes or {})},
    )


def _cosine_or_off(text: str) -> float | None:
    """`--resample-duplicates`: a cosine in (0, 1], or 0 / none / off for off."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a cosine: {text!r}") from None
    if value == 0:
        return None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"the cosine must be in (0, 1], or 0 / none / off: {text!r}"
        )
    return value


_SPEC_PARSERS = {"resample_duplicates": {"type": _cosine_or_off}}
_SPEC_NOTES = {"resample_duplicates": "0, none or off: off"}


def load_dictionary_argument(args: argparse.Namespace) -> tuple[Site, Dictionary]:
    """The (site, dictionary) named by --dictionary/--dictionaries and --site (text or a Site)."""
    if args.dictionaries:
        if not args.site:
            raise UserInputError("--dictionaries needs --site")
        site = Site.parse(args.site)
        return site, load_dictionaries(args.dictionaries, sites=[site], device=args.device)[site]
    dictionary = Dictionary.load(args.dictionary, device=args.device)
    site = args.site or dictionary.config.site
    if not site:
        raise UserInputError(
            f"{args.dictionary} does not name a site in our grammar; pass --site (e.g. resid.2)"
        )
    return Site.parse(site), dictionary
