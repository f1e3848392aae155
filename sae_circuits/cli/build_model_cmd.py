"""`sae-circuits build-model`: rebuild the embedded model end to end and print its quality metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from sae_circuits.cli.common import add_json_argument, print_json, print_result, wrote
from sae_circuits.errors import UserInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-model",
        description=(
            "Generate the corpus from the seed, train the byte-level BPE tokenizer and the "
            "GPT-NeoX model, evaluate IOI / subject-verb agreement on held-out sentence shapes "
            "(also per shape) and write the model folder with its model card (about 50 minutes "
            "of CPU time; 78 minutes wall on 2 cores shared with other jobs). An interrupted "
            "build resumes from the checkpoint.pt that it "
            "keeps in the output folder when started again with the same settings."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: the shipped embedded model folder, which is overwritten)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole build (default: 0)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the shipped recipe's)"
    )
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sae_circuits.embedded.build import build_model
    from sae_circuits.embedded.evaluate import QUALITY_BAR
    from sae_circuits.models import EMBEDDED_MODEL_NAME, embedded_model_path

    if args.seed < 0:
        raise UserInputError(f"--seed must be >= 0, got {args.seed}")
    if args.steps is not None and args.steps < 1:
        raise UserInputError(f"--steps must be >= 1, got {args.steps}")
    out = args.out if args.out is not None else embedded_model_path()
    overrides = {} if args.steps is None else {"steps": args.steps}
    record = build_model(out, seed=args.seed, **overrides)
    result = {
        "model": EMBEDDED_MODEL_NAME if args.out is None else str(out),
        "out": str(out),
        **record,
    }
    wrote(out)
    if args.json:
        print_json(result)
        return 0
    metrics, passed = record["metrics"], record["quality_bar_passed"]
    table = Table(title=f"{out} (seed {args.seed})")
    for column in ("metric", "value", "target", "passed"):
        table.add_column(column)
    for key, (op, threshold) in QUALITY_BAR.items():
        ok = "[green]yes" if passed[key] else "[red]no"
        table.add_row(key, f"{metrics[key]:.4f}", f"{op} {threshold}", ok)
    table.add_row("text_loss (held-out text files)", f"{metrics['text_loss']:.4f}", "", "")
    print_result(table)
    shapes = Table(title="held-out shapes")
    for column in ("task", "shape", "accuracy", "logit diff", "ABC mean |diff|", "n"):
        shapes.add_column(column)
    for row in record["shapes"]:
        abc = row.get("abc_abs_logit_diff")
        shapes.add_row(
            row["task"],
            row["shape"],
            f"{row['accuracy']:.3f}",
            f"{row['logit_diff']:.3f}",
            "" if abc is None else f"{abc:.3f}",
            str(row["n"]),
        )
    print_result(shapes)
    print_result(
        f"corpus sha256 {record['corpus']['sha256']}  size {record['size_mb']} MB  "
        f"time {record['times_s']['total_s']:.0f} s"
    )
    return 0
