"""`sae-circuits toy`: a dictionary sweep on synthetic data with known features."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from sae_circuits.cli.common import (
    add_json_argument,
    add_spec_options,
    print_json,
    print_result,
    wrote,
)
from sae_circuits.options import field_help, option_values
from sae_circuits.toy import (
    DEFAULT_L1S,
    DEFAULT_RATIOS,
    DEFAULT_STEPS,
    HEATMAPS,
    TOY_SPEC,
    SweepResult,
    ToyConfig,
    ToyData,
    plot_heatmaps,
    select,
    sweep,
)
from sae_circuits.training import TrainSpec

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
METHOD_TITLES = {
    "dead": "largest (size, L1) without dead features",
    "ssll": "smallest SSLL",
    "mmcs_larger": "largest MMCS vs larger dictionaries",
}


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
    torch.set_num_threads(args.threads)
    options = option_values(args, SPEC_OPTIONS)
    options["resample_every"] = options["resample_every"] or None
    data = ToyData(ToyConfig(h=args.h, g=args.g, n_active=args.n_active, seed=args.seed))
    result = sweep(
        data,
        l1s=args.l1,
        ratios=args.ratios,
        steps=args.steps,
        batch_size=args.batch_size,
        template=replace(TOY_SPEC, **options),
    )
    selected = select(result)
    document = {"grid": result.rows(), "selected": selected}
    if args.json:
        print_json(document)
    else:
        print_result(
            *(_matrix_table(result, name, title) for name, title in HEATMAPS.items()),
            _selection_table(selected),
            f"{len(result.dictionaries)} dictionaries, {result.steps} steps: "
            f"{result.seconds:.0f} s",
        )
    if args.out is not None:
        paths = plot_heatmaps(result, args.out)
        results = args.out / "results.json"
        tmp = results.with_name(results.name + ".tmp")
        tmp.write_text(
            json.dumps({**document, "steps": result.steps, "seconds": result.seconds}, indent=2)
            + "\n"
        )
        tmp.replace(results)
        wrote(*paths, results)
    return 0


def _cell(name: str, value: float) -> str:
    if not np.isfinite(value):
        return "–"
    return f"{value:.0f}" if name == "dead" else f"{value:.3f}"


def _matrix_table(result: SweepResult, name: str, title: str) -> Table:
    table = Table(title=title)
    table.add_column("size / G \\ α", justify="right")
    for l1 in result.l1s:
        table.add_column(f"{l1:g}", justify="right")
    values = getattr(result, name)
    for r, ratio in enumerate(result.ratios):
        table.add_row(f"{ratio:g}", *(_cell(name, v) for v in values[r]))
    return table


def _selection_table(selected: dict[str, dict[str, Any]]) -> Table:
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
