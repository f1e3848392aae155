"""Metric-rooted circuits for a task (Marks et al., sparse feature circuits).

Nodes are the features and error terms of every spliced site, scored by their effect on the task
metric when patched from the clean into the corrupted run; edges join nodes of consecutive spliced
sites (and the last site to the metric), scored by the change of the downstream node's linearised
effect. `method="attribution"` estimates both with gradients (attribution patching, optionally
integrated gradients for nodes) and re-measures the kept ones exactly; `method="ablation"` measures
every candidate exactly (one patched forward per candidate, batched) and also records the gradient
estimates of what it keeps. With residual-stream sites only, each site is a bottleneck, so edges
between consecutive sites carry every path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import networkx as nx
import torch

from sae_circuits.circuits import patching as P
from sae_circuits.circuits.faithfulness import faithfulness_curve
from sae_circuits.circuits.graph import (
    METRIC,
    Circuit,
    add_edge,
    add_metric_node,
    add_node,
    node_id,
    verification,
)
from sae_circuits.circuits.labels import top_tokens
from sae_circuits.errors import UserInputError
from sae_circuits.sites import Site
from sae_circuits.splice import attached

METHODS = ("attribution", "ablation")
DEFAULT_SIZES = (5, 10, 20, 50, 100, 200)


def task_circuit(
    model: Any,
    task: P.TaskLike,
    sites: Sequence[str] | None = None,
    method: str = "attribution",
    node_threshold: float = 0.0,
    max_nodes: int | None = 100,
    edge_threshold: float = 0.0,
    steps: int = 1,
    verify: bool = True,
    sizes: Sequence[int] | None = DEFAULT_SIZES,
    max_rows: int = 256,
    progress: bool = True,
) -> Circuit:
    """The circuit of `task` over the dictionaries spliced into `model` at `sites` (default: all).

    Nodes with |effect| >= `node_threshold` are kept, at most `max_nodes` of them (largest |effect|
    first); edges between kept nodes with |weight| >= `edge_threshold`. `steps > 1` uses integrated
    gradients for node attribution. `verify` measures the kept nodes and edges both ways (exact and
    gradient). `sizes`: circuit sizes (top-n nodes by |effect|) of the faithfulness curve; None
    skips it. Effects are in units of the task metric (mean over prompts).
    """
    if method not in METHODS:
        raise UserInputError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if steps < 1:
        raise UserInputError("steps must be at least 1")
    sites = _sites(model, sites)
    inputs = P.task_inputs(model, task)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    clean = P.run(model, inputs.clean, inputs.metric, sites)
    corrupt = P.run(model, inputs.corrupt, inputs.metric, sites)
    grads = P.gradients(model, inputs, sites)
    node_grads = (
        grads if steps == 1 else P.integrated_gradients(model, inputs, sites, clean, corrupt, steps)
    )
    attribution = {s: P.node_attribution(node_grads, clean, corrupt, s) for s in sites}
    timings["attribution_nodes_s"] = time.perf_counter() - start

    exact_nodes: dict[P.Node, float] = {}
    exact_down: dict[P.Node, torch.Tensor | None] = {}
    if method == "ablation":
        start = time.perf_counter()
        candidates = _candidates(clean, corrupt, sites)
        result = P.exact_patching(
            model, inputs, sites, clean, corrupt, grads, candidates, max_rows, progress
        )
        exact_nodes = {c: float(v) for c, v in zip(candidates, result.metric, strict=True)}
        exact_down = dict(zip(candidates, result.downstream, strict=True))
        timings["exact_nodes_and_edges_s"] = time.perf_counter() - start
        scores = exact_nodes
    else:
        scores = {(s, i): float(v) for s in sites for i, v in enumerate(attribution[s]) if v != 0}
    kept = _select(scores, node_threshold, max_nodes)

    edge_attr: dict[P.Node, torch.Tensor] = {}
    if method == "attribution" or verify:
        start = time.perf_counter()
        downstream = {s: sorted(i for t, i in kept if t == s) for s in sites[1:]}
        edge_attr = P.edge_attribution(
            model, inputs, sites, clean, corrupt, grads, {s: v for s, v in downstream.items() if v}
        )
        timings["attribution_edges_s"] = time.perf_counter() - start
    if method == "attribution" and verify:
        start = time.perf_counter()
        result = P.exact_patching(
            model, inputs, sites, clean, corrupt, grads, kept, max_rows, progress
        )
        exact_nodes = {c: float(v) for c, v in zip(kept, result.metric, strict=True)}
        exact_down = dict(zip(kept, result.downstream, strict=True))
        timings["verification_s"] = time.perf_counter() - start

    graph = _build_graph(
        method, sites, kept, attribution, exact_nodes, edge_attr, exact_down, edge_threshold
    )
    _annotate(model, graph, inputs, clean)
    m_clean, m_corrupt = float(clean.metric.mean()), float(corrupt.metric.mean())
    graph.nodes[METRIC].update(effect=m_clean - m_corrupt, effect_exact=m_clean - m_corrupt)
    report: dict[str, Any] = {
        "method": method,
        "sites": sites,
        "prompts": inputs.n,
        "metric_clean": m_clean,
        "metric_corrupt": m_corrupt,
        "node_threshold": node_threshold,
        "max_nodes": max_nodes,
        "edge_threshold": edge_threshold,
        "steps": steps,
        "scored_nodes": len(scores),
        "verification": verification(graph),
        "timings": timings,
    }
    if sizes is not None:
        start = time.perf_counter()
        ranking = [node_id(s, None if i == _width(clean, s) else i) for s, i in _ranked(scores)]
        grid = sorted({n for n in sizes if n < len(ranking)} | {len(kept), len(ranking)})
        report["faithfulness"] = faithfulness_curve(model, task, ranking, grid, sites, max_rows)
        timings["faithfulness_s"] = time.perf_counter() - start
    graph.graph.update(method=method, metric_clean=m_clean, metric_corrupt=m_corrupt)
    return Circuit(graph, report)


def _sites(model: Any, sites: Sequence[str] | None) -> list[str]:
    present = attached(model)
    if not present:
        raise UserInputError("no dictionaries are spliced into the model: attach some first")
    if sites is None:
        return list(present)
    names = [str(Site.parse(s)) for s in sites]
    missing = [s for s in names if s not in present]
    if missing:
        raise UserInputError(
            f"no dictionary is attached at {', '.join(missing)}; attached: {', '.join(present)}"
        )
    return sorted(dict.fromkeys(names), key=lambda s: Site.parse(s).order)


def _width(values: P.Values, site: str) -> int:
    return int(values.features[site].shape[-1])


def _candidates(clean: P.Values, corrupt: P.Values, sites: list[str]) -> list[P.Node]:
    """Every feature whose clean and corrupted values differ somewhere, and every error term."""
    out: list[P.Node] = []
    for s in sites:
        differs = (clean.features[s] != corrupt.features[s]).any(1).any(0)
        out += [(s, int(i)) for i in differs.nonzero().flatten()] + [(s, _width(clean, s))]
    return out


def _ranked(scores: dict[P.Node, float]) -> list[P.Node]:
    return sorted(scores, key=lambda node: -abs(scores[node]))


def _select(scores: dict[P.Node, float], threshold: float, limit: int | None) -> list[P.Node]:
    kept = [node for node in _ranked(scores) if abs(scores[node]) >= threshold and scores[node]]
    return kept[:limit] if limit is not None else kept


def _build_graph(
    method: str,
    sites: list[str],
    kept: list[P.Node],
    attribution: dict[str, torch.Tensor],
    exact_nodes: dict[P.Node, float],
    edge_attr: dict[P.Node, torch.Tensor],
    exact_down: dict[P.Node, torch.Tensor | None],
    edge_threshold: float,
) -> nx.DiGraph:
    graph = nx.DiGraph()
    add_metric_node(graph)
    names = {}
    for s, i in kept:
        est, exact = float(attribution[s][i]), exact_nodes.get((s, i))
        error = i == len(attribution[s]) - 1
        names[s, i] = add_node(
            graph,
            s,
            None if error else i,
            effect=est if method == "attribution" else exact,
            effect_attribution=est,
            effect_exact=exact,
        )
    previous = dict(zip(sites[1:], sites[:-1], strict=True))
    for (d, j), name in names.items():
        if d == sites[-1]:
            node = graph.nodes[name]
            add_edge(
                graph,
                name,
                METRIC,
                weight=node["effect"],
                weight_attribution=node["effect_attribution"],
                weight_exact=node.get("effect_exact"),
            )
        if d not in previous:
            continue
        for u, i in kept:
            if u != previous[d]:
                continue
            est = float(edge_attr[d, j][i]) if (d, j) in edge_attr else None
            down = exact_down.get((u, i))
            exact = float(down[j]) if down is not None else None
            weight = est if method == "attribution" else exact
            if weight is not None and weight != 0 and abs(weight) >= edge_threshold:
                add_edge(
                    graph,
                    names[u, i],
                    name,
                    weight=weight,
                    weight_attribution=est,
                    weight_exact=exact,
                )
    return graph


def _annotate(model: Any, graph: nx.DiGraph, inputs: P.TaskInputs, clean: P.Values) -> None:
    """Mean activation over the clean prompts' tokens, and a label of top tokens."""
    mask = inputs.mask
    ids = inputs.clean["input_ids"]
    for _, data in graph.nodes(data=True):
        if data["kind"] != "feature":
            if data["kind"] == "error":
                data["label"] = "error"
            continue
        acts = clean.features[data["site"]][..., data["feature"]]
        data["mean_activation"] = float(acts[mask].mean())
        data["label"] = top_tokens(model.tokenizer, ids, acts, mask)
