"""Batched nnsight runs over a task with dictionaries spliced at several sites.

Clean and corrupted values, gradients of the metric (plain or integrated), attribution of edges,
exact single-node patching and mean ablation. A node of a site is an *extended index*: `i < F` is
feature `i`, `i == F` the site's error term, so per-site vectors of length `F + 1` hold a number for
every node. Metrics are means over the task's prompts; gradients are of that mean. Candidates and
circuits are stacked as chunks of rows (the prompts repeated), so one forward serves many of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import nnsight
import torch

from sae_circuits.errors import UserInputError
from sae_circuits.progress import progress_bar
from sae_circuits.sites import torch_module
from sae_circuits.splice import spliced

Node = tuple[str, int]  # (site, extended index)


class TaskLike(Protocol):
    """What circuit discovery needs from a task (`sae_circuits.tasks.Task` fits): clean and
    corrupted prompts (strings, or token ids) of equal token length per pair, and a per-prompt
    metric on logits. An optional attribute `groups` (one label per pair, e.g. its template) says
    which prompts have aligned positions."""

    clean: Sequence[str] | torch.Tensor
    corrupt: Sequence[str] | torch.Tensor

    def metric(self, logits: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TaskInputs:
    """A task tokenised for the model: `clean`/`corrupt` hold `input_ids` and `attention_mask`."""

    clean: dict[str, torch.Tensor]
    corrupt: dict[str, torch.Tensor]
    metric: Callable[[torch.Tensor], torch.Tensor]
    groups: torch.Tensor  # (n,) index of each prompt's group: same label and same token length

    @property
    def n(self) -> int:
        return int(self.clean["input_ids"].shape[0])

    @property
    def mask(self) -> torch.Tensor:
        return self.clean["attention_mask"].bool()


def task_inputs(model: Any, task: TaskLike) -> TaskInputs:
    """Tokenise a task's prompts (left-padded) and check that clean and corrupted rows align."""
    device = next(torch_module(model).parameters()).device

    def encode(prompts: Sequence[str] | torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(prompts, torch.Tensor):
            ids = prompts
            mask = torch.ones_like(ids)
        else:
            batch = model.tokenizer(list(prompts), return_tensors="pt", padding=True)
            ids, mask = batch["input_ids"], batch["attention_mask"]
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    clean, corrupt = encode(task.clean), encode(task.corrupt)
    if clean["input_ids"].shape != corrupt["input_ids"].shape or not torch.equal(
        clean["attention_mask"], corrupt["attention_mask"]
    ):
        raise UserInputError(
            "clean and corrupted prompts must have equal token lengths, pair by pair"
        )
    n = clean["input_ids"].shape[0]
    if n == 0:
        raise UserInputError("the task has no prompts")
    labels = getattr(task, "groups", None) or [""] * n
    if len(labels) != n:
        raise UserInputError(f"the task has {len(labels)} group labels for {n} prompts")
    keys = list(zip(labels, clean["attention_mask"].sum(1).tolist(), strict=True))
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    groups = torch.tensor([index[key] for key in keys], device=device)
    return TaskInputs(clean, corrupt, task.metric, groups)


@dataclass
class Values:
    """Features `(B, T, F)` and error `(B, T, D)` of every site in one run, and the metric `(B,)`."""

    features: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor]
    metric: torch.Tensor | None = None


def _repeat(inputs: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {key: value.repeat(k, 1) for key, value in inputs.items()}


def _chunk_metric(metric: Callable, logits: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) mean metric of each chunk of rows."""
    return torch.stack([metric(part).float().mean() for part in logits.chunk(k)])


def run(
    model: Any, inputs: Mapping[str, torch.Tensor], metric: Callable, sites: list[str]
) -> Values:
    """Features, errors and metric of an unedited run."""
    with torch.no_grad(), model.trace(dict(inputs)):
        saved = nnsight.save(
            [(spliced(model, s).features.output, spliced(model, s).error.output) for s in sites]
        )
        m = nnsight.save(metric(model.output.logits).float())
    return Values(
        {s: f for s, (f, _) in zip(sites, saved, strict=True)},
        {s: e for s, (_, e) in zip(sites, saved, strict=True)},
        m,
    )


def gradients(model: Any, task: TaskInputs, sites: list[str]) -> Values:
    """Gradients of the mean metric w.r.t. every site's features and error, at the corrupted input."""
    with model.trace(dict(task.corrupt)):
        hooks = [spliced(model, s) for s in sites]
        tensors = [t for h in hooks for t in (h.features.output, h.error.output)]
        total = task.metric(model.output.logits).float().mean()
        grads = nnsight.save([g.detach() for g in torch.autograd.grad(total, tensors)])
    return Values(
        {s: grads[2 * i] for i, s in enumerate(sites)},
        {s: grads[2 * i + 1] for i, s in enumerate(sites)},
    )


def integrated_gradients(
    model: Any, task: TaskInputs, sites: list[str], clean: Values, corrupt: Values, steps: int
) -> Values:
    """Gradients averaged over `steps` points corrupt + α (clean − corrupt), α = 0, 1/steps, ...,
    each site interpolated on its own (the other sites respond freely); one trace per site."""
    alphas = torch.arange(steps, dtype=torch.float32) / steps
    out = Values({}, {})
    for site in sites:
        rows = alphas.repeat_interleave(task.n).to(task.mask.device)[:, None, None]
        f0, e0 = (
            corrupt.features[site].repeat(steps, 1, 1),
            corrupt.errors[site].repeat(steps, 1, 1),
        )
        df = clean.features[site].repeat(steps, 1, 1) - f0
        de = clean.errors[site].repeat(steps, 1, 1) - e0
        with model.trace(_repeat(task.corrupt, steps)):
            f = (f0 + rows * df).requires_grad_(True)
            e = (e0 + rows * de).requires_grad_(True)
            hook = spliced(model, site)
            hook.features.output = f
            hook.error.output = e
            total = _chunk_metric(task.metric, model.output.logits, steps).sum()
            grads = nnsight.save([g.detach() for g in torch.autograd.grad(total, [f, e])])
        out.features[site] = grads[0].view(steps, task.n, *f0.shape[1:]).mean(0)
        out.errors[site] = grads[1].view(steps, task.n, *e0.shape[1:]).mean(0)
    return out


def extended(features: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """Sum `(B, T, F)` and `(B, T, D)` products over rows and positions into an `(F + 1,)` vector."""
    return torch.cat([features.sum((0, 1)), error.sum()[None]])


def node_attribution(grads: Values, clean: Values, corrupt: Values, site: str) -> torch.Tensor:
    """(F + 1,) attribution patching estimate grad · (clean − corrupt) of each node of `site`."""
    return extended(
        grads.features[site] * (clean.features[site] - corrupt.features[site]),
        grads.errors[site] * (clean.errors[site] - corrupt.errors[site]),
    )


def edge_attribution(
    model: Any,
    task: TaskInputs,
    sites: list[str],
    clean: Values,
    corrupt: Values,
    grads: Values,
    downstream: Mapping[str, Sequence[int]],
) -> dict[Node, torch.Tensor]:
    """For each downstream node (site D, index j): the `(F_U + 1,)` estimate of its edges from the
    previous site U, the gradient of D's linearised effect Σ grad_j · value_j w.r.t. U's nodes times
    U's clean − corrupt difference. One forward, then one backward per downstream node."""
    previous = dict(zip(sites[1:], sites[:-1], strict=True))
    needed = [s for s in sites if s in downstream or s in {previous.get(d) for d in downstream}]
    jobs = [(d, j) for d in sites if d in downstream for j in downstream[d]]
    if not jobs:
        return {}
    with model.trace(dict(task.corrupt)) as tracer:
        live = {}
        for s in needed:
            hook = spliced(model, s)
            live[s] = (hook.features.output, hook.error.output)
        results = []
        for d, j in jobs:
            f_d, e_d = live[d]
            if j < f_d.shape[-1]:
                linear = (grads.features[d][..., j] * f_d[..., j]).sum()
            else:
                linear = (grads.errors[d] * e_d).sum()
            u = previous[d]
            if linear.requires_grad:
                g_f, g_e = torch.autograd.grad(
                    linear, live[u], retain_graph=True, allow_unused=True, materialize_grads=True
                )
            else:  # a feature inactive everywhere: no path back
                g_f, g_e = torch.zeros_like(live[u][0]), torch.zeros_like(live[u][1])
            results.append(
                extended(
                    g_f * (clean.features[u] - corrupt.features[u]),
                    g_e * (clean.errors[u] - corrupt.errors[u]),
                ).detach()
            )
        results = nnsight.save(results)
        tracer.stop()
    return dict(zip(jobs, results, strict=True))


@dataclass
class PatchResult:
    """Exact single-node patching: per candidate the change of the mean metric, and the `(F_D + 1,)`
    change of the linearised effect Σ grad · value of every node of the next site D (None at the
    last site)."""

    metric: torch.Tensor
    downstream: list[torch.Tensor | None]


def exact_patching(
    model: Any,
    task: TaskInputs,
    sites: list[str],
    clean: Values,
    corrupt: Values,
    grads: Values,
    candidates: Sequence[Node],
    max_rows: int = 256,
    progress: bool = True,
) -> PatchResult:
    """Patch each candidate's clean value (at every position) into the corrupted run, alone.
    Candidates are stacked as chunks of rows, `max_rows // n_prompts` per forward."""
    per_trace = max(1, max_rows // task.n)
    metric_changes: list[torch.Tensor] = []
    downstream: list[torch.Tensor | None] = []
    with (
        torch.no_grad(),
        progress_bar("exact patching", len(candidates), enabled=progress) as bar,
    ):
        for start in range(0, len(candidates), per_trace):
            chunk = list(candidates[start : start + per_trace])
            m, down = _patch_chunk(model, task, sites, clean, corrupt, grads, chunk)
            metric_changes.append(m - corrupt.metric.mean())
            downstream.extend(down)
            bar.advance(0, len(chunk))
    return PatchResult(torch.cat(metric_changes), downstream)


def _patch_chunk(
    model: Any,
    task: TaskInputs,
    sites: list[str],
    clean: Values,
    corrupt: Values,
    grads: Values,
    chunk: list[Node],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    k, n = len(chunk), task.n
    batch_rows = torch.arange(n, device=task.mask.device)
    nxt = dict(zip(sites[:-1], sites[1:], strict=True))
    measured = {nxt[s] for s, _ in chunk if s in nxt}
    with model.trace(_repeat(task.corrupt, k)):
        linear = {}
        for site in sites:
            hook = spliced(model, site)
            width = clean.features[site].shape[-1]
            here = [(c, i) for c, (s, i) in enumerate(chunk) if s == site]
            f = hook.features.output
            if site in measured:
                g = grads.features[site]
                linear[site] = (f.view(k, n, *f.shape[1:]) * g).sum((1, 2))
            feats = [(c, i) for c, i in here if i < width]
            if feats:
                rows = torch.cat([c * n + batch_rows for c, _ in feats])
                idx = torch.tensor([i for _, i in feats], device=rows.device).repeat_interleave(n)
                f = f.clone()
                f[rows, :, idx] = clean.features[site][rows % n, :, idx]
                hook.features.output = f
            e = hook.error.output
            if site in measured:
                err = (e.view(k, n, *e.shape[1:]) * grads.errors[site]).sum((1, 2, 3))
                linear[site] = torch.cat([linear[site], err[:, None]], 1)
            errs = [c for c, i in here if i == width]
            if errs:
                rows = torch.cat([c * n + batch_rows for c in errs])
                e = e.clone()
                e[rows] = clean.errors[site][rows % n]
                hook.error.output = e
        m = nnsight.save(_chunk_metric(task.metric, model.output.logits, k))
        linear = nnsight.save(linear)
    down: list[torch.Tensor | None] = []
    for c, (s, _) in enumerate(chunk):
        d = nxt.get(s)
        if d is None:
            down.append(None)
            continue
        base = node_linear(grads, corrupt, d)
        down.append(linear[d][c] - base)
    return m, down


def node_linear(grads: Values, values: Values, site: str) -> torch.Tensor:
    """(F + 1,) linearised effect Σ grad · value of each node of `site`."""
    return extended(
        grads.features[site] * values.features[site], grads.errors[site] * values.errors[site]
    )


def position_means(values: Values, mask: torch.Tensor, groups: torch.Tensor) -> Values:
    """Per-position means of every site's features and error over the prompts of each group (real
    tokens only), given per prompt: `(B, T, ·)` tensors whose row b holds the means of b's group."""
    one_hot = torch.nn.functional.one_hot(groups).to(mask.device, torch.float32)  # (B, G)
    weights = one_hot[:, :, None] * mask.float()[:, None, :]  # (B, G, T)
    count = weights.sum(0).clamp_min(1)  # (G, T)

    def means(x: torch.Tensor) -> torch.Tensor:
        per_group = torch.einsum("bgt,bt...->gt...", weights, x.float())
        per_group = per_group / count.view(*count.shape, *[1] * (x.dim() - 2))
        return per_group[groups]

    return Values(
        {s: means(f) for s, f in values.features.items()},
        {s: means(e) for s, e in values.errors.items()},
    )


def mean_ablated_metric(
    model: Any,
    task: TaskInputs,
    sites: list[str],
    means: Values,
    keeps: Sequence[Mapping[str, torch.Tensor]],
    max_rows: int = 256,
) -> torch.Tensor:
    """(len(keeps),) mean metric on the clean prompts with, at every site, the nodes outside
    `keep[site]` (a boolean `(F + 1,)` vector) set to their mean (`means`: per prompt, from
    `position_means`)."""
    per_trace = max(1, max_rows // task.n)
    out = []
    with torch.no_grad():
        for start in range(0, len(keeps), per_trace):
            chunk = list(keeps[start : start + per_trace])
            k = len(chunk)
            with model.trace(_repeat(task.clean, k)):
                for site in sites:
                    keep = torch.stack([c[site] for c in chunk]).repeat_interleave(task.n, 0)
                    if bool(keep.all()):
                        continue
                    hook = spliced(model, site)
                    f, f_mean = hook.features.output, means.features[site].repeat(k, 1, 1)
                    hook.features.output = torch.where(keep[:, None, :-1], f, f_mean)
                    e, e_mean = hook.error.output, means.errors[site].repeat(k, 1, 1)
                    hook.error.output = torch.where(keep[:, -1, None, None], e, e_mean)
                m = nnsight.save(_chunk_metric(task.metric, model.output.logits, k))
            out.append(m)
    return torch.cat(out)
