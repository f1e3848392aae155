"""One streaming pass over token batches collecting, per dictionary feature, bounded statistics.

For every feature: firing count (frequency) and the `top_k` largest activations with the token
where they occur. For *chosen* features also the full context row of each top activation (to show
it and to re-run the model on it), an activation histogram over fixed bins split by token, and the
activation mass per token. Memory does not grow with the corpus: top-k lists are merged per batch
with `topk`, and histograms keep `bins` bins whose range doubles (merging bin pairs) when a larger
activation arrives. Features are read as `spliced(model, site).features.output` in an nnsight
trace that stops after the site. The first real position of each context (BOS) is not scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from sae_circuits import engine
from sae_circuits.batches import TokenBatch, from_rows, scored_positions, split_batch
from sae_circuits.dictionary import Dictionary
from sae_circuits.errors import UserInputError
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote
from sae_circuits.sites import Site
from sae_circuits.splice import temporarily_attached


@dataclass
class FeatureStats:
    """What one pass collected. Unit `j` is dictionary feature `features[j]`.

    `top_values`/`top_tokens`/`top_positions`: (F, k), best first; entries past a feature's number of
    firings hold -inf. With chosen features: `top_rows` (F, k, L) the context of each top activation
    (-1 at pad positions), `hist_counts` (F, bins, V) firings per activation bin and token over
    [0, `hist_upper`), `token_mass` (F, V) summed activation per token.
    """

    site: Site
    features: torch.Tensor
    positions: int
    fires: torch.Tensor
    top_values: torch.Tensor
    top_tokens: torch.Tensor
    top_positions: torch.Tensor
    top_rows: torch.Tensor | None = None
    hist_upper: torch.Tensor | None = None
    hist_counts: torch.Tensor | None = None
    token_mass: torch.Tensor | None = None

    @property
    def frequencies(self) -> torch.Tensor:
        """(F,) share of scored positions where each feature is positive."""
        return self.fires.double() / max(self.positions, 1)


class _Collector:
    """Merges batches into `stats`; `detailed` keeps context rows, histograms and token mass."""

    def __init__(
        self, site: Site, features: torch.Tensor, top_k: int, vocab: int, bins: int, detailed: bool
    ) -> None:
        n = len(features)
        self.stats = FeatureStats(
            site=site,
            features=features,
            positions=0,
            fires=torch.zeros(n, dtype=torch.long),
            top_values=torch.full((n, top_k), -math.inf),
            top_tokens=torch.full((n, top_k), -1, dtype=torch.long),
            top_positions=torch.full((n, top_k), -1, dtype=torch.long),
        )
        self.vocab, self.bins, self.detailed = vocab, bins, detailed
        if detailed:
            self.stats.hist_upper = torch.zeros(n)
            self.stats.hist_counts = torch.zeros(n, bins, vocab)
            self.stats.token_mass = torch.zeros(n, vocab)

    def update(self, acts: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Merge one batch: `acts` (B, T, F), `ids` and boolean attention `mask` (B, T)."""
        s = self.stats
        scored = scored_positions(mask, skip_first=True)
        where = scored.nonzero()  # (n, 2): row, position
        flat = acts[scored]  # (n, F), same order as `where`
        tokens = ids[scored]
        s.positions += flat.shape[0]
        s.fires += (flat > 0).sum(0)
        k = min(s.top_values.shape[1], flat.shape[0])
        if k == 0:
            return
        values, index = flat.topk(k, dim=0)  # (k, F)
        values, index = values.T, index.T  # (F, k)
        merged = torch.cat([s.top_values, values], 1).topk(s.top_values.shape[1], dim=1)
        pick = merged.indices
        s.top_values = merged.values
        s.top_tokens = torch.cat([s.top_tokens, tokens[index]], 1).gather(1, pick)
        s.top_positions = torch.cat([s.top_positions, where[index, 1]], 1).gather(1, pick)
        if self.detailed:
            rows = ids.masked_fill(~mask, -1)[where[index, 0]]  # (F, k, L)
            if s.top_rows is None:
                s.top_rows = torch.full((len(s.features), s.top_values.shape[1], ids.shape[1]), -1)
            if s.top_rows.shape[2] != ids.shape[1]:
                raise UserInputError("all token batches must have the same context length")
            both = torch.cat([s.top_rows, rows], 1)
            s.top_rows = both.gather(1, pick[..., None].expand(-1, -1, both.shape[2]))
            self._update_histograms(flat, tokens)

    def _update_histograms(self, flat: torch.Tensor, tokens: torch.Tensor) -> None:
        s = self.stats
        for j in range(flat.shape[1]):
            fired = flat[:, j] > 0
            if not fired.any():
                continue
            values, toks = flat[fired, j], tokens[fired]
            self._fit_range(j, values.max().item())
            width = s.hist_upper[j] / self.bins
            which = (values / width).long().clamp_max(self.bins - 1)
            counts = torch.bincount(which * self.vocab + toks, minlength=self.bins * self.vocab)
            s.hist_counts[j] += counts.view(self.bins, self.vocab)
            s.token_mass[j] += torch.bincount(toks, weights=values, minlength=self.vocab)

    def _fit_range(self, j: int, largest: float) -> None:
        """Make [0, upper) hold `largest`: a power of two first, then double by merging bin pairs."""
        s = self.stats
        if s.hist_upper[j] == 0:
            s.hist_upper[j] = 2.0 ** (math.floor(math.log2(largest)) + 1)
        while largest >= s.hist_upper[j]:
            half = s.hist_counts[j].view(self.bins // 2, 2, self.vocab).sum(1)
            s.hist_counts[j] = torch.cat([half, torch.zeros_like(half)])
            s.hist_upper[j] *= 2


def collect(
    model: Model,
    site: str | Site,
    dictionary: Dictionary,
    batches: Iterable[TokenBatch],
    features: Sequence[int] | None = None,
    top_k: int = 20,
    bins: int = 64,
    progress: bool = True,
    total_batches: int | None = None,
    remote: Remote = False,
) -> FeatureStats:
    """Stream `batches` (token ids `(B, T)` or `(ids, mask)` pairs) through `model` with `dictionary`
    spliced at `site` and collect `FeatureStats`.

    `features=None` collects frequencies and top-k activations/tokens for every feature; a list of
    feature indices also keeps top contexts, histograms (`bins`, a power of two) and token mass.
    `remote` (True: NDIF, "local": nnsight's simulation) runs each batch as a request.
    """
    site = Site.parse(site)
    if bins < 2 or bins & (bins - 1):
        raise UserInputError("bins must be a power of two >= 2")
    index = torch.arange(dictionary.d_dict) if features is None else torch.tensor(list(features))
    if len(index) == 0 or index.min() < 0 or index.max() >= dictionary.d_dict:
        raise UserInputError(
            f"feature indices must be in 0..{dictionary.d_dict - 1} for the dictionary at {site}"
        )
    vocab = int(model.config.vocab_size)
    collector = _Collector(site, index, top_k, vocab, bins, detailed=features is not None)
    hook_index = None if features is None else index
    with (
        temporarily_attached(model, {site: dictionary}),
        torch.no_grad(),
        progress_bar("collecting features", total_batches, enabled=progress) as bar,
    ):
        for batch in batches:
            ids, mask = split_batch(batch)
            acts = _features(model, site, ids, mask, remote)
            acts = acts if hook_index is None else acts[..., hook_index]
            collector.update(acts.float().cpu(), ids.cpu(), mask.cpu())
            bar.advance(0)
    return collector.stats


def row_activations(
    model: Model,
    site: Site,
    dictionary: Dictionary,
    features: Sequence[int] | torch.Tensor,
    rows: torch.Tensor,
    batch_size: int = 64,
    remote: Remote = False,
) -> torch.Tensor:
    """(n, L, F) activations of `features` at every position of context `rows` (n, L), where -1
    marks pads (`FeatureStats.top_rows`), with `dictionary` spliced at `site`; one trace per
    `batch_size` rows, each stopped after the site; `remote` as for `collect`."""
    features = torch.as_tensor(features, dtype=torch.long)
    out = [torch.zeros(0, rows.shape[1], len(features))]
    with temporarily_attached(model, {site: dictionary}), torch.no_grad():
        for start in range(0, rows.shape[0], batch_size):
            chunk = rows[start : start + batch_size].long()
            ids, mask = from_rows(chunk, model.tokenizer.pad_token_id or 0)
            acts = _features(model, site, ids, mask, remote)[..., features]
            out.append(acts.float().cpu())
    return torch.cat(out)


def _features(
    model: Model, site: Site, ids: torch.Tensor, mask: torch.Tensor, remote: Remote
) -> torch.Tensor:
    """The features at `site` of one batch, in a run stopped after the site."""
    tokens = engine.Tokens(ids, mask)
    return engine.read(model, tokens, [site], remote=remote, stop=True).features[site]
