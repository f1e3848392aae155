"""`sae-circuits explain` and `sae-circuits score`: automatic interpretation of a site's units.

`explain` writes an explanation of each unit (a dictionary feature, a neuron or a principal
direction) from its top-activating contexts; `score` scores explanations (explaining first where
none is cached) by simulation, detection and fuzzing and reports the mean of each score per basis
with a 95% confidence interval. Both work offline with the built-in rule-based explainer and
simulator, or through any OpenAI-compatible chat-completions endpoint (`--llm-url`).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from rich.table import Table

from sae_circuits.autointerp_settings import BASES, Settings
from sae_circuits.cli.common import (
    add_dictionary_source,
    add_json_argument,
    add_model_argument,
    add_text_options,
    load_dictionary_argument,
    model_from_args,
    print_json,
    print_result,
    text_batches,
    wrote,
)
from sae_circuits.errors import UserInputError
from sae_circuits.nodes import Node
from sae_circuits.sites import Site


def register(subparsers: argparse._SubParsersAction) -> None:
    explain = subparsers.add_parser(
        "explain",
        description=(
            "SITE/FEATURE (e.g. resid.2/359), or SITE with --features N (N random units that fire, "
            "seeded): an explanation of each unit written from its top-activating contexts with "
            "per-token activations. Offline by default (a rule-based summary of the tokens that "
            "drive the unit); --llm-url/--llm-model ask any OpenAI-compatible chat endpoint. "
            "--basis compares dictionary features with the site's neurons and PCA directions."
        ),
    )
    _add_arguments(explain)
    explain.set_defaults(run=run_explain)
    score = subparsers.add_parser(
        "score",
        description=(
            "Score the explanations of SITE/FEATURE or of N random units (--features N), explaining "
            "first where --out holds none: simulation (Pearson correlation of simulated and true "
            "activations over held-out top and random contexts), detection and fuzzing (balanced "
            "accuracy). Prints each unit and the mean with a 95%% confidence interval per basis. "
            "The simulator is offline unless --llm-url is given (or --simulator says otherwise)."
        ),
    )
    _add_arguments(score)
    score.add_argument(
        "--simulator",
        choices=("offline", "llm"),
        help="who simulates and classifies (default: llm with --llm-url, else offline)",
    )
    score.set_defaults(run=run_score)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="SITE[/FEATURE]", help="e.g. resid.2/359 or resid.2")
    parser.add_argument(
        "--features", type=int, metavar="N", help="explain N random units of SITE that fire"
    )
    parser.add_argument(
        "--basis",
        nargs="+",
        choices=BASES,
        default=["sae"],
        help="sae (the dictionary's features), neurons, pca; several compare (default: sae)",
    )
    add_model_argument(parser)
    add_dictionary_source(parser)
    add_text_options(parser, ctx_len=32, batch_size=32, ctx_note=", as delphi")
    parser.add_argument(
        "--top-contexts",
        type=int,
        default=Settings.n_top,
        help="top contexts per unit, half to explain, half held out to score (default %(default)s)",
    )
    parser.add_argument(
        "--random-contexts",
        type=int,
        default=Settings.n_random,
        help="random contexts per unit (default %(default)s)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=Settings.threshold,
        help="a token is active above this share of the unit's maximum (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="cache folder: one JSON per unit, DIR/<basis>/<site>/<unit>.json; a rerun resumes",
    )
    llm = parser.add_argument_group("LLM endpoint (OpenAI-compatible chat completions)")
    llm.add_argument("--llm-url", help="e.g. http://localhost:8000/v1 (vLLM), :11434/v1 (Ollama)")
    llm.add_argument("--llm-model", help="model name the endpoint serves")
    llm.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key, if any (default OPENAI_API_KEY)",
    )
    llm.add_argument("--stream", action="store_true", help="read replies as event streams")
    llm.add_argument("--timeout", type=float, default=60.0, help="seconds per request (60)")
    llm.add_argument("--retries", type=int, default=4, help="retries on 429/5xx/timeouts (4)")
    llm.add_argument(
        "--explainer",
        choices=("offline", "llm"),
        help="who explains (default: llm with --llm-url, else offline)",
    )
    add_json_argument(parser)


def run_explain(args: argparse.Namespace) -> int:
    results = _run(args, scoring=False)
    if args.json:
        print_json(_document(args, results))
    else:
        print_result(_units_table(results, scored=False))
    return 0


def run_score(args: argparse.Namespace) -> int:
    from sae_circuits.autointerp import summarize

    results = _run(args, scoring=True)
    summary = summarize(results)
    if args.json:
        print_json({**_document(args, results), "summary": summary})
    else:
        print_result(_units_table(results, scored=True))
        print_result(_summary_table(summary))
    return 0


def _run(args: argparse.Namespace, scoring: bool) -> list[dict[str, Any]]:
    """Explain (and with `scoring`, score) the units `args` name; a `wrote` line per cache file."""
    from sae_circuits.autointerp import ResultCache, build_basis, interpret, sample_units

    site, feature = _target(args.target)
    if (feature is None) == (args.features is None):
        raise UserInputError("name one feature (e.g. resid.2/359) or pass SITE with --features N")
    if args.features is not None and args.features < 1:
        raise UserInputError("--features must be >= 1")
    if args.tokens < args.ctx_len:
        raise UserInputError("--tokens must be at least --ctx-len")
    if not 0 < args.threshold < 1:
        raise UserInputError("--threshold must be between 0 and 1")
    settings = Settings(
        args.top_contexts, args.random_contexts, args.threshold, args.seed, args.batch_size
    )
    explainer, judge = _explainer_and_judge(args, scoring)
    args.site = site
    if not args.dictionary and not args.dictionaries:
        args.dictionaries = "main"
    site, dictionary = load_dictionary_argument(args)
    model = model_from_args(args)
    batches = list(text_batches(args, model))
    if not batches:
        raise UserInputError("the text gave no context of --ctx-len tokens")
    bases = {
        name: build_basis(name, model, site, dictionary, batches, seed=args.seed)
        for name in dict.fromkeys(args.basis)
    }
    for name, basis in bases.items():
        if feature is not None and feature >= basis.d_dict:
            raise UserInputError(
                f"unit {feature} is out of range: the {name} basis at {site} has units "
                f"0..{basis.d_dict - 1}"
            )
    cache = ResultCache(args.out)
    results = []
    for name, basis in bases.items():
        units = (
            [feature]
            if feature is not None
            else sample_units(model, site, basis, batches, args.features, args.seed)
        )
        results += interpret(
            model, site, name, basis, batches, units, explainer, judge, cache, settings
        )
        if args.out:
            wrote(*(cache.path(name, site, unit) for unit in units))
    return results


def _target(text: str) -> tuple[Site, int | None]:
    if "/" not in text:
        return Site.parse(text), None
    node = Node.parse(text)
    if node.feature is None:
        raise UserInputError(f"{text}: name a unit index, e.g. resid.2/359")
    return node.site, node.feature


def _explainer_and_judge(args: argparse.Namespace, scoring: bool) -> tuple[Any, Any]:
    from sae_circuits.autointerp import (
        ChatClient,
        LLMExplainer,
        LLMJudge,
        OfflineExplainer,
        OfflineSimulator,
    )

    default = "llm" if args.llm_url else "offline"
    who_explains = args.explainer or default
    who_scores = (getattr(args, "simulator", None) or default) if scoring else None
    client = None
    if "llm" in (who_explains, who_scores):
        if not args.llm_url or not args.llm_model:
            raise UserInputError("an LLM explainer or simulator needs --llm-url and --llm-model")
        client = ChatClient.from_environment(
            args.llm_url,
            args.llm_model,
            args.api_key_env,
            timeout=args.timeout,
            retries=args.retries,
            stream=args.stream,
        )
    explainer = (
        LLMExplainer(client, args.threshold)
        if who_explains == "llm"
        else OfflineExplainer(args.threshold)
    )
    judge = None
    if who_scores == "llm":
        judge = LLMJudge(client)
    elif who_scores == "offline":
        judge = OfflineSimulator(args.threshold)
    return explainer, judge


def _document(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"target": args.target, "bases": list(dict.fromkeys(args.basis)), "units": results}


def _units_table(results: list[dict[str, Any]], scored: bool) -> Table:
    from sae_circuits.autointerp import SCORES

    table = Table(title="explanations" + (" and scores" if scored else ""))
    table.add_column("unit")
    table.add_column("basis")
    table.add_column("explanation", overflow="fold")
    if scored:
        for name in SCORES:
            table.add_column(name, justify="right")
    for result in results:
        text = result.get("explanation") or f"[red]{result.get('error', 'no explanation')}"
        scores = result.get("scores") or {}
        cells = [_number(scores.get(name)) for name in SCORES] if scored else []
        table.add_row(result["unit"], result["basis"], text, *cells)
    return table


def _summary_table(summary: dict[str, dict[str, dict[str, Any]]]) -> Table:
    from sae_circuits.autointerp import SCORES

    table = Table(title="mean score ± 95% confidence interval (n units)")
    table.add_column("basis")
    for name in SCORES:
        table.add_column(name, justify="right")
    for basis, scores in summary.items():
        cells = []
        for name in SCORES:
            entry = scores[name]
            if entry["mean"] is None:
                cells.append("-")
            else:
                ci = "" if entry["ci95"] is None else f" ± {entry['ci95']:.3f}"
                cells.append(f"{entry['mean']:.3f}{ci} ({entry['n']})")
        table.add_row(basis, *cells)
    return table


def _number(value: float | None) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    )
