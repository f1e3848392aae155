"""Export and view circuit graphs: node-link JSON, GraphML, DOT and a picture laid out by layer.

The picture puts one row per site, in forward order from the bottom, with the metric on top; a row
with many nodes wraps onto several lines so that labels (feature index and top tokens) never
overlap; edges are drawn with width ∝ |weight| and coloured by sign (blue: positive, red: negative).
`layout` is shared with the interactive view (`sae_circuits.views`).
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx

from sae_circuits.circuits.graph import METRIC
from sae_circuits.errors import UserInputError
from sae_circuits.plotting import new_figure
from sae_circuits.sites import Site

if TYPE_CHECKING:
    from sae_circuits.circuits.graph import Circuit

POSITIVE, NEGATIVE = "#2166ac", "#b2182b"


def node_link(graph: nx.DiGraph) -> dict[str, Any]:
    """The graph as a node-link dictionary (`nodes`, `edges`, graph attributes)."""
    return nx.node_link_data(graph, edges="edges")


def read_node_link(path: str | Path) -> nx.DiGraph:
    """A graph written by `save_circuit` (or any node-link JSON with `nodes` and `edges`)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"graph file not found: {path}")
    return nx.node_link_graph(json.loads(path.read_text()), directed=True, edges="edges")


def write_dot(graph: nx.DiGraph, path: str | Path) -> Path:
    """Graphviz DOT, one `rank=same` group per site. The signed edge weight is written as
    `signed_weight` (Graphviz reserves `weight` for non-negative layout weights)."""
    lines = ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, fontsize=10];"]
    for site, names in _rows(graph):
        lines.append(f"  {{ rank=same; // {site}")
        for name in names:
            data = graph.nodes[name]
            attrs = {k: v for k, v in data.items() if k != "label"}
            attrs["label"] = _label(name, data)
            lines.append(f"    {_quote(name)} [{_attrs(attrs)}];")
        lines.append("  }")
    widths = _widths(graph)
    for u, v, data in graph.edges(data=True):
        attrs = {("signed_weight" if k == "weight" else k): x for k, x in data.items()}
        attrs.update(color=_colour(data["weight"]), penwidth=round(widths[u, v], 2))
        lines.append(f"  {_quote(u)} -> {_quote(v)} [{_attrs(attrs)}];")
    lines.append("}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def _quote(value: Any) -> str:
    if isinstance(value, bool):
        return f'"{str(value).lower()}"'
    if isinstance(value, int | float):
        return f'"{value:.6g}"' if isinstance(value, float) else f'"{value}"'
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _attrs(attrs: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_quote(value)}" for key, value in attrs.items())


def save_circuit(
    circuit: Circuit, directory: str | Path, name: str = "circuit", png: bool = True
) -> list[Path]:
    """Write `<name>.json` (node-link, with the report under `report`), `<name>.graphml`,
    `<name>.dot` and, if `png`, `<name>.png`; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {**node_link(circuit.graph), "report": circuit.report}
    json_path = directory / f"{name}.json"
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    graphml = directory / f"{name}.graphml"
    nx.write_graphml(circuit.graph, graphml)
    paths = [json_path, graphml, write_dot(circuit.graph, directory / f"{name}.dot")]
    if png:
        paths.append(draw(circuit.graph, directory / f"{name}.png"))
    return paths


# ------------------------------------------------------------------------------ picture
def _order(site: str) -> tuple[int, int]:
    return (10**9, 0) if not site else Site.parse(site).order


def _rows(graph: nx.DiGraph) -> list[tuple[str, list[str]]]:
    """(site, node ids sorted by decreasing |effect|) per site in forward order, metric last."""
    sites: dict[str, list[str]] = {}
    for name, data in graph.nodes(data=True):
        sites.setdefault(data["site"], []).append(name)
    return [
        (site, sorted(names, key=lambda n: -abs(graph.nodes[n].get("effect", 0.0))))
        for site, names in sorted(sites.items(), key=lambda item: _order(item[0]))
    ]


def _label(name: str, data: dict[str, Any]) -> str:
    if name == METRIC:
        return METRIC
    head = "error" if data["kind"] == "error" else str(data["feature"])
    tokens = data.get("label", "") if data["kind"] != "error" else ""
    return f"{head}\n{tokens}" if tokens else head


def _colour(value: float) -> str:
    return POSITIVE if value >= 0 else NEGATIVE


def _widths(graph: nx.DiGraph, widest: float = 6.0) -> dict[tuple[str, str], float]:
    largest = max((abs(d["weight"]) for _, _, d in graph.edges(data=True)), default=0.0) or 1.0
    return {(u, v): 0.3 + widest * abs(d["weight"]) / largest for u, v, d in graph.edges(data=True)}


PER_LINE = 12  # nodes side by side in one line of a row; a fuller row wraps onto more lines
LINE, GAP = 0.6, 0.5  # vertical distance between the lines of a row, and between rows
LABEL_WIDTH = 18  # characters per label line: a label never grows wider than its slot


def layout(
    graph: nx.DiGraph, per_line: int = PER_LINE
) -> tuple[dict[str, tuple[float, float]], list[tuple[str, float]]]:
    """(x, y) per node, and (site, y of its first line) per row, for a picture `per_line` slots
    wide. Rows go up in forward order (the metric on top), each ordered by the mean x of its
    targets (fewer crossings; ties and nodes without placed targets by |effect|). A row of n nodes
    takes ceil(n / per_line) lines: consecutive nodes alternate between lines, so neighbours in
    x order never share a slot and labels do not overlap."""
    rows = _rows(graph)
    lines = [max(1, math.ceil(len(names) / per_line)) for _, names in rows]
    bases = [sum(n * LINE + GAP for n in lines[:level]) for level in range(len(rows))]
    pos: dict[str, tuple[float, float]] = {}
    for level in range(len(rows) - 1, -1, -1):
        names, n_lines = rows[level][1], lines[level]

        def key(name: str) -> float:
            xs = [pos[t][0] for t in graph.successors(name) if t in pos]
            return sum(xs) / len(xs) if xs else per_line

        columns = math.ceil(len(names) / n_lines)
        for k, name in enumerate(sorted(names, key=key)):
            x = (k // n_lines + 0.5) / columns * per_line
            pos[name] = (x, bases[level] + (k % n_lines) * LINE)
    return pos, [(site, base) for (site, _), base in zip(rows, bases, strict=True)]


def short_label(name: str, data: dict[str, Any]) -> str:
    """The node's label wrapped to at most three lines of `LABEL_WIDTH` characters."""
    head, _, tokens = _label(name, data).partition("\n")
    wrapped = textwrap.wrap(tokens, LABEL_WIDTH, max_lines=2, placeholder="…")
    return "\n".join([head, *wrapped])


def figure(graph: nx.DiGraph, title: str | None = None) -> Any:
    """A matplotlib figure of the graph, one band of lines per site."""
    pos, rows = layout(graph)
    top = max((y for _, y in pos.values()), default=0.0)
    fig = new_figure((3 + 1.35 * PER_LINE, 1.2 + 1.25 * (top + 1)))
    ax = fig.subplots()
    widths = _widths(graph)
    for u, v, data in graph.edges(data=True):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        ax.annotate(
            "",
            xy=(x1, y1 - 0.16),
            xytext=(x0, y0 + 0.16),
            zorder=1,
            arrowprops={
                "arrowstyle": "-|>",
                "color": _colour(data["weight"]),
                "lw": widths[u, v],
                "alpha": 0.5,
                "shrinkA": 0,
                "shrinkB": 0,
            },
        )
    for name, (x, y) in pos.items():
        data = graph.nodes[name]
        ax.text(
            x,
            y,
            short_label(name, data),
            ha="center",
            va="center",
            fontsize=6.5,
            zorder=3,
            bbox={
                "boxstyle": "round,pad=0.25",
                "fc": "#f0f0f0" if data["kind"] == "error" else "white",
                "ec": _colour(data.get("effect", 0.0)),
            },
        )
    ax.set_yticks([y for _, y in rows], [site or METRIC for site, _ in rows])
    ax.set_xticks([])
    ax.set_xlim(-0.1, PER_LINE + 0.1)
    ax.set_ylim(-0.5, top + 0.5)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or graph.graph.get("target") or graph.graph.get("method", "circuit"))
    fig.tight_layout()
    return fig


def draw(graph: nx.DiGraph, path: str | Path, dpi: int = 120) -> Path:
    """Save the picture of `graph` as a PNG."""
    figure(graph).savefig(path, dpi=dpi)
    return Path(path)


def png_bytes(graph: nx.DiGraph, dpi: int = 80) -> bytes:
    """The picture as PNG bytes (Jupyter's inline view)."""
    buffer = io.BytesIO()
    figure(graph).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
