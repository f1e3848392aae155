"""Pieces shared by the CLI commands: results on stdout (tables never cut), messages on stderr,
JSON on stdout, common arguments. Light at import: heavy modules load inside the functions."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.table import Table

from sae_circuits.errors import UserInputError
from sae_circuits.nodes import Node
from sae_circuits.sites import Site

if TYPE_CHECKING:
    from sae_circuits.dictionary import Dictionary
    from sae_circuits.training import TrainSpec

# Wide enough for any table of ours when the output is not a terminal (a file, a pipe).
_UNBOUNDED_WIDTH = 100_000


def print_result(*renderables: Any) -> None:
    """Print results on stdout, never cut. On a terminal, a table too wide for it is printed
    transposed if that fits, and otherwise its cells wrap; when stdout is not a terminal every
    table is printed at its full width and text lines are not wrapped, so that a log or a file
    keeps every cell and line whole."""
    out = Console()
    for renderable in _flattened(renderables):
        if isinstance(renderable, Table):
            width = _natural_width(renderable)
            if not out.is_terminal:
                Console(width=max(width, out.width)).print(renderable)
                continue
            if width > out.width and renderable.show_header and renderable.row_count:
                transposed = _transposed(renderable)
                if _natural_width(transposed) <= out.width:
                    renderable = transposed
            for column in renderable.columns:
                column.overflow = "fold"
        out.print(renderable, soft_wrap=not out.is_terminal)


def _natural_width(table: Table) -> int:
    return Console(width=_UNBOUNDED_WIDTH).measure(table).maximum


def _transposed(table: Table) -> Table:
    """`table` with rows and columns swapped (a wide table of few rows, for a narrow terminal):
    the first column's cells become the headers, the other headers the first column."""
    columns = [list(column.cells) for column in table.columns]
    first, *rest = table.columns
    transposed = Table(title=table.title)
    transposed.add_column(first.header)
    for cell in columns[0]:
        transposed.add_column(cell, justify="right")
    for column, cells in zip(rest, columns[1:], strict=True):
        transposed.add_row(column.header, *cells)
    return transposed


def _flattened(renderables: Iterable[Any]) -> Iterator[Any]:
    """The renderables, objects with `__rich__` resolved and groups opened."""
    for renderable in renderables:
        while hasattr(renderable, "__rich__"):
            renderable = renderable.__rich__()
        if isinstance(renderable, Group):
            yield from _flattened(renderable.renderables)
        else:
            yield renderable


def print_heading(text: str) -> None:
    """A section heading on stdout: a rule on a terminal, a plain `== text ==` line otherwise."""
    out = Console()
    if out.is_terminal:
        out.rule(f"[bold]{text}")
    else:
        out.print(f"== {text} ==", markup=False, highlight=False)


def note(text: str) -> None:
    """A message on stderr (a warning, a step done), never cut or wrapped."""
    Console(stderr=True, soft_wrap=True).print(text, markup=False, highlight=False)


def wrote(*paths: str | Path) -> None:
    """One `wrote PATH` line on stderr per file written."""
    for path in paths:
        note(f"wrote {path}")


def json_text(obj: Any) -> str:
    """`obj` as an indented, strict JSON document: sites and nodes, also as keys, in their text
    form; NaN (a metric not measured or undefined) as null."""
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
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Site | Node):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


DTYPES = ("float32", "bfloat16", "float16")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """--model, --device and --dtype: the model a command runs (see `model_from_args`)."""
    parser.add_argument(
        "--model",
        default=None,
        help="local model folder or hub name (default: the embedded model shipped with the package)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        type=_device_name,
        help="torch device: cpu, cuda, cuda:N (default: cpu; under torchrun, cuda is each "
        "process's own GPU)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="precision of the model's and the dictionaries' computations: bfloat16 and float16 "
        "run them under torch.autocast, the weights staying float32 (default: float32)",
    )


def _device_name(text: str) -> str:
    """--device: a device torch knows and this machine has (checked before anything loads)."""
    if text == "cpu":
        return text
    from sae_circuits.models import checked_device

    try:
        checked_device(text)
    except UserInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def model_from_args(args: argparse.Namespace) -> Any:
    """The model of `add_model_argument`'s options, on this process's device."""
    from sae_circuits.distributed import local_device
    from sae_circuits.models import AUTOCAST_DTYPES, load_model

    device = local_device(args.device)
    return load_model(args.model, device=device, autocast=AUTOCAST_DTYPES.get(args.dtype))


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
    from sae_circuits.options import add_options

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


def add_dictionary_source(parser: argparse.ArgumentParser) -> None:
    """--dictionaries SET (a shipped set, default main) or --dictionary DIR, one of them."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--dictionaries",
        metavar="SET",
        help="a dictionary set shipped for the embedded model (default: main)",
    )
    source.add_argument("--dictionary", metavar="DIR", help="dictionary folder")


def add_text_options(
    parser: argparse.ArgumentParser, ctx_len: int, batch_size: int, ctx_note: str = ""
) -> None:
    """--text, --tokens, --ctx-len and --batch-size: the text a command scans (`text_batches`)."""
    parser.add_argument("--text", help=".txt or .jsonl file (default: the model's held-out text)")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens to scan (default 65536)")
    parser.add_argument(
        "--ctx-len",
        type=int,
        default=ctx_len,
        help=f"tokens per context (default {ctx_len}{ctx_note})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"contexts per batch (default {batch_size})",
    )


def text_batches(args: argparse.Namespace, model: Any) -> Iterator[Any]:
    """The token batches of `add_text_options`: --text or the model's held-out text."""
    from sae_circuits.models import is_embedded
    from sae_circuits.text import default_documents, read_documents, token_batches

    documents = read_documents(args.text) if args.text else default_documents(is_embedded(model))
    return token_batches(model.tokenizer, documents, args.ctx_len, args.batch_size, args.tokens)


def add_training_data_options(parser: argparse.ArgumentParser) -> None:
    """The options of the activations a training run reads (train, select): batch, contexts,
    training text, held-out tokens, checkpoints."""
    parser.add_argument("--batch-size", type=int, default=1024, help="activations per step")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--n-ctxs", type=int, default=256, help="contexts held in the buffer")
    parser.add_argument("--text", help=".txt/.jsonl training text (default: the model's corpus)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for eval")
    parser.add_argument(
        "--checkpoint-every", type=int, default=500, help="steps between checkpoints"
    )


def load_dictionary_argument(args: argparse.Namespace) -> tuple[Site, Dictionary]:
    """The (site, dictionary) named by --dictionary/--dictionaries and --site (text or a Site)."""
    from sae_circuits.dictionary import Dictionary, load_dictionaries

    if args.dictionaries:
        if not args.site:
            raise UserInputError("--dictionaries needs --site")
        site = Site.parse(args.site)
        return site, load_dictionaries(args.dictionaries, sites=[site], device=args.device)[site]
    dictionary = Dictionary.load(args.dictionary, device=args.device, site=args.site)
    site = args.site or dictionary.config.site
    if not site:
        raise UserInputError(
            f"{args.dictionary} does not name a site in our grammar; pass --site (e.g. resid.2)"
        )
    return Site.parse(site), dictionary


def add_remote_argument(parser: argparse.ArgumentParser) -> None:
    """--remote: run the model's traces on NDIF (`--remote`) or through nnsight's local
    simulation of a request (`--remote local`); `args.remote` is False, True or "local"."""
    parser.add_argument(
        "--remote",
        nargs="?",
        const="ndif",
        default=False,
        type=_remote_option,
        metavar="local",
        help="run on NDIF (needs an API key in nnsight's config, NDIF_API_KEY, and a model NDIF "
        "hosts, by hub id); '--remote local' serialises each request and runs it here as a "
        "server would. The dictionaries travel inside each request",
    )


def _remote_option(text: str) -> bool | str:
    from sae_circuits.remote import parse_remote

    try:
        return parse_remote(text)
    except UserInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
