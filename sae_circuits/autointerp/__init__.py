"""Automatic interpretation (Bills et al. 2023; EleutherAI delphi): explain a unit — a dictionary
feature, a neuron, a principal direction — from its top-activating contexts, and score the
explanation by simulation, detection and fuzzing.

`contexts` (the contexts and per-token activations a unit is explained and scored on), `bases`
(features, neurons, PCA at one site), `prompts` (prompt formats and reply parsing), `client`
(OpenAI-compatible chat completions, standard library only), `offline` (the rule-based explainer and
simulator), `llm` (explainer and judge over the client), `scoring` (the scores), `cache` (per-unit
JSON results), `interpret` (all of it for a list of units).
"""

from sae_circuits.autointerp.bases import build_basis
from sae_circuits.autointerp.cache import ResultCache
from sae_circuits.autointerp.client import ChatClient, ChatError
from sae_circuits.autointerp.contexts import Record, UnitContexts, sample_units, unit_contexts
from sae_circuits.autointerp.interpret import interpret, summarize
from sae_circuits.autointerp.llm import LLMExplainer, LLMJudge
from sae_circuits.autointerp.offline import OfflineExplainer, OfflineSimulator
from sae_circuits.autointerp.prompts import Example, ResponseError
from sae_circuits.autointerp.scoring import (
    SCORES,
    balanced_accuracy,
    pearson,
    score_explanation,
)
from sae_circuits.autointerp_settings import BASES, Settings

__all__ = [
    "BASES",
    "SCORES",
    "ChatClient",
    "ChatError",
    "Example",
    "LLMExplainer",
    "LLMJudge",
    "OfflineExplainer",
    "OfflineSimulator",
    "Record",
    "ResponseError",
    "ResultCache",
    "Settings",
    "UnitContexts",
    "balanced_accuracy",
    "build_basis",
    "interpret",
    "pearson",
    "sample_units",
    "score_explanation",
    "summarize",
    "unit_contexts",
]
