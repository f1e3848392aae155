"""Synthetic activations with known features, MMCS, and choosing dictionary hyperparameters.

Reproduces Sharkey, Braun & Millidge (2022), *Taking features out of superposition with sparse
autoencoders*: G ground-truth unit features in h dimensions, sparse correlated coefficients, a grid
of dictionaries (L1 coefficient × size) trained in one pass, the mean max cosine similarity (MMCS)
between learned and true features, and three ways of choosing (size, L1) without ground truth:
dead features, summed standardised log losses (SSLL), and MMCS against larger dictionaries (the
methods themselves live in `sae_circuits.selection`, shared with grids trained on a model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sae_circuits.dictionary import Dictionary
from sae_circuits.errors import UserInputError
from sae_circuits.selection import mmcs, mmcs_larger, plot_heatmaps, propose, ssll
from sae_circuits.selection_defaults import (
    DEFAULT_L1S,
    DEFAULT_RATIOS,
    DEFAULT_STEPS,
    TOY_KEY,
    TOY_SPEC,
)
from sae_circuits.training import TrainSpec, train_dictionaries


# --------------------------------------------------------------------------------- generator
@dataclass
class ToyConfig:
    """Ground truth and coefficient statistics (defaults as in the report)."""

    h: int = 256
    g: int = 512
    n_active: float = 5.0  # mean number of active features per sample
    decay: float = 0.99  # feature g is active with probability ∝ decay**g
    correlation_rank: int = 16  # rank of the random covariance's low-rank part; 0: independent
    nonnegative: bool = False
    noise_std: float = 0.0  # additive Gaussian noise per dimension
    jitter_std: float = 0.0  # per-sample perturbation of each active direction (norm ≈ jitter_std)
    seed: int = 0


class ToyData:
    """Samples `x = Σ_g c_g (f_g + jitter) + noise` with known unit features `f_g`.

    Activity: `z ~ N(0, Σ)` (Σ a random fixed correlation matrix), feature g is on with probability
    `Φ(z_g) · λ^g · r`, r chosen so that the mean number on is `n_active` (E Φ(z_g) = ½); the
    magnitudes of active features are uniform in (0, 1).
    """

    def __init__(self, config: ToyConfig | None = None) -> None:
        self.config = config = config or ToyConfig()
        if config.h < 1 or config.g < 1 or config.n_active <= 0 or not 0 < config.decay <= 1:
            raise UserInputError("toy data needs h, g >= 1, n_active > 0 and 0 < decay <= 1")
        if config.correlation_rank < 0 or config.noise_std < 0 or config.jitter_std < 0:
            raise UserInputError("correlation_rank, noise_std and jitter_std must be >= 0")
        generator = torch.Generator().manual_seed(config.seed)
        features = torch.randn(config.g, config.h, generator=generator)
        self.features = F.normalize(features.abs() if config.nonnegative else features, dim=-1)
        self.factor = torch.randn(config.g, config.correlation_rank, generator=generator)
        self.z_scale = (self.factor.pow(2).sum(1) + 1).rsqrt()  # unit variance of every z_g
        decayed = config.decay ** torch.arange(config.g, dtype=torch.float64)
        self.p_max = (config.n_active / (0.5 * decayed.sum()) * decayed).float()
        if self.p_max.max() > 1:
            raise UserInputError(
                f"n_active={config.n_active} is too large for g={config.g} features with decay "
                f"{config.decay}: a probability would exceed 1"
            )

    @property
    def probabilities(self) -> torch.Tensor:
        """(G,) marginal probability that each feature is active."""
        return 0.5 * self.p_max

    @property
    def correlation(self) -> torch.Tensor:
        """(G, G) correlation matrix Σ of the Gaussian copula."""
        return (
            self.z_scale[:, None]
            * (self.factor @ self.factor.T + torch.eye(self.config.g))
            * self.z_scale
        )

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` samples: activations (n, h) and their true coefficients (n, G)."""
        c = self.config
        z = torch.randn(n, c.g, generator=generator)
        if c.correlation_rank:
            z += torch.randn(n, c.correlation_rank, generator=generator) @ self.factor.T
        active = (
            torch.rand(n, c.g, generator=generator)
            < torch.special.ndtr(z * self.z_scale) * self.p_max
        )
        coefficients = torch.rand(n, c.g, generator=generator) * active
        x = coefficients @ self.features
        if c.jitter_std:  # Σ_g c_g δ_g with δ_g ~ N(0, jitter²/h · I) is Gaussian with this scale
            scale = coefficients.norm(dim=1, keepdim=True) * (c.jitter_std / math.sqrt(c.h))
            x += scale * torch.randn(n, c.h, generator=generator)
        if c.noise_std:
            x += c.noise_std * torch.randn(n, c.h, generator=generator)
        return x, coefficients

    def stream(self, batch_size: int = 256, seed: int = 1) -> ToyStream:
        """An endless, checkpointable stream of `{"toy": (batch_size, h)}` batches."""
        return ToyStream(self, batch_size, seed)


class ToyStream:
    """Endless batches from `ToyData`, with `state_dict`/`load_state_dict` for exact resume."""

    def __init__(self, data: ToyData, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise UserInputError("batch_size must be >= 1")
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield {TOY_KEY: self.data.sample(self.batch_size, self.generator)[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


# --------------------------------------------------------------------------------- sweeps
@dataclass
class SweepResult:
    """Grids indexed [ratio, l1]: ground-truth MMCS, dead count, SSLL, MMCS vs larger, losses."""

    l1s: list[float]
    ratios: list[float]
    mmcs: np.ndarray
    dead: np.ndarray
    ssll: np.ndarray
    mmcs_larger: np.ndarray  # NaN for the largest ratio
    reconstruction: np.ndarray  # (1/h)‖x − Dc‖² on held-out samples
    l1_norm: np.ndarray  # ‖c‖₁ on held-out samples
    steps: int
    seconds: float
    dictionaries: list[Dictionary]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per grid cell: l1, ratio, mmcs, dead, ssll, mmcs_larger (None if undefined)."""
        return [
            {
                "l1": l1,
                "ratio": ratio,
                "mmcs": _finite(self.mmcs[r, i]),
                "dead": int(self.dead[r, i]),
                "ssll": _finite(self.ssll[r, i]),
                "mmcs_larger": _finite(self.mmcs_larger[r, i]),
            }
            for r, ratio in enumerate(self.ratios)
            for i, l1 in enumerate(self.l1s)
        ]


def sweep(
    data: ToyData,
    l1s: list[float] | tuple[float, ...] = DEFAULT_L1S,
    ratios: list[float] | tuple[float, ...] = DEFAULT_RATIOS,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 256,
    template: TrainSpec = TOY_SPEC,
    eval_samples: int = 8192,
    progress: bool = True,
) -> SweepResult:
    """Train the grid L1 × (ratio · G) in one pass over one stream and score every dictionary.

    Every dictionary is `template` (its training settings and seed; default `TOY_SPEC`) with the
    cell's size and L1. Dead features are those never active in the last
    `min(template.dead_window, steps)` batches; resampling (`template.resample_every`, with its
    duplicate and min-fires rules) never falls within that window of the end. The reconstruction
    and L1 losses behind SSLL are measured on `eval_samples` held-out samples; the stream and the
    held-out samples are seeded from `template.seed`.
    """
    l1s, ratios = sorted(set(l1s)), sorted(set(ratios))
    if not l1s or not ratios or min(l1s) < 0 or min(ratios) <= 0:
        raise UserInputError("a sweep needs L1 values >= 0 and ratios > 0")
    window = min(template.dead_window, steps)
    resample_every = _resampling_period(template.resample_every, steps, window)
    specs = [
        replace(
            template,
            key=TOY_KEY,
            d_dict=max(1, round(ratio * data.config.g)),
            l1=l1,
            dead_window=window,
            resample_every=resample_every,
            resample_duplicates=template.resample_duplicates if resample_every else None,
            resample_min_fires=template.resample_min_fires if resample_every else 0,
        )
        for ratio in ratios
        for l1 in l1s
    ]
    start = time.perf_counter()
    trained = train_dictionaries(
        data.stream(batch_size, seed=template.seed + 1), specs, steps, progress=progress
    )
    shape = (len(ratios), len(l1s))
    grid = np.array(trained, dtype=object).reshape(shape)
    x, _ = data.sample(eval_samples, torch.Generator().manual_seed(template.seed + 2))
    mmcs_grid, dead, reconstruction, l1_norm = (np.zeros(shape) for _ in range(4))
    with torch.no_grad():
        for index, dictionary in np.ndenumerate(grid):
            x_hat, f = dictionary(x)
            reconstruction[index] = float((x - x_hat).pow(2).sum(-1).mean()) / data.config.h
            l1_norm[index] = float(f.sum(-1).mean())
            mmcs_grid[index] = mmcs(data.features, dictionary)
            dead[index] = dictionary.config.metrics["train_dead"]
    larger = mmcs_larger(grid)
    seconds = time.perf_counter() - start  # training and scoring
    return SweepResult(
        l1s=l1s,
        ratios=ratios,
        mmcs=mmcs_grid,
        dead=dead,
        ssll=ssll(reconstruction, l1_norm),
        mmcs_larger=larger,
        reconstruction=reconstruction,
        l1_norm=l1_norm,
        steps=steps,
        seconds=seconds,
        dictionaries=list(trained),
    )


def _resampling_period(resample_every: int | None, steps: int, window: int) -> int | None:
    """`resample_every`, or None if no resampling falls before the last `window` steps.

    The trainer resamples after steps R, 2R, … below `steps`; a resampling inside the dead window
    would make latents that stay silent look alive, so sweeps refuse such a schedule.
    """
    if resample_every is None or resample_every >= steps:
        return None
    last = (steps - 1) // resample_every * resample_every
    if steps - last < window:
        raise UserInputError(
            f"resampling every {resample_every} steps would resample at step {last}, within the "
            f"dead window ({window}) of the end ({steps}): make steps a multiple of "
            "resample_every >= dead_window, or turn resampling off"
        )
    return resample_every


def select(result: SweepResult) -> dict[str, dict[str, float]]:
    """Each method's proposed (ratio, L1) (`selection.propose`) and the ground-truth MMCS there."""
    chosen = propose(result.dead, result.ssll, result.mmcs_larger)
    return {
        method: {"l1": result.l1s[i], "ratio": result.ratios[r], "mmcs": float(result.mmcs[r, i])}
        for method, (r, i) in chosen.items()
    }


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


# --------------------------------------------------------------------------------- heatmaps
HEATMAPS = {
    "mmcs": "ground-truth MMCS",
    "dead": "dead features",
    "ssll": "SSLL (summed standardised log losses)",
    "mmcs_larger": "MMCS vs larger dictionaries",
}


def plot_toy_heatmaps(result: SweepResult, out_dir: str | Path) -> list[Path]:
    """One small PNG per metric (`toy_<metric>.png`) over the ratio × L1 grid."""
    return plot_heatmaps(
        {name: (title, getattr(result, name)) for name, title in HEATMAPS.items()},
        result.ratios,
        result.l1s,
        out_dir,
        prefix="toy_",
        row_label="dictionary size / G",
    )


__all__ = [
    "SweepResult",
    "TOY_SPEC",
    "ToyConfig",
    "ToyData",
    "ToyStream",
    "plot_toy_heatmaps",
    "select",
    "sweep",
]
