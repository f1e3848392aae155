"""sae-circuits: sparse dictionaries spliced into language models with nnsight.

Train and evaluate sparse autoencoders, patch and ablate their features, and discover feature
circuits, all as ordinary nnsight traces over a model with dictionaries spliced in.
"""

from sae_circuits.autointerp import (
    ChatClient,
    LLMExplainer,
    LLMJudge,
    OfflineExplainer,
    OfflineSimulator,
    interpret,
    score_explanation,
    unit_contexts,
)
from sae_circuits.buffer import ActivationBuffer
from sae_circuits.circuits import (
    Circuit,
    faithfulness,
    faithfulness_curve,
    feature_circuit,
    read_node_link,
    task_circuit,
)
from sae_circuits.dictionary import (
    Dictionary,
    DictionaryConfig,
    LinearBasis,
    TiedDictionary,
    TopKDictionary,
    Transcoder,
    UntiedDictionary,
    load_dictionaries,
    shipped_sets,
)
from sae_circuits.errors import UserInputError
from sae_circuits.evaluation import METRIC_KEYS, evaluate
from sae_circuits.features import (
    FeatureReport,
    FrequencyReport,
    compare_with_neurons,
    feature_frequencies,
    inspect_features,
)
from sae_circuits.interventions import InterventionResult, ablate, patch, pin
from sae_circuits.models import embedded_model_path, load_model
from sae_circuits.nodes import Node
from sae_circuits.patching_curves import PatchingCurve, compare_bases, patching_curve
from sae_circuits.protocols import Model
from sae_circuits.sites import Site, SiteMap, read_site, valid_sites, write_site
from sae_circuits.sparse_codes import (
    SparseCodes,
    gather_linear,
    select_batch_topk,
    select_threshold,
    select_topk,
    sparse_decode,
)
from sae_circuits.splice import attach, attached, detach, spliced, temporarily_attached
from sae_circuits.tasks import Task, load_task
from sae_circuits.text import read_documents, token_batches
from sae_circuits.training import TrainSpec, train_dictionaries
from sae_circuits.views import (
    circuit_view,
    dictionary_view,
    feature_view,
    node_reports,
    notebook_html,
    write_page,
)

__version__ = "0.1.0"

__all__ = [
    "ActivationBuffer",
    "Circuit",
    "InterventionResult",
    "Model",
    "Node",
    "PatchingCurve",
    "SiteMap",
    "TrainSpec",
    "ablate",
    "compare_bases",
    "patch",
    "patching_curve",
    "pin",
    "train_dictionaries",
    "faithfulness",
    "faithfulness_curve",
    "feature_circuit",
    "read_node_link",
    "task_circuit",
    "METRIC_KEYS",
    "Dictionary",
    "DictionaryConfig",
    "FeatureReport",
    "FrequencyReport",
    "LinearBasis",
    "Site",
    "Task",
    "TiedDictionary",
    "TopKDictionary",
    "Transcoder",
    "UntiedDictionary",
    "UserInputError",
    "attach",
    "attached",
    "compare_with_neurons",
    "detach",
    "embedded_model_path",
    "evaluate",
    "feature_frequencies",
    "inspect_features",
    "load_dictionaries",
    "load_model",
    "load_task",
    "read_documents",
    "read_site",
    "shipped_sets",
    "spliced",
    "temporarily_attached",
    "token_batches",
    "valid_sites",
    "write_site",
    "ChatClient",
    "LLMExplainer",
    "LLMJudge",
    "OfflineExplainer",
    "OfflineSimulator",
    "interpret",
    "score_explanation",
    "unit_contexts",
    "SparseCodes",
    "gather_linear",
    "select_batch_topk",
    "select_threshold",
    "select_topk",
    "sparse_decode",
    "circuit_view",
    "dictionary_view",
    "feature_view",
    "node_reports",
    "notebook_html",
    "write_page",
]
