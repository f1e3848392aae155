"""Circuit discovery: cross-layer feature graphs in networkx.

- `task_circuit`: metric-rooted graphs for a task by attribution patching (verified by exact
  patching) or by exact patching of every candidate (Marks et al.);
- `feature_circuit`: feature-rooted trees by exact ablation, recursing down the layers
  (Cunningham et al.);
- `faithfulness`, `faithfulness_curve`: the share of the task metric a circuit keeps with everything
  else mean-ablated;
- `Circuit`: the graph and its report; `.save(dir)` writes node-link JSON, GraphML, DOT and a PNG,
  and it renders inline in Jupyter.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it, imported on first use (PEP 562), so that importing
# `sae_circuits.circuits.methods` loads neither torch nor networkx.
_EXPORTS = {
    "METHODS": "sae_circuits.circuits.methods",
    "METRIC": "sae_circuits.nodes",
    "Circuit": "sae_circuits.circuits.graph",
    "Node": "sae_circuits.nodes",
    "draw": "sae_circuits.circuits.export",
    "faithfulness": "sae_circuits.circuits.faithfulness",
    "faithfulness_curve": "sae_circuits.circuits.faithfulness",
    "feature_circuit": "sae_circuits.circuits.feature_graph",
    "node_link": "sae_circuits.circuits.export",
    "read_node_link": "sae_circuits.circuits.export",
    "sign_agreement": "sae_circuits.circuits.graph",
    "spearman": "sae_circuits.circuits.graph",
    "task_circuit": "sae_circuits.circuits.task_graph",
    "verification": "sae_circuits.circuits.graph",
    "write_dot": "sae_circuits.circuits.export",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sae_circuits.circuits' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "METHODS",
    "METRIC",
    "Circuit",
    "Node",
    "draw",
    "faithfulness",
    "faithfulness_curve",
    "feature_circuit",
    "node_link",
    "read_node_link",
    "sign_agreement",
    "spearman",
    "task_circuit",
    "verification",
    "write_dot",
]
