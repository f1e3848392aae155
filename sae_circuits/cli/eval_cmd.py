"""`sae-circuits eval`: reconstruction, sparsity and downstream metrics of a dictionary."""

from __future__ import annotations

import argparse
import math

from rich.table import Table

from sae_circuits.cli.common import add_json_argument, add_model_argument, console, print_json
from sae_circuits.dictionary import Dictionary, load_dictionaries
from sae_circuits.errors import UserInputError
from sae_circuits.evaluation import METRIC_KEYS, evaluate
from sae_circuits.models import load_model
from sae_circuits.sites import Site
from sae_circuits.text import default_documents, read_documents, token_batches


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a dictionary spliced into a model",
        description=(
            "Splice a dictionary into the model and measure MSE, L1, L0, fraction of features "
            "alive, fraction of variance explained, cosine similarity, loss recovered "
            "((CE_zero - CE_spliced) / (CE_zero - CE_clean)), KL(clean || spliced) and CE "
            "increase on held-out text."
        ),
    )
    add_model_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dictionary", help="dictionary folder (ours or a published format)")
    source.add_argument(
        "--dictionaries", metavar="SET", help="a dictionary set shipped for the embedded model"
    )
    parser.add_argument(
        "--site",
        help="site to splice at; required with --dictionaries, overrides the dictionary's own "
        "site otherwise (e.g. for foreign files)",
    )
    parser.add_argument(
        "--text",
        help=".txt or .jsonl file to evaluate on (default: the embedded model's held-out text, or "
        "a built-in sample of English and code for other models)",
    )
    parser.add_argument(
        "--tokens", type=int, default=16384, help="number of tokens (default 16384)"
    )
    parser.add_argument("--ctx-len", type=int, default=128, help="context length (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="contexts per batch")
    add_json_argument(parser)
    parser.set_defaults(run=run)


def load_dictionary_argument(args: argparse.Namespace) -> tuple[str, Dictionary]:
    """The (site, dictionary) named by --dictionary/--dictionaries and --site."""
    if args.dictionaries:
        if not args.site:
            raise UserInputError("--dictionaries needs --site")
        site = str(Site.parse(args.site))
        return site, load_dictionaries(args.dictionaries, sites=[site], device=args.device)[site]
    dictionary = Dictionary.load(args.dictionary, device=args.device)
    site = args.site or dictionary.config.site
    if not site:
        raise UserInputError(
            f"{args.dictionary} does not name a site in our grammar; pass --site (e.g. resid.2)"
        )
    return str(Site.parse(site)), dictionary


def run(args: argparse.Namespace) -> int:
    if args.tokens < args.ctx_len:
        raise UserInputError("--tokens must be at least --ctx-len")
    site, dictionary = load_dictionary_argument(args)
    model = load_model(args.model, device=args.device)
    documents = read_documents(args.text) if args.text else default_documents(args.model is None)
    batches = token_batches(model.tokenizer, documents, args.ctx_len, args.batch_size, args.tokens)
    total = math.ceil(args.tokens / (args.ctx_len * args.batch_size))
    metrics = evaluate(model, {site: dictionary}, batches, total_batches=total)[site]
    if args.json:
        print_json({key: metrics[key] for key in METRIC_KEYS})
    else:
        console.print(metrics_table({site: metrics}))
    return 0


def metrics_table(results: dict[str, dict[str, float]]) -> Table:
    """A rich table with one row per site."""
    table = Table(title="dictionary quality")
    table.add_column("site")
    for key in METRIC_KEYS:
        table.add_column(key, justify="right")
    for site, metrics in results.items():
        table.add_row(site, *(f"{metrics[key]:.4g}" for key in METRIC_KEYS))
    return table
