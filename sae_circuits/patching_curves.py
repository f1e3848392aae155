"""Patching curves: how much of a task's behaviour the top-k features of a basis restore.

Features at a site are ranked on a train task by attribution |Σ grad·(c − c̄)| (one backward per
batch) or by |c − c̄|, then the top k are patched (`interventions.patch`'s formula) on a test task
for k = 1…K; each curve gives the share of the clean−corrupted metric gap restored and the KL from
the clean output. `compare_bases` ranks the PCA, neuron and random-direction baselines the same
way, so the comparison is at equal k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import nnsight
import torch

from sae_circuits import engine
from sae_circuits.dictionary import Dictionary, LinearBasis
from sae_circuits.engine import SiteEdit
from sae_circuits.errors import UserInputError
from sae_circuits.interventions import Positions, attached_for_call, feature_mask
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.sites import Site, read_site
from sae_circuits.splice import spliced, temporarily_attached
from sae_circuits.tasks import Task

BASELINES = ("pca", "neurons", "random")
Ranking = Literal["attribution", "difference"]


@dataclass
class PatchingCurve:
    """Patching the top-k features of one basis at one site, for k = 1…K (lists indexed k − 1)."""

    site: str
    basis: str
    ranking: str
    features: list[int]  # the K top-ranked features, best first
    restored: list[float]  # (mean m_k − mean m_corrupt) / (mean m_clean − mean m_corrupt)
    kl: list[float]  # mean KL(clean ‖ patched) at the last position
    clean_metric: float
    corrupt_metric: float

    def k_to_restore(self, share: float) -> int | None:
        """The smallest k restoring at least `share` of the gap, or None within K."""
        return next((k + 1 for k, r in enumerate(self.restored) if r >= share), None)


def rank_features(
    model: Model,
    task: Task,
    site: str | Site,
    method: Ranking = "attribution",
    positions: Positions = "all",
    batch_size: int = 32,
) -> torch.Tensor:
    """A score per feature of the dictionary attached at `site` (higher = patch first).

    `attribution`: |Σ grad·(c − c̄)| / n, the linearised effect on the mean metric of patching the
    feature, with the gradient taken on the corrupted run; `difference`: Σ |c − c̄| / n. Sums run
    over the prompts and the edited positions.
    """
    if method not in ("attribution", "difference"):
        raise UserInputError(f"unknown ranking {method!r}; valid: attribution, difference")
    site = Site.parse(site)
    hook = spliced(model, site)
    total = torch.zeros(())
    for batch in engine.task_tokens(model, task).batches(batch_size):
        c = engine.read(model, batch.clean, [site]).features[site]
        if method == "attribution":
            with model.trace(batch.corrupt.inputs()):
                features = hook.features.output
                c_bar = features.save()
                metric = batch.metric(model.output.logits).sum()
                with metric.backward():
                    grad = features.grad.save()
            term = (c - c_bar.detach()) * grad
        else:
            term = (c - engine.read(model, batch.corrupt, [site]).features[site]).abs()
        if positions == "last":
            term = term[:, -1:]
        total = total + term.sum((0, 1)).cpu()
    return (total.abs() if method == "attribution" else total) / len(task)


def patching_curve(
    model: Model,
    train: Task,
    test: Task,
    site: str | Site,
    dictionary: Dictionary | None = None,
    max_features: int = 50,
    ranking: Ranking = "attribution",
    positions: Positions = "all",
    basis: str = "sae",
    batch_size: int = 32,
    rows_per_trace: int = 256,
    progress: bool = False,
) -> PatchingCurve:
    """Rank the features at `site` on `train`, then patch the top k on `test` for k = 1…K.

    Uses `dictionary` (attached for the call) or the one attached at `site`. Several k run as
    copies of the batch in one forward, up to `rows_per_trace` prompt rows per forward.
    """
    site = Site.parse(site)
    with attached_for_call(model, {site: dictionary} if dictionary is not None else None):
        scores = rank_features(model, train, site, ranking, positions, batch_size)
        order = scores.argsort(descending=True)[: min(max_features, scores.numel())]
        ks = list(range(1, order.numel() + 1))
        clean_sum, corrupt_sum = 0.0, 0.0
        patched, kl = torch.zeros(len(ks)), torch.zeros(len(ks))
        n_batches = -(-len(test) // batch_size)
        with progress_bar(f"{site} {basis}", n_batches * len(ks), enabled=progress) as bar:
            for batch in engine.task_tokens(model, test).batches(batch_size):
                clean = engine.read(model, batch.clean, [site], batch.metric)
                corrupt = engine.read(model, batch.corrupt, [], batch.metric)
                clean_sum += clean.metric.sum().item()
                corrupt_sum += corrupt.metric.sum().item()
                c = clean.features[site]
                per_trace = max(1, rows_per_trace // len(batch))
                for first in range(0, len(ks), per_trace):
                    chunk = ks[first : first + per_trace]
                    copies = [
                        {
                            site: SiteEdit(
                                feature_mask(c.shape[1], order[:k], c.shape[2], positions), c
                            )
                        }
                        for k in chunk
                    ]
                    result = engine.edited(model, batch.corrupt, copies, batch.metric)
                    for j, k in enumerate(chunk):
                        patched[k - 1] += result.metric[j].sum().item()
                        kl[k - 1] += (
                            engine.kl_divergence(clean.logits, result.logits[j]).sum().item()
                        )
                    bar.advance(0, len(chunk))
    n = len(test)
    clean_metric, corrupt_metric = clean_sum / n, corrupt_sum / n
    restored = (patched / n - corrupt_metric) / (clean_metric - corrupt_metric)  # inf/nan: no gap
    return PatchingCurve(
        str(site),
        basis,
        ranking,
        order.tolist(),
        restored.tolist(),
        (kl / n).tolist(),
        clean_metric,
        corrupt_metric,
    )


def baseline_bases(
    model: Model, task: Task, site: str | Site, seed: int = 0
) -> dict[str, LinearBasis]:
    """The `pca` (fitted on the site's activations over the task's clean and corrupted prompts),
    `neurons` and `random` (seeded rotation) bases for `site`."""
    site = Site.parse(site)
    width = _width_of_site(model, site)
    neurons = LinearBasis.neurons(width, site=site)
    activations = []
    with temporarily_attached(model, {site: neurons}):  # its features are the activation itself
        for prompts in (task.clean, task.corrupt):
            for _, batch in engine.batches(engine.tokenize(model, prompts), 32):
                x = engine.read(model, batch, [site]).features[site]
                activations.append(x[batch.mask])
    return {
        "pca": LinearBasis.pca(torch.cat(activations), site=site),
        "neurons": neurons,
        "random": LinearBasis.random(width, seed=seed, site=site),
    }


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
) -> dict[str, PatchingCurve]:
    """Patching curves at `site` for the dictionary (`sae`) and the PCA, neuron and random bases,
    all ranked by the same method on `train` and patched on `test`."""
    site = Site.parse(site)
    if dictionary is None:
        spliced(model, site)  # raises if no dictionary is attached there
    bases: dict[str, Dictionary | None] = {"sae": dictionary}
    bases.update(baseline_bases(model, train, site, seed))
    return {
        name: patching_curve(
            model,
            train,
            test,
            site,
            basis_dictionary,
            max_features,
            ranking,
            positions,
            basis=name,
            progress=progress,
        )
        for name, basis_dictionary in bases.items()
    }


def _width_of_site(model: Model, site: Site) -> int:
    """The activation width at `site` (from one token through the model)."""
    with torch.no_grad(), model.trace(torch.tensor([[model.tokenizer.eos_token_id or 0]])):
        width = nnsight.save(read_site(model, site).shape[-1])
    return int(width)


__all__ = [
    "BASELINES",
    "PatchingCurve",
    "baseline_bases",
    "compare_bases",
    "patching_curve",
    "rank_features",
]
