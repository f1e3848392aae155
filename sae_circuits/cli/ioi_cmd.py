"""`sae-circuits ioi`: how many features must be patched to restore IOI, per site and basis."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from sae_circuits.cli.common import add_json_argument, add_model_argument, console, print_json
from sae_circuits.dictionary import load_dictionaries
from sae_circuits.errors import UserInputError
from sae_circuits.interventions import PatchingCurve, compare_bases
from sae_circuits.models import load_model, model_name
from sae_circuits.sites import Site
from sae_circuits.tasks import CORRUPTIONS, load_task

SHARES = (0.5, 0.8)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ioi",
        help="patching curves on IOI: SAE features vs PCA, neurons and random directions",
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
    if args.plot:
        _check_matplotlib()
    model = load_model(args.model, device=args.device)
    shipped_for = None if args.model is None else model_name(model)
    sites = [str(Site.parse(site)) for site in args.site] if args.site else None
    dictionaries = load_dictionaries(args.dictionaries, sites, shipped_for, args.device)
    order = sorted(dictionaries, key=lambda site: Site.parse(site).order)
    train = load_task("ioi", model, args.corruption, args.n_prompts, args.seed, "train")
    test = load_task("ioi", model, args.corruption, args.n_prompts, args.seed, "heldout")
    curves = {
        site: compare_bases(
            model,
            train,
            test,
            site,
            dictionaries[site],
            args.max_features,
            args.ranking,
            args.positions,
            args.seed,
            progress=True,
        )
        for site in order
    }
    any_curve = next(iter(curves[order[0]].values()))
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
        console.print(
            f"IOI ({args.corruption}) logit(IO) - logit(S) on {len(test)} held-out prompts: "
            f"clean {any_curve.clean_metric:.3f}, corrupted {any_curve.corrupt_metric:.3f}"
        )
        console.print(restore_table(curves, args.max_features))
    if args.plot:
        plot_curves(curves, Path(args.plot))
        console.print(f"wrote {args.plot}")
    return 0


def restore_table(curves: dict[str, dict[str, PatchingCurve]], max_features: int) -> Table:
    """Per site and basis: the k needed to restore 50% and 80% of the gap, and the end of the curve."""
    table = Table(title="directions patched to restore the IOI gap (- : not within K)")
    for column in ("site", "basis", "k for 50%", "k for 80%", f"restored at K={max_features}"):
        table.add_column(column, justify="left" if column in ("site", "basis") else "right")
    table.add_column("KL at K", justify="right")
    for site, by_basis in curves.items():
        for name, curve in by_basis.items():
            ks = [curve.k_to_restore(share) for share in SHARES]
            table.add_row(
                site,
                name,
                *(str(k) if k is not None else "-" for k in ks),
                f"{curve.restored[-1]:.3g}",
                f"{curve.kl[-1]:.3g}",
            )
        table.add_section()
    return table


def plot_curves(curves: dict[str, dict[str, PatchingCurve]], path: Path) -> None:
    """One column per site: restored share (top) and KL to the clean output (bottom) against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    figure, axes = plt.subplots(2, n, figsize=(3.2 * n, 5.6), squeeze=False, sharex=True)
    for column, (site, by_basis) in enumerate(curves.items()):
        top, bottom = axes[0, column], axes[1, column]
        for name, curve in by_basis.items():
            ks = range(1, len(curve.restored) + 1)
            style = {"linewidth": 2.2 if name == "sae" else 1.3, "label": name}
            top.plot(ks, curve.restored, **style)
            bottom.plot(ks, curve.kl, **style)
        for share in SHARES:
            top.axhline(share, color="grey", linewidth=0.6, linestyle=":")
        top.set_title(site)
        bottom.set_xlabel("k directions patched")
        bottom.set_yscale("log")
    axes[0, 0].set_ylabel("share of IOI gap restored")
    axes[1, 0].set_ylabel("KL(clean ‖ patched)")
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserInputError("--plot needs matplotlib: pip install 'sae-circuits[plots]'") from None
