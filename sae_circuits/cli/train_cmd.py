"""`sae-circuits train`: harvest activations through nnsight traces and train dictionaries."""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

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
from sae_circuits.options import field_help, option_values
from sae_circuits.sites import Site
from sae_circuits.train_spec import TrainSpec

# The defaults of `train`, where they differ from TrainSpec's: a shorter warm-up and dead window.
TRAIN_DEFAULTS = TrainSpec(key="", warmup_steps=200, dead_window=500)
# TrainSpec fields set by options of their own name (d_dict and l1 span the grid: --dict-size, --l1)
SPEC_OPTIONS = (
    "kind",
    "loss",
    "sparsity",
    "k",
    "aux_k",
    "aux_coefficient",
    "downstream_coefficient",
    "error_swap",
    "skip",
    "init",
    "lr",
    "warmup_steps",
    "decay_start",
    "resample_every",
    "dead_window",
    "resample_duplicates",
    "resample_min_fires",
    "resample_target",
    "noise_std",
    "normalize",
    "seed",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        description=(
            "Harvest activations at one or more sites with nnsight traces into a shuffled "
            "buffer and train a grid of dictionaries (every --site x --dict-size x --l1) in one "
            "pass. Each dictionary is evaluated on held-out text and saved with its config and "
            "metrics: in OUT/<site>/ when there is one dictionary per site, otherwise in "
            "OUT/<site>/<kind>_<size>_l1-<l1>/ (top-k: _k-<k>). An interrupted run resumes from "
            "OUT/.checkpoint, removed once the run succeeds. A warm-up that would not end within "
            "the run is clipped to a tenth of it, with a warning. "
            "With --loss kl or e2e-ds the dictionaries train through the spliced model on "
            "token contexts (about --batch-size tokens per step) instead of shuffled activations. "
            "--from-shards trains on activations written by `harvest` instead of running the "
            "model. Launched by torchrun (torchrun --nproc-per-node N --no-python sae-circuits "
            "train ...), the N processes train data-parallel: each harvests its share of every "
            "batch of --batch-size activations, and rank 0 alone evaluates and writes (see "
            "docs/scaling.md)."
        ),
    )
    add_model_argument(parser)
    parser.add_argument(
        "--site",
        action="append",
        help="site (repeatable; required, except with --from-shards: then every harvested site)",
    )
    parser.add_argument(
        "--target-site",
        action="append",
        help="--kind transcoder: the site each --site's transcoder reconstructs, in the same "
        "order (e.g. --site mlp_in.1 --target-site mlp.1)",
    )
    parser.add_argument(
        "--dict-size",
        type=int,
        action="append",
        help=f"{field_help(TrainSpec, 'd_dict')} (repeatable; default {TRAIN_DEFAULTS.d_dict})",
    )
    parser.add_argument(
        "--l1",
        type=float,
        action="append",
        help=f"{field_help(TrainSpec, 'l1')} (repeatable; default {TRAIN_DEFAULTS.l1:g})",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        help="training activations (default 2000000; with --from-shards: all harvested)",
    )
    parser.add_argument(
        "--from-shards",
        metavar="DIR",
        help="train on the activations `sae-circuits harvest` wrote to DIR (from this --model)",
    )
    parser.add_argument(
        "--distribute-sites",
        action="store_true",
        help="under torchrun: each process trains a share of the dictionaries (balanced by "
        "size) on the activations all processes harvest, instead of every process holding "
        "every dictionary",
    )
    add_training_data_options(parser)
    parser.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep OUT/.checkpoint after a successful run (default: removed)",
    )
    parser.add_argument(
        "--fp16", action="store_true", help="store weights in float16 (loading gives float32)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    add_json_argument(parser)
    add_spec_options(
        parser,
        TRAIN_DEFAULTS,
        SPEC_OPTIONS,
        {"sparsity": {"choices": ("l1", "entropy", "l0")}},  # topk goes with --k
        {"seed": "also of the text order and the buffer's shuffling"},
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sae_circuits.distributed import process_group

    with process_group(args.device):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    import torch

    from sae_circuits.buffer import read_shard_index
    from sae_circuits.distributed import is_writer
    from sae_circuits.evaluation import METRIC_KEYS
    from sae_circuits.models import AUTOCAST_DTYPES, is_embedded
    from sae_circuits.pipeline import train_and_evaluate
    from sae_circuits.text import default_documents, read_documents, training_documents

    shards = read_shard_index(args.from_shards) if args.from_shards else None
    if not args.site and shards is None:
        raise UserInputError("give --site (or --from-shards)")
    sites = [Site.parse(site) for site in args.site or shards["sites"]]
    if len(set(sites)) != len(sites):
        raise UserInputError("a site is given twice")
    targets = _target_sites(args, sites)
    if args.tokens is None:
        args.tokens = shards["rows"] if shards is not None else 2_000_000
    if args.tokens < args.batch_size:
        raise UserInputError("--tokens must be at least --batch-size")
    if not args.resample_every and (
        args.resample_duplicates is not None
        or args.resample_min_fires
        or args.resample_target != TRAIN_DEFAULTS.resample_target
    ):
        raise UserInputError(
            "--resample-duplicates, --resample-min-fires and --resample-target act at each "
            "resampling: give --resample-every too"
        )
    options = option_values(args, SPEC_OPTIONS)
    sizes = args.dict_size or [_init_size(args.init) or TRAIN_DEFAULTS.d_dict]
    specs = [
        replace(
            TRAIN_DEFAULTS,
            key=str(site),
            target_key=str(targets[site]) if targets else None,
            d_dict=size,
            l1=l1,
            **options,
        )
        for site, size, l1 in itertools.product(sites, sizes, args.l1 or [TRAIN_DEFAULTS.l1])
    ]
    model = model_from_args(args)
    for site in [*sites, *targets.values()]:
        site.resolve(model)
    embedded = is_embedded(model)
    saved = train_and_evaluate(
        model,
        specs,
        args.tokens,
        Path(args.out),
        read_documents(args.text) if args.text else training_documents(embedded, args.seed),
        default_documents(embedded),
        batch_size=args.batch_size,
        ctx_len=args.ctx_len,
        n_ctxs=args.n_ctxs,
        eval_tokens=args.eval_tokens,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        storage_dtype=torch.float16 if args.fp16 else None,
        keep_checkpoint=args.keep_checkpoint,
        shards=Path(args.from_shards) if args.from_shards else None,
        autocast=AUTOCAST_DTYPES.get(args.dtype),
        distribute_sites=args.distribute_sites,
    )
    if not is_writer():
        return 0
    rows = [
        {
            "path": str(folder),
            "site": dictionary.config.site,
            "kind": dictionary.kind,
            "dict_size": dictionary.d_dict,
            "l1": dictionary.config.hyperparameters["l1"],
            **{_train_key(key): dictionary.config.metrics[key] for key in METRIC_KEYS},
        }
        for folder, dictionary in saved
    ]
    if args.json:
        print_json(rows)
    else:
        print_result(results_table(rows))
    wrote(*(folder for folder, _ in saved))
    return 0


def _target_sites(args: argparse.Namespace, sites: list[Site]) -> dict[Site, Site]:
    """The site each transcoder reconstructs, by the site it reads (empty for other kinds)."""
    if args.kind != "transcoder":
        if args.target_site:
            raise UserInputError("--target-site is for --kind transcoder")
        return {}
    if not args.target_site or len(args.target_site) != len(sites):
        raise UserInputError("--kind transcoder needs one --target-site per --site")
    return dict(zip(sites, (Site.parse(t) for t in args.target_site), strict=True))


def _init_size(folder: str | None) -> int | None:
    """The dictionary size of the --init dictionary (the default --dict-size then)."""
    from sae_circuits.dictionary import Dictionary

    return None if folder is None else Dictionary.load(folder).d_dict


def _train_key(metric: str) -> str:
    """`l1` names the coefficient in train output; the mean L1 norm of the features is `l1_norm`."""
    return "l1_norm" if metric == "l1" else metric


def results_table(rows: list[dict[str, Any]]) -> Table:
    from sae_circuits.evaluation import METRIC_KEYS

    columns = ("site", "dict_size", "l1", *(_train_key(k) for k in METRIC_KEYS), "path")
    table = Table(title="trained dictionaries")
    for column in columns:
        table.add_column(column, justify="left" if column in ("site", "path") else "right")
    for row in rows:
        table.add_row(
            *(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns)
        )
    return table
