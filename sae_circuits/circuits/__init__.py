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

from sae_circuits.circuits.export import draw, node_link, read_node_link, write_dot
from sae_circuits.circuits.faithfulness import faithfulness, faithfulness_curve
from sae_circuits.circuits.feature_graph import feature_circuit
from sae_circuits.circuits.graph import Circuit, sign_agreement, spearman, verification
from sae_circuits.circuits.task_graph import METHODS, task_circuit
from sae_circuits.nodes import METRIC, Node

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
