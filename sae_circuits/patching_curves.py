"""Patching curves: how much of a task's behaviour the top-k directions of a basis restore.

Directions at a site are ranked on a train task by attribution |Σ grad·(c − c̄)| or by |c − c̄|,
then the top k are patched on a test task: `x' = x_corrupt + Σ_{i ∈ top k} (c_i − c̄_i) d_i`,
which is the corrupted run with those features set to their clean values and the corrupted error
term kept. Each curve gives the share of the clean−corrupted metric gap restored and the KL from
the clean output, and its `ceiling` is the share restored with every feature patched (the clean
reconstruction plus the corrupted error term); `error_restored` is the share restored by patching
the error term alone (x̄ + (e − ē)), what the dictionary's error carries of the contrast.

Every basis (the dictionary, the PCA, neuron and random baselines) is applied to the site's raw
activations outside the model, so all bases share one gradient pass per batch for the ranking,
and their patched activations for all k run as copies of a batch in the same forwards. Blocks
before the site are not recomputed in those forwards: their output is the corrupted run's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sae_circuits import engine
from sae_circuits.buffer import harvest
from sae_circuits.constants import BASELINES
from sae_circuits.dictionary import Dictionary, LinearBasis
from sae_circuits.errors import UserInputError
from sae_circuits.interventions import Positions
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote
from sae_circuits.site_runs import (
    forward_plan,
    patched_runs,
    position_weights,
    read_run,
    site_gradient,
    site_width,
)
from sae_circuits.sites import Site, SiteMap, torch_module
from sae_circuits.splice import attached
from sae_circuits.tasks import Task

Ranking = Literal["attribution", "difference"]


@dataclass
class PatchingCurve:
    """Patching the top-k directions of one basis at one site, for the k in `ks`."""

    site: str
    basis: str
    ranking: str
    features: list[int]  # the K top-ranked directions, best first
    ks: list[int]  # the k evaluated, increasing (every k up to K, or a grid ending at K)
    restored: list[float]  # per k: (mean m_k − mean m_corrupt) / (mean m_clean − mean m_corrupt)
    kl: list[float]  # per k: mean KL(clean ‖ patched) at the last position
    ceiling: float  # the share restored with every direction of the basis patched
    ceiling_kl: float
    error_restored: float  # the share restored by patching only the error term, x̄ + (e − ē)
    clean_metric: float
    corrupt_metric: float

    def k_to_restore(self, share: float) -> int | None:
        """The smallest evaluated k restoring at least `share` of the gap, or None within K."""
        return next((k for k, r in zip(self.ks, self.restored, strict=True) if r >= share), None)


def k_grid(max_features: int, every_k: bool = False) -> list[int]:
    """The k of a curve: every k up to 10, then 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, …
    up to `max_features` (always included); `every_k`: 1…`max_features`."""
    if max_features < 1:
        raise UserInputError("max_features must be at least 1")
    if every_k:
        return list(range(1, max_features + 1))
    ks, scale = list(range(1, min(10, max_features) + 1)), 10
    while ks[-1] < max_features:
        ks += [m * scale // 10 for m in (12, 15, 20, 25, 30, 40, 50, 60, 80, 100)]
        scale *= 10
    return sorted({k for k in ks if k < max_features} | {max_features})


# ---------------------------------------------------------------------------------- ranking
def rank_bases(
    model: Model,
    task: Task,
    site: str | Site,
    bases: Mapping[str, Dictionary],
    method: Ranking = "attribution",
    positions: Positions = "all",
    batch_size: int = 32,
    remote: Remote = False,
) -> dict[str, torch.Tensor]:
    """A score per direction of each basis at `site` (higher = patch first).

    `attribution`: |Σ grad·(c − c̄)| / n, the linearised effect on the mean metric of patching the
    direction, with the gradient `g · d_i` taken on the corrupted run (one backward per batch for
    every basis); `difference`: Σ |c − c̄| / n. Sums run over the prompts and the edited (real)
    positions.
    """
    if method not in ("attribution", "difference"):
        raise UserInputError(f"unknown ranking {method!r}; valid: attribution, difference")
    site = Site.parse(site)
    totals = {name: torch.zeros(basis.d_dict) for name, basis in bases.items()}
    for batch in engine.task_tokens(model, task).batches(batch_size):
        x_clean = read_run(model, batch.clean, site, remote=remote).x
        if method == "attribution":
            x_corrupt, grad = site_gradient(model, batch.corrupt, site, batch.metric, remote)
        else:
            x_corrupt, grad = read_run(model, batch.corrupt, site, remote=remote).x, None
        weight = position_weights(batch.clean.mask, positions).to(x_clean.dtype)
        for name, basis in bases.items():
            with torch.no_grad():
                delta = (basis.encode(x_clean) - basis.encode(x_corrupt)) * weight
                if grad is None:
                    totals[name] += delta.abs().sum((0, 1)).cpu()
                else:
                    totals[name] += (
                        (delta * (grad @ basis.fixed_directions("attribution rankings").T))
                        .sum((0, 1))
                        .cpu()
                    )
    return {
        name: (total.abs() if method == "attribution" else total) / len(task)
        for name, total in totals.items()
    }


def rank_features(
    model: Model,
    task: Task,
    site: str | Site,
    method: Ranking = "attribution",
    positions: Positions = "all",
    batch_size: int = 32,
    dictionary: Dictionary | None = None,
) -> torch.Tensor:
    """`rank_bases` for one dictionary (default: the one attached at `site`)."""
    site = Site.parse(site)
    dictionary = _dictionary_at(model, site, dictionary)
    return rank_bases(model, task, site, {"sae": dictionary}, method, positions, batch_size)["sae"]


def _dictionary_at(model: Model, site: Site, dictionary: Dictionary | None) -> Dictionary:
    if dictionary is None:
        found = attached(model).get(site)
        if found is None:
            raise UserInputError(f"no dictionary is attached at {site} and none was given")
        dictionary = found
    in_site = dictionary.config.in_site
    if in_site is not None and Site.parse(in_site) != site:
        raise UserInputError(
            f"patching curves need a dictionary that reads and writes {site}; this one reads "
            f"{in_site} (a transcoder)"
        )
    return dictionary


# ----------------------------------------------------------------------------------- curves
def compare_bases(
    model: Model,
    train: Task,
    test: Task,
    site: str | Site,
    dictionary: Dictionary | None = None,
    max_features: int = 50,
    ranking: Ranking = "attribution",
    positions: Positions = "all",
    seed: int = 0,
    progress: bool = False,
    baselines: Sequence[str] = BASELINES,
    every_k: bool = False,
    corpus_tokens: int = 16384,
    batch_size: int = 32,
    rows_per_trace: int = 512,
    remote: Remote = False,
    corpus: torch.Tensor | None = None,
) -> dict[str, PatchingCurve]:
    """Patching curves at `site` for the dictionary (`sae`; default: the one attached there) and
    the `baselines` (see `baseline_bases`, which `corpus_tokens` and `corpus` are passed to), all
    ranked by the same method on `train` and patched on `test` at the k of
    `k_grid(max_features, every_k)`. `remote` (True: NDIF, "local": nnsight's simulation) runs
    every trace as a request."""
    site = Site.parse(site)
    bases: dict[str, Dictionary] = {"sae": _dictionary_at(model, site, dictionary)}
    bases.update(baseline_bases(model, train, site, seed, baselines, corpus_tokens, remote, corpus))
    return curves_for_bases(
        model,
        train,
        test,
        site,
        bases,
        max_features=max_features,
        ranking=ranking,
        positions=positions,
        progress=progress,
        every_k=every_k,
        batch_size=batch_size,
        rows_per_trace=rows_per_trace,
        remote=remote,
    )


def patching_curve(
    model: Model,
    train: Task,
    test: Task,
    site: str | Site,
    dictionary: Dictionary | None = None,
    basis: str = "sae",
    every_k: bool = True,
    **options: Any,
) -> PatchingCurve:
    """The curve of one dictionary or basis (default: the dictionary attached at `site`) at every
    k; `options` are those of `curves_for_bases` (`max_features`, `ranking`, `positions`, ...)."""
    bases = {basis: _dictionary_at(model, Site.parse(site), dictionary)}
    return curves_for_bases(model, train, test, site, bases, every_k=every_k, **options)[basis]


def curves_for_bases(
    model: Model,
    train: Task,
    test: Task,
    site: str | Site,
    bases: Mapping[str, Dictionary],
    max_features: int = 50,
    ranking: Ranking = "attribution",
    positions: Positions = "all",
    progress: bool = False,
    every_k: bool = False,
    batch_size: int = 32,
    rows_per_trace: int = 512,
    remote: Remote = False,
) -> dict[str, PatchingCurve]:
    """Rank each basis's directions on `train`, then patch its top k on `test`; every basis and
    k of a batch run as copies in shared forwards of up to `rows_per_trace` rows. `remote` as for
    `compare_bases`."""
    site = Site.parse(site)
    scores = rank_bases(model, train, site, bases, ranking, positions, batch_size, remote)
    orders = {
        name: score.argsort(descending=True)[: min(max_features, score.numel())]
        for name, score in scores.items()
    }
    grids = {name: k_grid(order.numel(), every_k) for name, order in orders.items()}
    # per basis: metric sums at each k, then the ceiling and, unless the basis is exact (a
    # LinearBasis has no error term), the error term alone
    with_error = {name: not isinstance(basis, LinearBasis) for name, basis in bases.items()}
    sums = {name: torch.zeros(len(grid) + 1 + with_error[name]) for name, grid in grids.items()}
    kls = {name: torch.zeros(len(grid) + 1 + with_error[name]) for name, grid in grids.items()}
    clean_sum = corrupt_sum = 0.0
    plan = forward_plan(model, site)
    n_batches = -(-len(test) // batch_size)
    with progress_bar(f"{site} curves", n_batches, enabled=progress) as bar:
        for batch in engine.task_tokens(model, test).batches(batch_size):
            clean = read_run(model, batch.clean, site, batch.metric, plan, remote)
            corrupt = read_run(model, batch.corrupt, site, batch.metric, plan, remote)
            clean_sum += clean.metric.sum().item()
            corrupt_sum += corrupt.metric.sum().item()
            weight = position_weights(batch.clean.mask, positions)
            slots: list[tuple[str, int]] = []
            values: list[torch.Tensor] = []
            for name, basis in bases.items():
                stack = _patched_values(
                    basis, clean.x, corrupt.x, weight, orders[name], grids[name], with_error[name]
                )
                values.append(stack)
                slots += [(name, j) for j in range(stack.shape[0])]
            values_all = torch.cat(values)
            per_trace = max(1, rows_per_trace // len(batch))
            for first in range(0, len(slots), per_trace):
                chunk = values_all[first : first + per_trace]
                logits, metric = patched_runs(
                    model, batch.corrupt, site, chunk, corrupt.start, batch.metric, remote
                )
                for j, (name, slot) in enumerate(slots[first : first + per_trace]):
                    sums[name][slot] += metric[j].sum().item()
                    kls[name][slot] += engine.kl_divergence(clean.logits, logits[j]).sum().item()
            bar.advance(0)
    n = len(test)
    clean_metric, corrupt_metric = clean_sum / n, corrupt_sum / n
    gap = clean_metric - corrupt_metric
    curves = {}
    for name, grid in grids.items():
        restored = ((sums[name] / n - corrupt_metric) / gap).tolist()  # inf/nan: no gap
        kl = (kls[name] / n).tolist()
        error_restored = restored[len(grid) + 1] if with_error[name] else 0.0
        curves[name] = PatchingCurve(
            str(site),
            name,
            ranking,
            orders[name].tolist(),
            grids[name],
            restored[: len(grid)],
            kl[: len(grid)],
            restored[len(grid)],
            kl[len(grid)],
            error_restored,
            clean_metric,
            corrupt_metric,
        )
    return curves


def _patched_values(
    basis: Dictionary,
    x_clean: torch.Tensor,
    x_corrupt: torch.Tensor,
    weight: torch.Tensor,
    order: torch.Tensor,
    grid: Sequence[int],
    with_error: bool,
) -> torch.Tensor:
    """`(len(grid) + 1 + with_error, B, T, D)`: the corrupted activation with the top k directions
    of `order` patched to their clean values for each k of `grid`, then with every direction
    patched, then (`with_error`) with only the error term patched (`x̄ + (e − ē)`, where
    `e = x − Σ c_i d_i`)."""
    with torch.no_grad():
        delta = (basis.encode(x_clean) - basis.encode(x_corrupt)) * weight
        directions = basis.fixed_directions("patching curves").to(x_clean.dtype)
        steps = delta[..., order].unsqueeze(-1) * directions[order]  # (B, T, K, D)
        cumulative = steps.cumsum(2)[:, :, [k - 1 for k in grid]]  # (B, T, G, D)
        top_k = x_corrupt.unsqueeze(2) + cumulative
        features = delta @ directions
        everything = (x_corrupt + features).unsqueeze(2)
        copies = [top_k, everything]
        if with_error:
            copies.append((x_corrupt + (x_clean - x_corrupt) * weight - features).unsqueeze(2))
        return torch.cat(copies, 2).permute(2, 0, 1, 3).contiguous()


# -------------------------------------------------------------------------------- baselines
def baseline_bases(
    model: Model,
    task: Task,
    site: str | Site,
    seed: int = 0,
    names: Sequence[str] = BASELINES,
    corpus_tokens: int = 16384,
    remote: Remote = False,
    corpus: torch.Tensor | None = None,
) -> dict[str, LinearBasis]:
    """Bases to compare a dictionary with at `site`: `pca_task` (PCA fitted on the site's
    activations over the task's clean and corrupted prompts: supervised by the task),
    `pca_corpus` (PCA fitted on `corpus_tokens` tokens of training text, as Cunningham et al.
    fitted theirs; `corpus`: those activations, when `corpus_activations` already read them),
    `neurons` (the standard basis) and `random` (a seeded rotation)."""
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise UserInputError(f"unknown baseline {unknown[0]!r}; valid: {', '.join(BASELINES)}")
    site = Site.parse(site)
    found: dict[str, LinearBasis] = {}
    width = None
    for name in names:
        if name == "pca_task":
            rows = []
            for prompts in (task.clean, task.corrupt):
                for _, batch in engine.batches(engine.tokenize(model, prompts), 32):
                    rows.append(read_run(model, batch, site, remote=remote).x[batch.mask])
            found[name] = LinearBasis.pca(torch.cat(rows), site=site)
        elif name == "pca_corpus":
            if corpus is None:
                corpus = corpus_activations(model, [site], corpus_tokens, remote)[site]
            found[name] = LinearBasis.pca(corpus, site=site)
        else:
            width = width or site_width(model, site)
            found[name] = (
                LinearBasis.neurons(width, site=site)
                if name == "neurons"
                else LinearBasis.random(width, seed=seed, site=site)
            )
    return found


def corpus_activations(
    model: Model, sites: Sequence[str | Site], n_tokens: int = 16384, remote: Remote = False
) -> SiteMap:
    """Per site, `(≈n_tokens, D)`: its activations over training text (the embedded model's
    training corpus, or for another model the default text sample), each context's BOS left out;
    one pass over the text reads every site."""
    from sae_circuits.models import is_embedded
    from sae_circuits.text import token_batches, training_documents

    sites = sorted({Site.parse(site) for site in sites})
    documents = training_documents(is_embedded(model))
    device = next(torch_module(model).parameters()).device
    rows: dict[str, list[torch.Tensor]] = {str(site): [] for site in sites}
    for ids in token_batches(model.tokenizer, documents, 128, 16, max_tokens=n_tokens):
        ids = ids.to(device)
        for label, x in harvest(model, sites, ids, torch.ones_like(ids), remote=remote).items():
            rows[label].append(x)
    if not next(iter(rows.values()), []):
        raise UserInputError("no training text to fit the corpus PCA on")
    return SiteMap((site, torch.cat(rows[str(site)])) for site in sites)


__all__ = [
    "BASELINES",
    "PatchingCurve",
    "baseline_bases",
    "compare_bases",
    "corpus_activations",
    "curves_for_bases",
    "k_grid",
    "patching_curve",
    "rank_bases",
    "rank_features",
]
