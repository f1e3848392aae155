"""The circuit view: nodes in one band per site (the layout of the circuit picture), edges with width
and colour by signed weight, pan/zoom, hover for effects (gradient estimate and exact patching), a
slider that prunes edges by |weight|, and a click on a node opening its feature panel (contexts and
logit effects, embedded for every feature node the view was given a report for).

The page opens the panel of `#node=<id>` in its address on load, through the same selection a
click makes. It keeps `data-nodes`, `data-edges` (shown at the slider's threshold) and
`data-selected` on its `<body>`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any

import networkx as nx
from bokeh.document import Document
from bokeh.events import DocumentReady
from bokeh.layouts import column, row
from bokeh.models import (
    CustomJS,
    Div,
    HoverTool,
    MultiLine,
    NodesAndLinkedEdges,
    Scatter,
    Slider,
    TapTool,
)
from bokeh.plotting import figure, from_networkx

from sae_circuits.batches import TokenBatch
from sae_circuits.circuits.export import NEGATIVE, POSITIVE, layout, short_label
from sae_circuits.circuits.graph import Circuit
from sae_circuits.dictionary import Dictionary
from sae_circuits.features.report import FeatureReport, inspect_features
from sae_circuits.nodes import METRIC, Node
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote
from sae_circuits.sites import Site
from sae_circuits.views.feature_html import feature_panel

MARKERS = {"feature": "circle", "error": "square", "metric": "diamond", "target": "star"}
PANEL_WIDTH = 520

# Slider: keep the edges with |weight| >= the threshold (a copy of the full edge table stays in
# `full`), fade the nodes left without an edge, and publish the counts on <body>.
PRUNE = """
const t = slider.value, keep = {};
for (const key of Object.keys(full)) keep[key] = [];
for (let i = 0; i < full.abs.length; i++) {
  if (full.abs[i] >= t) for (const key of Object.keys(full)) keep[key].push(full[key][i]);
}
edges.data = keep;
const linked = new Set([...keep.start, ...keep.end]);
const ids = nodes.data.index;
nodes.data.alpha = ids.map((id) => (linked.has(id) || t === 0 ? 1.0 : 0.2));
nodes.change.emit();
document.body.dataset.edges = keep.start.length;
document.body.dataset.threshold = t;
"""

# A click (or `#node=` on load) selects a node: show its panel, record the selection on <body>.
SELECT = """
const i = nodes.selected.indices[0];
const id = i === undefined ? '' : nodes.data.index[i];
panel.text = id === '' ? hint : (panels[id] || `<h3>${id}</h3><p>${nodes.data.hover[i]}</p>`);
document.body.dataset.selected = id;
"""

READY = """
document.body.dataset.nodes = nodes.data.index.length;
document.body.dataset.edges = edges.data.start.length;
function fromHash() {
  const m = window.location.hash.match(/node=([^&]+)/);
  if (!m) return;
  const i = nodes.data.index.indexOf(decodeURIComponent(m[1]));
  if (i >= 0) nodes.selected.indices = [i];
}
window.addEventListener('hashchange', fromHash);
fromHash();
"""


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:+.4g}"


def _display_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy of `graph` carrying the columns the view draws and shows (every node and edge has
    every column, so the data sources are rectangular)."""
    effects = [abs(d.get("effect", 0.0)) for n, d in graph.nodes(data=True) if n != METRIC]
    largest = max(effects, default=0.0) or 1.0
    weights = [abs(d["weight"]) for _, _, d in graph.edges(data=True)]
    widest = max(weights, default=0.0) or 1.0
    shown = nx.DiGraph()
    for name, data in graph.nodes(data=True):
        effect = data.get("effect")
        strength = 1.0 if name == METRIC or effect is None else abs(effect) / largest
        shown.add_node(
            name,
            site=data.get("site") or METRIC,
            kind=data["kind"],
            label=short_label(name, data).split("\n")[0],
            tokens=data.get("label", ""),
            effect=_number(effect),
            attribution=_number(data.get("effect_attribution")),
            exact=_number(data.get("effect_exact")),
            activation=_number(data.get("mean_activation")),
            marker=MARKERS.get(data["kind"], "circle"),
            colour=POSITIVE if (effect or 0.0) >= 0 else NEGATIVE,
            fill=0.15 + 0.85 * strength,
            size=12 + 16 * strength,
            alpha=1.0,
            hover=html.escape(f"effect {_number(effect)}; {data.get('label', '')}"),
        )
    for u, v, data in graph.edges(data=True):
        weight = data["weight"]
        shown.add_edge(
            u,
            v,
            value=_number(weight),
            attribution=_number(data.get("weight_attribution")),
            exact=_number(data.get("weight_exact")),
            abs=abs(weight),
            width=0.5 + 7.0 * abs(weight) / widest,
            colour=POSITIVE if weight >= 0 else NEGATIVE,
        )
    return shown


def _title(circuit: Circuit) -> str:
    report, graph = circuit.report, circuit.graph
    check = report.get("verification", {})
    parts = [
        f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges",
        f"method {report.get('method') or graph.graph.get('method', '?')}",
    ]
    if check.get("spearman") is not None:
        parts.append(
            f"exact vs gradient over {check['n']} nodes and edges: Spearman "
            f"{check['spearman']:.2f}, signs agree {check['sign_agreement']:.0%}"
        )
    return "; ".join(parts)


def circuit_view(
    circuit: Circuit, reports: Mapping[str, FeatureReport] | None = None, title: str = "circuit"
) -> Document:
    """The circuit page; `reports` (node id -> report, e.g. from `node_reports`) fill the panels."""
    graph = _display_graph(circuit.graph)
    pos, rows = layout(circuit.graph)
    top = max((y for _, y in pos.values()), default=0.0)
    plot = figure(
        width=980,
        height=int(160 + 130 * (top + 1)),
        x_range=(-0.5, 12.5),
        y_range=(-0.6, top + 0.6),
        tools="pan,wheel_zoom,box_zoom,reset,save",
        active_scroll="wheel_zoom",
        title=_title(circuit),
    )
    plot.xaxis.visible = False
    plot.xgrid.grid_line_color = None
    plot.yaxis.ticker = [y for _, y in rows]
    plot.yaxis.major_label_overrides = {y: site or METRIC for site, y in rows}
    renderer = from_networkx(graph, pos)
    nodes = renderer.node_renderer.data_source
    edges = renderer.edge_renderer.data_source
    renderer.node_renderer.glyph = Scatter(
        marker="marker",
        size="size",
        fill_color="colour",
        fill_alpha="fill",
        line_color="colour",
        line_alpha="alpha",
    )
    renderer.node_renderer.selection_glyph = Scatter(
        marker="marker", size="size", fill_color="#ffbf00", line_color="black", line_width=2
    )
    renderer.edge_renderer.glyph = MultiLine(
        line_color="colour", line_width="width", line_alpha=0.45
    )
    renderer.edge_renderer.selection_glyph = MultiLine(
        line_color="colour", line_width="width", line_alpha=0.95
    )
    renderer.selection_policy = NodesAndLinkedEdges()
    renderer.inspection_policy = NodesAndLinkedEdges()
    plot.renderers.append(renderer)
    plot.text(
        x=[pos[n][0] for n in nodes.data["index"]],
        y=[pos[n][1] + 0.17 for n in nodes.data["index"]],
        text=nodes.data["label"],
        text_font_size="8pt",
        text_align="center",
        text_baseline="bottom",
    )
    plot.add_tools(
        HoverTool(
            renderers=[renderer.node_renderer],
            tooltips=[
                ("node", "@index"),
                ("top tokens", "@tokens"),
                ("effect", "@effect"),
                ("gradient estimate", "@attribution"),
                ("exact patching", "@exact"),
                ("mean activation", "@activation"),
            ],
        ),
        HoverTool(
            renderers=[renderer.edge_renderer],
            line_policy="interp",
            tooltips=[
                ("edge", "@start → @end"),
                ("weight", "@value"),
                ("gradient estimate", "@attribution"),
                ("exact patching", "@exact"),
            ],
        ),
        TapTool(renderers=[renderer.node_renderer]),
    )
    full = {key: list(values) for key, values in edges.data.items()}
    largest = max(full.get("abs", []), default=0.0)
    slider = Slider(
        name="prune",
        start=0.0,
        end=largest or 1.0,
        value=0.0,
        step=(largest or 1.0) / 200,
        title="prune edges: min |weight|",
        width=480,
        format="0.0000",
    )
    slider.js_on_change(
        "value",
        CustomJS(args={"slider": slider, "full": full, "edges": edges, "nodes": nodes}, code=PRUNE),
    )
    panels = {name: feature_panel(report) for name, report in (reports or {}).items()}
    hint = "<p>Click a node to see its top contexts and logit effects.</p>"
    panel = Div(text=hint, width=PANEL_WIDTH, styles={"overflow-y": "auto", "max-height": "900px"})
    nodes.selected.js_on_change(
        "indices",
        CustomJS(
            args={"nodes": nodes, "panel": panel, "panels": panels, "hint": hint}, code=SELECT
        ),
    )
    document = Document(title=title)
    document.add_root(row(column(plot, slider), panel))
    document.js_on_event(DocumentReady, CustomJS(args={"nodes": nodes, "edges": edges}, code=READY))
    return document


def node_reports(
    model: Model,
    circuit: Circuit,
    dictionaries: Mapping[str | Site, Dictionary],
    batches: Iterable[TokenBatch],
    top_k: int = 8,
    progress: bool = True,
    remote: Remote = False,
) -> dict[str, FeatureReport]:
    """A `FeatureReport` (contexts, histogram, logit effects) for every feature node of `circuit`
    whose site has a dictionary in `dictionaries`: one pass over `batches` per site (`remote` as
    for `inspect_features`)."""
    by_site: dict[Site, list[int]] = {}
    for name in circuit.graph.nodes:
        if name == METRIC:
            continue
        node = Node.parse(name)
        if not node.is_error:
            by_site.setdefault(node.site, []).append(node.feature)
    batches = list(batches)
    found = {Site.parse(site): d for site, d in dictionaries.items()}
    reports: dict[str, FeatureReport] = {}
    for site, features in sorted(by_site.items()):
        if site not in found:
            continue
        for report in inspect_features(
            model,
            site,
            found[site],
            batches,
            sorted(features),
            top_k,
            progress=progress,
            total_batches=len(batches),
            remote=remote,
        ):
            reports[report.name] = report
    return reports
