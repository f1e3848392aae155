"""Feature interventions as nnsight traces over the spliced model: patch, ablate, pin.

Every intervention rewrites the `features` hook point of spliced dictionaries; the splice keeps the
error term computed from the run's unedited features, so editing features `F` at a site turns the
activation `x` into `x + Σ_{i∈F} (f'_i − f_i) d_i`. In particular `patch` sets the features of the
corrupted run to their clean values, which is exactly the patching formula

    x' = x̄ + Σ_{i∈F} (c_i − c̄_i) d_i     (corrupted error term kept).

Passing `dictionaries={site: LinearBasis...}` attaches those for the call only (e.g. the PCA, neuron
or random-direction baselines: exact reconstructions, so the same formula holds with their
directions). Prompts are tokenised once and run in batches, left-padded, so position -1 is each
prompt's last token; `positions="last"` edits only that position. Every function returns an
`InterventionResult` with the last-position logits and, given a `Task`, the per-prompt metric.
Patching curves against baselines live in `sae_circuits.patching_curves`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sae_circuits import engine
from sae_circuits.dictionary import Dictionary
from sae_circuits.engine import SiteEdit
from sae_circuits.errors import UserInputError
from sae_circuits.protocols import Model
from sae_circuits.sites import Site, read_site, write_site
from sae_circuits.splice import attached, temporarily_attached
from sae_circuits.tasks import Task

Positions = Literal["all", "last"]
Features = Sequence[int] | torch.Tensor
Source = Task | Sequence[str]


@dataclass
class InterventionResult:
    """Last-position logits `(n, vocab)` and, for a task, the per-prompt metric `(n,)`."""

    logits: torch.Tensor
    metric: torch.Tensor | None = None


def run(
    model: Model, source: Source, corrupted: bool = False, batch_size: int = 32
) -> InterventionResult:
    """The model without edits on a task's clean (or `corrupted`) prompts, or on plain prompts."""
    tokens = engine.tokenize(model, _prompts(source, corrupted))
    logits = [
        engine.read(model, batch, []).logits for _, batch in engine.batches(tokens, batch_size)
    ]
    return _result(torch.cat(logits), source)


def patch(
    model: Model,
    source: Task | tuple[Sequence[str], Sequence[str]],
    sites_features: Mapping[str | Site, Features],
    positions: Positions = "all",
    dictionaries: Mapping[str | Site, Dictionary] | None = None,
    batch_size: int = 32,
) -> InterventionResult:
    """Run the corrupted prompts with features `F` at each site set to their clean values.

    `source` is a task or a pair (clean prompts, corrupted prompts) of equal token lengths.
    """
    pairs = (
        engine.task_tokens(model, source)
        if isinstance(source, Task)
        else engine.pair_tokens(model, *source)
    )
    with attached_for_call(model, dictionaries):
        selected = _selection(model, sites_features)
        logits = []
        for batch in pairs.batches(batch_size):
            clean = engine.read(model, batch.clean, list(selected)).features
            edits = {
                site: SiteEdit(
                    feature_mask(batch.clean.length, index, _d_dict(model, site), positions),
                    clean[site],
                )
                for site, index in selected.items()
            }
            logits.append(engine.edited(model, batch.corrupt, [edits]).logits[0])
    return _result(torch.cat(logits), source)


def ablate(
    model: Model,
    source: Source,
    sites_features: Mapping[str | Site, Features],
    mode: Literal["zero", "mean", "resample"] = "zero",
    reference: Sequence[str] | None = None,
    positions: Positions = "all",
    dictionaries: Mapping[str | Site, Dictionary] | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> InterventionResult:
    """Ablate features on a task's clean prompts (or plain prompts).

    `zero` sets them to 0; `mean` to their mean over every real token (or, with
    `positions="last"`, every last token) of the `reference` prompts (default: the prompts
    themselves), one value per feature (`engine.mean_over_tokens`); `resample` to their values on
    a reference prompt of the same token length drawn at random (seeded) for each prompt.
    """
    if mode not in ("zero", "mean", "resample"):
        raise UserInputError(f"unknown ablation mode {mode!r}; valid: zero, mean, resample")
    prompts = _prompts(source)
    reference = list(reference) if reference is not None else prompts
    tokens = engine.tokenize(model, prompts)
    with attached_for_call(model, dictionaries):
        selected = _selection(model, sites_features)
        sites = list(selected)
        if mode == "mean":
            means = engine.mean_over_tokens(
                model, engine.tokenize(model, reference), sites, positions == "last", batch_size
            )
        if mode == "resample":
            partners = _partners(model, prompts, reference, seed)
        logits = []
        for rows, batch in engine.batches(tokens, batch_size):
            if mode == "resample":
                partner = engine.tokenize(model, [reference[i] for i in partners[rows]])
                values = engine.read(model, partner, sites).features
            else:
                values = {s: means[s] if mode == "mean" else torch.zeros(()) for s in sites}
            edits = {
                site: SiteEdit(
                    feature_mask(batch.length, index, _d_dict(model, site), positions), values[site]
                )
                for site, index in selected.items()
            }
            logits.append(engine.edited(model, batch, [edits]).logits[0])
    return _result(torch.cat(logits), source)


def pin(
    model: Model,
    source: Source,
    pins: Mapping[str | Site, Mapping[int, float]],
    positions: Positions = "all",
    dictionaries: Mapping[str | Site, Dictionary] | None = None,
    batch_size: int = 32,
) -> InterventionResult:
    """Set features to given values (steering) on a task's clean prompts or plain prompts."""
    tokens = engine.tokenize(model, _prompts(source))
    with attached_for_call(model, dictionaries):
        values = _pin_values(model, pins)
        logits = []
        for _, batch in engine.batches(tokens, batch_size):
            edits = {
                site: SiteEdit(feature_mask(batch.length, index, len(value), positions), value)
                for site, (index, value) in values.items()
            }
            logits.append(engine.edited(model, batch, [edits]).logits[0])
    return _result(torch.cat(logits), source)


def generate_pinned(
    model: Model,
    prompts: Sequence[str],
    pins: Mapping[str | Site, Mapping[int, float]],
    max_new_tokens: int = 20,
    positions: Positions = "all",
    dictionaries: Mapping[str | Site, Dictionary] | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """`model.generate` with features pinned at every step; returns the token ids (prompt + new).

    nnsight 0.8 replays the splice's edit only on the first generation step, so the spliced
    `features` hook point is not reached on later steps; the pin is therefore written at the site
    itself, as `x + decode(f') − decode(f)` with `f = encode(x)`, which is what setting the features
    does in a trace. `positions="last"` pins each step's newest token.
    """
    with attached_for_call(model, dictionaries):
        values = _pin_values(model, pins)
        spliced_dictionaries = attached(model)
        with warnings.catch_warnings():  # the open step loop ends, by design, with a warning
            warnings.filterwarnings("ignore", message=".*was never reached")
            with model.generate(max_new_tokens=max_new_tokens, **generate_kwargs) as tracer:
                with tracer.invoke(list(prompts)):
                    for _ in tracer.all():
                        for site, (index, value) in values.items():  # forward order
                            dictionary = spliced_dictionaries[site]
                            x = read_site(model, site)
                            f = dictionary.encode(x)
                            mask = feature_mask(f.shape[1], index, len(value), positions)
                            g = torch.where(mask.to(f.device), value.to(f.device), f)
                            write_site(
                                model,
                                site,
                                x + dictionary.reconstruct(g, x) - dictionary.reconstruct(f, x),
                            )
                with tracer.invoke():
                    tokens = tracer.result.save()
    return tokens


# --------------------------------------------------------------------------------- internals
@contextmanager
def attached_for_call(
    model: Model, dictionaries: Mapping[str | Site, Dictionary] | None
) -> Iterator[None]:
    """`dictionaries` attached for a `with` block (nothing when None)."""
    with temporarily_attached(model, dictionaries) if dictionaries else nullcontext():
        yield


def _prompts(source: Source, corrupted: bool = False) -> list[str]:
    if isinstance(source, Task):
        return source.corrupt if corrupted else source.clean
    if isinstance(source, str):
        return [source]
    return list(source)


def _result(logits: torch.Tensor, source: Any) -> InterventionResult:
    return InterventionResult(logits, source.metric(logits) if isinstance(source, Task) else None)


def _selection(
    model: Model, sites_features: Mapping[str | Site, Features]
) -> dict[Site, torch.Tensor]:
    """Feature indices by site (in forward order), checked against the attached dictionaries."""
    present = attached(model)
    selected = {}
    for key, features in sites_features.items():
        site = Site.parse(key)
        if site not in present:
            raise UserInputError(
                f"no dictionary is attached at {site}; attached: {', '.join(map(str, present))}"
            )
        index = torch.as_tensor(features, dtype=torch.long).reshape(-1)
        d_dict = present[site].d_dict
        if index.numel() and not (int(index.min()) >= 0 and int(index.max()) < d_dict):
            raise UserInputError(f"feature indices at {site} must lie in 0..{d_dict - 1}")
        selected[site] = index
    return dict(sorted(selected.items()))


def _pin_values(
    model: Model, pins: Mapping[str | Site, Mapping[int, float]]
) -> dict[Site, tuple[torch.Tensor, torch.Tensor]]:
    """(feature indices, full-width value vector) by site, in forward order, for `pin`."""
    pins = {Site.parse(site): values for site, values in pins.items()}
    selected = _selection(model, {site: list(values) for site, values in pins.items()})
    out = {}
    for site, index in selected.items():
        vector = torch.zeros(_d_dict(model, site))
        vector[index] = torch.tensor([float(pins[site][int(i)]) for i in index])
        out[site] = (index, vector)
    return out


def _d_dict(model: Model, site: Site) -> int:
    return attached(model)[site].d_dict


def feature_mask(
    seq: int, features: torch.Tensor, d_dict: int, positions: Positions
) -> torch.Tensor:
    """A boolean `(seq, d_dict)` mask of the edited positions (all, or the last) and features."""
    if positions not in ("all", "last"):
        raise UserInputError(f"positions must be 'all' or 'last', got {positions!r}")
    mask = torch.zeros(seq, d_dict, dtype=torch.bool)
    rows = slice(None) if positions == "all" else slice(-1, None)
    mask[rows, features] = True
    return mask


def _partners(
    model: Model, prompts: Sequence[str], reference: Sequence[str], seed: int
) -> list[int]:
    """For each prompt, a random reference prompt of the same token length (its index)."""

    def length(text: str) -> int:
        return len(model.tokenizer(text)["input_ids"])

    by_length: dict[int, list[int]] = {}
    for i, text in enumerate(reference):
        by_length.setdefault(length(text), []).append(i)
    generator = torch.Generator().manual_seed(seed)
    partners = []
    for text in prompts:
        candidates = by_length.get(length(text))
        if not candidates:
            raise UserInputError(
                f"resample ablation: no reference prompt has the token length of {text!r}"
            )
        partners.append(candidates[int(torch.randint(len(candidates), (1,), generator=generator))])
    return partners


__all__ = [
    "InterventionResult",
    "ablate",
    "attached_for_call",
    "feature_mask",
    "generate_pinned",
    "patch",
    "pin",
    "run",
]
