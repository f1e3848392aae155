"""Cunningham et al.'s greedy search for the directions that carry a behaviour.

Start with every direction of a basis patched from the corrupted run into the clean run
(`x' = x_clean + Σ_{i ∈ S} (c̄_i − c_i) d_i`, S = all), so the output is close to the corrupted
one; then, in a random order, un-patch each direction whenever doing so raises the KL to the
corrupted output by less than a threshold. What stays patched is the set the behaviour needs; the
curve of its size against the final KL over a log-spaced range of thresholds compares bases.

The search is sequential, but each decision is exact and cheap: a forward evaluates a chunk of
candidates as cumulative removals (copy j removes candidates 1…j), and every removal up to the
first one that fails the threshold is accepted, exactly as the one-at-a-time search would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sae_circuits import engine
from sae_circuits.constants import DEFAULT_THRESHOLDS
from sae_circuits.dictionary import Dictionary
from sae_circuits.errors import UserInputError
from sae_circuits.interventions import Positions
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.site_runs import (
    SiteRun,
    forward_plan,
    patched_runs,
    position_weights,
    read_run,
)
from sae_circuits.sites import Site
from sae_circuits.tasks import Task


@dataclass
class GreedyCurve:
    """The greedy search of one basis at one site, one entry per threshold."""

    site: str
    basis: str
    thresholds: list[float]
    kept: list[int]  # directions still patched at the end
    kl: list[float]  # mean KL(corrupted ‖ patched) with only those patched
    features: list[list[int]]  # the kept directions
    candidates: int  # directions whose value differs between the runs (the others are no-ops)
    start_kl: float  # KL with every direction patched


@dataclass
class _Batch:
    tokens: engine.TaskTokens
    clean: SiteRun
    corrupt: SiteRun
    delta: torch.Tensor  # (B, T, F) corrupted − clean features at the edited positions


def greedy_search(
    model: Model,
    task: Task,
    site: str | Site,
    bases: Mapping[str, Dictionary],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    seed: int = 0,
    positions: Positions = "all",
    batch_size: int = 64,
    rows_per_trace: int = 512,
    progress: bool = False,
) -> dict[str, GreedyCurve]:
    """Run the greedy search for each basis at `site` on `task`, once per threshold (nats)."""
    if not thresholds or any(t <= 0 for t in thresholds):
        raise UserInputError("greedy search thresholds must be positive (KL increases, nats)")
    site = Site.parse(site)
    plan = forward_plan(model, site)
    runs = [
        (
            batch,
            read_run(model, batch.clean, site, None, plan),
            read_run(model, batch.corrupt, site, None, plan),
        )
        for batch in engine.task_tokens(model, task).batches(batch_size)
    ]
    copies = max(1, rows_per_trace // max(len(batch) for batch, _, _ in runs))
    curves = {}
    for name, basis in bases.items():
        with torch.no_grad():
            batches = [
                _Batch(
                    batch,
                    clean,
                    corrupt,
                    (basis.encode(corrupt.x) - basis.encode(clean.x))
                    * position_weights(batch.clean.mask, positions),
                )
                for batch, clean, corrupt in runs
            ]
        directions = basis.fixed_directions("greedy searches").detach()
        moved = torch.stack([b.delta.abs().amax((0, 1)) for b in batches]).amax(0) > 0
        generator = torch.Generator().manual_seed(seed)
        candidates = moved.nonzero().flatten()
        order = candidates[torch.randperm(candidates.numel(), generator=generator)].tolist()
        all_patched = moved.clone()
        start_kl = _kl(model, site, batches, directions, all_patched, [])[0]
        curve = GreedyCurve(str(site), name, list(thresholds), [], [], [], len(order), start_kl)
        with progress_bar(
            f"{site} {name} greedy", len(thresholds) * len(order), enabled=progress
        ) as bar:
            for threshold in thresholds:
                kept, kl = all_patched.clone(), start_kl
                i = 0
                while i < len(order):
                    chunk = order[i : i + copies]
                    trial = _kl(model, site, batches, directions, kept, chunk)
                    decided = 0
                    for feature, value in zip(chunk, trial, strict=True):
                        decided += 1
                        if value - kl >= threshold:
                            break  # it stays patched; the later trials assumed its removal
                        kept[feature] = False
                        kl = value
                    i += decided
                    bar.advance(0, decided)
                curve.kept.append(int(kept.sum()))
                curve.kl.append(kl)
                curve.features.append(kept.nonzero().flatten().tolist())
        curves[name] = curve
    return curves


def _kl(
    model: Model,
    site: Site,
    batches: Sequence[_Batch],
    directions: torch.Tensor,
    patched: torch.Tensor,
    removals: Sequence[int],
) -> list[float]:
    """Mean KL(corrupted ‖ patched) over the task with the directions in `patched` patched, then
    (one value each) with `removals[:1]`, `removals[:2]`, … also un-patched; with no removals, the
    KL of `patched` itself."""
    totals = torch.zeros(max(1, len(removals)))
    n = 0
    for batch in batches:
        with torch.no_grad():
            base = batch.clean.x + (batch.delta * patched) @ directions
            if removals:
                index = torch.tensor(removals)
                steps = batch.delta[..., index].unsqueeze(-1) * directions[index]  # (B, T, C, D)
                values = base.unsqueeze(2) - steps.cumsum(2)
                values = values.permute(2, 0, 1, 3).contiguous()
            else:
                values = base.unsqueeze(0)
        logits, _ = patched_runs(model, batch.tokens.clean, site, values, batch.clean.start)
        for copy in range(values.shape[0]):
            totals[copy] += engine.kl_divergence(batch.corrupt.logits, logits[copy]).sum().item()
        n += len(batch.tokens)
    return (totals / n).tolist()


__all__ = ["DEFAULT_THRESHOLDS", "GreedyCurve", "greedy_search"]
