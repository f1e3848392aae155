"""`sae-circuits eval`: downstream, sparsity and reconstruction metrics of spliced dictionaries."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from sae_circuits.cli.common import (
    add_json_argument,
    add_model_argument,
    add_remote_argument,
    load_dictionary_argument,
    model_from_args,
    print_json,
    print_result,
    text_batches,
    wrote,
)
from sae_circuits.constants import DENSE_FREQUENCY, METRIC_KEYS
from sae_circuits.errors import UserInputError
from sae_circuits.sites import SiteMap


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        description=(
            "Splice dictionaries into the model and measure on held-out text, per site: CE "
            "increase (CE_spliced - CE_clean, nats) and KL(clean || spliced) of the next-token "
            "distributions, L0, loss recovered against mean ablation ((CE_mean - CE_spliced) / "
            "(CE_mean - CE_clean), the site replaced by its mean over the text) and against zero "
            "ablation, normalised MSE (squared error over that of predicting the mean; = 1 - FVE), "
            "fraction of variance explained, MSE, cosine similarity, L1, and the shares of "
            f"features alive, dead (never active) and dense (active on > {DENSE_FREQUENCY:.0%} of "
            "the tokens). With several sites the model runs once per batch for all of them."
        ),
    )
    add_model_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dictionary", help="dictionary folder (ours or a published format)")
    source.add_argument(
        "--dictionaries",
        metavar="SET",
        help="a dictionary set shipped for the embedded model (e.g. main): every site of the set, "
        "or those given with --site",
    )
    parser.add_argument(
        "--site",
        action="append",
        help="with --dictionaries: a site of the set to evaluate (repeatable); with --dictionary: "
        "the site to splice at, overriding the dictionary's own (e.g. for foreign files)",
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
    parser.add_argument(
        "--worst",
        type=int,
        default=0,
        metavar="N",
        help="also list, per site, the N next-token predictions whose CE rises the most when the "
        "dictionary is spliced in, with the tokens around them (the predicted one in [[ ]])",
    )
    parser.add_argument(
        "--html", type=Path, metavar="PATH", help="with --worst: write those contexts as a page"
    )
    parser.add_argument(
        "--no-ablations",
        dest="ablations",
        action="store_false",
        help="skip the zero- and mean-ablated runs, a third of the work: the loss-recovered "
        "columns (and ce_zero, ce_mean) are then not measured (NaN)",
    )
    add_remote_argument(parser)
    add_json_argument(parser)
    parser.epilog = (
        "--json prints every metric (also ce_clean, ce_spliced, ce_zero, ce_mean and tokens, the "
        'number of evaluated positions, and with --worst a list "worst" of {ce_increase, '
        "ce_clean, ce_spliced, batch, row, position, before, token, after, context}): one object "
        "for one site, an object of them by site for several."
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.tokens < args.ctx_len:
        raise UserInputError("--tokens must be at least --ctx-len")
    if args.worst < 0:
        raise UserInputError("--worst must be >= 0")
    if args.html and not args.worst:
        raise UserInputError("--html shows the --worst contexts: give --worst N")
    from sae_circuits.cli.tables import metrics_table
    from sae_circuits.evaluation import evaluate

    dictionaries = _dictionaries(args)
    model = model_from_args(args)
    results = evaluate(
        model,
        dictionaries,
        text_batches(args, model),
        worst=args.worst,
        remote=args.remote,
        ablations=args.ablations,
    )
    if args.json:
        by_site = {site: {key: m[key] for key in METRIC_KEYS} | m for site, m in results.items()}
        print_json(next(iter(by_site.values())) if len(by_site) == 1 else by_site)
    else:
        print_result(
            metrics_table(results),
            *(worst_table(site, m["worst"]) for site, m in results.items() if args.worst),
        )
    if args.html:
        from sae_circuits.views import write_page
        from sae_circuits.views.feature_html import worst_view

        wrote(write_page(worst_view({site: m["worst"] for site, m in results.items()}), args.html))
    return 0


def _dictionaries(args: argparse.Namespace) -> SiteMap:
    """The dictionaries named by --dictionary/--dictionaries and --site, by site."""
    from sae_circuits.dictionary import load_dictionaries

    if args.dictionaries:
        return load_dictionaries(args.dictionaries, sites=args.site, device=args.device)
    if args.site and len(args.site) > 1:
        raise UserInputError("--dictionary takes at most one --site")
    single = argparse.Namespace(**{**vars(args), "site": args.site[0] if args.site else None})
    site, dictionary = load_dictionary_argument(single)
    return SiteMap({site: dictionary})


def worst_table(site: object, rows: list[dict[str, Any]]) -> Table:
    """The predictions whose CE rises the most when `site` is spliced, predicted token in [[ ]]."""
    table = Table(title=f"largest CE increases with {site} spliced (nats)")
    for column in ("ΔCE", "CE clean", "batch", "row", "pos", "context"):
        table.add_column(column, justify="left" if column == "context" else "right")
    for row in rows:
        table.add_row(
            f"{row['ce_increase']:.3f}",
            f"{row['ce_clean']:.3f}",
            str(row["batch"]),
            str(row["row"]),
            str(row["position"]),
            Text(row["context"].replace("\n", "⏎")),  # Text: the [[ ]] are not markup
        )
    return table
