"""The feature view: activation histogram split by token, top contexts highlighted token by token,
logit effects of ablation and of the decoder direction, firing frequency.

`feature_panel` is the same content as one HTML fragment (no plots): the circuit view shows it
when a node is clicked. `worst_view` lists where spliced dictionaries fail: the next-token
predictions whose CE rises the most (`evaluate(..., worst=N)`).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, Div, HoverTool
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.transform import stack

from sae_circuits.circuits.export import NEGATIVE, POSITIVE
from sae_circuits.features.views import shown

if TYPE_CHECKING:
    from sae_circuits.features.report import Context, FeatureReport, TokenScore

EFFECTS = (("logit", "ablation effect"), ("direct", "direct effect (decoder direction)"))
STYLE = (
    "<style>.sc-ctx{font-family:monospace;white-space:pre;line-height:1.7}"
    ".sc-ctx span{padding:1px 0;border-radius:2px}"
    ".sc-bars td{padding:0 4px;font-size:12px}.sc-bars td.tok{font-family:monospace}</style>"
)


def _esc(text: str) -> str:
    return html.escape(text).replace("\n", "⏎")


def contexts_html(report: FeatureReport) -> str:
    """The top contexts, every token shaded by the feature's activation on it (hover: value)."""
    largest = max((c.activation for c in report.contexts), default=0.0) or 1.0
    lines = [_context_line(c, largest) for c in report.contexts]
    body = "".join(
        f"<tr><td>{c.activation:.3g}</td><td class='sc-ctx'>{line}</td></tr>"
        for c, line in zip(report.contexts, lines, strict=True)
    )
    return f"<table class='sc-contexts'><tr><th>act</th><th>context</th></tr>{body}</table>"


def _context_line(context: Context, largest: float) -> str:
    if not context.tokens:  # a report without per-token values: the activating token only
        return (
            f"{_esc(context.before)}<b style='background:rgba(255,170,0,.8)'>"
            f"{_esc(context.token)}</b>{_esc(context.after)}"
        )
    spans = []
    for token, value in context.tokens:
        alpha = max(0.0, min(1.0, value / largest))
        spans.append(
            f"<span title='{value:.3g}' style='background:rgba(255,170,0,{alpha:.2f})'>"
            f"{_esc(token)}</span>"
        )
    return "".join(spans)


def _bars(items: list[TokenScore], colour: str, largest: float) -> str:
    rows = "".join(
        f"<tr><td class='tok'>{_esc(shown(t.token))}</td><td>{t.value:+.3g}</td><td>"
        f"<div style='width:{round(120 * abs(t.value) / largest)}px;height:9px;"
        f"background:{colour}'></div></td></tr>"
        for t in items
    )
    return f"<table class='sc-bars'>{rows}</table>"


def effects_html(report: FeatureReport) -> str:
    """Logits down and up, as bar lists, for the ablation and the direct effect."""
    parts = []
    for key, label in EFFECTS:
        effects = getattr(report, f"{key}_effects")
        if not effects:
            continue
        largest = max(abs(t.value) for t in effects["down"] + effects["up"]) or 1.0
        parts.append(
            f"<div style='display:inline-block;vertical-align:top;margin-right:16px'>"
            f"<b>{_esc(label)}</b><br>logits down{_bars(effects['down'], NEGATIVE, largest)}"
            f"logits up{_bars(effects['up'], POSITIVE, largest)}</div>"
        )
    return "".join(parts) or "<p>no logit effects (the feature never fired)</p>"


def header_html(report: FeatureReport) -> str:
    tokens = ", ".join(f"{_esc(shown(t.token))} {t.value:.0%}" for t in report.top_tokens[:6])
    return (
        f"<h3 style='margin:4px 0'>feature {_esc(report.name)}</h3>"
        f"<p style='margin:2px 0'>fires on <b>{report.frequency:.3%}</b> of "
        f"{report.positions:,} tokens; top tokens (share of activation): {tokens or '—'}</p>"
    )


def feature_panel(report: FeatureReport) -> str:
    """The feature as one HTML fragment: header, contexts, logit effects."""
    return (
        f"{STYLE}<div class='sc-panel' data-feature='{_esc(report.name)}' "
        f"data-contexts='{len(report.contexts)}'>{header_html(report)}"
        f"<h4 style='margin:6px 0 2px'>top activating contexts</h4>{contexts_html(report)}"
        f"<h4 style='margin:6px 0 2px'>logit effects</h4>{effects_html(report)}</div>"
    )


def histogram_plot(report: FeatureReport, width: int = 620, height: int = 300) -> figure:
    """Firings per activation bin, stacked by the most frequent firing tokens (rest: other)."""
    last = max((b for b, n in enumerate(report.histogram_counts) if n), default=0) + 1
    edges = report.histogram_edges[: last + 1]
    split = report.histogram_split[:6]
    data: dict[str, list] = {"left": edges[:-1], "right": edges[1:]}
    rest = list(report.histogram_counts[:last])
    names = []
    for k, (_, counts) in enumerate(split):
        data[f"t{k}"] = counts[:last]
        rest = [r - c for r, c in zip(rest, counts[:last], strict=True)]
        names.append(f"t{k}")
    data["other"] = rest
    data["total"] = report.histogram_counts[:last]
    names.append("other")
    plot = figure(
        width=width,
        height=height,
        title="activation histogram, by token",
        x_axis_label="activation",
        y_axis_label="firings",
        tools="pan,wheel_zoom,box_zoom,reset,save",
    )
    colours = [*Category10_10[: len(split)], "#bbbbbb"]
    labels = [shown(token) for token, _ in split] + ["other"]
    source = ColumnDataSource(data)
    bottom: list[str] = []
    for name, colour, label in zip(names, colours, labels, strict=True):
        stacked = plot.quad(
            left="left",
            right="right",
            bottom=stack(*bottom) if bottom else 0,
            top=stack(*bottom, name),
            source=source,
            fill_color=colour,
            line_color="white",
            legend_label=label,
        )
        plot.add_tools(
            HoverTool(
                renderers=[stacked],
                tooltips=[
                    ("activation", "@left{0.000}–@right{0.000}"),
                    (label, f"@{name}"),
                    ("all tokens", "@total"),
                ],
            )
        )
        bottom.append(name)
    plot.legend.label_text_font_size = "9pt"
    plot.legend.location = "top_right"
    return plot


def effect_plot(items: dict[str, list[TokenScore]], title: str, width: int = 300) -> figure:
    """Horizontal bars: the tokens whose logits go down (red) and up (blue) the most."""
    scores = list(reversed(items["down"])) + list(items["up"])
    labels = {k: shown(t.token) for k, t in enumerate(scores)}
    source = ColumnDataSource(
        {
            "y": list(labels),
            "value": [t.value for t in scores],
            "token": list(labels.values()),
            "colour": [NEGATIVE if t.value < 0 else POSITIVE for t in scores],
        }
    )
    plot = figure(
        width=width,
        height=40 + 16 * len(scores),
        title=title,
        tools="",
        toolbar_location=None,
        tooltips=[("token", "@token"), ("logit change", "@value{+0.0000}")],
    )
    plot.hbar(y="y", right="value", height=0.8, color="colour", source=source)
    plot.yaxis.ticker = list(labels)
    plot.yaxis.major_label_overrides = labels
    plot.ygrid.grid_line_color = None
    return plot


def feature_view(report: FeatureReport) -> Document:
    """The feature page: header, histogram, contexts, and a plot per kind of logit effect."""
    effects = [
        effect_plot(getattr(report, f"{key}_effects"), label)
        for key, label in EFFECTS
        if getattr(report, f"{key}_effects")
    ]
    layout = column(
        Div(text=header_html(report), width=1000),
        row(histogram_plot(report), *effects),
        Div(text=f"{STYLE}<h4>top activating contexts</h4>{contexts_html(report)}", width=1000),
    )
    document = Document(title=f"feature {report.name}")
    document.add_root(layout)
    return document


def worst_contexts_html(rows: list[dict[str, Any]]) -> str:
    """The rows of `evaluate(..., worst=N)` as a table, the predicted token highlighted."""
    largest = max((row["ce_increase"] for row in rows), default=0.0) or 1.0
    body = "".join(
        f"<tr><td>{row['ce_increase']:.3f}</td><td>{row['ce_clean']:.3f}</td>"
        f"<td>{row['batch']}/{row['row']}/{row['position']}</td><td class='sc-ctx'>"
        f"{_esc(row['before'])}<b style='background:rgba(214,39,40,"
        f"{max(0.2, min(1.0, row['ce_increase'] / largest)):.2f})' "
        f"title='[[ ]]: the predicted token'>{_esc(row['token'])}</b>{_esc(row['after'])}"
        "</td></tr>"
        for row in rows
    )
    return (
        "<table class='sc-worst'><tr><th>ΔCE (nats)</th><th>CE clean</th>"
        f"<th>batch/row/position</th><th>context</th></tr>{body}</table>"
    )


def worst_view(by_site: Mapping[Any, list[dict[str, Any]]]) -> Document:
    """A page of the predictions each spliced site makes worst, one table per site."""
    parts = [
        f"<h3 style='margin:6px 0 2px'>{_esc(str(site))}: largest CE increases when spliced</h3>"
        f"{worst_contexts_html(rows)}"
        for site, rows in by_site.items()
    ]
    document = Document(title="where the dictionaries fail")
    document.add_root(column(Div(text=STYLE + "".join(parts), width=1000)))
    return document
