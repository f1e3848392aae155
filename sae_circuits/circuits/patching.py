"""Gradients, attribution and exact patching of circuit nodes over a tokenised task.

Runs go through `sae_circuits.engine` (the task tokenised once, `read`, `edited`). Inside, the
numbers of one site's nodes are a `NodeValues`: a vector of the site's features followed by its
error term, indexed by `Node`; this module is the only place that knows that layout. Metrics are
means over the task's prompts; gradients are of that mean. Candidates and circuits are stacked as
copies of the prompts, so one forward serves many of them.

Every trace body is written once for local and remote runs (`remote=`: True for NDIF, "local" for
nnsight's simulation): it sees the sites through `remote.spliced_sites` and references only
envoys, tensors, plain values and `sae_circuits.carried`, so that it can travel in a request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import nnsight
import torch

from sae_circuits.carried import assigned, replaced, summed
from sae_circuits.engine import SiteEdit, TaskTokens, Values, edited
from sae_circuits.errors import UserInputError
from sae_circuits.nodes import Node
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote, portable_metric, spliced_sites, vocabulary_size
from sae_circuits.sites import Site


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
    return NodeValues(site, summed(features, error))


def _metric(
    model: Model, task: TaskTokens, remote: Remote
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The task's metric as a trace body applies it to the `(n, T, V)` logits of its prompts: the
    task's own function here, a pure-torch graph in a request."""
    if not remote:
        return task.metric
    metric = portable_metric(task.metric, (len(task), task.corrupt.length, vocabulary_size(model)))
    if metric is None:
        raise UserInputError("a remote circuit needs a task metric that torch.fx can trace")
    return metric


def gradients(
    model: Model, task: TaskTokens, sites: Sequence[Site], remote: Remote = False
) -> Values:
    """Gradients of the mean metric w.r.t. every site's features and error, at the corrupted input."""
    metric = _metric(model, task, remote)
    with (
        spliced_sites(model, sites, remote) as (order, places),
        model.trace(task.corrupt.inputs(), remote=remote),
    ):
        seen = [site.apply() for site in order]
        tensors = [t for i in places for t in seen[i][:2]]
        total = metric(model.output.logits).float().mean()
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
    remote: Remote = False,
) -> Values:
    """Gradients averaged over `steps` points corrupt + α (clean − corrupt), α = 0, 1/steps, ...,
    each site interpolated on its own (the other sites respond freely); one trace per site."""
    alphas = torch.arange(steps, dtype=torch.float32) / steps
    n = len(task)
    metric = _metric(model, task, remote)
    out = Values()
    for site in sites:
        rows = alphas.repeat_interleave(n).to(task.mask.device)[:, None, None]
        f0 = corrupt.features[site].repeat(steps, 1, 1)
        e0 = corrupt.errors[site].repeat(steps, 1, 1)
        df = clean.features[site].repeat(steps, 1, 1) - f0
        de = clean.errors[site].repeat(steps, 1, 1) - e0
        with (
            spliced_sites(model, [site], remote) as (order, (place,)),
            model.trace(task.corrupt.repeat(steps).inputs(), remote=remote),
        ):
            f = (f0 + rows * df).requires_grad_(True)
            e = (e0 + rows * de).requires_grad_(True)
            for i, spliced_site in enumerate(order):
                if i == place:
                    spliced_site.apply(replaced(f), replaced(e))
                else:
                    spliced_site.apply()
            logits = model.output.logits
            total = torch.stack([metric(part).float().mean() for part in logits.chunk(steps)])
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
    remote: Remote = False,
) -> dict[Node, NodeValues]:
    """For each downstream node (at site D): the estimate of its edges from every node of the
    previous site U, the gradient of D's linearised effect Σ grad · value w.r.t. U's nodes times
    U's clean − corrupt difference. One forward, then one backward per downstream node."""
    previous = dict(zip(sites[1:], sites[:-1], strict=True))
    jobs = [node for node in downstream if node.site in previous]
    if not jobs:
        return {}
    needed = sorted({node.site for node in jobs} | {previous[node.site] for node in jobs})
    with spliced_sites(model, needed, remote, through_last=True) as (order, places):
        at = dict(zip(needed, places, strict=True))
        # what the body reads, by position in `order`, and per job: (D, feature or -1, U)
        gradient = {at[s]: (grads.features[s], grads.errors[s]) for s in needed}
        change = {
            at[s]: (clean.features[s] - corrupt.features[s], clean.errors[s] - corrupt.errors[s])
            for s in needed
        }
        plan = [
            (at[node.site], -1 if node.is_error else node.feature, at[previous[node.site]])
            for node in jobs
        ]
        with model.trace(task.corrupt.inputs(), remote=remote) as tracer:
            seen = [site.apply()[:2] for site in order]
            results = []
            for d, feature, u in plan:
                f_d, e_d = seen[d]
                g_df, g_de = gradient[d]
                if feature < 0:
                    linear = (g_de * e_d).sum()
                else:
                    linear = (g_df[..., feature] * f_d[..., feature]).sum()
                if linear.requires_grad:
                    g_f, g_e = torch.autograd.grad(
                        linear,
                        seen[u],
                        retain_graph=True,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                else:  # a feature inactive everywhere: no path back
                    g_f, g_e = torch.zeros_like(seen[u][0]), torch.zeros_like(seen[u][1])
                df, de = change[u]
                results.append(summed(g_f * df, g_e * de).detach())
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
    remote: Remote = False,
) -> PatchResult:
    """Patch each candidate's clean value (at every position) into the corrupted run, alone.
    Candidates are stacked as copies of the prompts, `max_rows // n_prompts` per forward."""
    per_trace = max(1, max_rows // len(task))
    metric = _metric(model, task, remote)
    metric_changes: list[torch.Tensor] = []
    downstream: list[NodeValues | None] = []
    with (
        torch.no_grad(),
        progress_bar("exact patching", len(candidates), enabled=progress) as bar,
    ):
        for start in range(0, len(candidates), per_trace):
            chunk = list(candidates[start : start + per_trace])
            m, down = _patch_chunk(model, task, sites, clean, corrupt, grads, chunk, metric, remote)
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
    metric: Callable[[torch.Tensor], torch.Tensor],
    remote: Remote,
) -> tuple[torch.Tensor, list[NodeValues | None]]:
    """One forward of `len(chunk)` copies of the corrupted prompts, copy c with node `chunk[c]`
    patched: the mean metric per copy, and the linearised effects at each patched node's next site.

    Patching writes single feature columns by index (not `engine.edited`'s full masks), which keeps
    memory at one copy of the features for hundreds of candidates."""
    k, n = len(chunk), len(task)
    following = dict(zip(sites[:-1], sites[1:], strict=True))
    measured = {following[node.site] for node in chunk if node.site in following}
    with spliced_sites(model, sites, remote) as (order, places):
        # per position in `order`: the features' and the error's edit, and the gradients of
        # the linearised effects to measure there (None: no edit, nothing measured)
        plan: list[tuple] = [(None, None, None)] * len(order)
        for site, place in zip(sites, places, strict=True):
            here = [(c, node) for c, node in enumerate(chunk) if node.site == site]
            plan[place] = (
                _feature_patch(here, clean.features[site], n),
                _error_patch(here, clean.errors[site], n),
                (grads.features[site], grads.errors[site]) if site in measured else None,
            )
        with model.trace(task.corrupt.repeat(k).inputs(), remote=remote):
            linear = []
            for spliced_site, (features, error, gradient) in zip(order, plan, strict=True):
                f, e, _ = spliced_site.apply(features, error)
                if gradient is None:
                    linear.append(None)
                    continue
                g_f, g_e = gradient
                effect = (f.view(k, n, *f.shape[1:]) * g_f).sum((1, 2))
                err = (e.view(k, n, *e.shape[1:]) * g_e).sum((1, 2, 3))
                linear.append(torch.cat([effect, err[:, None]], 1))
            logits = model.output.logits
            m = nnsight.save(torch.stack([metric(part).float().mean() for part in logits.chunk(k)]))
            linear = nnsight.save(linear)
    measured_at = dict(zip(sites, places, strict=True))
    down: list[NodeValues | None] = []
    for c, node in enumerate(chunk):
        d = following.get(node.site)
        if d is None:
            down.append(None)
            continue
        base = node_linear(grads, corrupt, d).values
        down.append(NodeValues(d, linear[measured_at[d]][c] - base))
    return m, down


def _feature_patch(
    here: list[tuple[int, Node]], clean: torch.Tensor, n: int
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The edit writing each feature node's clean column into its copy (None: no feature here)."""
    features = [(c, node.feature) for c, node in here if not node.is_error]
    if not features:
        return None
    batch_rows = torch.arange(n, device=clean.device)
    rows = torch.cat([c * n + batch_rows for c, _ in features])
    idx = torch.tensor([i for _, i in features], device=rows.device).repeat_interleave(n)
    return assigned((rows, slice(None), idx), clean[rows % n, :, idx])


def _error_patch(
    here: list[tuple[int, Node]], clean: torch.Tensor, n: int
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The edit writing the clean error term into the copies of error nodes (None: none here)."""
    errors = [c for c, node in here if node.is_error]
    if not errors:
        return None
    batch_rows = torch.arange(n, device=clean.device)
    rows = torch.cat([c * n + batch_rows for c in errors])
    return assigned(rows, clean[rows % n])


def ablated_metric(
    model: Model,
    task: TaskTokens,
    sites: Sequence[Site],
    replacements: Values,
    circuits: Sequence[Iterable[Node]],
    max_rows: int = 256,
    remote: Remote = False,
) -> torch.Tensor:
    """(len(circuits),) mean metric on the clean prompts with, at every site, the nodes outside
    each circuit set to their `replacements` (per prompt: `engine.mean_per_position`'s means, or
    the corrupted run's values)."""
    widths = {s: replacements.features[s].shape[-1] for s in sites}
    keeps = [keep_vectors(nodes, widths) for nodes in circuits]
    per_trace = max(1, max_rows // len(task))
    out = []
    for start in range(0, len(keeps), per_trace):
        copies = [_ablation_edits(keep, replacements) for keep in keeps[start : start + per_trace]]
        metric = edited(model, task.clean, copies, task.metric, remote=remote).metric
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


def _ablation_edits(
    keep: Mapping[Site, torch.Tensor], replacements: Values
) -> dict[Site, SiteEdit]:
    """Edits that set every node outside `keep` to its replacement (sites keeping everything:
    none)."""
    return {
        site: SiteEdit(
            ~keep[site][:-1],
            replacements.features[site],
            ~keep[site][-1:].reshape(1, 1, 1),
            replacements.errors[site],
        )
        for site in keep
        if not bool(keep[site].all())
    }
