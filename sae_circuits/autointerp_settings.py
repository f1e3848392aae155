"""The choices and defaults of automatic interpretation (`sae_circuits.autointerp`): the bases
and the per-unit `Settings`. Light at import (no torch), so that the command line's parsers read
them; outside the package, whose import loads torch."""

from __future__ import annotations

from dataclasses import dataclass

BASES = ("sae", "neurons", "pca")  # a dictionary's features, the neurons, principal directions


@dataclass(frozen=True)
class Settings:
    """Contexts per unit (`n_top` top ones, half explained and half held out; `n_random` random),
    the active-token `threshold` (share of the unit's maximum), the `seed` of every random choice."""

    n_top: int = 20
    n_random: int = 20
    threshold: float = 0.3
    seed: int = 0
    batch_size: int = 32
