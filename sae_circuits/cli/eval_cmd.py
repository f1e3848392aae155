"""`sae-circuits eval`: downstream, sparsity and reconstruction metrics of spliced dictionaries."""

from __future__ import annotations

import argparse

from sae_circuits.cli.common import (
    add_json_argument,
    add_model_argument,
    load_dictionary_argument,
    print_json,
    print_result,
    text_batches,
)
from sae_circuits.cli.tables import metrics_table
from sae_circuits.dictionary import load_dictionaries
from sae_circuits.errors import UserInputError
from sae_circuits.evaluation import DENSE_FREQUENCY, METRIC_KEYS, evaluate
from sae_circuits.models import load_model
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
    add_json_argument(parser)
    parser.epilog = (
        "--json prints every metric (also ce_clean, ce_spliced, ce_zero, ce_mean and tokens, the "
        "number of evaluated positions): one object for one site, an object of them by site for "
        "several."
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.tokens < args.ctx_len:
        raise UserInputError("--tokens must be at least --ctx-len")
    dictionaries = _dictionaries(args)
    model = load_model(args.model, device=args.device)
    results = evaluate(model, dictionaries, text_batches(args, model))
    if args.json:
        by_site = {site: {key: m[key] for key in METRIC_KEYS} | m for site, m in results.items()}
        print_json(next(iter(by_site.values())) if len(by_site) == 1 else by_site)
    else:
        print_result(metrics_table(results))
    return 0


def _dictionaries(args: argparse.Namespace) -> SiteMap:
    """The dictionaries named by --dictionary/--dictionaries and --site, by site."""
    if args.dictionaries:
        return load_dictionaries(args.dictionaries, sites=args.site, device=args.device)
    if args.site and len(args.site) > 1:
        raise UserInputError("--dictionary takes at most one --site")
    single = argparse.Namespace(**{**vars(args), "site": args.site[0] if args.site else None})
    site, dictionary = load_dictionary_argument(single)
    return SiteMap({site: dictionary})
