"""`sae-circuits export`: write a dictionary in another library's format (SAELens, sparsify)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sae_circuits.cli.common import add_json_argument, print_json, print_result, wrote
from sae_circuits.formats import WRITER_MODULES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        description=(
            "Write the dictionary in DIR (our format or any format `Dictionary.load` reads) as "
            "another library's files: --to saelens writes OUT/cfg.json + sae_weights.safetensors "
            "for sae_lens.SAE.load_from_disk; --to sparsify writes OUT/<hookpoint>/cfg.json + "
            "sae.safetensors for sparsify.SparseCoder.load_from_disk (the hookpoint is the module "
            "path of the dictionary's site, from its model's architecture). Both compute our "
            "features and reconstructions; a dictionary the format cannot represent exactly is "
            "refused, naming what it lacks."
        ),
        help="write a dictionary in SAELens or sparsify format",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="the dictionary folder")
    parser.add_argument(
        "--to", required=True, choices=sorted(WRITER_MODULES), help="the format to write"
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="the folder to write")
    parser.add_argument(
        "--site",
        help="the site the dictionary is spliced at, where DIR's files name none we know "
        "(e.g. resid.2)",
    )
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sae_circuits.dictionary import Dictionary

    dictionary = Dictionary.load(args.directory, site=args.site)
    folder = dictionary.save(args.out, format=args.to)
    files = sorted(str(path) for path in folder.iterdir() if path.is_file())
    config = dictionary.config
    result: dict[str, Any] = {
        "source": str(args.directory),
        "format": args.to,
        "kind": dictionary.kind,
        "in_site": config.in_site,
        "out_site": config.out_site,
        "path": str(folder),
        "files": files,
    }
    if args.json:
        print_json(result)
    else:
        sites = (
            str(config.out_site)
            if config.in_site == config.out_site
            else f"{config.in_site} -> {config.out_site}"
        )
        print_result(f"{dictionary.kind} dictionary at {sites} written as {args.to} to {folder}")
        wrote(*files)
    return 0
