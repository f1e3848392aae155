"""Exact patching vs. attribution patching for the same IOI circuit on the embedded model.

Builds the IOI graph (the resid sites by default) twice — `method="attribution"` (gradients)
and `method="ablation"` (one patched forward per candidate node, batched) — without verification
or faithfulness, and prints the wall-time ratio (ablation / attribution) and the Spearman rank
correlation of the two methods' weights on the edges both graphs keep.

    python benchmarks/bench_circuits.py [--dictionaries main] [--prompts 32] [--max-nodes 100]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sae_circuits import attach, load_model
from sae_circuits.circuits import METRIC, sign_agreement, spearman, task_circuit
from sae_circuits.cli.circuit_cmd import circuit_dictionaries
from sae_circuits.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--dictionaries", default="main", help="set name or folder")
    parser.add_argument("--sites", nargs="+", help="default: the resid sites")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-nodes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    attach(model, circuit_dictionaries(args.dictionaries, args.sites, "cpu"))
    task = load_task("ioi", model, corruption="abc", n=args.prompts)
    graphs, seconds = {}, {}
    for method in ("attribution", "ablation"):
        start = time.perf_counter()
        circuit = task_circuit(
            model, task, method=method, max_nodes=args.max_nodes, verify=False, sizes=None
        )
        seconds[method] = time.perf_counter() - start
        graphs[method] = circuit
    attribution, ablation = graphs["attribution"].graph, graphs["ablation"].graph
    shared = [(u, v) for u, v in attribution.edges if v != METRIC and ablation.has_edge(u, v)]
    a = [attribution.edges[e]["weight"] for e in shared]
    b = [ablation.edges[e]["weight"] for e in shared]
    result = {
        "prompts": len(task),
        "sites": graphs["attribution"].report["sites"],
        "candidates_exact": graphs["ablation"].report["scored_nodes"],
        "seconds_attribution": round(seconds["attribution"], 2),
        "seconds_ablation": round(seconds["ablation"], 2),
        "ratio_ablation_over_attribution": round(seconds["ablation"] / seconds["attribution"], 1),
        "nodes_shared": len(set(attribution) & set(ablation)) - 1,
        "nodes": [attribution.number_of_nodes() - 1, ablation.number_of_nodes() - 1],
        "edges_shared": len(shared),
        "spearman_shared_edges": spearman(a, b),
        "sign_agreement_shared_edges": sign_agreement(a, b),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
