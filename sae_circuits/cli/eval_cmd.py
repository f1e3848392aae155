"""`sae-circuits eval`: reconstruction, sparsity and downstream metrics of a dictionary."""

from __future__ import annotations

import argparse
import math

from sae_circuits.cli.common import (
    add_json_argument,
    add_model_argument,
    console,
    load_dictionary_argument,
    print_json,
)
from sae_circuits.cli.tables import metrics_table
from sae_circuits.errors import UserInputError
from sae_circuits.evaluation import METRIC_KEYS, evaluate
from sae_circuits.models import is_embedded, load_model
from sae_circuits.text import default_documents, read_documents, token_batches


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a dictionary spliced into a model",
        description=(
            "Splice a dictionary into the model and measure MSE, L1, L0, fraction of features "
            "alive, fraction of variance explained, cosine similarity, loss recovered "
            "((CE_zero - CE_spliced) / (CE_zero - CE_clean)), KL(clean || spliced) and CE "
            "increase on held-out text."
        ),
    )
    add_model_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dictionary", help="dictionary folder (ours or a published format)")
    source.add_argument(
        "--dictionaries", metavar="SET", help="a dictionary set shipped for the embedded model"
    )
    parser.add_argument(
        "--site",
        help="site to splice at; required with --dictionaries, overrides the dictionary's own "
        "site otherwise (e.g. for foreign files)",
    )
    parser.add_argument(
        "--text",
        help=".txt or .jsonl file to evaluate on (default: the embedded model's held-out text, or "
        "a built-in sample of English and code for other models)",
    )
    parser.add_argument(
        "--tokens", type=int, default=16384, help="number of tokens (default 16384)"
    )
    parser.add_argument("--ctx-len", type=int, default=128, help="context length (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="contexts per batch")
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.tokens < args.ctx_len:
        raise UserInputError("--tokens must be at least --ctx-len")
    site, dictionary = load_dictionary_argument(args)
    model = load_model(args.model, device=args.device)
    documents = read_documents(args.text) if args.text else default_documents(is_embedded(model))
    batches = token_batches(model.tokenizer, documents, args.ctx_len, args.batch_size, args.tokens)
    total = math.ceil(args.tokens / (args.ctx_len * args.batch_size))
    metrics = evaluate(model, {site: dictionary}, batches, total_batches=total)[site]
    if args.json:
        print_json({key: metrics[key] for key in METRIC_KEYS})
    else:
        console.print(metrics_table({site: metrics}))
    return 0
