"""The built-in offline explainer and simulator: the rule-based baseline LLM explanations must beat.

The explainer summarises the explanation set by two token lookup tables, as in the token-based
baseline of Bills et al. (2023): the tokens that carry most of the unit's activation, each with its
mean activation (0..10) where it occurs, and, when the unit is better predicted by the token before
the active one, those previous tokens. It writes them as a readable sentence whose quoted tokens the
offline simulator reads back, e.g.

    fires on " the" (7), " a" (4); also after " of" (5)

The simulator predicts, for each token, the largest value of an entry that matches it (the token
itself for entries before "after", the previous token for entries after it; tokens compare with
surrounding spaces stripped, unless they are only whitespace, and case folded). On an explanation
without quoted tokens (an LLM's free text) every content word is an entry with value 10. Classifiers follow from the simulation: a context
activates when some prediction reaches `threshold` × 10; marked tokens are right when their mean
prediction does.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence

from sae_circuits.autointerp.contexts import Record, UnitContexts, normalized
from sae_circuits.autointerp.prompts import Example, explainer_messages

NEVER_FIRES = "never fires on the scanned text"
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"(?:\s*\((\d+(?:\.\d+)?)\))?')
_WORD = re.compile(r"[A-Za-z0-9']+")
_FILLER = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "by",
        "for",
        "from",
        "in",
        "is",
        "of",
        "on",
        "or",
        "that",
        "the",
        "this",
        "to",
        "with",
        "activates",
        "after",
        "before",
        "fires",
        "text",
        "token",
        "tokens",
        "word",
        "words",
    ]
)


def _key(token: str) -> str:
    """A token as the lookup tables compare it: spaces around it stripped (unless it is only
    whitespace) and case folded."""
    return token.strip().casefold() or token


class OfflineExplainer:
    """Explains a unit by its token lookup tables (at most `n_tokens` entries each, covering
    `coverage` of the activation mass)."""

    name = "offline"

    def __init__(self, threshold: float = 0.3, n_tokens: int = 6, coverage: float = 0.8) -> None:
        self.threshold, self.n_tokens, self.coverage = threshold, n_tokens, coverage

    def messages(self, contexts: UnitContexts) -> list[dict[str, str]]:
        """The prompt an LLM explainer would get: its hash identifies the evidence explained."""
        return explainer_messages(contexts.explanation_set, contexts.max_activation, self.threshold)

    def explain(self, contexts: UnitContexts) -> str:
        records, top = contexts.explanation_set, contexts.max_activation
        if top <= 0:
            return NEVER_FIRES
        current = self._table(records, top, previous=False)
        before = self._table(records, top, previous=True)
        text = "fires on " + _entries(current)
        if before and before[0][2] > current[0][2] + 0.1:
            text += "; also after " + _entries(before)
        return text

    def _table(
        self, records: Sequence[Record], top: float, previous: bool
    ) -> list[tuple[str, int, float]]:
        """(token, mean 0..10 activation where it occurs, share of the mass), largest mass first."""
        mass: dict[str, float] = defaultdict(float)
        seen: dict[str, int] = defaultdict(int)
        for record in records:
            scaled = normalized(record.activations, top)
            keys = record.tokens[:-1] if previous else record.tokens
            values = scaled[1:] if previous else scaled
            for token, value in zip(keys, values, strict=True):
                mass[_key(token)] += value
                seen[_key(token)] += 1
        total = sum(mass.values())
        if total <= 0:
            return []
        ranked = sorted((k for k in mass if mass[k] > 0), key=lambda k: -mass[k])
        table, covered = [], 0.0
        for key in ranked[: self.n_tokens]:
            table.append((key, round(mass[key] / seen[key]), mass[key] / total))
            covered += mass[key] / total
            if covered >= self.coverage:
                break
        return [entry for entry in table if entry[1] > 0] or table[:1]


def _entries(table: list[tuple[str, int, float]]) -> str:
    return ", ".join(
        f"{json.dumps(token, ensure_ascii=False)} ({value})" for token, value, _ in table
    )


def rules(explanation: str) -> tuple[dict[str, float], dict[str, float]]:
    """The (current-token, previous-token) lookup tables an explanation states."""
    head, _, tail = explanation.partition("after ")
    if not _QUOTED.search(explanation):
        words = {_key(w): 10.0 for w in _WORD.findall(explanation) if _key(w) not in _FILLER}
        return words, {}
    tables = []
    for part in (head, tail):
        table: dict[str, float] = {}
        for match in _QUOTED.finditer(part):
            quoted = match.group(0)[: match.group(0).rindex('"') + 1]
            token = _key(json.loads(quoted))
            value = float(match.group(1)) if match.group(1) else 10.0
            table[token] = max(table.get(token, 0.0), min(value, 10.0))
        tables.append(table)
    return tables[0], tables[1]


class OfflineSimulator:
    """Predicts activations from an explanation's lookup tables (see the module docstring)."""

    name = "offline"

    def __init__(self, threshold: float = 0.3) -> None:
        self.threshold = threshold

    def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        current, previous = rules(explanation)
        keys = [_key(t) for t in tokens]
        return [
            max(current.get(k, 0.0), previous.get(keys[i - 1], 0.0) if i else 0.0)
            for i, k in enumerate(keys)
        ]

    def classify(self, explanation: str, examples: Sequence[Example], task: str) -> list[int]:
        level = 10 * self.threshold
        labels = []
        for example in examples:
            predicted = self.simulate(explanation, example.tokens)
            if task == "detection":
                labels.append(int(max(predicted, default=0.0) >= level))
            else:
                marked = [p for p, m in zip(predicted, example.marked or [], strict=True) if m]
                labels.append(int(bool(marked) and sum(marked) / len(marked) >= level))
        return labels
