"""`sae-circuits toy`: a dictionary sweep on synthetic data with known features."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from sae_circuits.cli.common import (
    add_json_argument,
    add_resampling_arguments,
    console,
    print_json,
)
from sae_circuits.toy import (
    DEFAULT_DECAY_START,
    DEFAULT_L1S,
    DEFAULT_LR,
    DEFAULT_RATIOS,
    DEFAULT_RESAMPLE_DUPLICATES,
    DEFAULT_RESAMPLE_EVERY,
    DEFAULT_RESAMPLE_MIN_FIRES,
    DEFAULT_RESAMPLE_TARGET,
    DEFAULT_STEPS,
    HEATMAPS,
    SweepResult,
    ToyConfig,
    ToyData,
    plot_heatmaps,
    require_matplotlib,
    select,
    sweep,
)
from sae_circuits.training import RECIPES

METHOD_TITLES = {
    "dead": "largest (size, L1) without dead features",
    "ssll": "smallest SSLL",
    "mmcs_larger": "largest MMCS vs larger dictionaries",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "toy",
        help="sweep dictionaries on synthetic data with known features (MMCS, selection methods)",
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
        "--l1", type=float, nargs="+", default=list(DEFAULT_L1S), help="L1 coefficients α"
    )
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS), help="dictionary sizes / G"
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training batches")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help=f"Adam learning rate (default {DEFAULT_LR:g})"
    )
    parser.add_argument(
        "--decay-start",
        type=float,
        default=DEFAULT_DECAY_START,
        help="linear LR decay to 0 from this fraction of the steps "
        f"(default {DEFAULT_DECAY_START:g}; the report: 1, no decay)",
    )
    parser.add_argument(
        "--resample-every",
        type=int,
        default=DEFAULT_RESAMPLE_EVERY,
        help="re-initialise dead latents every N steps, never within the dead window of the end "
        f"(default {DEFAULT_RESAMPLE_EVERY}; 0: never, as in the report)",
    )
    add_resampling_arguments(
        parser,
        duplicates=DEFAULT_RESAMPLE_DUPLICATES,
        min_fires=DEFAULT_RESAMPLE_MIN_FIRES,
        target=DEFAULT_RESAMPLE_TARGET,
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the matrices are small, extra threads help little)",
    )
    parser.add_argument(
        "--dead-window", type=int, default=500, help="T: dead if silent for T batches"
    )
    parser.add_argument(
        "--recipe", choices=RECIPES, default="report", help="loss and initialisation"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="write heatmap PNGs and results.json here"
    )
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        require_matplotlib()  # fail before training, not after
    torch.set_num_threads(args.threads)
    data = ToyData(ToyConfig(h=args.h, g=args.g, n_active=args.n_active, seed=args.seed))
    result = sweep(
        data,
        l1s=args.l1,
        ratios=args.ratios,
        steps=args.steps,
        batch_size=args.batch_size,
        dead_window=args.dead_window,
        recipe=args.recipe,
        lr=args.lr,
        decay_start=args.decay_start,
        resample_every=args.resample_every or None,
        resample_duplicates=args.resample_duplicates,
        resample_min_fires=args.resample_min_fires,
        resample_target=args.resample_target,
        seed=args.seed,
    )
    selected = select(result)
    for name, title in HEATMAPS.items():
        console.print(_matrix_table(result, name, title))
    console.print(_selection_table(selected))
    console.print(
        f"{len(result.dictionaries)} dictionaries, {result.steps} steps: {result.seconds:.0f} s"
    )
    document = {"grid": result.rows(), "selected": selected}
    if args.out is not None:
        paths = plot_heatmaps(result, args.out)
        (args.out / "results.json").write_text(
            json.dumps({**document, "steps": result.steps, "seconds": result.seconds}, indent=2)
            + "\n"
        )
        console.print(f"wrote {', '.join(str(p) for p in paths)} and {args.out / 'results.json'}")
    if args.json:
        print_json(document)
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
