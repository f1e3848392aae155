"""Faithfulness of a circuit: keep its nodes, ablate every other node at the spliced sites.

`(m(C) − m(∅)) / (m(M) − m(∅))`, where m is the task metric on the clean prompts (mean over
prompts), M the full spliced model, ∅ every feature and error term ablated, and C only the nodes
outside the circuit ablated. Two ablations (`ABLATIONS`):
- "mean" (Marks et al.): a node takes its mean per position over the task's clean prompts of the
  same group (template and token length, so that positions line up; one group when the task gives
  no `groups`);
- "corrupt" (activation patching, as ACDC and edge attribution patching measure circuits): a node
  takes its value on the prompt's corrupted counterpart, the same contrast the attribution scores
  measure, so that ∅ is the corrupted run. Features equal in both runs (under the ABC corruption
  the indirect object's name) are then left as they are instead of being removed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch

from sae_circuits import engine
from sae_circuits.circuits import patching as P
from sae_circuits.circuits.methods import ABLATIONS
from sae_circuits.engine import TaskLike
from sae_circuits.errors import UserInputError
from sae_circuits.nodes import METRIC, Node
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote
from sae_circuits.sites import Site
from sae_circuits.splice import attached


def faithfulness_curve(
    model: Model,
    task: TaskLike,
    ranking: Sequence[str | Node],
    sizes: Iterable[int],
    sites: Sequence[str | Site] | None = None,
    max_rows: int = 256,
    remote: Remote = False,
    ablation: str = "mean",
) -> list[dict[str, float]]:
    """Faithfulness of the top-n nodes of `ranking` (nodes or their ids, best first) for each n in
    `sizes` (and n = 0): `[{"nodes": n, "faithfulness": f, "metric": m(C)}, ...]`, with the nodes
    outside ablated by `ablation` ("mean" or "corrupt", see the module). `remote` (True: NDIF,
    "local": nnsight's simulation) runs each forward as a request."""
    if ablation not in ABLATIONS:
        raise UserInputError(f"unknown ablation {ablation!r}; valid: {', '.join(ABLATIONS)}")
    sites = list(attached(model)) if sites is None else sorted({Site.parse(s) for s in sites})
    ranking = [Node.parse(node) for node in ranking]
    inputs = engine.task_tokens(model, task)
    sizes_of_groups = torch.bincount(inputs.groups)
    if ablation == "mean" and bool((sizes_of_groups == 1).any()):
        warnings.warn(
            f"{int((sizes_of_groups == 1).sum())} of {len(sizes_of_groups)} groups (templates) "
            "have a single prompt, whose mean is the prompt itself: mean ablation leaves them "
            "unchanged; use more prompts per template",
            stacklevel=2,
        )
    clean = engine.read(model, inputs.clean, sites, inputs.metric, remote=remote)
    if ablation == "mean":
        replacements = engine.mean_per_position(clean, inputs.mask, inputs.groups)
    else:
        replacements = engine.read(model, inputs.corrupt, sites, inputs.metric, remote=remote)
    sizes = sorted(set(sizes) | {0})
    circuits = [ranking[:n] for n in sizes]
    metrics = P.ablated_metric(
        model, inputs, sites, replacements, circuits, max_rows, remote
    ).tolist()
    empty, full = metrics[0], float(clean.metric.mean())
    if abs(full - empty) <= 1e-6 * max(1.0, abs(full)):
        warnings.warn(
            "ablating every node leaves the metric unchanged: faithfulness is undefined (nan)",
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
    model: Model,
    task: TaskLike,
    nodes: Iterable[str | Node],
    sites: Sequence[str | Site] | None = None,
    remote: Remote = False,
    ablation: str = "mean",
) -> float:
    """Faithfulness of the circuit made of `nodes` (ids like `resid.2/17`, `resid.2/error`);
    `remote` and `ablation` as for `faithfulness_curve`."""
    nodes = [n for n in nodes if n != METRIC]
    curve = faithfulness_curve(
        model, task, nodes, [len(nodes)], sites, remote=remote, ablation=ablation
    )
    return curve[-1]["faithfulness"]
