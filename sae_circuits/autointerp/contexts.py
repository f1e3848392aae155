"""Contexts of a unit (a feature of a dictionary, or a direction of a basis) with per-token
activations: its top-activating contexts and random ones, as the explainer and scorers see them.

A context is one row of the scanned token batches (`text.token_batches` packs non-overlapping
windows of `ctx_len` tokens); its first real position (BOS) is not shown. A unit's activation is its
positive side (`max(0, value)`), so that features, neurons and principal directions are read alike.
The top contexts are the distinct rows holding the unit's largest activations, found by
`features.collect`; then one more run over those rows and a seeded sample of random rows reads the
activation of every token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sae_circuits.batches import TokenBatch, scored_positions, split_batch
from sae_circuits.dictionary import Dictionary
from sae_circuits.errors import UserInputError
from sae_circuits.features.collect import collect, row_activations
from sae_circuits.features.report import TokenText
from sae_circuits.protocols import Model
from sae_circuits.sites import Site


@dataclass
class Record:
    """One context: its tokens as text and the unit's activation on each."""

    tokens: list[str]
    activations: list[float]

    @property
    def peak(self) -> float:
        return max(self.activations, default=0.0)


@dataclass
class UnitContexts:
    """What the explainer and the scorers see of one unit.

    `top`: distinct contexts by their largest activation, best first; `random`: a seeded sample of
    the other contexts. Top contexts alternate between the explanation set (ranks 0, 2, 4...) and
    the held-out set the scorers use (ranks 1, 3, 5...). `max_activation` (the largest activation
    seen) scales activations to the integers 0..10 of the prompts.
    """

    unit: int
    top: list[Record]
    random: list[Record]

    @property
    def max_activation(self) -> float:
        return max((r.peak for r in self.top), default=0.0)

    @property
    def explanation_set(self) -> list[Record]:
        return self.top[0::2]

    @property
    def held_out(self) -> list[Record]:
        return self.top[1::2]

    def quiet(self, threshold: float) -> list[Record]:
        """Random contexts where the unit stays below `threshold` × its largest activation."""
        return [r for r in self.random if r.peak < threshold * self.max_activation]


def sample_units(
    model: Model,
    site: str | Site,
    basis: Dictionary,
    batches: Sequence[TokenBatch],
    n: int,
    seed: int = 0,
    progress: bool = True,
) -> list[int]:
    """`n` units of `basis` drawn at random (seeded) among those that fire on `batches`, sorted."""
    stats = collect(
        model, site, basis, batches, top_k=1, progress=progress, total_batches=len(batches)
    )
    alive = (stats.fires > 0).nonzero()[:, 0]
    if len(alive) == 0:
        raise UserInputError(f"no unit of the {basis.kind} basis at {site} fires on this text")
    generator = torch.Generator().manual_seed(seed)
    pick = alive[torch.randperm(len(alive), generator=generator)[:n]]
    return sorted(pick.tolist())


def unit_contexts(
    model: Model,
    site: str | Site,
    basis: Dictionary,
    batches: Sequence[TokenBatch],
    units: Sequence[int],
    n_top: int = 20,
    n_random: int = 20,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> list[UnitContexts]:
    """Top and random contexts, with per-token activations, of each unit in `units`."""
    site = Site.parse(site)
    if n_top < 2 or n_random < 1:
        raise UserInputError("need at least 2 top contexts and 1 random context per unit")
    stats = collect(
        model,
        site,
        basis,
        batches,
        units,
        top_k=4 * n_top,
        bins=2,
        progress=progress,
        total_batches=len(batches),
    )
    pool = _all_rows(batches)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    pool = pool[order[: 2 * n_random + n_top]]
    tops = [
        _distinct_rows(stats.top_rows[j], stats.top_values[j], n_top) for j in range(len(units))
    ]
    rows = torch.cat([pool, *tops]) if tops else pool
    acts = row_activations(model, site, basis, list(units), rows, batch_size).clamp_min(0)
    text = TokenText(model.tokenizer)
    result, start = [], len(pool)
    for j, unit in enumerate(units):
        top_index = range(start, start + len(tops[j]))
        start += len(tops[j])
        seen = {tuple(r.tolist()) for r in tops[j]}
        others = [i for i in range(len(pool)) if tuple(pool[i].tolist()) not in seen][:n_random]
        result.append(
            UnitContexts(
                unit=int(unit),
                top=[_record(rows[i], acts[i, :, j], text) for i in top_index],
                random=[_record(rows[i], acts[i, :, j], text) for i in others],
            )
        )
    return result


def _all_rows(batches: Sequence[TokenBatch]) -> torch.Tensor:
    """Every context of `batches` as one `(n, L)` tensor with -1 at pad positions."""
    rows = []
    for batch in batches:
        ids, mask = split_batch(batch)
        rows.append(ids.masked_fill(~mask, -1).cpu())
    if not rows or len({r.shape[1] for r in rows}) != 1:
        raise UserInputError("need token batches, all of the same context length")
    return torch.cat(rows)


def _distinct_rows(rows: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` distinct rows among those of positive top activations (best first)."""
    keep, seen = [], set()
    for row, value in zip(rows, values.tolist(), strict=True):
        key = tuple(row.tolist())
        if value > 0 and key not in seen:
            seen.add(key)
            keep.append(row)
        if len(keep) == n:
            break
    return torch.stack(keep) if keep else rows[:0]


def _record(row: torch.Tensor, acts: torch.Tensor, text: TokenText) -> Record:
    shown = scored_positions(row[None] >= 0, skip_first=True)[0]
    return Record(
        tokens=[text(int(t)) for t in row[shown].tolist()],
        activations=[round(float(a), 6) for a in acts[shown].tolist()],
    )


def normalized(values: Sequence[float], max_activation: float) -> list[int]:
    """Activations on the prompts' scale: `floor(10 · value / max_activation)` in 0..10."""
    if max_activation <= 0 or not math.isfinite(max_activation):
        return [0 for _ in values]
    return [min(10, max(0, math.floor(10 * v / max_activation))) for v in values]
