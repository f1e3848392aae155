"""Pictures: every figure of the package is made here or with `new_figure`.

Figures are `matplotlib.figure.Figure` objects that are never registered with pyplot, so drawing
needs no display and no interactive backend: `savefig` renders them with Agg, headless or not, and
a notebook's or a user's own pyplot backend is left as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from sae_circuits.sites import Site

if TYPE_CHECKING:
    from sae_circuits.greedy_search import GreedyCurve
    from sae_circuits.patching_curves import PatchingCurve

# Shares of the clean-corrupted gap marked on patching curves and reported in their tables.
GAP_SHARES = (0.5, 0.8)


def new_figure(figsize: tuple[float, float], **kwargs: Any) -> Figure:
    """A figure of `figsize` inches, drawn with Agg when saved (`Figure` keyword arguments)."""
    return Figure(figsize=figsize, **kwargs)


def patching_curves(curves: Mapping[Site, Mapping[str, PatchingCurve]], path: str | Path) -> Path:
    """One column per site: restored share (top) and KL to the clean output (bottom) against k,
    one line per basis, written as a PNG."""
    path = Path(path)
    n = len(curves)
    figure = new_figure((3.2 * n, 5.6))
    axes = figure.subplots(2, n, squeeze=False, sharex=True)
    for column, (site, by_basis) in enumerate(curves.items()):
        top, bottom = axes[0, column], axes[1, column]
        for name, curve in by_basis.items():
            style = {"linewidth": 2.2 if name == "sae" else 1.3, "label": name}
            top.plot(curve.ks, curve.restored, marker=".", **style)
            bottom.plot(curve.ks, curve.kl, marker=".", **style)
        for share in GAP_SHARES:
            top.axhline(share, color="grey", linewidth=0.6, linestyle=":")
        top.set_title(str(site))
        bottom.set_xlabel("k directions patched")
        bottom.set_yscale("log")
    axes[0, 0].set_ylabel("share of IOI gap restored")
    axes[1, 0].set_ylabel("KL(clean ‖ patched)")
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def greedy_curves(results: Mapping[Site, Mapping[str, GreedyCurve]], path: str | Path) -> Path:
    """One panel per site: directions kept by the greedy search against the KL to the corrupted
    output (one point per threshold), one line per basis, as Cunningham et al. plot it."""
    path = Path(path)
    n = len(results)
    figure = new_figure((3.4 * n, 3.2))
    axes = figure.subplots(1, n, squeeze=False)[0]
    for axis, (site, by_basis) in zip(axes, results.items(), strict=True):
        for name, curve in by_basis.items():
            axis.plot(
                curve.kept,
                curve.kl,
                marker="o",
                linewidth=2.2 if name == "sae" else 1.3,
                label=name,
            )
        axis.set_title(str(site))
        axis.set_xlabel("directions kept")
        axis.set_xscale("symlog", linthresh=1)
    axes[0].set_ylabel("KL(corrupted ‖ patched)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


__all__ = ["GAP_SHARES", "greedy_curves", "new_figure", "patching_curves"]
