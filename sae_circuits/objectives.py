"""Training objectives through the spliced model: KL and end-to-end with downstream errors.

Braun et al. 2024 (*Identifying functionally important features with end-to-end sparse dictionary
learning*) train a dictionary on what the model does with its reconstruction rather than on the
reconstruction itself. Per batch of token contexts:

- one clean trace (no gradients) reads every site the dictionaries need and the next-token
  log-probabilities at the real pairs of positions (`CleanRun`);
- per dictionary, one trace of the model with that dictionary spliced in (the splice users trace,
  `sae_circuits.splice`) and its error term set to zero at the scored positions gives
  `kl`: mean KL(clean ‖ spliced) over the pairs, and for `e2e-ds` the normalized squared error of
  every later residual-stream site, `‖a_spliced − a_clean‖² / mean ‖a_clean‖²`, averaged over them;
- with `error_swap` = s > 0, a share s of the KL comes from a second trace in which each scored
  position takes its reconstruction plus the error term of the scored position half a batch away
  (another context): x̂ + e'. The KL with the error term dropped keeps a reconstruction that the
  model reads as it reads x, but leaves the error terms free to hold what the model reads, which
  then moves the output when error terms and features of different inputs are combined (the
  IOI ceiling: clean features with the corrupted error term). The swapped term penalises that.

The first real position of each context (BOS) keeps its activation, as in evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import nnsight
import torch
import torch.nn.functional as F

from sae_circuits.batches import TokenBatch, scored_positions, split_batch, trace_inputs
from sae_circuits.protocols import Model
from sae_circuits.sites import Site, num_layers, read_site
from sae_circuits.splice import spliced


class ContextStream:
    """Token batches from an iterable (e.g. `text.token_batches`), with the count consumed as its
    state, so that a resumed run fast-forwards a fresh iterable to the same place."""

    def __init__(self, batches: Iterable[TokenBatch]) -> None:
        self.batches = batches
        self.iterator: Iterator[TokenBatch] = iter(batches)
        self.consumed = 0

    def __iter__(self) -> Iterator[TokenBatch]:
        for batch in self.iterator:
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for _ in range(state["consumed"] - self.consumed):
            next(self.iterator)
        self.consumed = state["consumed"]


class CleanRun(NamedTuple):
    """What one clean forward pass of a batch gives every dictionary in training."""

    inputs: dict[str, torch.Tensor]  # the trace's keyword inputs
    scored: torch.Tensor  # (batch, ctx) bool: real positions but the first of each row
    pairs: torch.Tensor  # (batch, ctx - 1) bool: positions whose next token is real
    activations: dict[Site, torch.Tensor]  # (batch, ctx, d) per site read
    log_probs: torch.Tensor  # (n_pairs, vocab) float32

    def scored_activations(self, site: Site) -> torch.Tensor:
        """(n_scored, d): the site's activations at the scored positions."""
        return self.activations[site][self.scored]


def clean_run(model: Model, batch: TokenBatch, sites: list[Site]) -> CleanRun:
    """One traced forward pass without gradients reading `sites` and the log-probabilities."""
    ids, mask = split_batch(batch)
    inputs = trace_inputs(ids, mask)
    with torch.no_grad(), model.trace(**inputs):
        values = nnsight.save([read_site(model, site) for site in sorted(sites)])
        logits = model.output.logits.save()
    pairs = mask[:, :-1] & mask[:, 1:]
    return CleanRun(
        inputs,
        scored_positions(mask, skip_first=True),
        pairs,
        {site: value.float() for site, value in zip(sorted(sites), values, strict=True)},
        _log_probs(logits, pairs),
    )


def downstream_sites(model: Model, site: Site) -> list[Site]:
    """The residual-stream sites after `site` (e2e-ds matches the model's activations there)."""
    residual = (Site.parse(f"resid.{layer}") for layer in range(num_layers(model)))
    return [resid for resid in residual if resid > site]


def spliced_loss(
    model: Model,
    site: Site,
    clean: CleanRun,
    downstream: list[Site] | None = None,
    downstream_coefficient: float = 1.0,
    error_swap: float = 0.0,
) -> torch.Tensor:
    """KL(clean ‖ spliced) with the dictionary attached at `site` replacing the activation (its
    error term zeroed at the scored positions), plus `downstream_coefficient` × the mean normalized
    squared error of the `downstream` sites when given. With `error_swap` = s, (1 − s) of that KL
    and s of the KL with the error terms swapped between contexts (`swapped_errors`) instead.
    Differentiable in the dictionary."""
    hook = spliced(model, site)
    loss = torch.zeros(())
    if error_swap > 0:
        with model.trace(**clean.inputs):
            hook.error.output = swapped_errors(hook.error.output, clean.scored)
            logits = model.output.logits.save()
        loss = error_swap * kl_to_clean(_log_probs(logits, clean.pairs), clean.log_probs)
    if error_swap == 1 and not downstream:
        return loss
    keep = (~clean.scored).unsqueeze(-1)
    with model.trace(**clean.inputs):
        hook.error.output = hook.error.output * keep
        later = nnsight.save([read_site(model, s) for s in downstream or []])
        logits = model.output.logits.save()
    loss = loss + (1 - error_swap) * kl_to_clean(_log_probs(logits, clean.pairs), clean.log_probs)
    if downstream:
        errors = [
            normalized_squared_error(value[clean.scored], clean.scored_activations(s))
            for s, value in zip(downstream, later, strict=True)
        ]
        loss = loss + downstream_coefficient * torch.stack(errors).mean()
    return loss


def swapped_errors(error: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """`error` `(batch, ctx, d)` with the values at the `scored` positions rolled by half their
    number, so that each takes the error term of a position in another context (when the batch has
    two rows or more); the other positions keep theirs."""
    values = error[scored]
    swapped = error.clone()
    swapped[scored] = values.roll(len(values) // 2, dims=0)
    return swapped


def kl_to_clean(log_probs: torch.Tensor, clean_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(clean ‖ q) from (n, vocab) log-probabilities."""
    return F.kl_div(log_probs, clean_log_probs, log_target=True, reduction="sum") / len(log_probs)


def normalized_squared_error(value: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """`mean ‖value − clean‖² / mean ‖clean‖²` over rows."""
    return (value.float() - clean).pow(2).sum(-1).mean() / clean.pow(2).sum(-1).mean()


def _log_probs(logits: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    return logits[:, :-1][pairs].float().log_softmax(-1)


__all__ = [
    "CleanRun",
    "ContextStream",
    "clean_run",
    "downstream_sites",
    "kl_to_clean",
    "normalized_squared_error",
    "spliced_loss",
    "swapped_errors",
]
