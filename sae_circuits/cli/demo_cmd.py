"""`sae-circuits demo`: the whole toolkit in about a minute, on the embedded model and its dictionaries."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_circuits.cli.common import (
    add_json_argument,
    json_text,
    print_heading,
    print_json,
    print_result,
    wrote,
)
from sae_circuits.nodes import METRIC, Node
from sae_circuits.sites import Site, num_layers

if TYPE_CHECKING:
    from sae_circuits.circuits import Circuit

QUALITY_SITES = (Site.parse("resid.1"), Site.parse("mlp.1"))
PATCH_SITE = Site.parse("resid.2")
DEMO_BASELINES = ("pca_corpus", "neurons")  # the paper's two baselines


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        description=(
            "On the embedded model and its shipped dictionaries: IOI performance, the quality of "
            f"two dictionaries ({', '.join(map(str, QUALITY_SITES))}), an IOI feature-patching "
            f"curve at {PATCH_SITE} against PCA and neurons, the IOI circuit over the residual "
            "stream (faithfulness and verification of its edges), and one inspected feature. Writes "
            "JSON, PNG and graph files to --out, and two pages that open offline in a browser: "
            "circuit.html (click a node for its contexts and logit effects) and feature.html."
        ),
    )
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--prompts", type=int, default=24, help="IOI prompts per split")
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # with --json, stdout holds only the JSON document: the tour is shown on stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = _tour(args)
    if args.json:
        print_json(result)
    return 0


def _tour(args: argparse.Namespace) -> dict[str, Any]:
    """Run and show the tour's five steps; the `demo.json` document."""
    from sae_circuits.circuits import task_circuit
    from sae_circuits.cli.tables import circuit_table, metrics_table, restore_table
    from sae_circuits.dictionary import load_dictionaries
    from sae_circuits.evaluation import METRIC_KEYS, evaluate
    from sae_circuits.interventions import run as run_task
    from sae_circuits.models import load_model
    from sae_circuits.patching_curves import compare_bases
    from sae_circuits.plotting import patching_curves
    from sae_circuits.splice import attach, detach
    from sae_circuits.tasks import load_task
    from sae_circuits.text import default_documents, token_batches
    from sae_circuits.views import circuit_view, feature_view, node_reports, write_page

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = load_model()
    result: dict[str, Any] = {}

    print_heading("1. IOI on the embedded model")
    train = load_task("ioi", model, "abc", args.prompts, 0, "train")
    test = load_task("ioi", model, "abc", args.prompts, 0, "heldout")
    clean = run_task(model, test).metric
    corrupt = run_task(model, test, corrupted=True).metric
    result["ioi"] = {
        "prompts": len(test),
        "clean_metric": clean.mean().item(),
        "corrupt_metric": corrupt.mean().item(),
        "accuracy": (clean > 0).float().mean().item(),
    }
    print_result(
        f"held-out templates, {len(test)} prompts: logit(IO) - logit(S) = "
        f"{result['ioi']['clean_metric']:.2f} (IO wins {result['ioi']['accuracy']:.0%}); "
        f"ABC-corrupted: {result['ioi']['corrupt_metric']:.2f}"
    )

    print_heading("2. Dictionary quality (set main)")
    quality_dicts = load_dictionaries("main", sites=list(QUALITY_SITES))
    batches = list(token_batches(model.tokenizer, default_documents(True), 128, 16, 4096))
    quality = evaluate(model, quality_dicts, batches)
    result["quality"] = {site: {k: m[k] for k in METRIC_KEYS} for site, m in quality.items()}
    print_result(metrics_table(quality))

    print_heading(f"3. IOI feature patching at {PATCH_SITE}: SAE vs PCA vs neurons")
    patch_dict = load_dictionaries("main", sites=[PATCH_SITE])[PATCH_SITE]
    curves = {
        PATCH_SITE: compare_bases(
            model, train, test, PATCH_SITE, patch_dict, 20, baselines=DEMO_BASELINES
        )
    }
    result["patching"] = {name: c.restored for name, c in curves[PATCH_SITE].items()}
    print_result(restore_table(curves, 20))
    files = [_write_json(out / "patching.json", result["patching"])]
    files.append(patching_curves(curves, out / "patching.png"))

    print_heading("4. The IOI circuit over the residual stream")
    residual = [Site("resid", layer) for layer in range(num_layers(model))]
    circuit_dicts = load_dictionaries("main", sites=residual)
    attach(model, circuit_dicts)
    try:
        circuit = task_circuit(model, test, max_nodes=40, sizes=(5, 10, 20, 40))
        print_result(circuit_table(circuit))
        files += circuit.save(out, "circuit_ioi")
    finally:
        detach(model)
    result["circuit"] = circuit.summary()
    # Short contexts for the panels: the 17 tokens shown around each top activation fit, and the
    # ablations behind the logit effects run on 32 tokens, not 128.
    panel_batches = token_batches(model.tokenizer, default_documents(True), 32, 16, 4096)
    reports = node_reports(model, circuit, circuit_dicts, panel_batches, top_k=8)
    files.append(write_page(circuit_view(circuit, reports, "IOI circuit"), out / "circuit.html"))

    print_heading("5. One feature of the circuit, inspected")
    report = reports[_top_feature(circuit).id]
    print_result(report)
    result["feature"] = report.to_json()
    files.append(report.save_png(out / "feature.png"))
    files.append(write_page(feature_view(report), out / "feature.html"))

    result["seconds"] = time.perf_counter() - start
    files.append(out / "demo.json")
    result["files"] = [str(f) for f in files]
    _write_json(out / "demo.json", result)
    print_heading(f"done in {result['seconds']:.0f} s")
    wrote(*files)
    return result


def _top_feature(circuit: Circuit) -> Node:
    """The feature node (not an error node) with the largest |effect|."""
    features = [n for n in circuit.graph.nodes if n != METRIC and not Node.parse(n).is_error]
    ranked = sorted(
        features,
        key=lambda n: -abs(circuit.graph.nodes[n].get("effect", 0.0)),
    )
    return Node.parse(ranked[0])


def _write_json(path: Path, obj: Any) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_text(obj))
    tmp.replace(path)
    return path
