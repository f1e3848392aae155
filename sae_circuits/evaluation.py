"""Quality of spliced dictionaries, measured through nnsight traces over batches of tokens.

A first pass reads every site (one trace per batch that stops after the last site) for the mean
activation over the evaluated positions. Then per batch, one trace runs the clean model (reading
every site's features and error), and per site one batched trace runs the model with the site's
error set to zero (the activation replaced by its reconstruction), with the site zero-ablated and
with the site mean-ablated (replaced by that mean); `ablations=False` runs neither ablation (nor
the first pass), leaving their metrics NaN. Metrics, over non-pad positions (and, with
`skip_first`, not the first real position of each row, which is BOS and keeps its activation in
every run), in the order of `METRIC_KEYS`:

- `ce_delta`: CE_spliced − CE_clean (nats);  `kl`: mean KL(clean ‖ spliced) of the next-token
  distributions;
- `l0`: mean count of non-zero features per position;
- `loss_recovered_mean`: (CE_mean − CE_spliced) / (CE_mean − CE_clean), CE_mean with the site
  mean-ablated; `loss_recovered`: (CE_zero − CE_spliced) / (CE_zero − CE_clean), CE_zero with the
  site zero-ablated (lenient wherever zero ablation is catastrophic, as in the residual stream);
- `nmse`: normalised MSE, Σ‖x − x̂‖² / Σ‖x − mean(x)‖², the squared error relative to always
  predicting the mean activation (Gao et al. 2024, *Scaling and evaluating sparse autoencoders*);
  with the mean taken over the same positions it equals 1 − `fve`;
- `fve`: fraction of variance explained, 1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖²;
- `mse`: mean over positions and dimensions of (x − x̂)²;  `cosine`: mean cos(x, x̂);
- `l1`: mean sum of |f| per position;
- `frac_alive`: share of features non-zero at least once;  `frac_dead`: share never non-zero
  (1 − `frac_alive`);  `frac_dense`: share non-zero on more than `DENSE_FREQUENCY` of the
  positions.

Besides these, the result holds `ce_clean`, `ce_spliced`, `ce_zero`, `ce_mean` and `tokens` (the
number of evaluated positions), and when asked (`worst=N`) the N next-token predictions whose CE
rises the most with the site spliced in (`worst`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress

from sae_circuits import engine
from sae_circuits.batches import TokenBatch, scored_positions, split_batch
from sae_circuits.buffer import harvest
from sae_circuits.constants import DENSE_FREQUENCY, METRIC_KEYS
from sae_circuits.dictionary import Dictionary
from sae_circuits.engine import SiteEdit, Tokens
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote
from sae_circuits.sites import Site, SiteMap
from sae_circuits.splice import temporarily_attached


class _CleanTokens:
    """The clean run's next-token log-probabilities over the real (non-pad) pairs of a batch."""

    def __init__(self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.pair_mask = (mask[:, :-1] & mask[:, 1:]).reshape(-1)
        self.targets = ids[:, 1:].reshape(-1)[self.pair_mask]
        self.log_probs = self.log_probs_of(logits)
        self.token_ce = F.nll_loss(self.log_probs, self.targets, reduction="none")
        self.ce = self.token_ce.sum().item()

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
    fires: torch.Tensor = field(init=False)
    ce_tokens: int = 0
    ce: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("clean", "spliced"), 0.0))
    kl: float = 0.0

    def __post_init__(self) -> None:
        self.fires = torch.zeros(self.d_dict, dtype=torch.float64)

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
        self.fires += active.sum(0)

    def add_losses(self, clean: _CleanTokens, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Accumulate next-token CE of the spliced and ablated runs (`logits` by run name) beside
        the clean one and KL(clean ‖ spliced), over the real (non-pad) next-token pairs; return
        the spliced run's CE per pair."""
        self.ce["clean"] += clean.ce
        log_probs, token_ce = {}, {}
        for name, run_logits in logits.items():
            log_probs[name] = clean.log_probs_of(run_logits)
            token_ce[name] = F.nll_loss(log_probs[name], clean.targets, reduction="none")
            self.ce[name] = self.ce.get(name, 0.0) + token_ce[name].sum().item()
        self.kl += F.kl_div(
            log_probs["spliced"], clean.log_probs, log_target=True, reduction="sum"
        ).item()
        self.ce_tokens += clean.targets.numel()
        return token_ce["spliced"]

    def metrics(self) -> dict[str, float]:
        n = max(self.positions, 1)
        d = self.sum_x.numel() if self.sum_x is not None else 1
        total_variance = self.sum_x_squared - (self.sum_x.pow(2).sum().item() / n if n else 0)
        nmse = self.squared_error / total_variance if total_variance > 0 else float("nan")
        ce = {  # NaN for an ablation not run
            name: self.ce[name] / max(self.ce_tokens, 1) if name in self.ce else float("nan")
            for name in ("clean", "spliced", "zero", "mean")
        }
        frequency = self.fires / n
        return {
            "ce_delta": ce["spliced"] - ce["clean"],
            "kl": self.kl / max(self.ce_tokens, 1),
            "l0": self.l0 / n,
            "loss_recovered_mean": _recovered(ce, "mean"),
            "loss_recovered": _recovered(ce, "zero"),
            "nmse": nmse,
            "fve": 1 - nmse,
            "mse": self.squared_error / (n * d),
            "cosine": self.cosine / n,
            "l1": self.l1 / n,
            "frac_alive": (frequency > 0).double().mean().item(),
            "frac_dead": (frequency == 0).double().mean().item(),
            "frac_dense": (frequency > DENSE_FREQUENCY).double().mean().item(),
            **{f"ce_{name}": value for name, value in ce.items()},
            "tokens": self.positions,
        }


def _recovered(ce: Mapping[str, float], ablation: str) -> float:
    """(CE_ablated − CE_spliced) / (CE_ablated − CE_clean); NaN when ablating costs nothing."""
    gap = ce[ablation] - ce["clean"]
    return (ce[ablation] - ce["spliced"]) / gap if gap != 0 else float("nan")


def evaluate(
    model: Model,
    dictionaries: Mapping[str | Site, Dictionary],
    batches: Iterable[TokenBatch],
    skip_first: bool = True,
    progress: bool = True,
    means: Mapping[str | Site, torch.Tensor] | None = None,
    worst: int = 0,
    remote: Remote = False,
    ablations: bool = True,
) -> SiteMap:
    """Metrics (see module docstring) for each dictionary: a `SiteMap` of metric dicts.

    `batches` yields token ids `(batch, ctx)` or `(ids, attention_mask)` pairs; they are read twice
    (the mean-activation pass, then the evaluation), so an iterator is first collected into a
    list. `means` (by site, from `mean_activations` over the same batches) skips the first pass,
    e.g. when several dictionaries of one site are evaluated one after the other. The dictionaries
    are attached for the evaluation and the model's previous splices restored afterwards.
    `worst` > 0 adds `"worst"` to each site's metrics: the `worst` next-token predictions whose CE
    rises the most when the site is spliced in (`WorstTokens.rows`). `remote` (True: NDIF,
    "local": nnsight's simulation) runs every trace as a request that carries the dictionaries.
    `ablations=False` skips the zero- and mean-ablated runs (a third of the forward passes) and
    the mean pass: `loss_recovered`, `loss_recovered_mean`, `ce_zero` and `ce_mean` are NaN.
    """
    dictionaries = SiteMap(dictionaries)
    batches = list(batches)
    totals = {site: _SiteTotals(dictionary.d_dict) for site, dictionary in dictionaries.items()}
    worst_tokens = {site: WorstTokens(worst) for site in dictionaries}
    passes = 1 if means is not None or not ablations else 2
    with (
        temporarily_attached(model, dictionaries),
        torch.no_grad(),
        progress_bar("evaluating", passes * len(batches), enabled=progress) as bar,
    ):
        if means is None and ablations:
            means = mean_activations(model, list(dictionaries), batches, skip_first, bar, remote)
        means = SiteMap(means or {})
        replaced = {  # per site: the ablated runs by name, with the value the site takes
            site: {"zero": torch.zeros_like(means[site]), "mean": means[site]} if ablations else {}
            for site in dictionaries
        }
        for index, batch in enumerate(batches):
            ids, mask = split_batch(batch)
            scored = scored_positions(mask, skip_first)
            tokens = Tokens(ids, mask)
            clean_logits, reads = _clean_run(model, dictionaries, ids, mask, remote)
            clean = _CleanTokens(clean_logits, ids, mask)
            for site in dictionaries:
                features, error, rebuild = reads[site]
                spliced_ce = _evaluate_site(
                    model,
                    site,
                    tokens,
                    scored,
                    features,
                    error,
                    rebuild,
                    replaced[site],
                    clean,
                    totals[site],
                    remote,
                )
                if worst:
                    worst_tokens[site].add(spliced_ce - clean.token_ce, clean, ids, mask, index)
            bar.advance(0)
    results = SiteMap({site: site_totals.metrics() for site, site_totals in totals.items()})
    if worst:
        for site, metrics in results.items():
            metrics["worst"] = worst_tokens[site].rows(model.tokenizer)
    return results


class WorstTokens:
    """The `n` next-token predictions of the largest CE increase seen so far, with their contexts
    (`before` tokens before the predicted one and `after` after it)."""

    def __init__(self, n: int, before: int = 12, after: int = 4) -> None:
        self.n, self.before, self.after = n, before, after
        self.found: list[dict[str, Any]] = []

    def add(
        self,
        increase: torch.Tensor,
        clean: _CleanTokens,
        ids: torch.Tensor,
        mask: torch.Tensor,
        batch: int,
    ) -> None:
        """Consider a batch's `(pairs,)` CE increases, in the order of `clean`'s real pairs."""
        if not self.n or not increase.numel():
            return
        pairs = clean.pair_mask.nonzero().squeeze(1)  # flat indices into (rows, ctx - 1)
        top = increase.topk(min(self.n, increase.numel()))
        for value, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row, position = divmod(int(pairs[i]), ids.shape[1] - 1)
            target = position + 1  # the predicted token
            real = mask[row].nonzero().squeeze(1)
            start, end = (
                max(int(real[0]), target - self.before),
                min(int(real[-1]) + 1, target + 1 + self.after),
            )
            self.found.append(
                {
                    "ce_increase": value,
                    "ce_clean": float(clean.token_ce[i]),
                    "batch": batch,
                    "row": row,
                    "position": target,
                    "ids": ids[row, start:end].tolist(),
                    "at": target - start,
                }
            )
        self.found = sorted(self.found, key=lambda found: -found["ce_increase"])[: self.n]

    def rows(self, tokenizer: Any) -> list[dict[str, Any]]:
        """Largest first: `ce_increase` (nats), `ce_clean`, `ce_spliced`, where (`batch`, `row` of
        it, `position` of the predicted token), and the text: `before`, `token`, `after`, and
        `context` with the predicted token marked `[[token]]`."""
        rows = []
        for found in self.found:
            ids, at = found["ids"], found["at"]
            before, token = tokenizer.decode(ids[:at]), tokenizer.decode(ids[at : at + 1])
            after = tokenizer.decode(ids[at + 1 :])
            rows.append(
                {
                    "ce_increase": found["ce_increase"],
                    "ce_clean": found["ce_clean"],
                    "ce_spliced": found["ce_clean"] + found["ce_increase"],
                    "batch": found["batch"],
                    "row": found["row"],
                    "position": found["position"],
                    "before": before,
                    "token": token,
                    "after": after,
                    "context": f"{before}[[{token}]]{after}",
                }
            )
        return rows


def mean_activations(
    model: Model,
    sites: Iterable[str | Site],
    batches: Iterable[TokenBatch],
    skip_first: bool = True,
    bar: Progress | None = None,
    remote: Remote = False,
) -> SiteMap:
    """Each site's mean activation (float32) over the evaluated positions of `batches` (one
    trace per batch, stopped after the last site)."""
    sites = sorted(Site.parse(site) for site in sites)
    sums = {site: torch.zeros((), dtype=torch.float64) for site in sites}
    count = 0
    for batch in batches:
        ids, mask = split_batch(batch)
        acts = harvest(model, sites, ids, mask, keep_bos=not skip_first, remote=remote)
        for site in sites:
            sums[site] = sums[site] + acts[str(site)].double().sum(0)
        count += int(scored_positions(mask, skip_first).sum())
        if bar is not None:
            bar.advance(0)
    return SiteMap((site, (total / max(count, 1)).float()) for site, total in sums.items())


Rebuild = Callable[[torch.Tensor], torch.Tensor]
"""Features of a site's clean run -> the site's reconstruction from them (`Dictionary.reconstruct`
with the run's input: its skip term, its normalisation statistics)."""


def _clean_run(
    model: Model, dictionaries: SiteMap, ids: torch.Tensor, mask: torch.Tensor, remote: Remote
) -> tuple[torch.Tensor, dict[Site, tuple[torch.Tensor, torch.Tensor, Rebuild]]]:
    """The clean logits and every site's `(features, error, rebuild)`, read in one forward pass."""
    values = engine.read(
        model,
        Tokens(ids, mask),
        list(dictionaries),
        remote=remote,
        all_logits=True,
        activations=True,
    )
    reads = {}
    for site, dictionary in dictionaries.items():
        features, error, x = values.features[site], values.errors[site], values.activations[site]
        reads[site] = (features, error, _rebuild(dictionary, site, features, error, x))
    return values.logits, reads


def _rebuild(
    dictionary: Dictionary,
    site: Site,
    features: torch.Tensor,
    error: torch.Tensor,
    x: torch.Tensor,
) -> Rebuild:
    """The site's `Rebuild` from its clean read: `x` (the site's value) is the input of a
    dictionary that reads its own site; one that reads another (a transcoder, which maps no
    normalisation back) adds `decode(f)` to the skip term its reconstruction `x − error` holds."""
    if dictionary.config.in_site in (None, site):
        return lambda g: dictionary.reconstruct(g, x)
    skip = x - error - dictionary.decode(features)
    return lambda g: dictionary.decode(g) + skip


def _evaluate_site(
    model: Model,
    site: Site,
    tokens: Tokens,
    scored: torch.Tensor,
    features: torch.Tensor,
    error: torch.Tensor,
    rebuild: Rebuild,
    ablations: Mapping[str, torch.Tensor],
    clean: _CleanTokens,
    totals: _SiteTotals,
    remote: Remote,
) -> torch.Tensor:
    """Accumulate one site's metrics on a batch: reconstruction from the clean run's reads, and one
    batched forward with the site's activation replaced by its reconstruction and, per entry of
    `ablations` (a name and the `(d,)` vector that replaces the activation), ablated. Returns the
    spliced run's CE per real next-token pair."""
    logits = _site_runs(
        model, site, tokens, scored.unsqueeze(-1), rebuild, features, ablations, remote
    )
    x_hat = rebuild(features)
    x = x_hat + error
    totals.add_reconstruction(x[scored], x_hat[scored], features[scored])
    return totals.add_losses(clean, logits)


def _site_runs(
    model: Model,
    site: Site,
    tokens: Tokens,
    scored: torch.Tensor,
    rebuild: Rebuild,
    features: torch.Tensor,
    ablations: Mapping[str, torch.Tensor],
    remote: Remote,
) -> dict[str, torch.Tensor]:
    """The logits of the spliced run (error dropped at the `scored` positions, `(B, T, 1)`) and of
    each ablation (features dropped and the error term set so that the site takes the ablation's
    value there), as copies of the batch in one forward."""
    zeros = rebuild(torch.zeros_like(features))
    copies = [{site: SiteEdit(error_mask=scored, error_value=0.0)}] + [
        {
            site: SiteEdit(
                features_mask=scored, error_mask=scored, error_value=value.to(zeros) - zeros
            )
        }
        for value in ablations.values()
    ]
    runs = engine.edited(model, tokens, copies, remote=remote, all_logits=True).logits
    return dict(zip(["spliced", *ablations], runs, strict=True))


__all__ = ["DENSE_FREQUENCY", "METRIC_KEYS", "WorstTokens", "evaluate", "mean_activations"]
