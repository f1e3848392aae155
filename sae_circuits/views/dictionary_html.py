"""The dictionary view: the histogram of log10 firing frequency and a searchable table of every
feature with its frequency and the tokens of its largest activations. The search box filters the
table by feature index or token text (`#search=<text>` in the address fills it on load); the page
keeps `data-features` and `data-shown` (rows
matching the search) on its `<body>`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bokeh.document import Document
from bokeh.events import DocumentReady
from bokeh.layouts import column
from bokeh.models import (
    CDSView,
    ColumnDataSource,
    CustomJS,
    DataTable,
    Div,
    IndexFilter,
    NumberFormatter,
    TableColumn,
    TextInput,
)
from bokeh.plotting import figure

from sae_circuits.features.views import shown

if TYPE_CHECKING:
    from sae_circuits.features.report import FrequencyReport

SEARCH = """
const q = search.value_input.trim().toLowerCase();
const keep = [];
for (let i = 0; i < table.data.feature.length; i++) {
  if (!q || String(table.data.feature[i]) === q || table.data.tokens[i].toLowerCase().includes(q))
    keep.push(i);
}
view.filter.indices = keep;
document.body.dataset.shown = keep.length;
"""

READY = """
document.body.dataset.features = table.data.feature.length;
document.body.dataset.shown = table.data.feature.length;
const m = window.location.hash.match(/search=([^&]*)/);
if (m) search.value_input = decodeURIComponent(m[1]);
"""


def frequency_plot(report: FrequencyReport, width: int = 760, height: int = 260) -> figure:
    """Features per bin of log10 firing frequency (the dead ones, which never fired, apart)."""
    edges, counts = report.log10_histogram()
    plot = figure(
        width=width,
        height=height,
        title=f"{len(report.frequencies)} features at {report.site}: {report.dead} dead in "
        f"{report.positions:,} tokens",
        x_axis_label="log10 firing frequency",
        y_axis_label="features",
        tools="pan,wheel_zoom,box_zoom,reset,save",
        tooltips=[("log10 frequency", "@left{0.00}–@right{0.00}"), ("features", "@top")],
    )
    plot.quad(
        left=edges[:-1],
        right=edges[1:],
        bottom=0,
        top=counts,
        fill_color="#4a90d9",
        line_color="white",
    )
    return plot


def dictionary_view(report: FrequencyReport, title: str | None = None) -> Document:
    """The dictionary page: frequency histogram, search box, feature table."""
    tokens = [
        " ".join(f"{shown(t.token)}×{t.count}" for t in scores) for scores in report.top_tokens
    ] or [""] * len(report.frequencies)
    frequencies = report.frequencies.tolist()
    table = ColumnDataSource(
        {"feature": list(range(len(frequencies))), "frequency": frequencies, "tokens": tokens}
    )
    view = CDSView(filter=IndexFilter(list(range(len(frequencies)))))
    grid = DataTable(
        source=table,
        view=view,
        columns=[
            TableColumn(field="feature", title="feature", width=70),
            TableColumn(
                field="frequency",
                title="frequency",
                width=110,
                formatter=NumberFormatter(format="0.0000%"),
            ),
            TableColumn(field="tokens", title="tokens of the largest activations", width=580),
        ],
        width=760,
        height=460,
        index_position=None,
    )
    search = TextInput(title="search (feature index or token)", width=360)
    search.js_on_change(
        "value_input", CustomJS(args={"search": search, "table": table, "view": view}, code=SEARCH)
    )
    document = Document(title=title or f"dictionary at {report.site}")
    document.add_root(
        column(
            Div(text=f"<h3 style='margin:4px 0'>dictionary at {report.site}</h3>"),
            frequency_plot(report),
            search,
            grid,
        )
    )
    document.js_on_event(
        DocumentReady, CustomJS(args={"table": table, "search": search}, code=READY)
    )
    return document
