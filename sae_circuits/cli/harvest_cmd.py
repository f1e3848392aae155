"""`sae-circuits harvest`: activations at some sites, once, into shards that `train --from-shards`
reads (a sweep then trains many grids without running the model again)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from sae_circuits.cli.common import (
    add_json_argument,
    add_model_argument,
    add_remote_argument,
    model_from_args,
    note,
    print_json,
    print_result,
    wrote,
)
from sae_circuits.errors import UserInputError
from sae_circuits.sites import Site


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "harvest",
        description=(
            "Run the model over training text and write the activations at every --site to OUT "
            "as safetensors shards (shards.json indexes them), in the text order of `train` "
            "(the same --text, --ctx-len and --seed). `train --from-shards OUT` then trains "
            "dictionaries on them without running the model. An interrupted harvest continues "
            "where it stopped when run again with the same options; a finished one is extended "
            "by a larger --tokens. Positions: real tokens only, without each context's first "
            "(BOS) position."
        ),
    )
    add_model_argument(parser)
    parser.add_argument("--site", action="append", required=True, help="site (repeatable)")
    parser.add_argument("--tokens", type=int, required=True, help="activations to harvest per site")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument(
        "--shard-size", type=int, default=65536, help="activations per shard (default 65536)"
    )
    parser.add_argument("--text", help=".txt/.jsonl training text (default: the model's corpus)")
    parser.add_argument("--ctx-len", type=int, default=128, help="tokens per context (default 128)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="contexts per forward pass (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="where the corpus starts (default 0)")
    add_remote_argument(parser)
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sae_circuits.buffer import write_shards
    from sae_circuits.distributed import launched
    from sae_circuits.models import is_embedded
    from sae_circuits.pipeline import model_fingerprint
    from sae_circuits.text import read_documents, token_batches, training_documents

    if launched() and int(os.environ["WORLD_SIZE"]) > 1:
        raise UserInputError("harvest runs in one process (torchrun is for train)")
    sites = sorted(Site.parse(site) for site in args.site)
    if len(set(sites)) != len(sites):
        raise UserInputError("a site is given twice")
    if min(args.tokens, args.shard_size, args.ctx_len, args.batch_size) < 1:
        raise UserInputError("--tokens, --shard-size, --ctx-len and --batch-size must be >= 1")
    model = model_from_args(args)
    for site in sites:
        site.resolve(model)
    documents = (
        read_documents(args.text)
        if args.text
        else training_documents(is_embedded(model), args.seed)
    )
    contexts = token_batches(model.tokenizer, documents, args.ctx_len, args.batch_size)
    source = {
        "model": model_fingerprint(model),
        "text": str(Path(args.text).resolve()) if args.text else None,
        "ctx_len": args.ctx_len,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    out = write_shards(
        model,
        sites,
        contexts,
        args.out,
        args.tokens,
        args.shard_size,
        source=source,
        remote=args.remote,
    )
    return _report(args, out)


def _report(args: argparse.Namespace, out: Path) -> int:
    from rich.table import Table

    from sae_circuits.buffer import read_shard_index

    index = read_shard_index(out)
    result: dict[str, Any] = {
        "out": str(out),
        "sites": index["sites"],
        "rows": index["rows"],
        "shards": len(index["shards"]),
    }
    if index["rows"] < args.tokens:
        note(f"the text ran out after {index['rows']} of {args.tokens} activations")
    wrote(*(out / name for name in index["shards"]), out / "shards.json")
    if args.json:
        print_json(result)
        return 0
    table = Table(title="harvested activations")
    for column in result:
        table.add_column(column)
    table.add_row(*(", ".join(v) if isinstance(v, list) else str(v) for v in result.values()))
    print_result(table)
    return 0
