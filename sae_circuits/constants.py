"""Names and defaults shared by the library and the command-line parsers that offer them.

Light at import (no torch), so that `--help` and argument errors answer at once; the modules that
compute with them import them from here.
"""

from __future__ import annotations

# Built-in tasks and the corruptions each one offers (`sae_circuits.tasks`).
TASKS = ("ioi", "sva")
CORRUPTIONS = {"ioi": ("abc", "swap"), "sva": ("number",)}

# Bases a dictionary's patching curves are compared with (`sae_circuits.patching_curves`).
BASELINES = ("pca_task", "pca_corpus", "neurons", "random")
# KL thresholds (nats) of Cunningham et al.'s greedy search (`sae_circuits.greedy_search`).
DEFAULT_THRESHOLDS = (1e-4, 1e-3, 1e-2, 1e-1)

# Evaluation (`sae_circuits.evaluation`): the metrics reported per dictionary, in table order, and
# the firing frequency above which a feature counts as dense.
METRIC_KEYS = (
    "ce_delta",
    "kl",
    "l0",
    "loss_recovered_mean",
    "loss_recovered",
    "nmse",
    "fve",
    "mse",
    "cosine",
    "l1",
    "frac_alive",
    "frac_dead",
    "frac_dense",
)
DENSE_FREQUENCY = 0.1

__all__ = [
    "BASELINES",
    "CORRUPTIONS",
    "DEFAULT_THRESHOLDS",
    "DENSE_FREQUENCY",
    "METRIC_KEYS",
    "TASKS",
]
