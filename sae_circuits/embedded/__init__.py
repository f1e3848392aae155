"""The embedded model: a small Pythia-architecture (GPT-NeoX) model trained by the project itself.

`build_model` rebuilds it end to end (corpus, tokenizer, training, evaluation, model card);
`embedded_model_dir()` is where the shipped copy lives. Heavy modules (torch) load lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_circuits.embedded.task_text import (
    IOIExample,
    SVAExample,
    ioi_examples,
    load_task_data,
    single_token_words,
    sva_examples,
)

EMBEDDED_MODEL_NAME = "neox-ioi-4l"


def embedded_model_dir() -> Path:
    """Folder of the shipped embedded model (from a checkout or an installed wheel)."""
    from sae_circuits.resources import asset_dir

    return asset_dir("models") / EMBEDDED_MODEL_NAME


def iter_corpus(split: str = "train", seed: int = 0) -> Any:
    """Endless deterministic stream of corpus documents (see `sae_circuits.embedded.corpus`)."""
    from sae_circuits.embedded.corpus import iter_corpus as _iter

    return _iter(split, seed)


def build_model(out_dir: str | Path, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """Rebuild the embedded model into `out_dir` (see `sae_circuits.embedded.build.build_model`)."""
    from sae_circuits.embedded.build import build_model as _build

    return _build(out_dir, seed, **kwargs)


def evaluate_model(model: Any, tokenizer: Any, n: int = 400, seed: int = 0) -> dict[str, float]:
    """Held-out IOI, ABC, SVA and text-loss metrics (see `sae_circuits.embedded.evaluate`)."""
    from sae_circuits.embedded.evaluate import evaluate_model as _evaluate

    return _evaluate(model, tokenizer, n, seed)


__all__ = [
    "EMBEDDED_MODEL_NAME",
    "IOIExample",
    "SVAExample",
    "build_model",
    "embedded_model_dir",
    "evaluate_model",
    "ioi_examples",
    "iter_corpus",
    "load_task_data",
    "single_token_words",
    "sva_examples",
]
