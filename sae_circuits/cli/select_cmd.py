"""`sae-circuits select`: choose a dictionary's size and sparsity on a model without ground truth."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from rich.table import Table

from sae_circuits.cli.common import (
    add_json_argument,
    add_model_argument,
    add_spec_options,
    add_training_data_options,
    model_from_args,
    print_json,
    print_result,
    wrote,
)
from sae_circuits.errors import UserInputError
from sae_circuits.options import option_values
from sae_circuits.selection_defaults import GRIDS, RESULTS_FILE
from sae_circuits.sites import Site
from sae_circuits.train_spec import TOP_K_KINDS, TrainSpec

# The training defaults of `select`, where they differ from TrainSpec's (those of `train`).
SELECT_DEFAULTS = TrainSpec(key="", warmup_steps=200, dead_window=500)
SPEC_OPTIONS = (
    "kind",
    "lr",
    "warmup_steps",
    "decay_start",
    "dead_window",
    "normalize",
    "recipe",
    "seed",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "select",
        description=(
            "Train a grid of dictionaries at one site (every --dict-size x --l1, or x --k, each "
            "with --seeds random initialisations) in one pass over one harvest, evaluate each on "
            "held-out text, and report the three ways of choosing size and sparsity without "
            "ground truth of Sharkey et al. (2022): dead features at the end of training (proposal: "
            "the largest size, then the sparsest coefficient, without any), SSLL (z-scored log MSE "
            "plus z-scored log L1 norm; proposal: the smallest) and MMCS against the larger "
            "dictionaries of the grid at the same coefficient (proposal: the largest), with MMCS "
            "between two seeds (feature stability), CE increase and L0 beside them, and the MMCS "
            "of random directions for scale. Writes OUT/<site>/<kind>_<size>_l1-<l1>/ (the first "
            f"seed's dictionaries), one heatmap PNG per signal and OUT/{RESULTS_FILE}; an "
            "interrupted run resumes from OUT/.checkpoint."
        ),
    )
    add_model_argument(parser)
    parser.add_argument("--site", required=True, help="the site to train at (e.g. resid.2)")
    parser.add_argument(
        "--dict-size", type=int, nargs="+", required=True, help="dictionary sizes (the rows)"
    )
    sparsity = parser.add_mutually_exclusive_group(required=True)
    sparsity.add_argument("--l1", type=float, nargs="+", help="L1 coefficients (the columns)")
    sparsity.add_argument(
        "--k",
        type=int,
        nargs="+",
        help="top-k sizes (the columns), instead of --l1; the kind is topk unless --kind names "
        "another top-k kind",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=2,
        help="random initialisations per grid point (default 2: MMCS between the first two; 1: "
        "no stability measure)",
    )
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training activations")
    add_training_data_options(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_json_argument(parser)
    add_spec_options(
        parser,
        SELECT_DEFAULTS,
        SPEC_OPTIONS,
        notes={
            "seed": "of the data and of the first initialisation of the smallest size (size "
            "index r, initialisation i: seed + i + seeds * r)"
        },
    )
    parser.epilog = (
        f"--json prints what OUT/{RESULTS_FILE} holds: every grid point (dict_size, l1 or k, "
        "path, and the signals " + ", ".join(GRIDS) + ", nmse, frac_dead), the proposals, "
        "and the chance level of MMCS per size (random directions)."
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sae_circuits.cli.grid_tables import grid_table
    from sae_circuits.models import is_embedded
    from sae_circuits.selection import select_on_model
    from sae_circuits.text import default_documents, read_documents, training_documents

    if args.seeds < 1:
        raise UserInputError("--seeds must be >= 1")
    if args.tokens < args.batch_size:
        raise UserInputError("--tokens must be at least --batch-size")
    options = option_values(args, SPEC_OPTIONS)
    if args.k and options["kind"] not in TOP_K_KINDS:
        if options["kind"] != SELECT_DEFAULTS.kind:
            raise UserInputError(f"--k needs a top-k kind ({', '.join(TOP_K_KINDS)})")
        options["kind"] = "topk"
    if args.k:  # the template must be a valid top-k spec; every grid point sets its own k
        options["k"] = args.k[0]
    site = Site.parse(args.site)
    model = model_from_args(args)
    site.resolve(model)
    embedded = is_embedded(model)
    result = select_on_model(
        model,
        site,
        args.dict_size,
        args.k or args.l1,
        args.tokens,
        args.out,
        read_documents(args.text) if args.text else training_documents(embedded, args.seed),
        default_documents(embedded),
        sparsity="k" if args.k else "l1",
        seeds=[args.seed + i for i in range(args.seeds)],
        template=replace(SELECT_DEFAULTS, key=str(site), **options),
        batch_size=args.batch_size,
        ctx_len=args.ctx_len,
        n_ctxs=args.n_ctxs,
        eval_tokens=args.eval_tokens,
        checkpoint_every=args.checkpoint_every,
    )
    document = result.to_json()
    if args.json:
        print_json(document)
    else:
        corner = "size \\ " + ("L1" if result.sparsity == "l1" else "k")
        shown = [name for name in GRIDS if name != "seed_mmcs" or len(result.seeds) > 1]
        print_result(
            *(
                grid_table(
                    GRIDS[name],
                    result.grids[name],
                    result.sizes,
                    result.coefficients,
                    corner,
                    integer=name == "dead",
                )
                for name in shown
            ),
            _proposals_table(document),
        )
    wrote(
        *(point["path"] for point in document["grid"]),
        *(args.out / f"{name}.png" for name in GRIDS),
        args.out / RESULTS_FILE,
    )
    return 0


def _proposals_table(document: dict) -> Table:
    from sae_circuits.selection import METHOD_TITLES

    sparsity = document["sparsity"]
    table = Table(title=f"choosing size and {sparsity} at {document['site']}")
    columns = ("method", "size", sparsity, "CE increase", "L0", "MMCS between seeds", "path")
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "path") else "right")
    for method, point in document["proposals"].items():
        stability = point["seed_mmcs"]
        table.add_row(
            METHOD_TITLES[method],
            str(point["dict_size"]),
            f"{point[sparsity]:g}",
            f"{point['ce_delta']:.4f}",
            f"{point['l0']:.1f}",
            "–" if stability is None else f"{stability:.3f}",
            point["path"],
        )
    return table
