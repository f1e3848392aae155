"""One engine for batched runs of prompts through a model with dictionaries spliced in.

Interventions, patching curves and circuit discovery share these primitives:

- `tokenize` / `Tokens`: prompts tokenised once (left-padded); `Tokens.rows` cuts a batch out of
  them exactly as if it had been tokenised on its own (columns that are padding in every row go);
- `task_tokens` / `TaskTokens`: a task's clean and corrupted prompts tokenised once, checked to align
  pair by pair, with the groups of prompts whose positions line up (same template and length);
- `read`: one unedited run, the features and error terms at some sites and the last-position logits;
- `edited`: one forward of several copies of a batch, each copy with its own edits of features and
  error terms (`SiteEdit`); circuit and curve code stack many candidate edits into one forward;
- the two means used by mean ablation, named by what they average: `mean_over_tokens` (one mean
  per feature over every real token of reference prompts, for `ablate(mode="mean")`) and
  `mean_per_position` (a mean per template and position over a task's prompts, for faithfulness,
  where positions of one template carry the same role).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import nnsight
import torch
import torch.nn.functional as F

from sae_circuits.batches import split_batch, trace_inputs
from sae_circuits.carried import per_copy, where_per_copy
from sae_circuits.errors import UserInputError
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote, portable_metric, request, vocabulary_size
from sae_circuits.sites import Site, torch_module
from sae_circuits.splice import spliced


class TaskLike(Protocol):
    """What the engine needs from a task (`sae_circuits.tasks.Task` fits): clean and corrupted prompts
    (strings, or token ids) of equal token length pair by pair, and a per-prompt metric on logits.
    Optional: `groups` (one label per pair, e.g. its template: which prompts have aligned positions)
    and `subset(rows)` (needed to run a task in several batches)."""

    clean: Sequence[str] | torch.Tensor
    corrupt: Sequence[str] | torch.Tensor

    def metric(self, logits: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Tokens:
    """Left-padded token ids `(n, T)` and their attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        """T, the padded length."""
        return int(self.input_ids.shape[1])

    @property
    def mask(self) -> torch.Tensor:
        """`(n, T)` bool: real tokens."""
        return self.attention_mask.bool()

    def inputs(self) -> dict[str, torch.Tensor]:
        return trace_inputs(self.input_ids, self.attention_mask)

    def rows(self, index: slice) -> Tokens:
        """The rows at `index`, without the leading columns that are padding in all of them."""
        ids, mask = self.input_ids[index], self.attention_mask[index]
        real = mask.bool().any(0)
        first = int(real.nonzero()[0]) if bool(real.any()) else mask.shape[1]
        return Tokens(ids[:, first:], mask[:, first:])

    def repeat(self, copies: int) -> Tokens:
        """`copies` copies of the batch stacked along the rows (copy c is rows c·n … c·n + n − 1)."""
        return Tokens(self.input_ids.repeat(copies, 1), self.attention_mask.repeat(copies, 1))


def tokenize(model: Model, prompts: Sequence[str] | torch.Tensor) -> Tokens:
    """Prompts as left-padded `Tokens` on the model's device (token-id tensors are used as they are)."""
    device = next(torch_module(model).parameters()).device
    if isinstance(prompts, torch.Tensor):
        ids, mask = split_batch(prompts)
    else:
        if not prompts:
            raise UserInputError("no prompts to run")
        encoded = model.tokenizer(list(prompts), return_tensors="pt", padding=True)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
    if ids.shape[0] == 0:
        raise UserInputError("no prompts to run")
    return Tokens(ids.to(device), mask.to(device))


def batches(tokens: Tokens, batch_size: int) -> Iterator[tuple[slice, Tokens]]:
    """(rows, tokens of those rows) for consecutive batches of at most `batch_size` prompts."""
    for start in range(0, len(tokens), batch_size):
        rows = slice(start, min(start + batch_size, len(tokens)))
        yield rows, tokens.rows(rows)


@dataclass(frozen=True)
class TaskTokens:
    """A task tokenised once: `clean` and `corrupt` align pair by pair; `groups` (n,) numbers the
    groups of prompts with the same label and token length. `task` is None for bare prompt pairs."""

    task: Any
    clean: Tokens
    corrupt: Tokens
    groups: torch.Tensor

    def __len__(self) -> int:
        return len(self.clean)

    @property
    def mask(self) -> torch.Tensor:
        return self.clean.mask

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The task's per-prompt metric on logits of its prompts (rows in order)."""
        return self.task.metric(logits)

    def batches(self, batch_size: int) -> Iterator[TaskTokens]:
        """The task in consecutive batches of at most `batch_size` pairs (itself if it fits)."""
        if batch_size >= len(self):
            yield self
            return
        if self.task is not None and not hasattr(self.task, "subset"):
            raise UserInputError("running a task in batches needs a task with subset(rows)")
        for start in range(0, len(self), batch_size):
            rows = slice(start, min(start + batch_size, len(self)))
            yield TaskTokens(
                None if self.task is None else self.task.subset(rows),
                self.clean.rows(rows),
                self.corrupt.rows(rows),
                self.groups[rows],
            )


def task_tokens(model: Model, task: TaskLike) -> TaskTokens:
    """Tokenise a task's prompts once and check that clean and corrupted prompts align."""
    return pair_tokens(model, task.clean, task.corrupt, task)


def pair_tokens(
    model: Model,
    clean: Sequence[str] | torch.Tensor,
    corrupt: Sequence[str] | torch.Tensor,
    task: Any = None,
) -> TaskTokens:
    """Clean and corrupted prompts tokenised once, checked to have equal token lengths pair by
    pair; `task` (optional) gives the metric and the group labels."""
    if len(clean) != len(corrupt):
        raise UserInputError("patching needs as many clean as corrupted prompts")
    if len(clean) == 0:
        raise UserInputError("the task has no prompts")
    clean_tokens, corrupt_tokens = tokenize(model, clean), tokenize(model, corrupt)
    if clean_tokens.input_ids.shape != corrupt_tokens.input_ids.shape or not torch.equal(
        clean_tokens.attention_mask, corrupt_tokens.attention_mask
    ):
        raise UserInputError(
            "clean and corrupted prompts must have equal token lengths, pair by pair"
        )
    n = len(clean_tokens)
    labels = getattr(task, "groups", None) or [""] * n
    if len(labels) != n:
        raise UserInputError(f"the task has {len(labels)} group labels for {n} prompts")
    keys = list(zip(labels, clean_tokens.attention_mask.sum(1).tolist(), strict=True))
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    groups = torch.tensor([index[key] for key in keys], device=clean_tokens.input_ids.device)
    return TaskTokens(task, clean_tokens, corrupt_tokens, groups)


# ------------------------------------------------------------------------------------ runs
@dataclass
class Values:
    """Features `(B, T, F)` and error terms `(B, T, D)` by site, last-position logits `(B, V)` (or
    all `(B, T, V)`, when asked), when a metric was given the per-prompt metric `(B,)` and, when
    asked, the sites' activations `(B, T, D)` (their values before the splice)."""

    features: dict[Site, torch.Tensor] = field(default_factory=dict)
    errors: dict[Site, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    metric: torch.Tensor | None = None
    activations: dict[Site, torch.Tensor] = field(default_factory=dict)


def read(
    model: Model,
    tokens: Tokens,
    sites: Sequence[Site],
    metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
    remote: Remote = False,
    all_logits: bool = False,
    activations: bool = False,
    stop: bool = False,
) -> Values:
    """One unedited run: features and error terms at `sites` (in forward order), the last-position
    logits (all of them with `all_logits`), given `metric` (a function of the `(B, T, V)` logits)
    the per-prompt metric and, with `activations`, the sites' activations. `stop` ends the forward
    after the last site (no logits, no metric). `remote` (True: NDIF, "local": nnsight's
    simulation) runs it as a request that carries the dictionaries (`sae_circuits.remote`)."""
    sites = sorted(sites)
    hooks = [spliced(model, site) for site in sites]
    if remote:
        return _read_remote(model, tokens, sites, metric, remote, all_logits, activations, stop)
    values = kept = None
    with torch.no_grad(), model.trace(tokens.inputs()) as tracer:
        saved = []
        for hook in hooks:
            x = hook.inputs[0][0] if activations else None  # the splice is called with (x, x_in)
            saved.append((hook.features.output, hook.error.output, x))
        saved = nnsight.save(saved)
        if stop:
            tracer.stop()
        logits = model.output.logits
        values = nnsight.save(None if metric is None else metric(logits).float())
        kept = (logits if all_logits else logits[:, -1]).save()
    return _values(sites, saved, kept, values)


def _values(sites: Sequence[Site], saved: list, logits: torch.Tensor, metric: Any) -> Values:
    """`Values` from the (features, error, activation or None) read at each site."""
    return Values(
        {site: f for site, (f, _, _) in zip(sites, saved, strict=True)},
        {site: e for site, (_, e, _) in zip(sites, saved, strict=True)},
        logits,
        metric,
        {site: x for site, (_, _, x) in zip(sites, saved, strict=True) if x is not None},
    )


def _read_remote(
    model: Model,
    tokens: Tokens,
    sites: Sequence[Site],
    metric: Callable[[torch.Tensor], torch.Tensor] | None,
    remote: Remote,
    all_logits: bool,
    activations: bool,
    stop: bool,
) -> Values:
    score = portable_metric(metric, (len(tokens), tokens.length, vocabulary_size(model)))
    keep_logits = all_logits or (metric is not None and score is None)
    values = kept = None
    with request(model, remote) as carried:
        wanted = [list(carried).index(site) for site in sites]
        order = list(carried.values())[: max(wanted, default=-1) + 1 if stop else None]
        with torch.no_grad(), model.trace(tokens.inputs(), remote=remote) as tracer:
            seen = [site.apply() for site in order]
            saved = nnsight.save(
                [(*seen[i][:2], seen[i][2] if activations else None) for i in wanted]
            )
            if stop:
                tracer.stop()
            logits = model.output.logits
            values = nnsight.save(None if score is None else score(logits).float())
            kept = (logits if keep_logits else logits[:, -1]).save()
    if kept is not None and metric is not None and score is None:
        values = metric(kept).float()
    if kept is not None and keep_logits and not all_logits:
        kept = kept[:, -1]
    return _values(sites, saved, kept, values)


@dataclass(frozen=True)
class SiteEdit:
    """New values for some features and for the error term at one site, in one copy of a batch.

    Where `features_mask` (broadcastable to `(B, T, F)`) is set, the features take
    `features_value` (broadcastable too); where `error_mask` (broadcastable to `(B, T, 1)`) is
    set, the error term takes `error_value`. A None mask edits nothing.
    """

    features_mask: torch.Tensor | None = None
    features_value: torch.Tensor | float = 0.0
    error_mask: torch.Tensor | None = None
    error_value: torch.Tensor | float = 0.0


Edits = Mapping[Site, SiteEdit]


def edited(
    model: Model,
    tokens: Tokens,
    copies: Sequence[Edits],
    metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
    remote: Remote = False,
    all_logits: bool = False,
) -> Values:
    """One forward of `len(copies)` copies of the batch, copy c with the edits `copies[c]`.

    Returns last-position logits `(len(copies), B, V)` (all of them, `(len(copies), B, T, V)`,
    with `all_logits`) and, given `metric` (a function of one copy's `(B, T, V)` logits), the
    metric `(len(copies), B)`. `remote` as for `read`.
    """
    k, n = len(copies), len(tokens)
    sites = sorted({site for edits in copies for site in edits})
    hooks = {site: spliced(model, site) for site in sites}
    plan = {
        site: tuple(_edits_of(copies, site, part) for part in ("features", "error"))
        for site in sites
    }
    if remote:
        return _edited_remote(model, tokens, plan, k, metric, remote, all_logits)
    with torch.no_grad(), model.trace(tokens.repeat(k).inputs()):
        for site in sites:
            hook = hooks[site]
            features, error = plan[site]
            if features is not None:
                hook.features.output = where_per_copy(hook.features.output, features, n)
            if error is not None:
                hook.error.output = where_per_copy(hook.error.output, error, n)
        logits = model.output.logits
        metrics = nnsight.save(
            None
            if metric is None
            else torch.stack([metric(part).float() for part in logits.chunk(k)])
        )
        kept = (logits if all_logits else logits[:, -1]).save()
    return Values(logits=kept.view(k, n, *kept.shape[1:]), metric=metrics)


def _edits_of(copies: Sequence[Edits], site: Site, part: str) -> list | None:
    """Per copy, the (mask, value) of `part` ("features" or "error") at `site`, or None when no
    copy edits it."""
    pairs = []
    for edits in copies:
        edit = edits.get(site)
        mask = None if edit is None else getattr(edit, f"{part}_mask")
        pairs.append(None if mask is None else (mask, getattr(edit, f"{part}_value")))
    return pairs if any(pair is not None for pair in pairs) else None


def _edited_remote(
    model: Model,
    tokens: Tokens,
    plan: Mapping[Site, tuple[list | None, list | None]],
    k: int,
    metric: Callable[[torch.Tensor], torch.Tensor] | None,
    remote: Remote,
    all_logits: bool,
) -> Values:
    n = len(tokens)
    score = portable_metric(metric, (n, tokens.length, vocabulary_size(model)))
    keep_logits = all_logits or (metric is not None and score is None)
    with request(model, remote) as carried:
        order = [(carried[site], *plan.get(site, (None, None))) for site in carried]
        with torch.no_grad(), model.trace(tokens.repeat(k).inputs(), remote=remote):
            for site, features, error in order:
                site.apply(per_copy(features, n), per_copy(error, n))
            logits = model.output.logits
            metrics = nnsight.save(
                None
                if score is None
                else torch.stack([score(part).float() for part in logits.chunk(k)])
            )
            kept = (logits if keep_logits else logits[:, -1]).save()
    if metric is not None and score is None:
        metrics = torch.stack([metric(part).float() for part in kept.chunk(k)])
    kept = kept if all_logits or not keep_logits else kept[:, -1]
    return Values(logits=kept.view(k, n, *kept.shape[1:]), metric=metrics)


# ----------------------------------------------------------------------------------- means
def mean_over_tokens(
    model: Model,
    tokens: Tokens,
    sites: Sequence[Site],
    last_only: bool = False,
    batch_size: int = 32,
) -> dict[Site, torch.Tensor]:
    """`(F,)` mean features at each site over every real token of `tokens` (or each prompt's last
    token), accumulated batch by batch."""
    sums: dict[Site, torch.Tensor] = {}
    count = 0
    for _, batch in batches(tokens, batch_size):
        values = read(model, batch, sites)
        mask = batch.mask
        if last_only:
            mask = torch.zeros_like(mask)
            mask[:, -1] = True
        count += int(mask.sum())
        for site in sites:
            total = values.features[site][mask].sum(0).cpu()
            sums[site] = sums[site] + total if site in sums else total
    return {site: total / count for site, total in sums.items()}


def mean_per_position(values: Values, mask: torch.Tensor, groups: torch.Tensor) -> Values:
    """Per-position means of every site's features and error over the prompts of each group (real
    tokens only), given per prompt: `(B, T, ·)` tensors whose row b holds the means of b's group."""
    one_hot = F.one_hot(groups).to(mask.device, torch.float32)  # (B, G)
    weights = one_hot[:, :, None] * mask.float()[:, None, :]  # (B, G, T)
    count = weights.sum(0).clamp_min(1)  # (G, T)

    def means(x: torch.Tensor) -> torch.Tensor:
        per_group = torch.einsum("bgt,bt...->gt...", weights, x.float())
        per_group = per_group / count.view(*count.shape, *[1] * (x.dim() - 2))
        return per_group[groups]

    return replace(
        values,
        features={s: means(f) for s, f in values.features.items()},
        errors={s: means(e) for s, e in values.errors.items()},
        logits=None,
        metric=None,
    )


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row KL(reference ‖ logits) of the next-token distributions, in float64."""
    return F.kl_div(
        logits.double().log_softmax(-1),
        reference.double().log_softmax(-1),
        log_target=True,
        reduction="none",
    ).sum(-1)


__all__ = [
    "Edits",
    "SiteEdit",
    "TaskLike",
    "TaskTokens",
    "Tokens",
    "Values",
    "batches",
    "edited",
    "kl_divergence",
    "mean_over_tokens",
    "mean_per_position",
    "pair_tokens",
    "read",
    "task_tokens",
    "tokenize",
]
