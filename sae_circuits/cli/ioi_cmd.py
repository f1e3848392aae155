"""`sae-circuits ioi`: how many features must be patched to restore IOI, per site and basis."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import TYPE_CHECKING

from sae_circuits.cli.common import (
    add_json_argument,
    add_model_argument,
    add_remote_argument,
    model_from_args,
    print_json,
    print_result,
    wrote,
)
from sae_circuits.constants import BASELINES, CORRUPTIONS, DEFAULT_THRESHOLDS
from sae_circuits.errors import UserInputError
from sae_circuits.sites import Site

if TYPE_CHECKING:
    from sae_circuits.patching_curves import PatchingCurve


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ioi",
        description=(
            "Rank the directions of each basis at a site by attribution |grad x (c - c_corrupt)| "
            "on IOI prompts from the train templates, then patch the top k from the clean into "
            "the corrupted run on prompts from the held-out templates (x' = x_corrupt + "
            "sum over the top k of (c_i - c_corrupt_i) d_i, the corrupted error term kept), and "
            "report the share of the clean-corrupted logit-difference gap restored, the KL to "
            "the clean output, the ceiling (every feature patched) and the share the error term "
            "alone restores (x_corrupt + e - e_corrupt). Bases: the dictionary "
            "(sae), PCA fitted on the training text (pca_corpus) and on the task's prompts "
            "(pca_task, supervised by the task), the neuron basis and a random rotation. "
            "--search greedy runs Cunningham et al.'s search instead: patch every feature from "
            "the corrupted into the clean run, then un-patch features one at a time (random "
            "order) while the KL to the corrupted output rises by less than a threshold."
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
    parser.add_argument(
        "--every-k",
        action="store_true",
        help="evaluate every k up to K (default: 1-10, 12, 15, 20, 25, 30, 40, 50, ...)",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        choices=BASELINES,
        help=f"baseline bases (repeatable; default: {', '.join(BASELINES)})",
    )
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
    parser.add_argument(
        "--search",
        default="ranking",
        choices=("ranking", "greedy"),
        help="ranking: curves of the top-k ranked directions (default); greedy: Cunningham et "
        "al.'s search on the held-out prompts",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        action="append",
        metavar="NATS",
        help="greedy search KL thresholds (repeatable; default "
        f"{', '.join(f'{t:g}' for t in DEFAULT_THRESHOLDS)})",
    )
    parser.add_argument(
        "--greedy-prompts",
        type=int,
        default=32,
        help="held-out prompts the greedy search runs on (default 32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt sampling, random basis, order")
    parser.add_argument("--plot", metavar="PNG", help="write the curves to this PNG file")
    add_remote_argument(parser)
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.max_features < 1 or args.n_prompts < 1 or args.greedy_prompts < 1:
        raise UserInputError("--max-features, --n-prompts and --greedy-prompts must be at least 1")
    if args.threshold and args.search != "greedy":
        raise UserInputError("--threshold applies to --search greedy")
    if args.remote and args.search == "greedy":
        raise UserInputError("--remote runs the patching curves; --search greedy runs here only")
    from sae_circuits.cli.tables import restore_table
    from sae_circuits.dictionary import load_dictionaries
    from sae_circuits.models import is_embedded, model_name
    from sae_circuits.patching_curves import compare_bases, corpus_activations
    from sae_circuits.plotting import patching_curves
    from sae_circuits.tasks import load_task

    sites = [Site.parse(site) for site in args.site] if args.site else None
    model = model_from_args(args)
    shipped_for = None if is_embedded(model) else model_name(model)
    dictionaries = load_dictionaries(args.dictionaries, sites, shipped_for, args.device)
    train = load_task("ioi", model, args.corruption, args.n_prompts, args.seed, "train")
    test = load_task("ioi", model, args.corruption, args.n_prompts, args.seed, "heldout")
    baselines = args.baseline or list(BASELINES)
    # the corpus PCA of every site from one pass over the training text
    corpus = (
        corpus_activations(model, list(dictionaries), remote=args.remote)
        if "pca_corpus" in baselines
        else {}
    )
    if args.search == "greedy":
        return _greedy(args, model, dictionaries, train, test, baselines, corpus)
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
            baselines=baselines,
            every_k=args.every_k,
            remote=args.remote,
            corpus=corpus.get(site),
        )
        for site, dictionary in dictionaries.items()
    }
    any_curve = next(iter(next(iter(curves.values())).values()))
    if args.json:
        print_json(
            {
                "corruption": args.corruption,
                "clean_metric": any_curve.clean_metric,
                "corrupt_metric": any_curve.corrupt_metric,
                "n_train": len(train),
                "n_test": len(test),
                "sites": {
                    str(site): {name: _curve_json(curve) for name, curve in by_basis.items()}
                    for site, by_basis in curves.items()
                },
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


def _curve_json(curve: PatchingCurve) -> dict:
    return {
        "ks": curve.ks,
        "restored": curve.restored,
        "kl": curve.kl,
        "ceiling": curve.ceiling,
        "ceiling_kl": curve.ceiling_kl,
        "error_restored": curve.error_restored,
        "features": curve.features,
    }


def _greedy(args, model, dictionaries, train, test, baselines, corpus) -> int:
    from sae_circuits.cli.tables import greedy_table
    from sae_circuits.greedy_search import greedy_search
    from sae_circuits.patching_curves import baseline_bases
    from sae_circuits.plotting import greedy_curves

    thresholds = args.threshold or list(DEFAULT_THRESHOLDS)
    prompts = test.subset(slice(0, args.greedy_prompts))
    results = {}
    for site, dictionary in dictionaries.items():
        bases = {
            "sae": dictionary,
            **baseline_bases(model, train, site, args.seed, baselines, corpus=corpus.get(site)),
        }
        results[site] = greedy_search(
            model, prompts, site, bases, thresholds, args.seed, args.positions, progress=True
        )
    if args.json:
        print_json(
            {
                "corruption": args.corruption,
                "search": "greedy",
                "n_prompts": len(prompts),
                "sites": {
                    str(site): {name: asdict(curve) for name, curve in by_basis.items()}
                    for site, by_basis in results.items()
                },
            }
        )
    else:
        print_result(greedy_table(results))
    if args.plot:
        greedy_curves(results, args.plot)
        wrote(args.plot)
    return 0
