"""Scores of an explanation, by the published definitions.

- simulation (Bills et al. 2023, "top and random"): a simulator predicts every token's activation
  from the explanation on the held-out top contexts and as many random ones; the score is the
  Pearson correlation of predicted and true activations over all those tokens at once (0 when either
  side is constant, e.g. a simulator that predicts nothing).
- detection (delphi): held-out top contexts (label 1) and random contexts where the unit stays
  below `threshold` × its maximum (label 0); a classifier says which activate the unit; the score is
  the balanced accuracy, (true-positive rate + true-negative rate) / 2.
- fuzzing (delphi): the held-out top contexts with their active tokens marked (label 1) and the same
  quiet contexts with as many random tokens marked as the mean number of active tokens per top
  context, rounded up (label 0); a classifier says whether the marks are right; balanced accuracy.

A prediction that could not be read from a model's reply counts as wrong. A score that needs
contexts the scan did not provide (a unit with no quiet random context) is None.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol

import torch

from sae_circuits.autointerp.contexts import Record, UnitContexts
from sae_circuits.autointerp.prompts import Example, active

SCORES = ("simulation", "detection", "fuzzing")


class Judge(Protocol):
    """What scores an explanation: a simulator and a classifier (offline or an LLM)."""

    name: str

    def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]: ...

    def classify(
        self, explanation: str, examples: Sequence[Example], task: str
    ) -> list[int | None]: ...


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of `x` and `y`; 0.0 when either is constant."""
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def balanced_accuracy(truth: Sequence[int], predicted: Sequence[int | None]) -> float | None:
    """Mean over the two classes of the share predicted right (None is wrong); None without both
    classes."""
    rates = []
    for label in (0, 1):
        hits = [p == t for t, p in zip(truth, predicted, strict=True) if t == label]
        if not hits:
            return None
        rates.append(sum(hits) / len(hits))
    return sum(rates) / 2


def simulation_score(judge: Judge, explanation: str, records: Sequence[Record]) -> float:
    true, predicted = [], []
    for record in records:
        true.extend(record.activations)
        predicted.extend(judge.simulate(explanation, record.tokens))
    return pearson(true, predicted)


def classification_score(
    judge: Judge, explanation: str, examples: Sequence[tuple[Example, int]], task: str, seed: int
) -> float | None:
    """Balanced accuracy of the judge's `task` labels on (example, truth) pairs shown shuffled."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    if not shuffled:
        return None
    labels = judge.classify(explanation, [e for e, _ in shuffled], task)
    return balanced_accuracy([t for _, t in shuffled], labels)


def fuzzing_examples(
    contexts: UnitContexts, threshold: float, rng: random.Random
) -> list[tuple[Example, int]]:
    """Rightly marked held-out top contexts (1) and randomly marked quiet contexts (0)."""
    top = contexts.max_activation
    positives = [(r, active(r, top, threshold)) for r in contexts.held_out]
    quiet = contexts.quiet(threshold)[: len(positives)]
    if not positives or not quiet:
        return []
    n_marks = math.ceil(sum(sum(m) for _, m in positives) / len(positives))
    examples = [(Example(r.tokens, m), 1) for r, m in positives]
    for record in quiet:
        chosen = set(rng.sample(range(len(record.tokens)), min(n_marks, len(record.tokens))))
        marked = [i in chosen for i in range(len(record.tokens))]
        examples.append((Example(record.tokens, marked), 0))
    return examples


def score_explanation(
    contexts: UnitContexts, explanation: str, judge: Judge, threshold: float = 0.3, seed: int = 0
) -> dict[str, float | None]:
    """The simulation, detection and fuzzing scores of `explanation` for one unit."""
    held_out = contexts.held_out
    detection = [(Example(r.tokens), 1) for r in held_out] + [
        (Example(r.tokens), 0) for r in contexts.quiet(threshold)[: len(held_out)]
    ]
    if not any(t == 0 for _, t in detection):
        detection = []
    rng = random.Random(seed * 1_000_003 + contexts.unit)
    return {
        "simulation": simulation_score(
            judge, explanation, held_out + contexts.random[: len(held_out)]
        ),
        "detection": classification_score(judge, explanation, detection, "detection", seed),
        "fuzzing": classification_score(
            judge, explanation, fuzzing_examples(contexts, threshold, rng), "fuzzing", seed
        ),
    }


def mean_interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and 95% confidence interval (normal approximation, 1.96 standard errors) of `values`."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "ci95": None}
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"n": n, "mean": mean, "ci95": 1.96 * math.sqrt(variance / n)}
