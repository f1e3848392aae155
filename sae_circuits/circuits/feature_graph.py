"""Feature-rooted circuits by exact ablation (Cunningham et al.).

From a target feature (e.g. `resid.3/1234`): take its top-activating contexts from a corpus; at the
site of the same kind one layer down, zero-ablate (at every position) each feature active in those
contexts, one ablation per chunk of rows, and measure the mean drop of the target's activation at
its top positions; the `top_k` features with the largest |drop| become parents, the edge weighted
by the signed drop. Recurse on the parents down to layer 0 or `depth` levels; a feature reached
twice is expanded once. Each edge also carries the first-order (gradient × activation) estimate of
the same drop, so the report says how well attribution would have ranked them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import networkx as nx
import nnsight
import torch

from sae_circuits.batches import from_rows, trace_inputs
from sae_circuits.carried import assigned
from sae_circuits.circuits.graph import Circuit, add_edge, add_node, verification
from sae_circuits.errors import UserInputError
from sae_circuits.features.collect import FeatureStats, collect
from sae_circuits.models import is_embedded
from sae_circuits.nodes import Node
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote, spliced_sites
from sae_circuits.sites import Site
from sae_circuits.splice import attached
from sae_circuits.text import default_documents, token_batches

Parents = list[tuple[int, float, float]]  # (upstream feature, exact drop, estimated drop)


def feature_circuit(
    model: Model,
    target: str,
    depth: int = 3,
    top_k: int = 3,
    documents: Iterable[str] | None = None,
    tokens: int = 32768,
    ctx_len: int = 64,
    contexts: int = 8,
    max_rows: int = 256,
    progress: bool = True,
    remote: Remote = False,
) -> Circuit:
    """The tree of upstream features of `target` (`"<site>/<feature>"`, a dictionary spliced there
    and at the sites below), built by exact ablation on its top `contexts` contexts among `tokens`
    tokens of `documents` (default: the embedded model's held-out text, or a built-in sample).
    `remote` (True: NDIF, "local": nnsight's simulation) runs every forward as a request that
    carries the dictionaries."""
    root = Node.parse(target)
    site, feature = root.site, root.feature
    if feature is None:
        raise UserInputError("the target must be a feature, e.g. resid.3/1234, not an error node")
    chain = _chain(model, site, depth)
    width = attached(model)[site].d_dict
    if not 0 <= feature < width:
        raise UserInputError(
            f"feature {feature} is out of range: {site} has features 0..{width - 1}"
        )
    if depth < 1 or top_k < 1 or contexts < 1:
        raise UserInputError("depth, top_k and contexts must be at least 1")
    if documents is None:
        documents = default_documents(is_embedded(model))
    batches = list(token_batches(model.tokenizer, documents, ctx_len, 32, tokens))
    if not batches:
        raise UserInputError("the corpus gave no context of the requested length")

    start = time.perf_counter()
    graph = nx.DiGraph()
    frontier = [feature]
    parents: dict[Node, Parents] = {}
    for level, here in enumerate(chain):
        stats = collect(
            model,
            here,
            attached(model)[here],
            batches,
            frontier,
            contexts,
            progress=progress,
            remote=remote,
        )
        for j, f in enumerate(frontier):
            _add_feature(graph, model, here, f, stats, j)
        if level + 1 == len(chain):
            break
        below = chain[level + 1]
        with progress_bar(f"ablating at {below}", len(frontier), enabled=progress) as bar:
            for j, f in enumerate(frontier):
                parents[Node(here, f)] = _parents(
                    model, here, below, f, stats, j, top_k, max_rows, remote
                )
                bar.advance(0)
        frontier = sorted({u for f in frontier for u, _, _ in parents[Node(here, f)]})
        if not frontier:
            break
    for child, found in parents.items():
        below = chain[chain.index(child.site) + 1]
        for u, exact, estimate in found:
            add_edge(
                graph,
                Node(below, u).id,
                child.id,
                weight=exact,
                weight_exact=exact,
                weight_attribution=estimate,
            )
    _set_effects(graph, root.id)
    graph.graph.update(method="ablation", target=root.id)
    report = {
        "method": "feature-ablation",
        "target": root.id,
        "sites": [str(s) for s in chain],
        "depth": depth,
        "top_k": top_k,
        "contexts": contexts,
        "tokens": sum(b.numel() for b in batches),
        "verification": verification(graph),
        "faithfulness": [],
        "timings": {"total_s": time.perf_counter() - start},
    }
    return Circuit(graph, report)


def _chain(model: Model, site: Site, depth: int) -> list[Site]:
    """The target's site and the sites of the same kind below it, `depth` levels or to layer 0."""
    if site.layer is None:
        raise UserInputError(f"feature-rooted graphs need a per-layer site, not {site}")
    layers = range(site.layer, max(site.layer - depth, 0) - 1, -1)
    chain = [Site(site.kind, layer) for layer in layers]
    present = attached(model)
    missing = [str(s) for s in chain if s not in present]
    if missing or len(chain) < 2:
        raise UserInputError(
            f"a feature-rooted graph from {site} needs dictionaries at "
            f"{', '.join(map(str, chain))}; missing: {', '.join(missing) or 'a layer below'} "
            f"(attached: {', '.join(map(str, present))})"
        )
    return chain


def _contexts(stats: FeatureStats, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (n, P) cut after the last top position, and the top positions (n,)."""
    found = torch.isfinite(stats.top_values[j]) & (stats.top_values[j] > 0)
    rows, positions = stats.top_rows[j][found], stats.top_positions[j][found]
    if len(positions) == 0:
        return rows, positions
    return rows[:, : int(positions.max()) + 1], positions


def _parents(
    model: Model,
    site: Site,
    below: Site,
    feature: int,
    stats: FeatureStats,
    j: int,
    top_k: int,
    max_rows: int,
    remote: Remote,
) -> Parents:
    """The `top_k` features at `below` whose zero-ablation changes `feature` most (mean drop over
    its top contexts), with the gradient estimate of each drop."""
    rows, positions = _contexts(stats, j)
    n = len(positions)
    if n == 0:
        return []
    ids, mask = from_rows(rows)
    inputs = trace_inputs(ids, mask)
    at = torch.arange(n)
    with (
        spliced_sites(model, [below, site], remote, through_last=True) as (order, (u, t)),
        model.trace(inputs, remote=remote) as tracer,
    ):
        seen = [spliced_site.apply() for spliced_site in order]
        upstream = seen[u][0]
        target = seen[t][0][at, positions, feature]
        (grad,) = torch.autograd.grad(target.sum(), [upstream])
        saved = nnsight.save([upstream.detach(), target.detach(), grad.detach()])
        tracer.stop()
    upstream, base, grad = saved
    before = torch.arange(rows.shape[1])[None, :] <= positions[:, None]
    active = ((upstream > 0) & (before & mask)[..., None]).any(1).any(0)
    candidates = active.nonzero().flatten()
    estimate = (grad * upstream).sum((0, 1)) / n
    exact = _ablation_drops(
        model, site, below, feature, inputs, positions, base, candidates, max_rows, remote
    )
    order = exact.abs().argsort(descending=True)[:top_k]
    return [
        (int(candidates[o]), float(exact[o]), float(estimate[candidates[o]]))
        for o in order
        if exact[o] != 0
    ]


def _ablation_drops(
    model: Model,
    site: Site,
    below: Site,
    feature: int,
    inputs: dict[str, torch.Tensor],
    positions: torch.Tensor,
    base: torch.Tensor,
    candidates: torch.Tensor,
    max_rows: int,
    remote: Remote,
) -> torch.Tensor:
    """(len(candidates),) mean drop of the target when each candidate is zero-ablated."""
    n = len(positions)
    per_trace = max(1, max_rows // n)
    drops = []
    with torch.no_grad():
        for chunk in candidates.split(per_trace):
            k = len(chunk)
            rows = torch.arange(k * n)
            ablate = assigned((rows, slice(None), chunk.repeat_interleave(n)), 0.0)
            at = positions.repeat(k)
            copies = {key: v.repeat(k, 1) for key, v in inputs.items()}
            with (
                spliced_sites(model, [below, site], remote, through_last=True) as (order, (u, t)),
                model.trace(copies, remote=remote) as tracer,
            ):
                seen = [
                    spliced_site.apply(ablate if i == u else None)
                    for i, spliced_site in enumerate(order)
                ]
                value = seen[t][0][rows, at, feature].save()
                tracer.stop()
            drops.append((base.repeat(k) - value).view(k, n).mean(1))
    return torch.cat(drops) if drops else torch.zeros(0)


def _add_feature(
    graph: nx.DiGraph, model: Model, site: Site, feature: int, stats: FeatureStats, j: int
) -> None:
    values = stats.top_values[j]
    found = torch.isfinite(values) & (values > 0)
    tokens = list(dict.fromkeys(stats.top_tokens[j][found].tolist()))[:3]
    add_node(
        graph,
        Node(site, feature),
        mean_activation=float(stats.token_mass[j].sum()) / max(stats.positions, 1),
        top_activation=float(values[found].mean()) if found.any() else 0.0,
        label=" ".join(repr(model.tokenizer.decode([t])) for t in tokens),
    )


def _set_effects(graph: nx.DiGraph, root: str) -> None:
    """Root: mean activation on its top contexts; others: their largest-|drop| effect on a child."""
    for name, data in graph.nodes(data=True):
        if name == root:
            data["effect"] = data["top_activation"]
            continue
        weights = [d["weight"] for _, _, d in graph.out_edges(name, data=True)]
        data["effect"] = max(weights, key=abs) if weights else 0.0
