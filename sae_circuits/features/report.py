"""Feature reports built from one collection pass: contexts, histograms, frequencies, effects.

`inspect_features` gives a `FeatureReport` per chosen feature (shown by rich in a terminal, as HTML
in Jupyter, saved as PNG); `feature_frequencies` a `FrequencyReport` for a whole dictionary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_circuits.batches import TokenBatch
from sae_circuits.dictionary import Dictionary
from sae_circuits.features.collect import FeatureStats, collect, row_activations
from sae_circuits.features.effects import ablation_effects, direct_effects
from sae_circuits.nodes import Node
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote
from sae_circuits.sites import Site


@dataclass
class Context:
    """A top-activating context: tokens before, the activating token, and a few after; `tokens`
    holds every token of that window with the feature's activation on it (the per-token view)."""

    before: str
    token: str
    after: str
    activation: float
    token_id: int
    tokens: list[tuple[str, float]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The window with the activating token marked as `[[token]]`."""
        return f"{self.before}[[{self.token}]]{self.after}"


@dataclass
class TokenScore:
    token: str
    value: float
    count: int = 0


@dataclass
class FeatureReport:
    """What feature `index` at `site` reads (contexts, histogram, tokens) and does (logit effects).

    `histogram_counts[b]` counts firings with activation in [edges[b], edges[b+1]);
    `histogram_split` gives those counts for the most frequent firing tokens, `(token, counts)`.
    `logit_effects` (down = largest drops) are means over the top contexts of ablated − clean logits;
    `logit_effect_values` holds that mean for every vocabulary token (its distribution).
    """

    site: Site
    index: int
    frequency: float
    positions: int
    contexts: list[Context]
    top_tokens: list[TokenScore]
    histogram_edges: list[float]
    histogram_counts: list[int]
    histogram_split: list[tuple[str, list[int]]]
    logit_effects: dict[str, list[TokenScore]] = field(default_factory=dict)
    logit_effect_values: torch.Tensor | None = None
    direct_effects: dict[str, list[TokenScore]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The feature's node id, `<site>/<index>`."""
        return Node(self.site, self.index).id

    def to_json(self) -> dict[str, Any]:
        """The `inspect --json` document."""

        def scores(items: list[TokenScore], key: str) -> list[dict[str, Any]]:
            return [{"token": t.token, key: round(t.value, 6)} for t in items]

        return {
            "feature": self.name,
            "frequency": self.frequency,
            "tokens_scanned": self.positions,
            "top_contexts": [
                {
                    "text": c.text,
                    "token": c.token,
                    "activation": round(c.activation, 6),
                    "before": c.before,
                    "after": c.after,
                    "tokens": [[token, round(value, 6)] for token, value in c.tokens],
                }
                for c in self.contexts
            ],
            "top_tokens": [
                {"token": t.token, "share": round(t.value, 6), "count": t.count}
                for t in self.top_tokens
            ],
            "logit_effects": {k: scores(v, "logit_change") for k, v in self.logit_effects.items()},
            "direct_effects": {k: scores(v, "logit") for k, v in self.direct_effects.items()},
            "histogram": {
                "edges": self.histogram_edges,
                "counts": self.histogram_counts,
                "by_token": [{"token": t, "counts": c} for t, c in self.histogram_split],
            },
        }

    def __rich__(self) -> Any:
        from sae_circuits.features.views import feature_renderable

        return feature_renderable(self)

    def _repr_html_(self) -> str:
        from sae_circuits.views import feature_view, notebook_html

        return notebook_html(feature_view(self))

    def save_png(self, path: str | Path) -> Path:
        """Activation histogram split by token, and the distribution of logit changes."""
        from sae_circuits.features.views import save_feature_png

        return save_feature_png(self, path)


@dataclass
class FrequencyReport:
    """Firing frequency of every feature of a dictionary (`frequencies[i]` for feature i) and the
    tokens of its largest activations (`top_tokens[i]`: token, largest activation on it, count)."""

    site: Site
    positions: int
    frequencies: torch.Tensor
    top_tokens: list[list[TokenScore]] = field(default_factory=list)

    @property
    def dead(self) -> int:
        return int((self.frequencies == 0).sum())

    def log10_histogram(self, bins_per_decade: int = 4) -> tuple[list[float], list[int]]:
        """(edges, counts) of log10 frequency over the features that fired."""
        alive = self.frequencies[self.frequencies > 0].double().log10()
        if alive.numel() == 0:
            return [], []
        low = torch.floor(alive.min()).item()
        n = int(round(-low * bins_per_decade)) or 1
        edges = torch.linspace(low, 0, n + 1)
        counts = torch.histc(alive.clamp(low, 0), n, low, 0).long()
        return edges.tolist(), counts.tolist()

    def to_json(self) -> dict[str, Any]:
        edges, counts = self.log10_histogram()
        return {
            "site": str(self.site),
            "tokens_scanned": self.positions,
            "features": len(self.frequencies),
            "dead": self.dead,
            "log10_frequency_histogram": {"edges": edges, "counts": counts},
            "frequencies": [round(f, 8) for f in self.frequencies.tolist()],
        }

    def __rich__(self) -> Any:
        from sae_circuits.features.views import frequency_renderable

        return frequency_renderable(self)

    def _repr_html_(self) -> str:
        from sae_circuits.views import dictionary_view, notebook_html

        return notebook_html(dictionary_view(self))

    def save_png(self, path: str | Path) -> Path:
        from sae_circuits.features.views import save_frequency_png

        return save_frequency_png(self, path)


class TokenText:
    """Decodes token ids to strings, one id at a time, with a cache."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]

    def span(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)) if ids else ""


def inspect_features(
    model: Model,
    site: str | Site,
    dictionary: Dictionary,
    batches: Iterable[TokenBatch],
    features: Sequence[int],
    top_k: int = 20,
    effects: bool = True,
    n_tokens: int = 10,
    window: tuple[int, int] = (12, 4),
    progress: bool = True,
    total_batches: int | None = None,
    remote: Remote = False,
) -> list[FeatureReport]:
    """One pass over `batches`, then a report per feature; `effects` adds the ablation effects on
    the top contexts and the direct effects. `n_tokens` tokens per ranked list; `window` = tokens
    shown (before, after) the activating one. `remote` (True: NDIF, "local": nnsight's
    simulation) runs every trace as a request (the direct effects are computed here)."""
    site = Site.parse(site)
    stats = collect(
        model,
        site,
        dictionary,
        batches,
        features,
        top_k,
        progress=progress,
        total_batches=total_batches,
        remote=remote,
    )
    text = TokenText(model.tokenizer)
    direct = direct_effects(model, dictionary.decoder_directions[stats.features].detach())
    reports = []
    fired = stats.top_values > 0  # (F, k), a prefix of each row
    # Causal models: nothing after the last shown token changes what is read or measured up to it.
    end = int(stats.top_positions[fired].max()) + 1 if fired.any() else 0
    rows = stats.top_rows[fired][:, : end + window[1]] if fired.any() else torch.zeros(0, 0)
    acts = row_activations(model, site, dictionary, stats.features, rows.long(), remote=remote)
    starts = [0, *fired.sum(1).cumsum(0).tolist()]
    for j, index in enumerate(stats.features.tolist()):
        own = acts[starts[j] : starts[j + 1], :, j]
        report = _report(stats, j, text, n_tokens, window, own)
        if effects and fired[j].any():
            positions = stats.top_positions[j][fired[j]]
            rows = stats.top_rows[j][fired[j], : int(positions.max()) + 1]
            delta = ablation_effects(model, site, dictionary, index, rows, positions, remote)
            delta = delta.mean(0)
            report.logit_effect_values = delta
            report.logit_effects = _ranked(delta, text, n_tokens)
        if effects and direct is not None:
            report.direct_effects = _ranked(direct[j], text, n_tokens)
        reports.append(report)
    return reports


def _report(
    stats: FeatureStats,
    j: int,
    text: TokenText,
    n_tokens: int,
    window: tuple[int, int],
    acts: torch.Tensor,
    n_split: int = 6,
) -> FeatureReport:
    """The report of unit `j`; `acts` (contexts, L): its activations on its top context rows."""
    contexts = []
    for c, (value, row, position) in enumerate(
        zip(
            stats.top_values[j].tolist(),
            stats.top_rows[j],
            stats.top_positions[j].tolist(),
            strict=True,
        )
    ):
        if value <= 0:
            break
        real = (row >= 0).nonzero()[:, 0]
        start = max(int(real[0]) + 1, position - window[0])  # skip the BOS position
        ids = row.tolist()
        shown = [p for p in range(start, position + 1 + window[1]) if p < len(ids) and ids[p] >= 0]
        after = [ids[p] for p in shown if p > position]
        contexts.append(
            Context(
                text.span(ids[start:position]),
                text(ids[position]),
                text.span(after),
                value,
                ids[position],
                [(text(ids[p]), float(acts[c, p])) for p in shown],
            )
        )
    counts = stats.hist_counts[j]  # (bins, V)
    mass = stats.token_mass[j]
    per_token = counts.sum(0)
    top = mass.topk(min(n_tokens, int((mass > 0).sum())))
    total = mass.sum().clamp_min(1e-30)
    top_tokens = [
        TokenScore(text(t), (m / total).item(), int(per_token[t]))
        for m, t in zip(top.values, top.indices.tolist(), strict=True)
    ]
    edges = torch.linspace(0, float(stats.hist_upper[j]), counts.shape[0] + 1).tolist()
    frequent = per_token.topk(min(n_split, int((per_token > 0).sum()))).indices.tolist()
    return FeatureReport(
        site=stats.site,
        index=int(stats.features[j]),
        frequency=stats.frequencies[j].item(),
        positions=stats.positions,
        contexts=contexts,
        top_tokens=top_tokens,
        histogram_edges=edges,
        histogram_counts=counts.sum(1).long().tolist(),
        histogram_split=[(text(t), counts[:, t].long().tolist()) for t in frequent],
    )


def _ranked(values: torch.Tensor, text: TokenText, n: int) -> dict[str, list[TokenScore]]:
    """The `n` largest ("up") and smallest ("down") entries of a (V,) vector, as tokens."""
    n = min(n, values.numel())
    up, down = values.topk(n), (-values).topk(n)
    return {
        "up": [
            TokenScore(text(t), v.item())
            for v, t in zip(up.values, up.indices.tolist(), strict=True)
        ],
        "down": [
            TokenScore(text(t), -v.item())
            for v, t in zip(down.values, down.indices.tolist(), strict=True)
        ],
    }


def feature_frequencies(
    model: Model,
    site: str | Site,
    dictionary: Dictionary,
    batches: Iterable[TokenBatch],
    progress: bool = True,
    total_batches: int | None = None,
    top_k: int = 10,
    remote: Remote = False,
) -> FrequencyReport:
    """Firing frequency of every feature over `batches` (one pass) and the distinct tokens of its
    `top_k` largest activations, largest first; `remote` as for `collect`."""
    stats = collect(
        model,
        site,
        dictionary,
        batches,
        top_k=top_k,
        progress=progress,
        total_batches=total_batches,
        remote=remote,
    )
    text = TokenText(model.tokenizer)
    top_tokens = []
    for values, tokens in zip(stats.top_values.tolist(), stats.top_tokens.tolist(), strict=True):
        scores: dict[int, TokenScore] = {}
        for value, token in zip(values, tokens, strict=True):
            if value <= 0:
                break
            score = scores.setdefault(token, TokenScore(text(token), value))
            score.count += 1
        top_tokens.append(list(scores.values()))
    return FrequencyReport(stats.site, stats.positions, stats.frequencies, top_tokens)
