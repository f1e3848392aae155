"""Choosing a dictionary's size and sparsity without ground truth, on toy data or on a model.

Sharkey, Braun & Millidge (2022), *Taking features out of superposition with sparse autoencoders*,
propose three signals over a grid of dictionaries (rows: sizes, columns: sparsity coefficients):

- **dead features**: latents that never fire; the proposal is the largest size, then the sparsest
  coefficient, without dead features (else with the fewest);
- **SSLL**, summed standardised log losses: the z-score over the grid of log reconstruction loss
  plus that of log L1 loss; the proposal is the smallest;
- **MMCS against larger dictionaries**: the mean over a dictionary's features of the max cosine
  similarity with any feature of a larger one at the same coefficient (averaged over the larger
  sizes of the grid); the proposal is the largest.

Besides, **seed stability**: the MMCS between two dictionaries that differ only by their random
initialisation (both directions averaged), the report's suggested check of whether features are
real. `random_mmcs` is the value of MMCS between random directions, the floor for all of these.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sae_circuits.dictionary import Dictionary
from sae_circuits.errors import UserInputError
from sae_circuits.plotting import new_figure
from sae_circuits.protocols import Model
from sae_circuits.selection_defaults import GRIDS, RESULTS_FILE
from sae_circuits.sites import Site
from sae_circuits.train_spec import TrainSpec

METHODS = ("dead", "ssll", "mmcs_larger")
METHOD_TITLES = {
    "dead": "largest size, then sparsest, without dead features",
    "ssll": "smallest SSLL",
    "mmcs_larger": "largest MMCS vs larger dictionaries",
}
Cell = tuple[int, int]  # (row: size index, column: coefficient index)


# --------------------------------------------------------------------------------- MMCS
def _directions(features: torch.Tensor | Dictionary) -> torch.Tensor:
    tensor = features.decoder_directions if isinstance(features, Dictionary) else features
    return F.normalize(tensor.detach().float().cpu(), dim=-1)


def max_cosine(
    a: torch.Tensor | Dictionary, b: torch.Tensor | Dictionary, chunk: int = 4096
) -> torch.Tensor:
    """For each row (feature) of `a`, its largest cosine similarity with any row of `b`.

    Works in `chunk × chunk` blocks, so 32k × 32k features need only `chunk²` floats at a time.
    Dictionaries are compared by their decoder directions.
    """
    a, b = _directions(a), _directions(b)
    if a.shape[1] != b.shape[1]:
        raise UserInputError(f"cannot compare features of width {a.shape[1]} and {b.shape[1]}")
    best = torch.full((len(a),), -1.0)
    for i in range(0, len(a), chunk):
        for j in range(0, len(b), chunk):
            block = (a[i : i + chunk] @ b[j : j + chunk].T).amax(1)
            best[i : i + chunk] = torch.maximum(best[i : i + chunk], block)
    return best


def mmcs(
    reference: torch.Tensor | Dictionary, learned: torch.Tensor | Dictionary, chunk: int = 4096
) -> float:
    """Mean over `reference` features (ground truth, or a smaller dictionary) of the max cosine
    similarity with any `learned` feature (the larger dictionary)."""
    return float(max_cosine(reference, learned, chunk).mean())


def random_mmcs(width: int, n_reference: int, n_learned: int, seed: int = 0) -> float:
    """MMCS of `n_reference` against `n_learned` isotropic random directions in `width` dimensions:
    what MMCS is by chance (for any fixed reference, the max cosine with isotropic directions has
    the same distribution, so this is also the expectation against a random dictionary)."""
    generator = torch.Generator().manual_seed(seed)
    return mmcs(
        torch.randn(n_reference, width, generator=generator),
        torch.randn(n_learned, width, generator=generator),
    )


def mmcs_larger(dictionaries: np.ndarray) -> np.ndarray:
    """Per cell of a `[size, coefficient]` object array of dictionaries (rows by increasing size),
    the mean MMCS against the dictionaries of every larger row in the same column; NaN in the
    last row."""
    rows, columns = dictionaries.shape
    larger = np.full((rows, columns), np.nan)
    for r in range(rows - 1):
        for c in range(columns):
            larger[r, c] = np.mean(
                [mmcs(dictionaries[r, c], dictionaries[q, c]) for q in range(r + 1, rows)]
            )
    return larger


def seed_mmcs(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per cell, the symmetric MMCS between two grids of dictionaries trained with different seeds:
    the mean of MMCS(first, second) and MMCS(second, first)."""
    if first.shape != second.shape:
        raise UserInputError("the two seeds' grids differ in shape")
    stability = np.zeros(first.shape)
    for index, a in np.ndenumerate(first):
        b = second[index]
        stability[index] = (mmcs(a, b) + mmcs(b, a)) / 2
    return stability


# --------------------------------------------------------------------------------- SSLL
def ssll(reconstruction: np.ndarray, l1_norm: np.ndarray) -> np.ndarray:
    """Summed standardised log losses: z-score (over the grid) of log reconstruction loss plus that
    of log L1 loss; zero losses (log 0) are left out of the statistics and give NaN."""
    return _zscore_log(reconstruction) + _zscore_log(l1_norm)


def _zscore_log(values: np.ndarray) -> np.ndarray:
    logs = np.full(values.shape, np.nan)
    positive = values > 0
    logs[positive] = np.log(values[positive])
    std = np.nanstd(logs)
    return (logs - np.nanmean(logs)) / (std if std > 0 else 1.0)


# --------------------------------------------------------------------------------- proposals
def propose(
    dead: np.ndarray, ssll_grid: np.ndarray, larger: np.ndarray, sparser_right: bool = True
) -> dict[str, Cell]:
    """Each method's proposed cell `(row, column)` of `[size, coefficient]` grids (rows by
    increasing size, columns by increasing coefficient). `sparser_right`: a larger coefficient is
    sparser (an L1 coefficient; False for k, where a smaller k is sparser). NaN SSLL or MMCS cells
    are never proposed unless every cell is NaN."""
    rows, columns = dead.shape
    cells = [(r, c) for r in range(rows) for c in range(columns)]
    ssll_grid = np.nan_to_num(ssll_grid, nan=np.inf)
    larger = np.nan_to_num(larger, nan=-np.inf)

    def sparsity(cell: Cell) -> int:
        return cell[1] if sparser_right else -cell[1]

    return {
        "dead": max(cells, key=lambda cell: (-dead[cell], cell[0], sparsity(cell))),
        "ssll": min(cells, key=lambda cell: ssll_grid[cell]),
        "mmcs_larger": max(cells, key=lambda cell: larger[cell]),
    }


# --------------------------------------------------------------------------------- heatmaps
def plot_heatmaps(
    grids: Mapping[str, tuple[str, np.ndarray]],
    rows: Sequence[float],
    columns: Sequence[float],
    out_dir: str | Path,
    prefix: str = "",
    row_label: str = "dictionary size",
    column_label: str = "L1 coefficient α",
    integer: Sequence[str] = ("dead",),
) -> list[Path]:
    """One small PNG per entry of `grids` (name -> (title, `[row, column]` values)), written as
    `<out_dir>/<prefix><name>.png`; the names in `integer` are annotated without decimals."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (title, values) in grids.items():
        fig = new_figure((0.75 * len(columns) + 1.8, 0.5 * len(rows) + 1.3))
        ax = fig.subplots()
        shown = np.ma.masked_invalid(np.asarray(values, dtype=float))
        image = ax.imshow(shown, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(columns)), [f"{v:g}" for v in columns])
        ax.set_yticks(range(len(rows)), [f"{v:g}" for v in rows])
        ax.set_xlabel(column_label)
        ax.set_ylabel(row_label)
        ax.set_title(title, fontsize=10)
        for (r, c), value in np.ndenumerate(values):
            if np.isfinite(value):
                text = f"{value:.0f}" if name in integer else f"{value:.2f}"
                ax.text(c, r, text, ha="center", va="center", fontsize=7, color="white")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out_dir / f"{prefix}{name}.png"
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=80)
        tmp.replace(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------- on a model


@dataclass
class GridSelection:
    """A grid of dictionaries trained at one site and the selection signals over it.

    `grids` holds `[size, coefficient]` arrays (names of `GRIDS`, plus `nmse` and `frac_dead` on
    the held-out text); every signal is of the first seed's dictionaries, except `seed_mmcs`.
    `chance` holds, per row, `random_mmcs` at the sizes that `mmcs_larger` and `seed_mmcs` compare.
    """

    site: str
    sparsity: str  # what the columns are: "l1" coefficients or top-k "k"
    sizes: list[int]
    coefficients: list[float]
    seeds: list[int]
    grids: dict[str, np.ndarray]
    chance: dict[str, list[float | None]]
    proposals: dict[str, Cell]
    folders: np.ndarray  # [size, coefficient]: the first seed's saved dictionary
    dictionaries: np.ndarray  # [seed, size, coefficient]

    def point(self, cell: Cell) -> dict[str, Any]:
        """One grid point: its size, coefficient, folder and every signal (None where undefined)."""
        r, c = cell
        return {
            "dict_size": self.sizes[r],
            self.sparsity: self.coefficients[c],
            "path": str(self.folders[cell]),
            **{name: _finite(grid[cell]) for name, grid in self.grids.items()},
        }

    def to_json(self) -> dict[str, Any]:
        rows, columns = len(self.sizes), len(self.coefficients)
        return {
            "site": self.site,
            "sparsity": self.sparsity,
            "sizes": self.sizes,
            "coefficients": self.coefficients,
            "seeds": self.seeds,
            "grid": [self.point((r, c)) for r in range(rows) for c in range(columns)],
            "chance": self.chance,
            "proposals": {method: self.point(cell) for method, cell in self.proposals.items()},
        }


def select_on_model(
    model: Model,
    site: str | Site,
    sizes: Iterable[int],
    coefficients: Iterable[float],
    tokens: int,
    out: str | Path,
    documents: Iterable[str],
    eval_documents: Iterable[str],
    sparsity: str = "l1",
    seeds: Sequence[int] = (0, 1),
    template: TrainSpec | None = None,
    plots: bool = True,
    **train_options: Any,
) -> GridSelection:
    """Train every (size, coefficient, seed) of the grid at `site` in one pass over one stream of
    activations (`pipeline.train_and_evaluate`: evaluated on `eval_documents`, saved under
    `out/<site>/`, resumable from its checkpoint), then compute the selection signals, write the
    heatmaps (`out/<name>.png`, names of `GRIDS`) unless not `plots`, and `out/selection.json`.

    `sparsity` "l1": the columns are L1 coefficients; "k": top-k sizes (`template.kind` must be a
    top-k kind). The dictionaries of initialisation `i` and size index `r` get the random seed
    `seeds[i] + len(seeds) * r`: every coefficient of a size starts from the same weights, no two
    sizes or initialisations do. `template` gives every other training setting; `train_options` go to
    `train_and_evaluate` (batch_size, ctx_len, n_ctxs, eval_tokens, checkpoint_every, ...).
    """
    from sae_circuits.pipeline import train_and_evaluate

    site = Site.parse(site)
    sizes, coefficients = sorted(set(sizes)), sorted(set(coefficients))
    seeds = list(dict.fromkeys(seeds))
    if sparsity not in ("l1", "k"):
        raise UserInputError("sparsity must be l1 or k")
    if not sizes or not coefficients or min(sizes) < 1 or min(coefficients) < 0:
        raise UserInputError("a grid needs sizes >= 1 and coefficients >= 0")
    if not seeds:
        raise UserInputError("a grid needs at least one seed")
    template = template or TrainSpec(key=str(site))
    shape = (len(seeds), len(sizes), len(coefficients))
    cells = list(np.ndindex(*shape))
    # The first seed's specs last: if two seeds' dictionaries share an output folder, the saved
    # one is the first seed's.
    order = sorted(cells, key=lambda cell: (-cell[0], cell[1], cell[2]))
    # Dictionaries of different sizes must not share a seed: the first rows of a larger one's
    # initialisation would be the smaller one's, and MMCS between them would start at 1.
    specs = [
        _spec(template, site, sizes[r], coefficients[c], sparsity, seeds[s] + len(seeds) * r)
        for s, r, c in order
    ]
    out = Path(out)
    saved = train_and_evaluate(
        model, specs, tokens, out, documents, eval_documents, seed=seeds[0], **train_options
    )
    folders = np.empty(shape, dtype=object)
    dictionaries = np.empty(shape, dtype=object)
    for cell, (folder, dictionary) in zip(order, saved, strict=True):
        folders[cell], dictionaries[cell] = folder, dictionary
    grids = _signals(dictionaries)
    width = dictionaries[0, 0, 0].config.output_dim  # of the decoder directions MMCS compares
    result = GridSelection(
        site=str(site),
        sparsity=sparsity,
        sizes=sizes,
        coefficients=coefficients,
        seeds=seeds,
        grids=grids,
        chance=_chance(width, sizes),
        proposals=propose(
            grids["dead"], grids["ssll"], grids["mmcs_larger"], sparser_right=sparsity == "l1"
        ),
        folders=folders[0],
        dictionaries=dictionaries,
    )
    if plots:
        plot_heatmaps(
            {name: (title, grids[name]) for name, title in GRIDS.items()},
            sizes,
            coefficients,
            out,
            column_label="L1 coefficient" if sparsity == "l1" else "k (active features)",
        )
    path = out / RESULTS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return result


def _signals(dictionaries: np.ndarray) -> dict[str, np.ndarray]:
    """The `[size, coefficient]` grids of `GridSelection` from `[seed, size, coefficient]`
    evaluated dictionaries."""
    first = dictionaries[0]

    def metric(name: str) -> np.ndarray:
        return np.array([[d.config.metrics[name] for d in row] for row in first], dtype=float)

    stable = seed_mmcs(first, dictionaries[1]) if len(dictionaries) > 1 else None
    return {
        "dead": metric("train_dead"),
        "ssll": ssll(metric("mse"), metric("l1")),
        "mmcs_larger": mmcs_larger(first),
        "seed_mmcs": np.full(first.shape, np.nan) if stable is None else stable,
        **{name: metric(name) for name in ("ce_delta", "l0", "nmse", "frac_dead")},
    }


def _chance(width: int, sizes: list[int]) -> dict[str, list[float | None]]:
    """`random_mmcs` per row at the sizes `mmcs_larger` (mean over the larger rows; None for the
    last) and `seed_mmcs` (the row's own size) compare."""
    return {
        "mmcs_larger": [
            float(np.mean([random_mmcs(width, n, m) for m in sizes[r + 1 :]]))
            if r + 1 < len(sizes)
            else None
            for r, n in enumerate(sizes)
        ],
        "seed_mmcs": [random_mmcs(width, n, n) for n in sizes],
    }


def _spec(
    template: TrainSpec, site: Site, size: int, coefficient: float, sparsity: str, seed: int
) -> TrainSpec:
    sparse = {"l1": coefficient} if sparsity == "l1" else {"k": int(coefficient)}
    return replace(template, key=str(site), d_dict=size, seed=seed, **sparse)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


__all__ = [
    "GRIDS",
    "GridSelection",
    "METHODS",
    "METHOD_TITLES",
    "max_cosine",
    "mmcs",
    "mmcs_larger",
    "plot_heatmaps",
    "propose",
    "random_mmcs",
    "seed_mmcs",
    "select_on_model",
    "ssll",
]
