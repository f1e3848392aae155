"""`sae-circuits inspect`: what a dictionary feature reads and does, or a whole dictionary's firing
frequencies, or how monosemantic its features are compared with the site's neurons."""

from __future__ import annotations

import argparse
import math

from rich.table import Table

from sae_circuits.cli.common import (
    add_dictionary_source,
    add_json_argument,
    add_model_argument,
    add_remote_argument,
    add_text_options,
    load_dictionary_argument,
    model_from_args,
    print_json,
    print_result,
    text_batches,
    wrote,
)
from sae_circuits.errors import UserInputError
from sae_circuits.nodes import Node
from sae_circuits.sites import Site


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        description=(
            "SITE/FEATURE (e.g. resid.2/123): top activating contexts, activation histogram split "
            "by token, firing frequency, the logit change of every token when the feature is "
            "ablated on its top contexts, and its direct effect through the unembedding. "
            "SITE with --frequencies: the firing frequency of every feature; with --vs-neurons: "
            "how concentrated the top activations of features and of neurons are on one token. "
            "--html FILE writes an interactive page that opens offline: for a feature, its "
            "histogram, contexts (each token shaded by activation) and logit effects; for a SITE, "
            "the frequency histogram and a searchable list of every feature with its top tokens."
        ),
    )
    parser.add_argument("target", metavar="SITE[/FEATURE]", help="e.g. resid.2/123 or resid.2")
    add_model_argument(parser)
    add_dictionary_source(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--frequencies", action="store_true", help="frequencies of all features")
    mode.add_argument(
        "--vs-neurons", action="store_true", help="token concentration: features vs. neurons"
    )
    parser.add_argument("--top-k", type=int, default=20, help="top contexts per unit (default 20)")
    add_text_options(parser, ctx_len=128, batch_size=16)
    parser.add_argument(
        "--png",
        metavar="PATH",
        help="also save the histograms as a PNG (a feature or --frequencies)",
    )
    parser.add_argument(
        "--html",
        metavar="FILE",
        help="also write an interactive page (a feature, or for a SITE the dictionary view)",
    )
    add_remote_argument(parser)
    add_json_argument(parser)
    parser.set_defaults(run=run)


def parse_target(text: str) -> Node | Site:
    """`resid.2/123` -> a feature `Node`; `resid.2` -> a `Site`."""
    _, slash, feature = text.rpartition("/")
    if not slash:
        return Site.parse(text)
    if not feature.isdigit():
        raise UserInputError(f"bad feature {text!r}: expected SITE/INDEX, e.g. resid.2/123")
    return Node.parse(text)


def run(args: argparse.Namespace) -> int:
    target = parse_target(args.target)
    site, feature = (target.site, target.feature) if isinstance(target, Node) else (target, None)
    if feature is None and not (args.frequencies or args.vs_neurons or args.html):
        raise UserInputError(
            "name a feature (e.g. resid.2/123) or pass --frequencies/--vs-neurons/--html"
        )
    if feature is not None and (args.frequencies or args.vs_neurons):
        raise UserInputError("--frequencies and --vs-neurons take a site without a feature")
    if (args.png or args.html) and args.vs_neurons:
        raise UserInputError("--png and --html are for a feature or a site, not --vs-neurons")
    if args.top_k < 1 or args.tokens < args.ctx_len:
        raise UserInputError("--top-k must be >= 1 and --tokens at least --ctx-len")
    args.site = site
    if not args.dictionary and not args.dictionaries:
        args.dictionaries = "main"
    site, dictionary = load_dictionary_argument(args)
    if feature is not None and feature >= dictionary.d_dict:
        raise UserInputError(
            f"feature {feature} is out of range: the dictionary at {site} has features "
            f"0..{dictionary.d_dict - 1}"
        )
    from sae_circuits.features import compare_with_neurons, feature_frequencies, inspect_features
    from sae_circuits.views import dictionary_view, feature_view, write_page

    model = model_from_args(args)
    batches = text_batches(args, model)
    total = math.ceil(args.tokens / (args.ctx_len * args.batch_size))
    if args.vs_neurons:
        result = compare_with_neurons(
            model, site, dictionary, batches, args.top_k, total_batches=total, remote=args.remote
        )
        if args.json:
            print_json({"site": site, "top_k": args.top_k, **result})
        else:
            print_result(_comparison_table(site, result))
        return 0
    if feature is None:
        report = feature_frequencies(
            model,
            site,
            dictionary,
            batches,
            total_batches=total,
            top_k=args.top_k,
            remote=args.remote,
        )
        view = dictionary_view(report) if args.html else None
    else:
        (report,) = inspect_features(
            model,
            site,
            dictionary,
            batches,
            [feature],
            args.top_k,
            total_batches=total,
            remote=args.remote,
        )
        view = feature_view(report) if args.html else None
    written = {"png": str(report.save_png(args.png))} if args.png else {}
    if view is not None:
        written["html"] = str(write_page(view, args.html))
    if args.json:
        print_json({**report.to_json(), **written})
    else:
        print_result(report)
    wrote(*written.values())
    return 0


def _comparison_table(site: Site, result: dict[str, dict[str, float]]) -> Table:
    table = Table(title=f"features vs. neurons at {site} (top activations on one token)")
    keys = list(next(iter(result.values())))
    table.add_column("basis")
    for key in keys:
        table.add_column(key.replace("_", " "), justify="right")
    for name, values in result.items():
        table.add_row(name, *(f"{values[key]:.3g}" for key in keys))
    return table
