"""Feature inspection: what a dictionary feature reads (top contexts, activation histograms split by
token, firing frequency) and what it does (logit change when ablated, direct effect through the
unembedding), features vs. neurons, and terminal/HTML/PNG views.

One streaming pass (`collect`) over token batches feeds everything; see the sub-modules.
"""

from sae_circuits.features.collect import FeatureStats, collect
from sae_circuits.features.effects import ablation_effects, direct_effects
from sae_circuits.features.monosemanticity import compare_with_neurons, concentration
from sae_circuits.features.report import (
    Context,
    FeatureReport,
    FrequencyReport,
    TokenScore,
    feature_frequencies,
    inspect_features,
)

__all__ = [
    "Context",
    "FeatureReport",
    "FeatureStats",
    "FrequencyReport",
    "TokenScore",
    "ablation_effects",
    "collect",
    "compare_with_neurons",
    "concentration",
    "direct_effects",
    "feature_frequencies",
    "inspect_features",
]
