"""Faithfulness of a circuit: keep its nodes, mean-ablate every other node at the spliced sites.

`(m(C) − m(∅)) / (m(M) − m(∅))`, where m is the task metric on the clean prompts (mean over
prompts), M the full spliced model, ∅ every feature and error term mean-ablated, and C only the
nodes outside the circuit mean-ablated. Means are per position over the task's clean prompts of
the same group (template and token length, so that positions line up; one group when the task
gives no `groups`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from sae_circuits.circuits import patching as P
from sae_circuits.circuits.graph import METRIC, parse_node
from sae_circuits.errors import UserInputError
from sae_circuits.splice import attached


def faithfulness_curve(
    model: Any,
    task: P.TaskLike,
    ranking: Sequence[str],
    sizes: Iterable[int],
    sites: Sequence[str] | None = None,
    max_rows: int = 256,
) -> list[dict[str, float]]:
    """Faithfulness of the top-n nodes of `ranking` (node ids, best first) for each n in `sizes`
    (and n = 0): `[{"nodes": n, "faithfulness": f, "metric": m(C)}, ...]`."""
    sites = list(attached(model)) if sites is None else list(sites)
    inputs = P.task_inputs(model, task)
    sizes_of_groups = torch.bincount(inputs.groups)
    if bool((sizes_of_groups == 1).any()):
        warnings.warn(
            f"{int((sizes_of_groups == 1).sum())} of {len(sizes_of_groups)} groups (templates) "
            "have a single prompt, whose mean is the prompt itself: mean ablation leaves them "
            "unchanged; use more prompts per template",
            stacklevel=2,
        )
    clean = P.run(model, inputs.clean, inputs.metric, sites)
    means = P.position_means(clean, inputs.mask, inputs.groups)
    widths = {s: clean.features[s].shape[-1] for s in sites}
    sizes = sorted(set(sizes) | {0})
    keeps = [_keep(ranking[:n], widths) for n in sizes]
    metrics = P.mean_ablated_metric(model, inputs, sites, means, keeps, max_rows).tolist()
    empty, full = metrics[0], float(clean.metric.mean())
    if abs(full - empty) <= 1e-6 * max(1.0, abs(full)):
        warnings.warn(
            "mean-ablating every node leaves the metric unchanged: faithfulness is undefined (nan)",
            stacklevel=2,
        )
        return [
            {"nodes": n, "faithfulness": math.nan, "metric": m}
            for n, m in zip(sizes, metrics, strict=True)
        ]
    return [
        {"nodes": n, "faithfulness": (m - empty) / (full - empty), "metric": m}
        for n, m in zip(sizes, metrics, strict=True)
    ]


def faithfulness(
    model: Any, task: P.TaskLike, nodes: Iterable[str], sites: Sequence[str] | None = None
) -> float:
    """Faithfulness of the circuit made of `nodes` (ids like `resid.2/17`, `resid.2/error`)."""
    nodes = [n for n in nodes if n != METRIC]
    return faithfulness_curve(model, task, nodes, [len(nodes)], sites)[-1]["faithfulness"]


def _keep(nodes: Sequence[str], widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """Boolean `(F + 1,)` keep vector per site for the given node ids."""
    keep = {s: torch.zeros(w + 1, dtype=torch.bool) for s, w in widths.items()}
    for name in nodes:
        site, feature = parse_node(name)
        if site not in keep:
            raise UserInputError(f"node {name} is not at a spliced site ({', '.join(widths)})")
        keep[site][widths[site] if feature is None else feature] = True
    return keep
