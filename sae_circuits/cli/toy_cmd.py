"""`sae-circuits toy`: a dictionary sweep on synthetic data with known features."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.table import Table

from sae_circuits.cli.common import (
    add_json_argument,
    add_spec_options,
    print_json,
    print_result,
    wrote,
)
from sae_circuits.options import field_help, option_values
from sae_circuits.selection_defaults import DEFAULT_L1S, DEFAULT_RATIOS, DEFAULT_STEPS, TOY_SPEC
from sae_circuits.train_spec import TrainSpec

# TrainSpec fields set by options of their own name (the grid spans --l1 and --ratios)
SPEC_OPTIONS = (
    "lr",
    "decay_start",
    "resample_every",
    "resample_duplicates",
    "resample_min_fires",
    "resample_target",
    "dead_window",
    "recipe",
    "seed",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "toy",
        description=(
            "Generate activations from G known unit features in h dimensions (sparse, correlated, "
            "decaying frequencies), train a grid of dictionaries (L1 × size ratio) in one pass, and "
            "report the ground-truth MMCS next to three ways of choosing (size, L1) without ground "
            "truth: dead features, SSLL, and MMCS against larger dictionaries."
        ),
    )
    parser.add_argument("--h", type=int, default=256, help="activation width (default 256)")
    parser.add_argument("--g", type=int, default=512, help="number of true features (default 512)")
    parser.add_argument(
        "--n-active", type=float, default=5.0, help="mean active features (default 5)"
    )
    parser.add_argument(
        "--l1",
        type=float,
        nargs="+",
        default=list(DEFAULT_L1S),
        help=f"{field_help(TrainSpec, 'l1')} α (default: {' '.join(map(str, DEFAULT_L1S))})",
    )
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS), help="dictionary sizes / G"
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training batches")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the matrices are small, extra threads help little)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write heatmap PNGs and results.json here"
    )
    add_json_argument(parser)
    add_spec_options(
        parser,
        TOY_SPEC,
        SPEC_OPTIONS,
        notes={
            "decay_start": "the report: 1, no decay",
            "resample_every": "never within the dead window of the end; 0: never, as in the report",
            "seed": "also of the synthetic data",
        },
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sae_circuits import toy
    from sae_circuits.cli.grid_tables import grid_table

    torch.set_num_threads(args.threads)
    options = option_values(args, SPEC_OPTIONS)
    options["resample_every"] = options["resample_every"] or None
    data = toy.ToyData(toy.ToyConfig(h=args.h, g=args.g, n_active=args.n_active, seed=args.seed))
    result = toy.sweep(
        data,
        l1s=args.l1,
        ratios=args.ratios,
        steps=args.steps,
        batch_size=args.batch_size,
        template=replace(TOY_SPEC, **options),
    )
    selected = toy.select(result)
    document = {"grid": result.rows(), "selected": selected}
    if args.json:
        print_json(document)
    else:
        print_result(
            *(
                grid_table(
                    title,
                    getattr(result, name),
                    result.ratios,
                    result.l1s,
                    "size / G \\ α",
                    integer=name == "dead",
                )
                for name, title in toy.HEATMAPS.items()
            ),
            _selection_table(selected),
            f"{len(result.dictionaries)} dictionaries, {result.steps} steps: "
            f"{result.seconds:.0f} s",
        )
    if args.out is not None:
        paths = toy.plot_toy_heatmaps(result, args.out)
        results = args.out / "results.json"
        tmp = results.with_name(results.name + ".tmp")
        tmp.write_text(
            json.dumps({**document, "steps": result.steps, "seconds": result.seconds}, indent=2)
            + "\n"
        )
        tmp.replace(results)
        wrote(*paths, results)
    return 0


def _selection_table(selected: dict[str, dict[str, Any]]) -> Table:
    from sae_circuits.selection import METHOD_TITLES

    table = Table(title="choosing (size, L1) without ground truth")
    for column in ("method", "size / G", "α", "ground-truth MMCS"):
        table.add_column(column)
    for method, choice in selected.items():
        table.add_row(
            METHOD_TITLES[method],
            f"{choice['ratio']:g}",
            f"{choice['l1']:g}",
            f"{choice['mmcs']:.3f}",
        )
    return table
