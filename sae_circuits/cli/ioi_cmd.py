"""`sae-circuits ioi`: how many features must be patched to restore IOI, per site and basis."""

from __future__ import annotations

import argparse

from sae_circuits.cli.common import (
    add_json_argument,
    add_model_argument,
    print_json,
    print_result,
    wrote,
)
from sae_circuits.cli.tables import restore_table
from sae_circuits.dictionary import load_dictionaries
from sae_circuits.errors import UserInputError
from sae_circuits.models import is_embedded, load_model, model_name
from sae_circuits.patching_curves import compare_bases
from sae_circuits.plotting import patching_curves
from sae_circuits.sites import Site
from sae_circuits.tasks import CORRUPTIONS, load_task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ioi",
        description=(
            "Rank the directions of each basis at a site by attribution |grad x (c - c_corrupt)| "
            "on IOI prompts from the train templates, then patch the top k (k = 1..K) from the "
            "clean into the corrupted run on prompts from the held-out templates, keeping the "
            "corrupted error term, and report the share of the clean-corrupted logit-difference "
            "gap restored and the KL to the clean output. Bases: the spliced dictionary (sae), "
            "PCA fitted on the site's activations, the neuron basis and a random rotation."
        ),
    )
    add_model_argument(parser)
    parser.add_argument(
        "--dictionaries", default="main", metavar="SET", help="shipped dictionary set (main)"
    )
    parser.add_argument(
        "--site", action="append", help="site (repeatable; default: every site of the set)"
    )
    parser.add_argument("--max-features", type=int, default=50, help="largest k (default 50)")
    parser.add_argument("--corruption", default="abc", choices=CORRUPTIONS["ioi"])
    parser.add_argument(
        "--n-prompts", type=int, default=100, help="prompts per split (train, test; default 100)"
    )
    parser.add_argument(
        "--ranking",
        default="attribution",
        choices=("attribution", "difference"),
        help="rank directions by |grad x (c - c_corrupt)| or by |c - c_corrupt| (train split)",
    )
    parser.add_argument("--positions", default="all", choices=("all", "last"))
    parser.add_argument("--seed", type=int, default=0, help="prompt sampling and random basis")
    parser.add_argument("--plot", metavar="PNG", help="write the curves to this PNG file")
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.max_features < 1 or args.n_prompts < 1:
        raise UserInputError("--max-features and --n-prompts must be at least 1")
    sites = [Site.parse(site) for site in args.site] if args.site else None
    model = load_model(args.model, device=args.device)
    shipped_for = None if is_embedded(model) else model_name(model)
    dictionaries = load_dictionaries(args.dictionaries, sites, shipped_for, args.device)
    train = load_task("ioi", model, args.corruption, args.n_prompts, args.seed, "train")
    test = load_task("ioi", model, args.corruption, args.n_prompts, args.seed, "heldout")
    curves = {
        site: compare_bases(
            model,
            train,
            test,
            site,
            dictionary,
            args.max_features,
            args.ranking,
            args.positions,
            args.seed,
            progress=True,
        )
        for site, dictionary in dictionaries.items()
    }
    any_curve = next(iter(next(iter(curves.values())).values()))
    if args.json:
        print_json(
            {
                "clean_metric": any_curve.clean_metric,
                "corrupt_metric": any_curve.corrupt_metric,
                "sites": {s: {b: c.restored for b, c in by.items()} for s, by in curves.items()},
                "kl": {s: {b: c.kl for b, c in by.items()} for s, by in curves.items()},
                "n_train": len(train),
                "n_test": len(test),
            }
        )
    else:
        print_result(
            f"IOI ({args.corruption}) logit(IO) - logit(S) on {len(test)} held-out prompts: "
            f"clean {any_curve.clean_metric:.3f}, corrupted {any_curve.corrupt_metric:.3f}"
        )
        print_result(restore_table(curves, args.max_features))
    if args.plot:
        patching_curves(curves, args.plot)
        wrote(args.plot)
    return 0
