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

from sae_circuits import engine
from sae_circuits.circuits import patching as P
from sae_circuits.circuits.faithfulness import faithfulness_curve
from sae_circuits.circuits.graph import Circuit, add_edge, add_metric_node, add_node, verification
from sae_circuits.circuits.labels import top_tokens
from sae_circuits.circuits.methods import ABLATIONS, METHODS
from sae_circuits.engine import TaskLike, TaskTokens, Values
from sae_circuits.errors import UserInputError
from sae_circuits.nodes import METRIC, Node
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote
from sae_circuits.sites import Site
from sae_circuits.splice import attached

DEFAULT_SIZES = (5, 10, 20, 50, 100, 200)


def task_circuit(
    model: Model,
    task: TaskLike,
    sites: Sequence[str | Site] | None = None,
    method: str = "attribution",
    node_threshold: float = 0.0,
    max_nodes: int | None = 100,
    edge_threshold: float = 0.0,
    steps: int = 1,
    verify: bool = True,
    sizes: Sequence[int] | None = DEFAULT_SIZES,
    max_rows: int = 256,
    progress: bool = True,
    remote: Remote = False,
    ablation: str = "mean",
) -> Circuit:
    """The circuit of `task` over the dictionaries spliced into `model` at `sites` (default: all).

    Nodes with |effect| >= `node_threshold` are kept, at most `max_nodes` of them (largest |effect|
    first); edges between kept nodes with |weight| >= `edge_threshold`. `steps > 1` uses integrated
    gradients for node attribution. `verify` measures the kept nodes and edges both ways (exact and
    gradient). `sizes`: circuit sizes (top-n nodes by |effect|) of the faithfulness curve; None
    skips it; `ablation` ("mean" or "corrupt") is how it removes the nodes outside the circuit
    (`faithfulness_curve`). Effects are in units of the task metric (mean over prompts). `remote` (True: NDIF,
    "local": nnsight's simulation) runs every forward as a request that carries the dictionaries.
    """
    if method not in METHODS:
        raise UserInputError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if ablation not in ABLATIONS:
        raise UserInputError(f"unknown ablation {ablation!r}; valid: {', '.join(ABLATIONS)}")
    if steps < 1:
        raise UserInputError("steps must be at least 1")
    sites = _sites(model, sites)
    inputs = engine.task_tokens(model, task)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    clean = engine.read(model, inputs.clean, sites, inputs.metric, remote=remote)
    corrupt = engine.read(model, inputs.corrupt, sites, inputs.metric, remote=remote)
    grads = P.gradients(model, inputs, sites, remote)
    node_grads = (
        grads
        if steps == 1
        else P.integrated_gradients(model, inputs, sites, clean, corrupt, steps, remote)
    )
    attribution = {s: P.node_attribution(node_grads, clean, corrupt, s) for s in sites}
    timings["attribution_nodes_s"] = time.perf_counter() - start

    exact_nodes: dict[Node, float] = {}
    exact_down: dict[Node, P.NodeValues | None] = {}
    if method == "ablation":
        start = time.perf_counter()
        candidates = _candidates(clean, corrupt, sites)
        result = P.exact_patching(
            model, inputs, sites, clean, corrupt, grads, candidates, max_rows, progress, remote
        )
        exact_nodes = {c: float(v) for c, v in zip(candidates, result.metric, strict=True)}
        exact_down = dict(zip(candidates, result.downstream, strict=True))
        timings["exact_nodes_and_edges_s"] = time.perf_counter() - start
        scores = exact_nodes
    else:
        scores = {node: value for s in sites for node, value in attribution[s].items()}
    kept = _select(scores, node_threshold, max_nodes)

    edge_attr: dict[Node, P.NodeValues] = {}
    if method == "attribution" or verify:
        start = time.perf_counter()
        downstream = sorted(node for node in kept if node.site != sites[0])
        edge_attr = P.edge_attribution(
            model, inputs, sites, clean, corrupt, grads, downstream, remote
        )
        timings["attribution_edges_s"] = time.perf_counter() - start
    if method == "attribution" and verify:
        start = time.perf_counter()
        result = P.exact_patching(
            model, inputs, sites, clean, corrupt, grads, kept, max_rows, progress, remote
        )
        exact_nodes = {c: float(v) for c, v in zip(kept, result.metric, strict=True)}
        exact_down = dict(zip(kept, result.downstream, strict=True))
        timings["verification_s"] = time.perf_counter() - start

    graph = _build_graph(
        method, sites, kept, attribution, exact_nodes, edge_attr, exact_down, edge_threshold
    )
    _annotate(model, graph, kept, inputs, clean)
    m_clean, m_corrupt = float(clean.metric.mean()), float(corrupt.metric.mean())
    graph.nodes[METRIC].update(effect=m_clean - m_corrupt, effect_exact=m_clean - m_corrupt)
    report: dict[str, Any] = {
        "method": method,
        "sites": [str(s) for s in sites],
        "prompts": len(inputs),
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
        ranking = _ranked(scores)
        grid = sorted({n for n in sizes if n < len(ranking)} | {len(kept), len(ranking)})
        report["faithfulness_ablation"] = ablation
        report["faithfulness"] = faithfulness_curve(
            model, task, ranking, grid, sites, max_rows, remote, ablation
        )
        timings["faithfulness_s"] = time.perf_counter() - start
    graph.graph.update(method=method, metric_clean=m_clean, metric_corrupt=m_corrupt)
    return Circuit(graph, report)


def _sites(model: Model, sites: Sequence[str | Site] | None) -> list[Site]:
    present = attached(model)
    if not present:
        raise UserInputError("no dictionaries are spliced into the model: attach some first")
    if sites is None:
        return list(present)
    parsed = sorted({Site.parse(s) for s in sites})
    missing = [str(s) for s in parsed if s not in present]
    if missing:
        raise UserInputError(
            f"no dictionary is attached at {', '.join(missing)}; "
            f"attached: {', '.join(map(str, present))}"
        )
    return parsed


def _candidates(clean: Values, corrupt: Values, sites: list[Site]) -> list[Node]:
    """Every feature whose clean and corrupted values differ somewhere, and every error term."""
    out: list[Node] = []
    for s in sites:
        differs = (clean.features[s] != corrupt.features[s]).any(1).any(0)
        out += [Node(s, int(i)) for i in differs.nonzero().flatten()] + [Node(s, None)]
    return out


def _ranked(scores: dict[Node, float]) -> list[Node]:
    return sorted(scores, key=lambda node: -abs(scores[node]))


def _select(scores: dict[Node, float], threshold: float, limit: int | None) -> list[Node]:
    kept = [node for node in _ranked(scores) if abs(scores[node]) >= threshold and scores[node]]
    return kept[:limit] if limit is not None else kept


def _build_graph(
    method: str,
    sites: list[Site],
    kept: list[Node],
    attribution: dict[Site, P.NodeValues],
    exact_nodes: dict[Node, float],
    edge_attr: dict[Node, P.NodeValues],
    exact_down: dict[Node, P.NodeValues | None],
    edge_threshold: float,
) -> nx.DiGraph:
    graph = nx.DiGraph()
    add_metric_node(graph)
    for node in kept:
        estimate, exact = attribution[node.site][node], exact_nodes.get(node)
        add_node(
            graph,
            node,
            effect=estimate if method == "attribution" else exact,
            effect_attribution=estimate,
            effect_exact=exact,
        )
    previous = dict(zip(sites[1:], sites[:-1], strict=True))
    for d in kept:
        if d.site == sites[-1]:
            data = graph.nodes[d.id]
            add_edge(
                graph,
                d.id,
                METRIC,
                weight=data["effect"],
                weight_attribution=data["effect_attribution"],
                weight_exact=data.get("effect_exact"),
            )
        if d.site not in previous:
            continue
        for u in kept:
            if u.site != previous[d.site]:
                continue
            estimate = edge_attr[d][u] if d in edge_attr else None
            down = exact_down.get(u)
            exact = down[d] if down is not None else None
            weight = estimate if method == "attribution" else exact
            if weight is not None and weight != 0 and abs(weight) >= edge_threshold:
                add_edge(
                    graph,
                    u.id,
                    d.id,
                    weight=weight,
                    weight_attribution=estimate,
                    weight_exact=exact,
                )
    return graph


def _annotate(
    model: Model, graph: nx.DiGraph, kept: list[Node], inputs: TaskTokens, clean: Values
) -> None:
    """Mean activation over the clean prompts' tokens, and a label of top tokens."""
    mask, ids = inputs.mask, inputs.clean.input_ids
    for node in kept:
        data = graph.nodes[node.id]
        if node.is_error:
            data["label"] = "error"
            continue
        acts = clean.features[node.site][..., node.feature]
        data["mean_activation"] = float(acts[mask].mean())
        data["label"] = top_tokens(model.tokenizer, ids, acts, mask)
