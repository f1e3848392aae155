"""Rich tables shared by the commands (and the demo, which shows each of them)."""

from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table
from rich.tree import Tree

from sae_circuits.circuits import Circuit
from sae_circuits.evaluation import METRIC_KEYS
from sae_circuits.greedy_search import GreedyCurve
from sae_circuits.patching_curves import PatchingCurve
from sae_circuits.plotting import GAP_SHARES
from sae_circuits.sites import Site


def metrics_table(results: Mapping[Site, Mapping[str, float]]) -> Table:
    """Dictionary quality: one row per site."""
    table = Table(title="dictionary quality")
    table.add_column("site")
    for key in METRIC_KEYS:
        table.add_column(key, justify="right")
    for site, metrics in results.items():
        table.add_row(str(site), *(f"{metrics[key]:.4g}" for key in METRIC_KEYS))
    return table


def restore_table(curves: Mapping[Site, Mapping[str, PatchingCurve]], max_features: int) -> Table:
    """Per site and basis: the k needed to restore each of `GAP_SHARES` of the gap, the end of the
    curve, its ceiling (every direction patched) and what the error term alone restores."""
    table = Table(title="directions patched to restore the IOI gap (- : not within K)")
    shares = [f"k for {share:.0%}" for share in GAP_SHARES]
    for column in ("site", "basis", *shares, f"restored at K={max_features}", "KL at K"):
        table.add_column(column, justify="left" if column in ("site", "basis") else "right")
    table.add_column("ceiling", justify="right")
    table.add_column("error alone", justify="right")
    for site, by_basis in curves.items():
        for name, curve in by_basis.items():
            ks = [curve.k_to_restore(share) for share in GAP_SHARES]
            table.add_row(
                str(site),
                name,
                *(str(k) if k is not None else "-" for k in ks),
                f"{curve.restored[-1]:.3g}",
                f"{curve.kl[-1]:.3g}",
                f"{curve.ceiling:.3g}",
                f"{curve.error_restored:.3g}",
            )
        table.add_section()
    return table


def greedy_table(results: Mapping[Site, Mapping[str, GreedyCurve]]) -> Table:
    """Per site and basis: the directions the greedy search kept and the KL to the corrupted
    output, at each threshold."""
    table = Table(title="greedy search: directions kept / KL(corrupted || patched)")
    table.add_column("site")
    table.add_column("basis")
    table.add_column("candidates", justify="right")
    table.add_column("all patched: KL", justify="right")
    thresholds = next(iter(next(iter(results.values())).values())).thresholds
    for threshold in thresholds:
        table.add_column(f"t={threshold:g}", justify="right")
    for site, by_basis in results.items():
        for name, curve in by_basis.items():
            table.add_row(
                str(site),
                name,
                str(curve.candidates),
                f"{curve.start_kl:.3g}",
                *(f"{kept} / {kl:.3g}" for kept, kl in zip(curve.kept, curve.kl, strict=True)),
            )
        table.add_section()
    return table


def circuit_table(circuit: Circuit) -> Table:
    """Sizes, verification and the faithfulness curve of a circuit."""
    summary = circuit.summary()
    table = Table(title=f"circuit ({circuit.report.get('method')})", show_header=False)
    table.add_row("nodes / edges", f"{summary['nodes']} / {summary['edges']}")
    for key, value in summary["verification"].items():
        table.add_row(f"verification {key}", "-" if value is None else f"{value:.3f}")
    ablation = summary["faithfulness_ablation"]
    for point in summary["faithfulness"]:
        table.add_row(
            f"faithfulness ({ablation} ablation), {point['nodes']} nodes",
            f"{point['faithfulness']:.3f}",
        )
    return table


def feature_tree(circuit: Circuit, root: str) -> Tree:
    """The upstream features of `root` as a tree: each child is a parent feature found by
    ablation, with its effect (the drop of the feature below) and its top tokens."""

    def label(name: str) -> str:
        data = circuit.graph.nodes[name]
        tokens = f"  {data['label']}" if data.get("label") else ""
        return f"{name}  effect {data.get('effect', 0.0):+.3g}{tokens}"

    tree = Tree(label(root))
    branches = [(root, tree)]
    while branches:
        name, branch = branches.pop()
        parents = sorted(
            circuit.graph.predecessors(name),
            key=lambda p: -abs(circuit.graph.edges[p, name].get("weight", 0.0)),
        )
        for parent in parents:
            branches.append((parent, branch.add(label(parent))))
    return tree
