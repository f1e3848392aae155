"""The build of the embedded model: a small Pythia-architecture (GPT-NeoX) model trained by the
project itself.

`build_model` rebuilds it end to end (corpus, tokenizer, training, evaluation, model card) into a
model folder named `EMBEDDED_MODEL_NAME`. Nothing at run time imports this package: the corpus and
the task sentences the build trains on are runtime modules (`sae_circuits.corpus`,
`sae_circuits.grammar`, `sae_circuits.task_text`), and `sae_circuits.models` finds and recognises the shipped copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_circuits.models import EMBEDDED_MODEL_NAME


def build_model(out_dir: str | Path, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """Rebuild the embedded model into `out_dir` (see `sae_circuits.embedded.build.build_model`)."""
    from sae_circuits.embedded.build import build_model as _build

    return _build(out_dir, seed, **kwargs)


def evaluate_model(model: Any, tokenizer: Any, n: int = 400, seed: int = 0) -> dict[str, float]:
    """Held-out IOI, ABC, SVA and text-loss metrics (see `sae_circuits.embedded.evaluate`)."""
    from sae_circuits.embedded.evaluate import evaluate_model as _evaluate

    return _evaluate(model, tokenizer, n, seed)


__all__ = ["EMBEDDED_MODEL_NAME", "build_model", "evaluate_model"]
