"""Circuit graphs: node ids and attributes, agreement statistics, and the `Circuit` result object.

Node ids are those of `sae_circuits.nodes.Node` (`"<site>/<feature>"`, `"<site>/error"`) and
`"metric"`. Node attributes: `kind`
("feature", "error", "metric", "target"), `site`, `layer` (-1 for `embed` and the metric), `feature`
(-1 for error and metric nodes), `mean_activation`, `effect`, `label` (top tokens), plus the two
measurements behind `effect`: `effect_attribution` (gradient estimate) and `effect_exact` (exact
patching or ablation). Edge attributes: `weight` (signed effect of the source on the target), with
`weight_attribution` and `weight_exact`. A number that was not measured is absent, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from sae_circuits.nodes import ERROR, METRIC, Node


def add_node(graph: nx.DiGraph, node: Node, **attrs: Any) -> str:
    """Add a feature or error node with the standard attributes; returns its id."""
    graph.add_node(
        node.id,
        kind=ERROR if node.is_error else "feature",
        site=str(node.site),
        layer=-1 if node.site.layer is None else int(node.site.layer),
        feature=-1 if node.is_error else int(node.feature),
        **_clean(attrs),
    )
    return node.id


def add_metric_node(graph: nx.DiGraph, **attrs: Any) -> str:
    graph.add_node(
        METRIC, kind=METRIC, site="", layer=-1, feature=-1, label=METRIC, **_clean(attrs)
    )
    return METRIC


def add_edge(graph: nx.DiGraph, source: str, target: str, **attrs: Any) -> None:
    graph.add_edge(source, target, **_clean(attrs))


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    """Plain Python scalars (GraphML needs consistent types); None values are dropped."""
    out = {}
    for key, value in attrs.items():
        if value is None:
            continue
        if hasattr(value, "item"):
            value = value.item()
        out[key] = float(value) if isinstance(value, float | np.floating) else value
    return out


# ------------------------------------------------------------------------------ statistics
def spearman(a: Any, b: Any) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 2 pairs or a
    constant input."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2)[inverse]


def sign_agreement(a: Any, b: Any) -> float | None:
    """Share of pairs with the same sign (zero counts as its own sign); None if empty."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float((np.sign(a) == np.sign(b)).mean()) if len(a) else None


def verification(graph: nx.DiGraph) -> dict[str, Any]:
    """Agreement of the attribution estimates with the exact measurements over the graph's nodes
    and edges that carry both (edges into the metric repeat node effects and are left out)."""
    nodes = [
        (d["effect_attribution"], d["effect_exact"])
        for _, d in graph.nodes(data=True)
        if "effect_attribution" in d and "effect_exact" in d
    ]
    edges = [
        (d["weight_attribution"], d["weight_exact"])
        for _, target, d in graph.edges(data=True)
        if target != METRIC and "weight_attribution" in d and "weight_exact" in d
    ]

    def stats(pairs: list[tuple[float, float]]) -> dict[str, Any]:
        a, b = zip(*pairs, strict=True) if pairs else ((), ())
        return {"n": len(pairs), "spearman": spearman(a, b), "sign_agreement": sign_agreement(a, b)}

    return {**stats(nodes + edges), "nodes": stats(nodes), "edges": stats(edges)}


# ------------------------------------------------------------------------------ result
@dataclass
class Circuit:
    """A circuit graph (`networkx.DiGraph`) and its report (method, sizes, verification,
    faithfulness curve, timings). Renders inline in Jupyter."""

    graph: nx.DiGraph
    report: dict[str, Any] = field(default_factory=dict)

    def summary(self, files: list[str | Path] = ()) -> dict[str, Any]:
        """The CLI's `--json` document."""
        return {
            "nodes": self.graph.number_of_nodes(),
            "edges": self.graph.number_of_edges(),
            "faithfulness": self.report.get("faithfulness", []),
            "faithfulness_ablation": self.report.get("faithfulness_ablation"),
            "verification": {
                key: self.report.get("verification", {}).get(key)
                for key in ("spearman", "sign_agreement")
            },
            "files": [str(f) for f in files],
        }

    def save(self, directory: str | Path, name: str = "circuit", png: bool = True) -> list[Path]:
        """Write `<name>.json` (node-link + report), `.graphml`, `.dot` and (optionally) `.png`."""
        from sae_circuits.circuits.export import save_circuit

        return save_circuit(self, directory, name, png)

    def _repr_png_(self) -> bytes:
        from sae_circuits.circuits.export import png_bytes

        return png_bytes(self.graph)

    def _repr_html_(self) -> str:
        from sae_circuits.views import circuit_view, notebook_html

        return notebook_html(circuit_view(self))

    def __repr__(self) -> str:
        v = self.report.get("verification", {})
        return (
            f"Circuit({self.graph.number_of_nodes()} nodes, {self.graph.number_of_edges()} edges, "
            f"method={self.report.get('method')!r}, spearman={v.get('spearman')})"
        )
