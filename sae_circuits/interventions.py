"""Feature interventions as nnsight traces over the spliced model: patch, ablate, pin.

Every intervention rewrites the `features` hook point of spliced dictionaries; the splice keeps the
error term computed from the run's unedited features, so editing features `F` at a site turns the
activation `x` into `x + Σ_{i∈F} (f'_i − f_i) d_i`. In particular `patch` sets the features of the
corrupted run to their clean values, which is exactly the patching formula

    x' = x̄ + Σ_{i∈F} (c_i − c̄_i) d_i     (corrupted error term kept).

Passing `dictionaries={site: LinearBasis...}` attaches those for the call only (e.g. the PCA, neuron
or random-direction baselines: exact reconstructions, so the same formula holds with their
directions). Prompts run in batches, left-padded, so position -1 is each prompt's last token;
`positions="last"` edits only that position. Every function returns an `InterventionResult` with the
last-position logits and, given a `Task`, the per-prompt metric.

Patching curves (`patching_curve`, `compare_bases`): features at a site are ranked on a train task
by attribution |Σ grad·(c − c̄)| (one backward per batch) or by |c − c̄|, then the top k are patched on
a test task for k = 1…K; each curve gives the share of the clean−corrupted metric gap restored and
the KL from the clean output. Baselines are ranked the same way, so the comparison is at equal k.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import nnsight
import torch
import torch.nn.functional as F

from sae_circuits.dictionary import Dictionary, LinearBasis
from sae_circuits.errors import UserInputError
from sae_circuits.progress import progress_bar
from sae_circuits.sites import Site, read_site, write_site
from sae_circuits.splice import attached, spliced, temporarily_attached
from sae_circuits.tasks import Task

Positions = Literal["all", "last"]
Features = Sequence[int] | torch.Tensor
Source = Task | Sequence[str]
BASELINES = ("pca", "neurons", "random")


@dataclass
class InterventionResult:
    """Last-position logits `(n, vocab)` and, for a task, the per-prompt metric `(n,)`."""

    logits: torch.Tensor
    metric: torch.Tensor | None = None

    def kl_from(self, reference: InterventionResult) -> torch.Tensor:
        """Per prompt KL(reference ‖ self) of the next-token distributions."""
        return _kl(reference.logits, self.logits)


# ----------------------------------------------------------------------------- interventions
def run(
    model: Any, source: Source, corrupted: bool = False, batch_size: int = 32
) -> InterventionResult:
    """The model without edits on a task's clean (or `corrupted`) prompts, or on plain prompts."""
    prompts = _prompts(source, corrupted)
    logits = [_read(model, inputs, [])[1] for inputs in _batches(model, prompts, batch_size)]
    return _result(torch.cat(logits), source)


def patch(
    model: Any,
    source: Task | tuple[Sequence[str], Sequence[str]],
    sites_features: Mapping[str | Site, Features],
    positions: Positions = "all",
    dictionaries: Mapping[str | Site, Dictionary] | None = None,
    batch_size: int = 32,
) -> InterventionResult:
    """Run the corrupted prompts with features `F` at each site set to their clean values.

    `source` is a task or a pair (clean prompts, corrupted prompts) of equal token lengths.
    """
    clean, corrupt = (source.clean, source.corrupt) if isinstance(source, Task) else source
    with _attached(model, dictionaries):
        selected = _selection(model, sites_features)
        logits = []
        for _, clean_inputs, corrupt_inputs in _pair_batches(model, clean, corrupt, batch_size):
            c, _ = _read(model, clean_inputs, list(selected))
            edit = {s: (_mask(*c[s].shape[1:], f, positions), c[s]) for s, f in selected.items()}
            logits.append(_edited(model, corrupt_inputs, [edit])[0])
    return _result(torch.cat(logits), source)


def ablate(
    model: Any,
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

    `zero` sets them to 0; `mean` to their mean over the `reference` prompts (default: the prompts
    themselves) at the edited positions (every real token, or the last); `resample` to their values
    on a reference prompt of the same token length drawn at random (seeded) for each prompt.
    """
    if mode not in ("zero", "mean", "resample"):
        raise UserInputError(f"unknown ablation mode {mode!r}; valid: zero, mean, resample")
    prompts = _prompts(source)
    reference = list(reference) if reference is not None else prompts
    with _attached(model, dictionaries):
        selected = _selection(model, sites_features)
        sites = list(selected)
        if mode == "mean":
            means = _mean_features(model, reference, sites, positions, batch_size)
        if mode == "resample":
            partners = _partners(model, prompts, reference, seed)
        logits = []
        for start, inputs in enumerate(_batches(model, prompts, batch_size)):
            n_rows, seq = inputs["input_ids"].shape
            if mode == "resample":
                rows = partners[start * batch_size : start * batch_size + n_rows]
                values, _ = _read(model, _tokenize(model, [reference[i] for i in rows]), sites)
            else:
                values = {s: means[s] if mode == "mean" else torch.zeros(()) for s in sites}
            edit = {
                s: (_mask(seq, _d_dict(model, s), f, positions), values[s])
                for s, f in selected.items()
            }
            logits.append(_edited(model, inputs, [edit])[0])
    return _result(torch.cat(logits), source)


def pin(
    model: Any,
    source: Source,
    pins: Mapping[str | Site, Mapping[int, float]],
    positions: Positions = "all",
    dictionaries: Mapping[str | Site, Dictionary] | None = None,
    batch_size: int = 32,
) -> InterventionResult:
    """Set features to given values (steering) on a task's clean prompts or plain prompts."""
    prompts = _prompts(source)
    with _attached(model, dictionaries):
        values = _pin_values(model, pins)
        logits = []
        for inputs in _batches(model, prompts, batch_size):
            seq = inputs["input_ids"].shape[1]
            edit = {
                s: (_mask(seq, value.shape[0], index, positions), value)
                for s, (index, value) in values.items()
            }
            logits.append(_edited(model, inputs, [edit])[0])
    return _result(torch.cat(logits), source)


def generate_pinned(
    model: Any,
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
    with _attached(model, dictionaries):
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
                            mask = _mask(*f.shape[1:], index, positions).to(f.device)
                            g = torch.where(mask, value.to(f.device), f)
                            write_site(model, site, x + dictionary.decode(g) - dictionary.decode(f))
                with tracer.invoke():
                    tokens = tracer.result.save()
    return tokens


# ---------------------------------------------------------------------------- patching curves
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
    model: Any,
    task: Task,
    site: str | Site,
    method: Literal["attribution", "difference"] = "attribution",
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
    site = str(Site.parse(site))
    hook = spliced(model, site)
    total = torch.zeros(())
    for rows, clean, corrupt in _pair_batches(model, task.clean, task.corrupt, batch_size):
        batch = task.subset(rows)
        c, _ = _read(model, clean, [site])
        if method == "attribution":
            with model.trace(**corrupt):
                features = hook.features.output
                c_bar = features.save()
                metric = batch.metric(model.output.logits).sum()
                with metric.backward():
                    grad = features.grad.save()
            term = (c[site] - c_bar.detach()) * grad
        else:
            c_bar, _ = _read(model, corrupt, [site])
            term = (c[site] - c_bar[site]).abs()
        if positions == "last":
            term = term[:, -1:]
        total = total + term.sum((0, 1)).cpu()
    return (total.abs() if method == "attribution" else total) / len(task)


def patching_curve(
    model: Any,
    train: Task,
    test: Task,
    site: str | Site,
    dictionary: Dictionary | None = None,
    max_features: int = 50,
    ranking: Literal["attribution", "difference"] = "attribution",
    positions: Positions = "all",
    basis: str = "sae",
    batch_size: int = 32,
    rows_per_trace: int = 256,
    progress: bool = False,
) -> PatchingCurve:
    """Rank the features at `site` on `train`, then patch the top k on `test` for k = 1…K.

    Uses `dictionary` (attached for the call) or the one attached at `site`. Several k run as
    separate invokes of one trace, up to `rows_per_trace` prompt rows per forward.
    """
    site = str(Site.parse(site))
    with _attached(model, {site: dictionary} if dictionary is not None else None):
        scores = rank_features(model, train, site, ranking, positions, batch_size)
        order = scores.argsort(descending=True)[: min(max_features, scores.numel())]
        ks = list(range(1, order.numel() + 1))
        sums = {
            "clean": 0.0,
            "corrupt": 0.0,
            "patched": torch.zeros(len(ks)),
            "kl": torch.zeros(len(ks)),
        }
        n_batches = -(-len(test) // batch_size)
        with progress_bar(f"{site} {basis}", n_batches * len(ks), enabled=progress) as bar:
            for rows, clean, corrupt in _pair_batches(model, test.clean, test.corrupt, batch_size):
                batch = test.subset(rows)
                c, clean_logits = _read(model, clean, [site])
                _, corrupt_logits = _read(model, corrupt, [])
                sums["clean"] += batch.metric(clean_logits).sum().item()
                sums["corrupt"] += batch.metric(corrupt_logits).sum().item()
                per_trace = max(1, rows_per_trace // len(batch))
                for first in range(0, len(ks), per_trace):
                    chunk = ks[first : first + per_trace]
                    edits = [
                        {site: (_mask(*c[site].shape[1:], order[:k], positions), c[site])}
                        for k in chunk
                    ]
                    for k, logits in zip(chunk, _edited(model, corrupt, edits), strict=True):
                        sums["patched"][k - 1] += batch.metric(logits).sum().item()
                        sums["kl"][k - 1] += _kl(clean_logits, logits).sum().item()
                    bar.advance(0, len(chunk))
    n = len(test)
    clean_metric, corrupt_metric = sums["clean"] / n, sums["corrupt"] / n
    gap = clean_metric - corrupt_metric
    restored = (sums["patched"] / n - corrupt_metric) / gap  # inf/nan if the gap is 0
    return PatchingCurve(
        site,
        basis,
        ranking,
        order.tolist(),
        restored.tolist(),
        (sums["kl"] / n).tolist(),
        clean_metric,
        corrupt_metric,
    )


def baseline_bases(
    model: Any, task: Task, site: str | Site, seed: int = 0
) -> dict[str, LinearBasis]:
    """The `pca` (fitted on the site's activations over the task's clean and corrupted prompts),
    `neurons` and `random` (seeded rotation) bases for `site`."""
    site = str(Site.parse(site))
    width = _width_of_site(model, site)
    neurons = LinearBasis.neurons(width, site=site)
    activations = []
    with temporarily_attached(model, {site: neurons}):  # its features are the activation itself
        for prompts in (task.clean, task.corrupt):
            for inputs in _batches(model, prompts, 32):
                x, _ = _read(model, inputs, [site])
                activations.append(x[site][inputs["attention_mask"].bool()])
    return {
        "pca": LinearBasis.pca(torch.cat(activations), site=site),
        "neurons": neurons,
        "random": LinearBasis.random(width, seed=seed, site=site),
    }


def compare_bases(
    model: Any,
    train: Task,
    test: Task,
    site: str | Site,
    dictionary: Dictionary | None = None,
    max_features: int = 50,
    ranking: Literal["attribution", "difference"] = "attribution",
    positions: Positions = "all",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, PatchingCurve]:
    """Patching curves at `site` for the dictionary (`sae`) and the PCA, neuron and random bases,
    all ranked by the same method on `train` and patched on `test`."""
    site = str(Site.parse(site))
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


# --------------------------------------------------------------------------------- internals
@contextmanager
def _attached(model: Any, dictionaries: Mapping[str | Site, Dictionary] | None) -> Iterator[None]:
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


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(
        logits.double().log_softmax(-1),
        reference.double().log_softmax(-1),
        log_target=True,
        reduction="none",
    ).sum(-1)


def _tokenize(model: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    encoded = model.tokenizer(list(prompts), return_tensors="pt", padding=True)
    device = next(model._module.parameters()).device
    return {key: encoded[key].to(device) for key in ("input_ids", "attention_mask")}


def _batches(
    model: Any, prompts: Sequence[str], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    if not prompts:
        raise UserInputError("no prompts to run")
    for start in range(0, len(prompts), batch_size):
        yield _tokenize(model, prompts[start : start + batch_size])


def _pair_batches(
    model: Any, clean: Sequence[str], corrupt: Sequence[str], batch_size: int
) -> Iterator[tuple[slice, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """(rows, clean inputs, corrupted inputs) per batch; checks that the token lengths agree."""
    if len(clean) != len(corrupt):
        raise UserInputError("patching needs as many clean as corrupted prompts")
    for start in range(0, len(clean), batch_size):
        rows = slice(start, min(start + batch_size, len(clean)))
        clean_inputs, corrupt_inputs = (
            _tokenize(model, clean[rows]),
            _tokenize(model, corrupt[rows]),
        )
        if clean_inputs["input_ids"].shape != corrupt_inputs["input_ids"].shape:
            raise UserInputError("clean and corrupted prompts differ in token length")
        yield rows, clean_inputs, corrupt_inputs


def _selection(
    model: Any, sites_features: Mapping[str | Site, Features]
) -> dict[str, torch.Tensor]:
    """Feature indices by site (in forward order), checked against the attached dictionaries."""
    present = attached(model)
    selected = {}
    for site, features in sites_features.items():
        name = str(Site.parse(site))
        if name not in present:
            raise UserInputError(f"no dictionary is attached at {name}; attached: {list(present)}")
        index = torch.as_tensor(features, dtype=torch.long).reshape(-1)
        d_dict = present[name].d_dict
        if index.numel() and not (int(index.min()) >= 0 and int(index.max()) < d_dict):
            raise UserInputError(f"feature indices at {name} must lie in 0..{d_dict - 1}")
        selected[name] = index
    return dict(sorted(selected.items(), key=lambda item: Site.parse(item[0]).order))


def _pin_values(
    model: Any, pins: Mapping[str | Site, Mapping[int, float]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(feature indices, full-width value vector) by site, in forward order, for `pin`."""
    pins = {str(Site.parse(site)): values for site, values in pins.items()}
    selected = _selection(model, {site: list(values) for site, values in pins.items()})
    out = {}
    for site, index in selected.items():
        vector = torch.zeros(_d_dict(model, site))
        vector[index] = torch.tensor([float(pins[site][int(i)]) for i in index])
        out[site] = (index, vector)
    return out


def _d_dict(model: Any, site: str) -> int:
    return attached(model)[site].d_dict


def _width_of_site(model: Any, site: str) -> int:
    """The activation width at `site` (from one token through the model)."""
    with torch.no_grad(), model.trace(torch.tensor([[model.tokenizer.eos_token_id or 0]])):
        width = nnsight.save(read_site(model, site).shape[-1])
    return int(width)


def _mask(seq: int, d_dict: int, features: torch.Tensor, positions: Positions) -> torch.Tensor:
    """A boolean `(seq, d_dict)` mask of the edited positions and features."""
    if positions not in ("all", "last"):
        raise UserInputError(f"positions must be 'all' or 'last', got {positions!r}")
    mask = torch.zeros(seq, d_dict, dtype=torch.bool)
    rows = slice(None) if positions == "all" else slice(-1, None)
    mask[rows, features] = True
    return mask


def _read(
    model: Any, inputs: Mapping[str, torch.Tensor], sites: Sequence[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features at `sites` and last-position logits of one unedited batch."""
    hooks = {site: spliced(model, site) for site in sites}
    with torch.no_grad(), model.trace(**inputs):
        features = nnsight.save({site: hooks[site].features.output for site in sites})
        logits = model.output.logits[:, -1].save()
    return features, logits


def _edited(
    model: Any,
    inputs: Mapping[str, torch.Tensor],
    edits: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
) -> list[torch.Tensor]:
    """Last-position logits of one batch under each edit set (one invoke each, one forward).

    An edit maps a site to (mask, value): features where `mask` is set take `value` (broadcast).
    """
    hooks = {site: spliced(model, site) for edit in edits for site in edit}
    with torch.no_grad(), model.trace() as tracer:
        logits = nnsight.save([])
        for edit in edits:
            with tracer.invoke(**inputs):
                for site, (mask, value) in edit.items():
                    features = hooks[site].features
                    f = features.output
                    features.output = torch.where(mask.to(f.device), value.to(f.device), f)
                logits.append(model.output.logits[:, -1])
    return list(logits)


def _mean_features(
    model: Any, prompts: Sequence[str], sites: Sequence[str], positions: Positions, batch_size: int
) -> dict[str, torch.Tensor]:
    """Mean features over the real tokens (or last tokens) of `prompts`, by site."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for inputs in _batches(model, prompts, batch_size):
        features, _ = _read(model, inputs, sites)
        mask = inputs["attention_mask"].bool()
        if positions == "last":
            mask = torch.zeros_like(mask)
            mask[:, -1] = True
        count += int(mask.sum())
        for site in sites:
            total = features[site][mask].sum(0).cpu()
            sums[site] = sums[site] + total if site in sums else total
    return {site: total / count for site, total in sums.items()}


def _partners(model: Any, prompts: Sequence[str], reference: Sequence[str], seed: int) -> list[int]:
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
    "BASELINES",
    "InterventionResult",
    "PatchingCurve",
    "ablate",
    "baseline_bases",
    "compare_bases",
    "generate_pinned",
    "patch",
    "patching_curve",
    "pin",
    "rank_features",
    "run",
]
