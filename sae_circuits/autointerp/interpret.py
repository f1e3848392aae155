"""Explain and score units of one basis at one site: contexts, explanation, scores, cache.

`interpret` collects the contexts of every unit in one pass, then for each unit reuses the cached
explanation when the explainer and its prompt are unchanged (or asks the explainer), reuses cached
scores when the judge, the explanation and the scored contexts are unchanged (or scores), and saves
the unit's result before moving on. An explainer reply that cannot be read is recorded as the unit's
error; a failed request (`ChatError`) stops the run, after the finished units are saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sae_circuits.autointerp.cache import ResultCache
from sae_circuits.autointerp.contexts import UnitContexts, unit_contexts
from sae_circuits.autointerp.prompts import Message, ResponseError, prompt_hash
from sae_circuits.autointerp.scoring import SCORES, Judge, mean_interval, score_explanation
from sae_circuits.autointerp_settings import Settings
from sae_circuits.batches import TokenBatch
from sae_circuits.dictionary import Dictionary
from sae_circuits.nodes import Node
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.sites import Site


class Explainer(Protocol):
    name: str

    def messages(self, contexts: UnitContexts) -> list[Message]: ...

    def explain(self, contexts: UnitContexts) -> str: ...


def interpret(
    model: Model,
    site: str | Site,
    basis_name: str,
    basis: Dictionary,
    batches: Sequence[TokenBatch],
    units: Sequence[int],
    explainer: Explainer,
    judge: Judge | None = None,
    cache: ResultCache | None = None,
    settings: Settings | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The result of each unit: explanation (or error) and, with a `judge`, its scores."""
    site = Site.parse(site)
    cache = cache or ResultCache(None)
    settings = settings or Settings()
    all_contexts = unit_contexts(
        model,
        site,
        basis,
        batches,
        units,
        settings.n_top,
        settings.n_random,
        settings.seed,
        settings.batch_size,
        progress,
    )
    results = []
    verb = "explaining and scoring" if judge else "explaining"
    with progress_bar(f"{verb} {basis_name} at {site}", len(units), enabled=progress) as bar:
        for contexts in all_contexts:
            result = _unit(site, basis_name, contexts, explainer, judge, cache, settings)
            cache.save(basis_name, site, contexts.unit, result)
            results.append(result)
            bar.advance(0)
    return results


def _unit(
    site: Site,
    basis_name: str,
    contexts: UnitContexts,
    explainer: Explainer,
    judge: Judge | None,
    cache: ResultCache,
    settings: Settings,
) -> dict[str, Any]:
    stored = cache.load(basis_name, site, contexts.unit)
    asked = prompt_hash(explainer.messages(contexts))
    result = {
        "unit": Node(site, contexts.unit).id,
        "basis": basis_name,
        "index": contexts.unit,
        "max_activation": contexts.max_activation,
        "explainer": explainer.name,
        "prompt_hash": asked,
    }
    if stored.get("explainer") == explainer.name and stored.get("prompt_hash") == asked:
        result["explanation"] = stored.get("explanation")
    if not result.get("explanation"):
        try:
            result["explanation"] = explainer.explain(contexts)
        except ResponseError as error:
            return {**result, "explanation": None, "error": str(error)}
    if judge is None:
        kept = stored.get("explanation") == result["explanation"]
        return {
            **result,
            **{k: stored[k] for k in ("judge", "score_key", "scores") if kept and k in stored},
        }
    key = _score_key(result["explanation"], judge, contexts, settings)
    if stored.get("score_key") == key and "scores" in stored:
        scores = stored["scores"]
    else:
        scores = score_explanation(
            contexts, result["explanation"], judge, settings.threshold, settings.seed
        )
    return {**result, "judge": judge.name, "score_key": key, "scores": scores}


def _score_key(explanation: str, judge: Judge, contexts: UnitContexts, settings: Settings) -> str:
    scored = [(r.tokens, r.activations) for r in contexts.held_out + contexts.random]
    content = [explanation, judge.name, settings.threshold, settings.seed, scored]
    return prompt_hash([{"role": "key", "content": repr(content)}])


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per basis and score: the mean and 95% interval over the units that have the score."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for basis in dict.fromkeys(r["basis"] for r in results):
        rows = [r.get("scores") or {} for r in results if r["basis"] == basis]
        summary[basis] = {
            name: mean_interval([s[name] for s in rows if s.get(name) is not None])
            for name in SCORES
        }
    return summary
