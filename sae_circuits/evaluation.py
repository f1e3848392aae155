"""Quality of spliced dictionaries, measured through nnsight traces over batches of tokens.

Per batch, one trace runs the clean model (reading every site's features and error); then per site
one batched trace runs the model with the site's error set to zero (the activation replaced by its
reconstruction) and the model with the site zero-ablated. Metrics, over non-pad positions (and, with
`skip_first`, not the first real position of each row, which is BOS and keeps its activation in
every run):

- `mse`: mean over positions and dimensions of (x − x̂)²;  `cosine`: mean cos(x, x̂);
- `fve`: fraction of variance explained, 1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖²;
- `l1`, `l0`: mean sum of |f| and mean count of non-zero features per position;
- `frac_alive`: fraction of features non-zero at least once;
- `loss_recovered`: (CE_zero − CE_spliced) / (CE_zero − CE_clean);
- `kl`: mean KL(clean ‖ spliced) of the next-token distributions; `ce_delta`: CE_spliced − CE_clean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sae_circuits.batches import TokenBatch, scored_positions, split_batch, trace_inputs
from sae_circuits.dictionary import Dictionary
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.sites import Site, SiteMap
from sae_circuits.splice import spliced, temporarily_attached

METRIC_KEYS = ("mse", "l1", "l0", "frac_alive", "fve", "cosine", "loss_recovered", "kl", "ce_delta")


class _CleanTokens:
    """The clean run's next-token log-probabilities over the real (non-pad) pairs of a batch."""

    def __init__(self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.pair_mask = (mask[:, :-1] & mask[:, 1:]).reshape(-1)
        self.targets = ids[:, 1:].reshape(-1)[self.pair_mask]
        self.log_probs = self.log_probs_of(logits)
        self.ce = F.nll_loss(self.log_probs, self.targets, reduction="sum").item()

    def log_probs_of(self, logits: torch.Tensor) -> torch.Tensor:
        """Float64 log-probabilities of `(batch, ctx, vocab)` logits at the real pairs."""
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])[self.pair_mask]
        return flat.double().log_softmax(-1)


@dataclass
class _SiteTotals:
    """Running sums over evaluated positions for one site."""

    d_dict: int
    positions: int = 0
    squared_error: float = 0.0
    sum_x: torch.Tensor | None = None
    sum_x_squared: float = 0.0
    l1: float = 0.0
    l0: float = 0.0
    cosine: float = 0.0
    alive: torch.Tensor | None = None
    ce_tokens: int = 0
    ce: dict[str, float] = field(
        default_factory=lambda: {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    )
    kl: float = 0.0

    def add_reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """Accumulate `(n, d)` activations, reconstructions and `(n, d_dict)` features."""
        x, x_hat, f = x.double(), x_hat.double(), f.double()
        active = f != 0
        self.positions += x.shape[0]
        self.squared_error += (x - x_hat).pow(2).sum().item()
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_x_squared += x.pow(2).sum().item()
        self.l1 += f.abs().sum().item()
        self.l0 += active.sum().item()
        self.cosine += F.cosine_similarity(x, x_hat, dim=-1).sum().item()
        fired = active.any(0)
        self.alive = fired if self.alive is None else self.alive | fired

    def add_losses(
        self, clean: _CleanTokens, spliced_logits: torch.Tensor, zero: torch.Tensor
    ) -> None:
        """Accumulate next-token CE of the spliced and zero-ablated runs beside the clean one and
        KL(clean ‖ spliced), over the real (non-pad) next-token pairs."""
        self.ce["clean"] += clean.ce
        log_probs = {}
        for name, logits in (("spliced", spliced_logits), ("zero", zero)):
            log_probs[name] = clean.log_probs_of(logits)
            self.ce[name] += F.nll_loss(log_probs[name], clean.targets, reduction="sum").item()
        self.kl += F.kl_div(
            log_probs["spliced"], clean.log_probs, log_target=True, reduction="sum"
        ).item()
        self.ce_tokens += clean.targets.numel()

    def metrics(self) -> dict[str, float]:
        n = max(self.positions, 1)
        d = self.sum_x.numel() if self.sum_x is not None else 1
        total_variance = self.sum_x_squared - (self.sum_x.pow(2).sum().item() / n if n else 0)
        ce = {name: value / max(self.ce_tokens, 1) for name, value in self.ce.items()}
        gap = ce["zero"] - ce["clean"]
        return {
            "mse": self.squared_error / (n * d),
            "l1": self.l1 / n,
            "l0": self.l0 / n,
            "frac_alive": (self.alive.float().mean().item() if self.alive is not None else 0.0),
            "fve": 1 - self.squared_error / total_variance if total_variance > 0 else float("nan"),
            "cosine": self.cosine / n,
            "loss_recovered": (ce["zero"] - ce["spliced"]) / gap if gap != 0 else float("nan"),
            "kl": self.kl / max(self.ce_tokens, 1),
            "ce_delta": ce["spliced"] - ce["clean"],
            "ce_clean": ce["clean"],
            "ce_spliced": ce["spliced"],
            "ce_zero": ce["zero"],
            "tokens": self.positions,
        }


def evaluate(
    model: Model,
    dictionaries: Mapping[str | Site, Dictionary],
    batches: Iterable[TokenBatch],
    skip_first: bool = True,
    progress: bool = True,
    total_batches: int | None = None,
) -> SiteMap:
    """Metrics (see module docstring) for each dictionary: a `SiteMap` of metric dicts.

    `batches` yields token ids `(batch, ctx)` or `(ids, attention_mask)` pairs. The dictionaries are
    attached for the evaluation and the model's previous splices restored afterwards.
    """
    dictionaries = SiteMap(dictionaries)
    totals = {site: _SiteTotals(dictionary.d_dict) for site, dictionary in dictionaries.items()}
    with (
        temporarily_attached(model, dictionaries),
        torch.no_grad(),
        progress_bar("evaluating", total_batches, enabled=progress) as bar,
    ):
        for batch in batches:
            ids, mask = split_batch(batch)
            scored = scored_positions(mask, skip_first)
            inputs = trace_inputs(ids, mask)
            clean_logits, reads = _clean_run(model, list(dictionaries), inputs)
            clean = _CleanTokens(clean_logits, ids, mask)
            for site, dictionary in dictionaries.items():
                features, error = reads[site]
                _evaluate_site(
                    model, site, dictionary, inputs, scored, features, error, clean, totals[site]
                )
            bar.advance(0)
    return SiteMap({site: site_totals.metrics() for site, site_totals in totals.items()})


def _clean_run(
    model: Model, sites: list[Site], inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[Site, tuple[torch.Tensor, torch.Tensor]]]:
    """The clean logits and every site's `(features, error)`, read in one forward pass (the sites
    in forward order)."""
    reads = {}
    with model.trace(**inputs):
        for site in sites:
            hook = spliced(model, site)
            reads[site] = (hook.features.output.save(), hook.error.output.save())
        logits = model.output.logits.save()
    return logits, reads


def _evaluate_site(
    model: Model,
    site: Site,
    dictionary: Dictionary,
    inputs: dict[str, torch.Tensor],
    scored: torch.Tensor,
    features: torch.Tensor,
    error: torch.Tensor,
    clean: _CleanTokens,
    totals: _SiteTotals,
) -> None:
    """Accumulate one site's metrics on a batch: reconstruction from the clean run's reads, and one
    batched trace with the site's activation replaced by its reconstruction and zero-ablated."""
    hook = spliced(model, site)
    keep = (~scored).unsqueeze(-1)  # positions whose activation every run leaves untouched
    with model.trace() as tracer:
        with tracer.invoke(**inputs):
            hook.error.output = hook.error.output * keep
            reconstructed = model.output.logits.save()
        with tracer.invoke(**inputs):
            f = hook.features.output
            hook.features.output = f * keep
            zero_error = -dictionary.decode(torch.zeros_like(f))
            hook.error.output = torch.where(keep, hook.error.output, zero_error)
            zero = model.output.logits.save()
    x_hat = dictionary.decode(features)
    x = x_hat + error
    totals.add_reconstruction(x[scored], x_hat[scored], features[scored])
    totals.add_losses(clean, reconstructed, zero)


__all__ = ["METRIC_KEYS", "evaluate"]
