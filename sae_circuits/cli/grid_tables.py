"""Rich tables of a hyperparameter grid (rows: dictionary sizes, columns: sparsity coefficients),
shared by `toy` and `select`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.table import Table


def grid_table(
    title: str,
    values: np.ndarray,
    rows: Sequence[float],
    columns: Sequence[float],
    corner: str,
    integer: bool = False,
) -> Table:
    """`values[row, column]` as a table (– for undefined cells), integers without decimals."""
    table = Table(title=title)
    table.add_column(corner, justify="right")
    for column in columns:
        table.add_column(f"{column:g}", justify="right")
    for row, cells in zip(rows, values, strict=True):
        table.add_row(f"{row:g}", *(_cell(value, integer) for value in cells))
    return table


def _cell(value: float, integer: bool) -> str:
    if not np.isfinite(value):
        return "–"
    return f"{value:.0f}" if integer else f"{value:.3f}"
