"""Runs of a model with one site's raw activation read, differentiated or replaced.

Patching curves and the greedy search apply every basis (dictionary, PCA, neurons) to the site's
activation outside the model and run the patched activations as copies of a batch. Those
forwards do not recompute the blocks before the site: a skipped block returns the unedited run's
value (nnsight's `Envoy.skip`), and only the last position's logits are computed when the model
takes `logits_to_keep`.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import nnsight
import torch

from sae_circuits.carried import set_site_value, site_value
from sae_circuits.engine import Tokens
from sae_circuits.errors import UserInputError
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote, portable_metric, request, vocabulary_size
from sae_circuits.sites import Site, architecture_of, envoy_at, read_site, site_envoy, torch_module
from sae_circuits.splice import attached

Metric = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SiteRun:
    """One unedited run of a batch: the site's activation `(B, T, D)`, the value patched forwards
    start from (None: they run from the embeddings), last-position logits and the metric."""

    x: torch.Tensor
    start: torch.Tensor | None
    logits: torch.Tensor
    metric: torch.Tensor | None


@dataclass(frozen=True)
class ForwardPlan:
    """How patched forwards reach a site: the first `skipped` blocks do not run (the last of them
    returns the start value, or for a residual site the patched value itself); `start_site` is
    where the start value is read in the unedited run."""

    skipped: int = 0
    start_site: Site | None = None
    site_is_block_output: bool = False


def forward_plan(model: Model, site: str | Site) -> ForwardPlan:
    """Skip the blocks before `site` (and a residual site's own block) when the model's blocks
    return bare tensors and no dictionary is spliced in (a splice must see its site run)."""
    site = Site.parse(site)
    if site.kind in ("embed", "module") or attached(model) or not _blocks_return_tensors(model):
        return ForwardPlan()
    if site.kind == "resid":
        return ForwardPlan(site.layer + 1, None, True)
    if site.layer == 0:
        return ForwardPlan()
    return ForwardPlan(site.layer, Site.parse(f"resid.{site.layer - 1}"))


_BLOCKS_RETURN_TENSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _blocks_return_tensors(model: Model) -> bool:
    try:
        layers = architecture_of(model).layers
    except UserInputError:
        return False
    module = torch_module(model)
    if module not in _BLOCKS_RETURN_TENSORS:
        with torch.no_grad(), model.trace(torch.tensor([[0]])):
            plain = nnsight.save(isinstance(envoy_at(model, layers)[0].output, torch.Tensor))
        _BLOCKS_RETURN_TENSORS[module] = bool(plain)
    return _BLOCKS_RETURN_TENSORS[module]


def _trace_kwargs(model: Model) -> dict[str, int]:
    parameters = inspect.signature(torch_module(model).forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


def read_run(
    model: Model,
    tokens: Tokens,
    site: str | Site,
    metric: Metric | None = None,
    plan: ForwardPlan = ForwardPlan(),
    remote: Remote = False,
) -> SiteRun:
    """One unedited run: the site's activation, `plan`'s start value, last-position logits and,
    given `metric` (a function of last-position logits), the per-prompt metric. `remote` (True:
    NDIF, "local": nnsight's simulation) runs it as a request, without the model's splices."""
    place = site_envoy(model, site)
    start_place = None if plan.start_site is None else site_envoy(model, plan.start_site)
    score, keep = _carried_metric(model, tokens, metric, remote)
    with (
        request(model, remote),
        torch.no_grad(),
        model.trace(tokens.inputs(), remote=remote, **_trace_kwargs(model)),
    ):
        start = nnsight.save(None if start_place is None else site_value(*start_place))
        x = site_value(*place).save()
        logits = model.output.logits
        last = logits[:, -1].save()
        values = nnsight.save(None if score is None else score(logits).float())
        kept = nnsight.save(logits if keep else None)
    return SiteRun(x, start, last, metric(kept).float() if keep else values)


def _carried_metric(
    model: Model, tokens: Tokens, metric: Metric | None, remote: Remote
) -> tuple[Metric | None, bool]:
    """The metric a trace body applies (a pure-torch graph in a request) and whether the logits
    must come back for it to be computed here instead."""
    if not remote or metric is None:
        return metric, False
    width = 1 if _trace_kwargs(model) else tokens.length
    score = portable_metric(metric, (len(tokens), width, vocabulary_size(model)))
    return score, score is None


def site_gradient(
    model: Model, tokens: Tokens, site: str | Site, metric: Metric, remote: Remote = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's activation `(B, T, D)` and the gradient of the summed metric with respect to it.
    `remote` as for `read_run` (the metric must then trace with torch.fx)."""
    place = site_envoy(model, site)
    score, keep = _carried_metric(model, tokens, metric, remote)
    if keep:
        raise UserInputError("a remote gradient needs a metric that torch.fx can trace")
    with (
        request(model, remote),
        model.trace(tokens.inputs(), remote=remote, **_trace_kwargs(model)),
    ):
        leaf = site_value(*place).detach().clone().requires_grad_(True)
        set_site_value(*place, leaf)
        total = score(model.output.logits).float().sum()
        found = nnsight.save((leaf.detach(), torch.autograd.grad(total, leaf)[0]))
    return found


def patched_runs(
    model: Model,
    tokens: Tokens,
    site: str | Site,
    values: torch.Tensor,
    start: torch.Tensor | None = None,
    metric: Metric | None = None,
    remote: Remote = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forwards of copies of a batch, copy c with the site's activation set to `values[c]`
    (`(C, B, T, D)`). `start`: the unedited run's start value (`read_run` with
    `forward_plan(model, site)`; needed when that plan starts from one). Returns the last-position
    logits `(C, B, V)` and, given `metric`, the metric `(C, B)`. `remote` as for `read_run`."""
    site = Site.parse(site)
    plan = forward_plan(model, site)
    if plan.start_site is not None and start is None:
        raise UserInputError(f"patched runs at {site} need the start value at {plan.start_site}")
    copies, n = values.shape[0], values.shape[1]
    flat = values.reshape(copies * n, *values.shape[2:])
    place = site_envoy(model, site)
    blocks = envoy_at(model, architecture_of(model).layers) if plan.skipped else None
    skipped, block_output = plan.skipped, plan.site_is_block_output  # plain values travel
    score, keep = _carried_metric(model, tokens, metric, remote)
    with (
        request(model, remote),
        torch.no_grad(),
        model.trace(tokens.repeat(copies).inputs(), remote=remote, **_trace_kwargs(model)),
    ):
        if skipped:
            first = flat if block_output else start.repeat(copies, 1, 1)
            for index in range(skipped):
                blocks[index].skip(first)
        if not block_output:
            set_site_value(*place, flat)
        logits = model.output.logits
        last = logits[:, -1].save()
        metrics = nnsight.save(
            None
            if score is None
            else torch.stack([score(part).float() for part in logits.chunk(copies)])
        )
        kept = nnsight.save(logits if keep else None)
    if keep:
        metrics = torch.stack([metric(part).float() for part in kept.chunk(copies)])
    return last.view(copies, n, -1), metrics


def position_weights(mask: torch.Tensor, positions: str) -> torch.Tensor:
    """`(B, T, 1)` float: 1 at the real positions that are edited (all, or each prompt's last)."""
    if positions not in ("all", "last"):
        raise UserInputError(f"positions must be 'all' or 'last', got {positions!r}")
    chosen = mask.clone()
    if positions == "last":
        chosen[:, :-1] = False
    return chosen.float().unsqueeze(-1)


def site_width(model: Model, site: str | Site) -> int:
    """The activation width at `site` (from one token through the model)."""
    with torch.no_grad(), model.trace(torch.tensor([[model.tokenizer.eos_token_id or 0]])):
        width = nnsight.save(read_site(model, site).shape[-1])
    return int(width)


__all__ = [
    "ForwardPlan",
    "SiteRun",
    "forward_plan",
    "patched_runs",
    "position_weights",
    "read_run",
    "site_gradient",
    "site_width",
]
