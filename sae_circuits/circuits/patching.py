"""Gradients, attribution and exact patching of circuit nodes over a tokenised task.

Runs go through `sae_circuits.engine` (the task tokenised once, `read`, `edited`). Inside, the
numbers of one site's nodes are a `NodeValues`: a vector of the site's features followed by its
error term, indexed by `Node`; this module is the only place that knows that layout. Metrics are
means over the task's prompts; gradients are of that mean. Candidates and circuits are stacked as
copies of the prompts, so one forward serves many of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import nnsight
import torch

from sae_circuits.engine import SiteEdit, TaskTokens, Values, edited
from sae_circuits.errors import UserInputError
from sae_circuits.nodes import Node
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.sites import Site
from sae_circuits.splice import spliced


@dataclass(frozen=True)
class NodeValues:
    """A number for every node of one site: `values[:-1]` for the features, `values[-1]` for the
    error term."""

    site: Site
    values: torch.Tensor  # (F + 1,)

    def __getitem__(self, node: Node) -> float:
        return float(self.values[self.index(node)])

    def index(self, node: Node) -> int:
        if node.site != self.site:
            raise UserInputError(f"node {node} is not at {self.site}")
        return len(self.values) - 1 if node.feature is None else node.feature

    def items(self) -> Iterator[tuple[Node, float]]:
        """(node, value) for every node with a non-zero value, features first."""
        width = len(self.values) - 1
        for i in self.values.nonzero().flatten().tolist():
            yield Node(self.site, None if i == width else i), float(self.values[i])


def _summed(site: Site, features: torch.Tensor, error: torch.Tensor) -> NodeValues:
    """Sum `(B, T, F)` and `(B, T, D)` products over rows and positions into node values."""
    return NodeValues(site, torch.cat([features.sum((0, 1)), error.sum().reshape(1)]))


def gradients(model: Model, task: TaskTokens, sites: Sequence[Site]) -> Values:
    """Gradients of the mean metric w.r.t. every site's features and error, at the corrupted input."""
    with model.trace(task.corrupt.inputs()):
        hooks = [spliced(model, s) for s in sites]
        tensors = [t for h in hooks for t in (h.features.output, h.error.output)]
        total = task.metric(model.output.logits).float().mean()
        grads = nnsight.save([g.detach() for g in torch.autograd.grad(total, tensors)])
    return Values(
        {s: grads[2 * i] for i, s in enumerate(sites)},
        {s: grads[2 * i + 1] for i, s in enumerate(sites)},
    )


def integrated_gradients(
    model: Model,
    task: TaskTokens,
    sites: Sequence[Site],
    clean: Values,
    corrupt: Values,
    steps: int,
) -> Values:
    """Gradients averaged over `steps` points corrupt + α (clean − corrupt), α = 0, 1/steps, ...,
    each site interpolated on its own (the other sites respond freely); one trace per site."""
    alphas = torch.arange(steps, dtype=torch.float32) / steps
    n = len(task)
    out = Values()
    for site in sites:
        rows = alphas.repeat_interleave(n).to(task.mask.device)[:, None, None]
        f0 = corrupt.features[site].repeat(steps, 1, 1)
        e0 = corrupt.errors[site].repeat(steps, 1, 1)
        df = clean.features[site].repeat(steps, 1, 1) - f0
        de = clean.errors[site].repeat(steps, 1, 1) - e0
        with model.trace(task.corrupt.repeat(steps).inputs()):
            f = (f0 + rows * df).requires_grad_(True)
            e = (e0 + rows * de).requires_grad_(True)
            hook = spliced(model, site)
            hook.features.output = f
            hook.error.output = e
            logits = model.output.logits
            total = torch.stack([task.metric(part).float().mean() for part in logits.chunk(steps)])
            grads = nnsight.save([g.detach() for g in torch.autograd.grad(total.sum(), [f, e])])
        out.features[site] = grads[0].view(steps, n, *f0.shape[1:]).mean(0)
        out.errors[site] = grads[1].view(steps, n, *e0.shape[1:]).mean(0)
    return out


def node_attribution(grads: Values, clean: Values, corrupt: Values, site: Site) -> NodeValues:
    """Attribution patching estimate grad · (clean − corrupt) of each node of `site`."""
    return _summed(
        site,
        grads.features[site] * (clean.features[site] - corrupt.features[site]),
        grads.errors[site] * (clean.errors[site] - corrupt.errors[site]),
    )


def node_linear(grads: Values, values: Values, site: Site) -> NodeValues:
    """Linearised effect Σ grad · value of each node of `site`."""
    return _summed(
        site,
        grads.features[site] * values.features[site],
        grads.errors[site] * values.errors[site],
    )


def edge_attribution(
    model: Model,
    task: TaskTokens,
    sites: Sequence[Site],
    clean: Values,
    corrupt: Values,
    grads: Values,
    downstream: Sequence[Node],
) -> dict[Node, NodeValues]:
    """For each downstream node (at site D): the estimate of its edges from every node of the
    previous site U, the gradient of D's linearised effect Σ grad · value w.r.t. U's nodes times
    U's clean − corrupt difference. One forward, then one backward per downstream node."""
    previous = dict(zip(sites[1:], sites[:-1], strict=True))
    jobs = [node for node in downstream if node.site in previous]
    if not jobs:
        return {}
    needed = sorted({node.site for node in jobs} | {previous[node.site] for node in jobs})
    with model.trace(task.corrupt.inputs()) as tracer:
        live = {}
        for s in needed:
            hook = spliced(model, s)
            live[s] = (hook.features.output, hook.error.output)
        results = []
        for node in jobs:
            f_d, e_d = live[node.site]
            if node.is_error:
                linear = (grads.errors[node.site] * e_d).sum()
            else:
                linear = (
                    grads.features[node.site][..., node.feature] * f_d[..., node.feature]
                ).sum()
            u = previous[node.site]
            if linear.requires_grad:
                g_f, g_e = torch.autograd.grad(
                    linear, live[u], retain_graph=True, allow_unused=True, materialize_grads=True
                )
            else:  # a feature inactive everywhere: no path back
                g_f, g_e = torch.zeros_like(live[u][0]), torch.zeros_like(live[u][1])
            effect = _summed(
                u,
                g_f * (clean.features[u] - corrupt.features[u]),
                g_e * (clean.errors[u] - corrupt.errors[u]),
            )
            results.append(effect.values.detach())
        results = nnsight.save(results)
        tracer.stop()
    return {
        node: NodeValues(previous[node.site], values)
        for node, values in zip(jobs, results, strict=True)
    }


@dataclass
class PatchResult:
    """Exact single-node patching: per candidate the change of the mean metric, and the change of
    the linearised effect Σ grad · value of every node of the next site (None at the last site)."""

    metric: torch.Tensor
    downstream: list[NodeValues | None]


def exact_patching(
    model: Model,
    task: TaskTokens,
    sites: Sequence[Site],
    clean: Values,
    corrupt: Values,
    grads: Values,
    candidates: Sequence[Node],
    max_rows: int = 256,
    progress: bool = True,
) -> PatchResult:
    """Patch each candidate's clean value (at every position) into the corrupted run, alone.
    Candidates are stacked as copies of the prompts, `max_rows // n_prompts` per forward."""
    per_trace = max(1, max_rows // len(task))
    metric_changes: list[torch.Tensor] = []
    downstream: list[NodeValues | None] = []
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
    model: Model,
    task: TaskTokens,
    sites: Sequence[Site],
    clean: Values,
    corrupt: Values,
    grads: Values,
    chunk: list[Node],
) -> tuple[torch.Tensor, list[NodeValues | None]]:
    """One forward of `len(chunk)` copies of the corrupted prompts, copy c with node `chunk[c]`
    patched: the mean metric per copy, and the linearised effects at each patched node's next site.

    Patching writes single feature columns by index (not `engine.edited`'s full masks), which keeps
    memory at one copy of the features for hundreds of candidates."""
    k, n = len(chunk), len(task)
    batch_rows = torch.arange(n, device=task.mask.device)
    following = dict(zip(sites[:-1], sites[1:], strict=True))
    measured = {following[node.site] for node in chunk if node.site in following}
    with model.trace(task.corrupt.repeat(k).inputs()):
        linear = {}
        for site in sites:
            hook = spliced(model, site)
            here = [(c, node) for c, node in enumerate(chunk) if node.site == site]
            f = hook.features.output
            if site in measured:
                linear[site] = (f.view(k, n, *f.shape[1:]) * grads.features[site]).sum((1, 2))
            features = [(c, node.feature) for c, node in here if not node.is_error]
            if features:
                rows = torch.cat([c * n + batch_rows for c, _ in features])
                idx = torch.tensor([i for _, i in features], device=rows.device)
                idx = idx.repeat_interleave(n)
                f = f.clone()
                f[rows, :, idx] = clean.features[site][rows % n, :, idx]
                hook.features.output = f
            e = hook.error.output
            if site in measured:
                err = (e.view(k, n, *e.shape[1:]) * grads.errors[site]).sum((1, 2, 3))
                linear[site] = torch.cat([linear[site], err[:, None]], 1)
            errors = [c for c, node in here if node.is_error]
            if errors:
                rows = torch.cat([c * n + batch_rows for c in errors])
                e = e.clone()
                e[rows] = clean.errors[site][rows % n]
                hook.error.output = e
        logits = model.output.logits
        m = nnsight.save(
            torch.stack([task.metric(part).float().mean() for part in logits.chunk(k)])
        )
        linear = nnsight.save(linear)
    down: list[NodeValues | None] = []
    for c, node in enumerate(chunk):
        d = following.get(node.site)
        if d is None:
            down.append(None)
            continue
        base = node_linear(grads, corrupt, d).values
        down.append(NodeValues(d, linear[d][c] - base))
    return m, down


def mean_ablated_metric(
    model: Model,
    task: TaskTokens,
    sites: Sequence[Site],
    means: Values,
    circuits: Sequence[Iterable[Node]],
    max_rows: int = 256,
) -> torch.Tensor:
    """(len(circuits),) mean metric on the clean prompts with, at every site, the nodes outside
    each circuit set to their mean (`means`: per prompt, e.g. `engine.mean_per_position`)."""
    widths = {s: means.features[s].shape[-1] for s in sites}
    keeps = [keep_vectors(nodes, widths) for nodes in circuits]
    per_trace = max(1, max_rows // len(task))
    out = []
    for start in range(0, len(keeps), per_trace):
        copies = [_ablation_edits(keep, means) for keep in keeps[start : start + per_trace]]
        metric = edited(model, task.clean, copies, task.metric).metric
        out.append(metric.mean(1))
    return torch.cat(out)


def keep_vectors(nodes: Iterable[Node], widths: Mapping[Site, int]) -> dict[Site, torch.Tensor]:
    """A boolean `(F + 1,)` vector per site: which of its nodes (features, then error) are kept."""
    keep = {s: torch.zeros(w + 1, dtype=torch.bool) for s, w in widths.items()}
    for node in nodes:
        if node.site not in keep:
            raise UserInputError(
                f"node {node} is not at a spliced site ({', '.join(map(str, widths))})"
            )
        keep[node.site][widths[node.site] if node.is_error else node.feature] = True
    return keep


def _ablation_edits(keep: Mapping[Site, torch.Tensor], means: Values) -> dict[Site, SiteEdit]:
    """Edits that set every node outside `keep` to its mean (sites keeping everything: none)."""
    return {
        site: SiteEdit(
            ~keep[site][:-1],
            means.features[site],
            ~keep[site][-1:].reshape(1, 1, 1),
            means.errors[site],
        )
        for site in keep
        if not bool(keep[site].all())
    }
