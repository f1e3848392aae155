"""Interactive views: the data each page embeds (checked against the circuit, the report and plain
torch), the circuit picture's layout, the commands that write pages, and the pages in a real
browser (headless Chromium; skipped where it is absent): no JavaScript error, the expected counts
read back from the rendered page, a click's panel opened through `#node=`, and a screenshot that
is not blank."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import networkx as nx
import pytest
import torch
from bokeh.events import DocumentReady
from bokeh.models import CustomJS, DataTable, GlyphRenderer, GraphRenderer, Slider
from conftest import random_untied
from matplotlib.backends.backend_agg import FigureCanvasAgg

from sae_circuits import load_model, token_batches
from sae_circuits.circuits import Circuit
from sae_circuits.circuits.export import LABEL_WIDTH, figure, layout, short_label
from sae_circuits.circuits.graph import add_edge, add_metric_node, add_node
from sae_circuits.cli import main
from sae_circuits.features import (
    Context,
    FeatureReport,
    TokenScore,
    collect,
    feature_frequencies,
    inspect_features,
)
from sae_circuits.nodes import METRIC, Node
from sae_circuits.sites import Site
from sae_circuits.testing import SAMPLE_TEXT, save_random_model, site_hook
from sae_circuits.views import (
    circuit_view,
    dictionary_view,
    feature_panel,
    feature_view,
    write_page,
)

DOCUMENTS = [SAMPLE_TEXT[i:] + SAMPLE_TEXT[:i] for i in range(0, len(SAMPLE_TEXT), 9)]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
browser = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")


# ------------------------------------------------------------------------------ fixtures
def make_circuit(per_site: dict[str, int], seed: int = 0) -> Circuit:
    """Feature nodes (`per_site[site]` of them) and an error node per site, every node joined to
    every node of the next site and the last site to the metric, with signed random weights; the
    exact measurements are left out for odd features (the view shows them as missing)."""
    generator = torch.Generator().manual_seed(seed)
    graph = nx.DiGraph()
    add_metric_node(graph)
    layers: list[list[str]] = []
    for site, n in per_site.items():
        names = []
        for node in [Node(Site.parse(site), i) for i in range(n)] + [Node(Site.parse(site), None)]:
            effect = float(torch.randn(1, generator=generator))
            exact = None if node.feature is not None and node.feature % 2 else effect * 1.1
            names.append(
                add_node(
                    graph, node, effect=effect, effect_attribution=effect, effect_exact=exact,
                    label="' a' ' b'" if node.feature is not None else "error",
                )
            )  # fmt: skip
        layers.append(names)
    for up, down in zip(layers, layers[1:] + [[METRIC]], strict=True):
        for u in up:
            for v in down:
                w = float(torch.randn(1, generator=generator))
                add_edge(graph, u, v, weight=w, weight_attribution=w, weight_exact=w / 2)
    report = {"method": "attribution", "verification": {"n": 3, "spearman": 0.5,
              "sign_agreement": 1.0}}  # fmt: skip
    return Circuit(graph, report)


def make_report(site: str = "resid.0", index: int = 1) -> FeatureReport:
    tokens = [(" the", 0.5), (" cat", 2.0), (" sat", 0.0)]
    return FeatureReport(
        site=Site.parse(site),
        index=index,
        frequency=0.0125,
        positions=4000,
        contexts=[
            Context(" the", " cat", " sat", 2.0, 7, tokens),
            Context("a <b>", " dog", "\n", 1.0, 8, [("a <b>", 0.25), (" dog", 1.0), ("\n", 0.0)]),
        ],
        top_tokens=[TokenScore(" cat", 0.75, 3), TokenScore(" dog", 0.25, 1)],
        histogram_edges=[0.0, 0.5, 1.0, 1.5, 2.0, 2.5],
        histogram_counts=[0, 1, 3, 0, 2],
        histogram_split=[(" cat", [0, 0, 1, 0, 2]), (" dog", [0, 1, 2, 0, 0])],
        logit_effects={
            "down": [TokenScore(" mat", -0.8), TokenScore(" hat", -0.3)],
            "up": [TokenScore(" ran", 0.6), TokenScore(" sat", 0.1)],
        },
        direct_effects={"down": [TokenScore(" x", -0.2)], "up": [TokenScore(" y", 0.4)]},
    )


def graph_renderer(document):
    return document.select_one({"type": GraphRenderer})


def callback_args(document, marker: str) -> dict:
    """The arguments of the document's CustomJS whose code contains `marker`."""
    (callback,) = [c for c in document.select({"type": CustomJS}) if marker in c.code]
    return callback.args


# ------------------------------------------------------------------------------ circuit data
def test_circuit_view_embeds_nodes_edges_and_measurements():
    circuit = make_circuit({"resid.0": 3, "resid.1": 2})
    report = make_report("resid.0", 1)
    document = circuit_view(circuit, {report.name: report})
    renderer = graph_renderer(document)
    nodes = renderer.node_renderer.data_source.data
    edges = renderer.edge_renderer.data_source.data
    graph = circuit.graph
    assert sorted(nodes["index"]) == sorted(graph.nodes)
    assert sorted(zip(edges["start"], edges["end"], strict=True)) == sorted(graph.edges)
    for i, name in enumerate(nodes["index"]):
        data = graph.nodes[name]
        exact = data.get("effect_exact")
        assert nodes["exact"][i] == ("—" if exact is None else f"{exact:+.4g}")
        if name != METRIC:
            assert nodes["effect"][i] == f"{data['effect']:+.4g}"
    weights = [
        graph.edges[u, v]["weight"] for u, v in zip(edges["start"], edges["end"], strict=True)
    ]
    largest = max(abs(w) for w in weights)
    for w, width, colour, size in zip(
        weights, edges["width"], edges["colour"], edges["abs"], strict=True
    ):
        assert width == pytest.approx(0.5 + 7.0 * abs(w) / largest)
        assert colour == ("#2166ac" if w >= 0 else "#b2182b") and size == abs(w)
    (slider,) = document.select({"type": Slider})
    assert slider.end == pytest.approx(largest) and slider.value == 0
    panels = callback_args(document, "panels[id]")["panels"]
    assert set(panels) == {report.name}
    assert "data-contexts='2'" in panels[report.name]
    pruning = callback_args(document, "full.abs")["full"]
    assert len(pruning["abs"]) == graph.number_of_edges()


def test_circuit_picture_is_legible_at_sixty_nodes(tmp_path):
    """60 feature nodes in one site and 12 in the next: labels are short and no two node boxes
    of the drawn picture overlap."""
    circuit = make_circuit({"resid.0": 60, "resid.1": 12})
    graph = circuit.graph
    for name in graph.nodes:
        graph.nodes[name]["label"] = "' Alexander' ' Christopher' ' Maximilian'"
    pos, rows = layout(graph)
    assert [site for site, _ in rows] == ["resid.0", "resid.1", ""]
    lines = {y for name, (_, y) in pos.items() if graph.nodes[name]["site"] == "resid.0"}
    assert len(lines) == math.ceil(61 / 12)
    assert all(
        len(line) <= LABEL_WIDTH
        for n in graph
        for line in short_label(n, graph.nodes[n]).split("\n")
    )
    fig = figure(graph)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    patches = [t.get_bbox_patch() for t in fig.axes[0].texts]  # node labels; arrows have none
    boxes = [patch.get_window_extent(renderer) for patch in patches if patch is not None]
    assert len(boxes) == graph.number_of_nodes()
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]
    assert not overlaps


# ------------------------------------------------------------------------------ feature data
def test_feature_panel_shades_each_token_and_lists_effects():
    report = make_report()
    panel = feature_panel(report)
    assert "feature resid.0/1" in panel and "1.250%" in panel and "4,000" in panel
    # each token shaded by activation / largest top activation (2.0), its value on hover
    assert "title='0.5' style='background:rgba(255,170,0,0.25)'> the</span>" in panel
    assert "title='2' style='background:rgba(255,170,0,1.00)'> cat</span>" in panel
    assert "a &lt;b&gt;" in panel and "a <b>" not in panel
    shown = {token: html.escape(repr(token)) for token in (" mat", " hat", " ran", " x", " y")}
    assert all(text in panel for text in shown.values())
    assert panel.index(shown[" mat"]) < panel.index(shown[" ran"])  # logits down, then up


def test_feature_view_embeds_histogram_and_effects():
    report = make_report()
    document = feature_view(report)
    sources = [r.data_source.data for r in document.select({"type": GlyphRenderer})]
    histogram = next(s for s in sources if "total" in s)
    assert histogram["total"] == report.histogram_counts
    assert histogram["t0"] == [0, 0, 1, 0, 2] and histogram["other"] == [0, 0, 0, 0, 0]
    effects = [s for s in sources if "value" in s]
    assert sorted(e["value"] for e in effects) == [[-0.3, -0.8, 0.6, 0.1], [-0.2, 0.4]]
    assert document.title == "feature resid.0/1"


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("views") / "neox", "gpt_neox")


@pytest.fixture(scope="module")
def neox(neox_dir):
    return load_model(neox_dir)


def test_context_tokens_carry_the_activations_of_plain_torch(neox):
    """Each token of a context window carries the feature's activation there, as a plain torch
    forward with the dictionary's encoder computes it."""
    dictionary = random_untied(neox.config.hidden_size, d_dict=8, site="resid.0")
    data = list(token_batches(neox.tokenizer, DOCUMENTS, 24, 8))
    fires = collect(neox, "resid.0", dictionary, data, top_k=1, progress=False).fires
    feature = int(fires.argmax())
    (report,) = inspect_features(neox, "resid.0", dictionary, data, [feature], 4, progress=False)
    stats = collect(neox, "resid.0", dictionary, data, [feature], top_k=4, progress=False)
    assert len(report.contexts) == 4
    for c, row, position in zip(
        report.contexts, stats.top_rows[0], stats.top_positions[0], strict=True
    ):
        with torch.no_grad(), site_hook(neox, "resid.0") as seen:
            neox._module(input_ids=row[None].clamp_min(0))
            acts = dictionary.encode(seen["x"])[0, :, feature]
        start = max(1, int(position) - 12)
        expected = acts[start : int(position) + 5].tolist()
        assert [value for _, value in c.tokens] == pytest.approx(expected, abs=1e-5)
        assert max(value for _, value in c.tokens) == pytest.approx(c.activation, abs=1e-5)


def test_dictionary_view_lists_every_feature_with_its_top_tokens(neox):
    dictionary = random_untied(neox.config.hidden_size, d_dict=8, site="resid.0")
    data = list(token_batches(neox.tokenizer, DOCUMENTS, 24, 8))
    report = feature_frequencies(neox, "resid.0", dictionary, data, progress=False, top_k=5)
    stats = collect(neox, "resid.0", dictionary, data, top_k=5, progress=False)
    for j, scores in enumerate(report.top_tokens):
        fired = stats.top_values[j] > 0
        tokens = stats.top_tokens[j][fired].tolist()
        assert [s.count for s in scores] == [tokens.count(t) for t in dict.fromkeys(tokens)]
        assert sum(s.count for s in scores) == int(fired.sum())
        assert not scores or scores[0].value == pytest.approx(float(stats.top_values[j, 0]))
    document = dictionary_view(report)
    table = document.select_one({"type": DataTable}).source.data
    assert table["feature"] == list(range(8))
    assert table["frequency"] == pytest.approx(report.frequencies.tolist())
    live = [j for j, scores in enumerate(report.top_tokens) if scores]
    assert live and len(live) == 8 - report.dead
    first = report.top_tokens[live[0]][0]
    assert table["tokens"][live[0]].startswith(f"{first.token!r}×{first.count}")


# ------------------------------------------------------------------------------ files
class ExternalSources(HTMLParser):
    """Tags that would load a script, style or image from the network."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value and re.match(r"(https?:)?//", value):
                self.found.append(f"<{tag} {name}={value}>")


def test_pages_are_self_contained_and_written_whole(tmp_path):
    circuit = make_circuit({"resid.0": 3, "resid.1": 2})
    path = write_page(circuit_view(circuit), tmp_path / "sub" / "c.html")
    text = path.read_text()
    assert text.rstrip().endswith("</html>") and "Bokeh" in text
    parser = ExternalSources()
    parser.feed(text)
    assert parser.found == []
    assert re.findall(r"<script[^>]*\bsrc=", text) == []
    assert list(path.parent.iterdir()) == [path]


def test_notebook_views(neox):
    circuit = make_circuit({"resid.0": 2})
    for shown in (circuit, make_report()):
        text = shown._repr_html_()
        assert text.startswith("<iframe srcdoc=") and "&lt;script" in text
    dictionary = random_untied(neox.config.hidden_size, d_dict=8, site="resid.0")
    data = list(token_batches(neox.tokenizer, DOCUMENTS, 24, 4))
    frequencies = feature_frequencies(neox, "resid.0", dictionary, data, progress=False)
    assert frequencies._repr_html_().startswith("<iframe srcdoc=")


@pytest.fixture(scope="module")
def inspect_inputs(tmp_path_factory, neox_dir, neox):
    root = tmp_path_factory.mktemp("inspect_html")
    random_untied(neox.config.hidden_size, d_dict=8, site="resid.0").save(root / "dictionary")
    (root / "text.txt").write_text("\n\n".join(DOCUMENTS))
    common = ["--model", str(neox_dir), "--dictionary", str(root / "dictionary")]
    return root, [*common, "--text", str(root / "text.txt"), "--tokens", "512", "--ctx-len", "16"]


def test_inspect_writes_feature_and_dictionary_pages(inspect_inputs, capsys):
    root, common = inspect_inputs
    feature, dictionary = root / "feature.html", root / "dictionary.html"
    assert main(["inspect", "resid.0/2", *common, "--json", "--html", str(feature)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["html"] == str(feature) and "top activating contexts" in feature.read_text()
    assert main(["inspect", "resid.0", *common, "--json", "--html", str(dictionary)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["features"] == 8 and "tokens of the largest activations" in dictionary.read_text()
    assert main(["inspect", "resid.0", *common, "--vs-neurons", "--html", str(feature)]) == 2


@pytest.mark.filterwarnings("ignore:.*have a single prompt:UserWarning")  # faithfulness, unused
def test_circuit_command_writes_the_page(tmp_path, capsys):
    """On the embedded model and its shipped dictionaries: the page has a panel per feature."""
    path = tmp_path / "c.html"
    args = ["circuit", "--task", "ioi", "--prompts", "16", "--sites", "resid.1", "resid.2"]
    args += ["--max-nodes", "6", "--no-verify", "--sizes", "3", "--json", "--html", str(path)]
    args += ["--contexts", "3", "--tokens", "1024", "--ctx-len", "32"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert str(path) in out["files"]
    text = path.read_text()
    features = re.findall(r"data-feature='(resid\.[12]/\d+)'", text.replace('\\"', "'"))
    assert features and len(features) == len(set(features)) <= 6


# ------------------------------------------------------------------------------ browser
PROBE = r"""<script>
(function () {
  const report = (kind, text) => console.log('PAGE-' + kind + ' ' + text);
  const error = console.error;
  console.error = (...a) => { report('ERROR', a.join(' ')); error.apply(console, a); };
  window.addEventListener('error', (e) => report('ERROR', e.message));
  window.addEventListener('unhandledrejection', (e) => report('ERROR', String(e.reason)));
  function count(root, selector) {
    let n = root.querySelectorAll(selector).length;
    for (const el of root.querySelectorAll('*')) if (el.shadowRoot) n += count(el.shadowRoot, selector);
    for (const frame of root.querySelectorAll('iframe'))
      if (frame.contentDocument) n += count(frame.contentDocument, selector);
    return n;
  }
  function text(root) {  // the text shown under root, shadow roots included, styles left out
    let t = '';
    const walk = document.createTreeWalker(root, NodeFilter.SHOW_ELEMENT | NodeFilter.SHOW_TEXT);
    for (let n = walk.nextNode(); n; n = walk.nextNode()) {
      if (n.nodeType === Node.TEXT_NODE && n.parentNode.nodeName !== 'STYLE') t += n.textContent + ' ';
      if (n.shadowRoot) t += text(n.shadowRoot);
    }
    return t;
  }
  function tooltips(root) {
    let t = '';
    for (const el of root.querySelectorAll('*')) if (el.shadowRoot) t += tooltips(el.shadowRoot);
    for (const el of root.querySelectorAll('.bk-Tooltip')) t += text(el.shadowRoot || el);
    return t;
  }
  window.addEventListener('load', () => setTimeout(() => {
    %(action)s
    setTimeout(() => {
      const seen = {};
      for (const s of %(selectors)s) seen[s] = count(document, s);
      document.body.dataset.rendered = JSON.stringify(seen);
      document.body.dataset.tooltip = tooltips(document).replace(/\s+/g, ' ');
    }, 500);
  }, 1000));
})();
</script>"""


def load(path: Path, fragment: str = "", action: str = "", selectors=("canvas",), shot=None):
    """Open `path` in headless Chromium with a probe that reports JavaScript errors, counts the
    rendered elements matching `selectors` (shadow roots included) after `action` ran and reads the
    text of the tooltips shown; returns the `<body>` data attributes (`rendered`: the counts) and
    the errors."""
    probe = PROBE % {"action": action, "selectors": json.dumps(list(selectors))}
    probed = path.with_name("probed_" + path.name)
    probed.write_text(path.read_text().replace("<head>", "<head>" + probe, 1))
    url = probed.as_uri() + fragment
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000"]
    common += ["--window-size=1500,1100", f"--user-data-dir={path.parent / 'chromium'}"]
    common += ["--host-resolver-rules=MAP * ~NOTFOUND"]  # offline: no host name resolves
    run = subprocess.run(
        [*common, "--enable-logging=stderr", "--v=0", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    errors = [
        line
        for line in console
        if any(sign in line for sign in ("PAGE-ERROR", "Uncaught", "Failed to load resource"))
    ]
    body = re.search(r"<body( data-[^>]*)>", run.stdout)  # the page's (scripts hold others)
    assert body, run.stderr[-2000:]
    data = {k: html.unescape(v) for k, v in re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1))}
    data["rendered"] = json.loads(data["rendered"])
    if shot is not None:
        subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    return data, errors


# Pointer events at data coordinates (x, y) on the plot's event layer, where the tap and hover
# tools listen (found through BokehJS's views): a click, or the pointer coming to rest there.
POINTER = """
function plotView(v) {
  if (v.frame !== undefined && v.canvas_view !== undefined) return v;
  for (const child of v.child_views || []) { const found = plotView(child); if (found) return found; }
  return null;
}
const view = plotView(Object.values(Bokeh.index)[0]);
const target = view.canvas_view.events_el, box = target.getBoundingClientRect();
const at = {clientX: box.left + view.frame.x_scale.compute(%(x)f),
            clientY: box.top + view.frame.y_scale.compute(%(y)f),
            bubbles: true, composed: true, pointerType: 'mouse', isPrimary: true, pointerId: 1};
for (const [type, buttons] of %(events)s) target.dispatchEvent(new PointerEvent(type, {...at, buttons}));
"""
CLICK = [["pointerdown", 1], ["pointerup", 0]]
HOVER = [["pointerenter", 0], ["pointermove", 0]]


def assert_not_blank(path: Path) -> None:
    from PIL import Image

    image = Image.open(path).convert("L")
    histogram = image.histogram()
    assert image.size == (1500, 1100)
    assert sum(1 for count in histogram if count) > 20, "the screenshot is (almost) one colour"
    assert max(histogram) < 0.97 * image.size[0] * image.size[1]


@browser
def test_circuit_page_in_chromium(tmp_path):
    circuit = make_circuit({"resid.0": 8, "resid.1": 5, "resid.2": 3})
    report = make_report("resid.1", 3)
    path = write_page(circuit_view(circuit, {report.name: report}), tmp_path / "circuit.html")
    graph = circuit.graph
    data, errors = load(
        path, f"#node={report.name}", selectors=[".sc-panel", ".sc-ctx", "canvas"],
        shot=tmp_path / "circuit.png",
    )  # fmt: skip
    assert errors == []
    assert int(data["nodes"]) == graph.number_of_nodes()
    assert int(data["edges"]) == graph.number_of_edges()
    assert data["selected"] == report.name  # the tap callback opened this node's panel
    rendered = data["rendered"]
    assert rendered[".sc-panel"] == 1 and rendered[".sc-ctx"] == len(report.contexts)
    assert rendered["canvas"] >= 1
    assert_not_blank(tmp_path / "circuit.png")
    # a click on the node's position opens the same panel
    x, y = layout(graph)[0][report.name]
    data, errors = load(
        path, action=POINTER % {"x": x, "y": y, "events": CLICK}, selectors=[".sc-ctx"]
    )
    assert errors == [] and data["selected"] == report.name
    assert data["rendered"][".sc-ctx"] == len(report.contexts)
    # hovering a node, and an edge at its midpoint, shows their gradient and exact values
    node = graph.nodes[report.name]
    data, errors = load(path, action=POINTER % {"x": x, "y": y, "events": HOVER})
    assert errors == [] and f"node: {report.name}" in data["tooltip"]
    assert f"gradient estimate: {node['effect_attribution']:+.4g}" in data["tooltip"]
    assert "exact patching: —" in data["tooltip"]  # an odd feature: not measured exactly
    u, v = "resid.0/0", "resid.1/0"
    (x0, y0), (x1, y1) = (layout(graph)[0][n] for n in (u, v))
    middle = {"x": (x0 + x1) / 2, "y": (y0 + y1) / 2, "events": HOVER}
    data, errors = load(path, action=POINTER % middle)
    edge = graph.edges[u, v]
    assert errors == [] and f"edge: {u} → {v}" in data["tooltip"]
    assert f"weight: {edge['weight']:+.4g}" in data["tooltip"]
    assert f"exact patching: {edge['weight_exact']:+.4g}" in data["tooltip"]
    # the slider's callback, run by setting its value: keeps the edges with |weight| >= 1
    threshold = 1.0
    kept = sum(abs(d["weight"]) >= threshold for _, _, d in graph.edges(data=True))
    action = f"Bokeh.documents[0].get_model_by_name('prune').value = {threshold};"
    data, errors = load(path, action=action)
    assert errors == [] and int(data["edges"]) == kept < graph.number_of_edges()


@browser
def test_feature_and_dictionary_pages_in_chromium(tmp_path, neox):
    report = make_report()
    path = write_page(feature_view(report), tmp_path / "feature.html")
    data, errors = load(path, selectors=[".sc-ctx", "canvas"], shot=tmp_path / "feature.png")
    assert errors == []
    rendered = data["rendered"]
    assert rendered[".sc-ctx"] == len(report.contexts) and rendered["canvas"] >= 3
    assert_not_blank(tmp_path / "feature.png")

    dictionary = random_untied(neox.config.hidden_size, d_dict=8, site="resid.0")
    batches = list(token_batches(neox.tokenizer, DOCUMENTS, 24, 8))
    frequencies = feature_frequencies(neox, "resid.0", dictionary, batches, progress=False)
    document = dictionary_view(frequencies)
    path = write_page(document, tmp_path / "dictionary.html")
    tokens = document.select_one({"type": DataTable}).source.data["tokens"]
    query = "e"
    matching = sum(query in text.lower() for text in tokens)
    assert 0 < matching < 8
    data, errors = load(path, "#search=" + query)
    assert errors == []
    assert int(data["features"]) == 8 and int(data["shown"]) == matching


@browser
def test_probe_reports_javascript_errors(tmp_path):
    document = circuit_view(make_circuit({"resid.0": 1}))
    document.js_on_event(DocumentReady, CustomJS(code="null.boom();"))
    _, errors = load(write_page(document, tmp_path / "broken.html"))
    assert any("boom" in line for line in errors)


@browser
def test_notebook_views_render_in_chromium(tmp_path):
    """What Jupyter shows: two views' `_repr_html_` in one page, each rendered in its iframe."""
    report = make_report()
    views = make_circuit({"resid.0": 4, "resid.1": 3})._repr_html_() + report._repr_html_()
    path = tmp_path / "notebook.html"
    path.write_text(f"<html><head></head><body><h1>notebook</h1>{views}</body></html>")
    data, errors = load(path, selectors=[".sc-ctx", "canvas"])
    rendered = data["rendered"]
    assert errors == [] and rendered[".sc-ctx"] == len(report.contexts)
    assert rendered["canvas"] >= 4  # the circuit's plot and the feature's three
