"""Views of feature reports: rich (terminal) and PNG (`sae_circuits.plotting`); the interactive HTML
views are in `sae_circuits.views`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from sae_circuits.plotting import new_figure

if TYPE_CHECKING:
    from sae_circuits.features.report import FeatureReport, FrequencyReport, TokenScore

BAR = 30  # characters of the longest terminal bar
TERMINAL_BINS = 16


def shown(token: str) -> str:
    """A token as a quoted, escaped Python literal, so spaces and newlines are visible."""
    return repr(token)


def _flat(text: str) -> str:
    return text.replace("\n", "⏎")


def _bar(value: float, largest: float) -> str:
    return "█" * max(1, round(BAR * value / largest)) if value > 0 and largest > 0 else ""


def _scores(items: list[TokenScore], percent: bool = False) -> str:
    if percent:
        return ", ".join(f"{shown(t.token)} {t.value:.0%}" for t in items)
    return ", ".join(f"{shown(t.token)} {t.value:+.3g}" for t in items)


def coarse_histogram(report: FeatureReport, rows: int) -> list[tuple[float, float, int, dict]]:
    """(low, high, count, {token: count}) over the filled range of bins, merged into at most `rows`
    rows. The token split covers the report's most frequent tokens."""
    counts, edges = report.histogram_counts, report.histogram_edges
    filled = [b for b, n in enumerate(counts) if n]
    if not filled:
        return []
    step = max(1, math.ceil((filled[-1] + 1 - filled[0]) / rows))
    first = filled[0] - filled[0] % step  # keep merged rows aligned to the bins
    merged = []
    for i in range(first, filled[-1] + 1, step):
        end = min(i + step, len(counts))
        split = {token: sum(c[i:end]) for token, c in report.histogram_split}
        merged.append((edges[i], edges[end], sum(counts[i:end]), split))
    return merged


def _top_split(split: dict[str, int], total: int, n: int = 3) -> str:
    top = sorted(split.items(), key=lambda item: -item[1])[:n]
    return ", ".join(f"{shown(t)} {c / total:.0%}" for t, c in top if c) if total else ""


# ------------------------------------------------------------------------------------ rich
def feature_renderable(report: FeatureReport) -> Group:
    """Header, top contexts with the activating token highlighted and marked `[[token]]` (so that
    a log shows it too), histogram, tokens and effects."""
    header = Text.assemble(
        (f"feature {report.name}", "bold"),
        f"   fires on {report.frequency:.3%} of {report.positions:,} tokens",
    )
    contexts = Table(title="top activating contexts", show_edge=False)
    contexts.add_column("act", justify="right")
    contexts.add_column("context")
    for c in report.contexts:
        line = Text(_flat(c.before), style="dim")
        line.append(f"[[{_flat(c.token)}]]", style="bold black on yellow")
        line.append(_flat(c.after), style="dim")
        contexts.add_row(f"{c.activation:.3g}", line)
    histogram = Table(title="activation histogram (bars: log count)", show_edge=False)
    for name in ("activation", "", "count", "top tokens"):
        histogram.add_column(name, justify="right" if name == "count" else "left")
    rows = coarse_histogram(report, TERMINAL_BINS)
    largest = max((math.log1p(n) for _, _, n, _ in rows), default=0)
    for low, high, n, split in rows:
        bar = Text(_bar(math.log1p(n), largest), "cyan")
        histogram.add_row(f"{low:.3g}–{high:.3g}", bar, str(n), _top_split(split, n))
    parts: list[Any] = [header, contexts, histogram]
    parts.append(Text(f"top tokens (share of activation mass): {_scores(report.top_tokens, True)}"))
    for label, effects in (("ablation", report.logit_effects), ("direct", report.direct_effects)):
        if effects:
            parts.append(Text(f"{label} effect, logits down: {_scores(effects['down'])}"))
            parts.append(Text(f"{label} effect, logits up:   {_scores(effects['up'])}"))
    return Group(*parts)


def frequency_renderable(report: FrequencyReport) -> Group:
    """Log10 firing-frequency histogram of a whole dictionary."""
    edges, counts = report.log10_histogram()
    table = Table(title=f"feature frequencies at {report.site} (log10 density)", show_edge=False)
    for name in ("log10 freq", "", "features"):
        table.add_column(name, justify="right" if name == "features" else "left")
    largest = max(counts, default=0)
    for b, n in enumerate(counts):
        table.add_row(f"{edges[b]:.2f}–{edges[b + 1]:.2f}", Text(_bar(n, largest), "cyan"), str(n))
    summary = Text(
        f"{len(report.frequencies)} features, {report.dead} dead (never fired) "
        f"in {report.positions:,} tokens"
    )
    return Group(table, summary)


# ------------------------------------------------------------------------------------- PNG
def _label(token: str) -> str:
    return shown(token).replace("$", r"\$")


def save_feature_png(report: FeatureReport, path: str | Path) -> Path:
    """Activation histogram stacked by token and the distribution of ablation logit changes."""
    panels = 2 if report.logit_effect_values is not None else 1
    fig = new_figure((5.2 * panels, 3.2))
    axes = fig.subplots(1, panels, squeeze=False)
    ax = axes[0][0]
    last = max((b for b, n in enumerate(report.histogram_counts) if n), default=0) + 1
    edges = report.histogram_edges[: last + 1]
    widths = [h - lo for lo, h in zip(edges[:-1], edges[1:], strict=True)]
    bottom = [0] * last
    rest = list(report.histogram_counts[:last])
    for token, counts in report.histogram_split[:5]:
        ax.bar(edges[:-1], counts[:last], widths, bottom=bottom, align="edge", label=_label(token))
        bottom = [b + c for b, c in zip(bottom, counts[:last], strict=True)]
        rest = [r - c for r, c in zip(rest, counts[:last], strict=True)]
    ax.bar(edges[:-1], rest, widths, bottom=bottom, align="edge", color="0.75", label="other")
    ax.set_xlabel("activation")
    ax.set_ylabel("firings")
    ax.set_title(f"{report.name}: activations by token", fontsize=10)
    ax.legend(fontsize=7)
    if panels == 2:
        ax = axes[0][1]
        values = report.logit_effect_values.numpy()
        ax.hist(values, bins=60, color="#4a90d9")
        ax.set_yscale("log")
        ax.set_xlabel("logit change when ablated (mean over top contexts)")
        ax.set_ylabel("vocabulary tokens")
        down = ", ".join(_label(t.token) for t in report.logit_effects["down"][:4])
        ax.set_title(f"largest drops: {down}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return Path(path)


def save_frequency_png(report: FrequencyReport, path: str | Path) -> Path:
    """Histogram of log10 firing frequency over the dictionary's live features."""
    edges, counts = report.log10_histogram()
    fig = new_figure((5.2, 3.2))
    ax = fig.subplots()
    if counts:
        ax.bar(
            edges[:-1],
            counts,
            [h - lo for lo, h in zip(edges[:-1], edges[1:], strict=True)],
            align="edge",
        )
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title(
        f"{report.site}: {len(report.frequencies)} features, {report.dead} dead", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return Path(path)
