"""sae-circuits: sparse dictionaries spliced into language models with nnsight.

Train and evaluate sparse autoencoders, patch and ablate their features, and discover feature
circuits, all as ordinary nnsight traces over a model with dictionaries spliced in.

The public names are imported on first use (PEP 562), so that `import sae_circuits.cli` and
`sae-circuits --help` load neither torch nor nnsight.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "ActivationBuffer": "sae_circuits.buffer",
    "Circuit": "sae_circuits.circuits",
    "InterventionResult": "sae_circuits.interventions",
    "Model": "sae_circuits.protocols",
    "Node": "sae_circuits.nodes",
    "PatchingCurve": "sae_circuits.patching_curves",
    "SiteMap": "sae_circuits.sites",
    "TrainSpec": "sae_circuits.train_spec",
    "ablate": "sae_circuits.interventions",
    "compare_bases": "sae_circuits.patching_curves",
    "patch": "sae_circuits.interventions",
    "patching_curve": "sae_circuits.patching_curves",
    "curves_for_bases": "sae_circuits.patching_curves",
    "baseline_bases": "sae_circuits.patching_curves",
    "rank_bases": "sae_circuits.patching_curves",
    "k_grid": "sae_circuits.patching_curves",
    "GreedyCurve": "sae_circuits.greedy_search",
    "greedy_search": "sae_circuits.greedy_search",
    "patched_runs": "sae_circuits.site_runs",
    "pin": "sae_circuits.interventions",
    "train_dictionaries": "sae_circuits.training",
    "faithfulness": "sae_circuits.circuits",
    "faithfulness_curve": "sae_circuits.circuits",
    "feature_circuit": "sae_circuits.circuits",
    "read_node_link": "sae_circuits.circuits",
    "task_circuit": "sae_circuits.circuits",
    "METRIC_KEYS": "sae_circuits.evaluation",
    "Dictionary": "sae_circuits.dictionary",
    "DictionaryConfig": "sae_circuits.dictionary",
    "FeatureReport": "sae_circuits.features",
    "FrequencyReport": "sae_circuits.features",
    "LinearBasis": "sae_circuits.dictionary",
    "Site": "sae_circuits.sites",
    "Task": "sae_circuits.tasks",
    "TiedDictionary": "sae_circuits.dictionary",
    "TopKDictionary": "sae_circuits.dictionary",
    "Transcoder": "sae_circuits.dictionary",
    "UntiedDictionary": "sae_circuits.dictionary",
    "UserInputError": "sae_circuits.errors",
    "attach": "sae_circuits.splice",
    "attached": "sae_circuits.splice",
    "compare_with_neurons": "sae_circuits.features",
    "detach": "sae_circuits.splice",
    "embedded_model_path": "sae_circuits.models",
    "evaluate": "sae_circuits.evaluation",
    "feature_frequencies": "sae_circuits.features",
    "inspect_features": "sae_circuits.features",
    "load_dictionaries": "sae_circuits.dictionary",
    "load_model": "sae_circuits.models",
    "load_task": "sae_circuits.tasks",
    "read_documents": "sae_circuits.text",
    "read_site": "sae_circuits.sites",
    "shipped_sets": "sae_circuits.dictionary",
    "spliced": "sae_circuits.splice",
    "temporarily_attached": "sae_circuits.splice",
    "token_batches": "sae_circuits.text",
    "valid_sites": "sae_circuits.sites",
    "write_site": "sae_circuits.sites",
    "ChatClient": "sae_circuits.autointerp",
    "LLMExplainer": "sae_circuits.autointerp",
    "LLMJudge": "sae_circuits.autointerp",
    "OfflineExplainer": "sae_circuits.autointerp",
    "OfflineSimulator": "sae_circuits.autointerp",
    "interpret": "sae_circuits.autointerp",
    "score_explanation": "sae_circuits.autointerp",
    "unit_contexts": "sae_circuits.autointerp",
    "SparseCodes": "sae_circuits.sparse_codes",
    "gather_linear": "sae_circuits.sparse_codes",
    "select_batch_topk": "sae_circuits.sparse_codes",
    "select_threshold": "sae_circuits.sparse_codes",
    "select_topk": "sae_circuits.sparse_codes",
    "sparse_decode": "sae_circuits.sparse_codes",
    "circuit_view": "sae_circuits.views",
    "dictionary_view": "sae_circuits.views",
    "feature_view": "sae_circuits.views",
    "node_reports": "sae_circuits.views",
    "notebook_html": "sae_circuits.views",
    "write_page": "sae_circuits.views",
    "GridSelection": "sae_circuits.selection",
    "mmcs": "sae_circuits.selection",
    "random_mmcs": "sae_circuits.selection",
    "select_on_model": "sae_circuits.selection",
    "ShardStream": "sae_circuits.buffer",
    "write_shards": "sae_circuits.buffer",
    "train_and_evaluate": "sae_circuits.pipeline",
    "process_group": "sae_circuits.distributed",
    "AbsTopKDictionary": "sae_circuits.dictionary",
    "GatedDictionary": "sae_circuits.dictionary",
    "JumpReLUTranscoder": "sae_circuits.dictionary",
    "read_dictionary": "sae_circuits.formats",
    "write_dictionary": "sae_circuits.formats",
    "site_from_hook": "sae_circuits.formats.hook_names",
    "GroupMaxDictionary": "sae_circuits.dictionary",
    "read_transcoder_set": "sae_circuits.formats.circuit_tracer",
    "unmounted": "sae_circuits.splice",
    "CarriedSite": "sae_circuits.carried",
    "check_remote": "sae_circuits.remote",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sae_circuits' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
