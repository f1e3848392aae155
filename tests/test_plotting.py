"""The plotting module: figures are drawn headless and never registered with pyplot."""

from __future__ import annotations

import matplotlib.pyplot as plt

from sae_circuits.greedy_search import GreedyCurve
from sae_circuits.patching_curves import PatchingCurve
from sae_circuits.plotting import greedy_curves, new_figure, patching_curves
from sae_circuits.sites import Site


def curve(basis: str) -> PatchingCurve:
    return PatchingCurve(
        "resid.2",
        basis,
        "attribution",
        [0, 1],
        [1, 2],
        [0.4, 0.9],
        [0.2, 0.1],
        0.95,
        0.05,
        0.04,
        2.0,
        0.0,
    )


def test_greedy_curves_png(tmp_path):
    results = {
        Site.parse("resid.2"): {
            b: GreedyCurve("resid.2", b, [1e-3, 1e-2], [30, 8], [0.01, 0.2], [[], []], 90, 0.002)
            for b in ("sae", "neurons")
        }
    }
    path = greedy_curves(results, tmp_path / "greedy.png")
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000


def test_patching_curves_png_leaves_pyplot_alone(tmp_path):
    before = plt.get_fignums()
    curves = {Site.parse(s): {b: curve(b) for b in ("sae", "pca")} for s in ("resid.1", "resid.2")}
    path = patching_curves(curves, tmp_path / "sub" / "curves.png")
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000
    assert plt.get_fignums() == before


def test_new_figure_saves_without_pyplot(tmp_path):
    figure = new_figure((2, 1))
    figure.subplots().plot([0, 1], [1, 0])
    figure.savefig(tmp_path / "f.png", dpi=50)
    assert (tmp_path / "f.png").stat().st_size > 100
