"""The plotting module: figures are drawn headless and never registered with pyplot."""

from __future__ import annotations

import matplotlib.pyplot as plt

from sae_circuits.patching_curves import PatchingCurve
from sae_circuits.plotting import new_figure, patching_curves
from sae_circuits.sites import Site


def curve(basis: str) -> PatchingCurve:
    return PatchingCurve("resid.2", basis, "attribution", [0, 1], [0.4, 0.9], [0.2, 0.1], 2.0, 0.0)


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
