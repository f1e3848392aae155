"""The type of the models the package works on, for annotations.

Any nnsight-wrapped Hugging Face causal LM fits (`load_model` returns one): it traces, edits, and
carries the Hugging Face config and tokenizer.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Model(Protocol):
    """An nnsight language model (`nnsight.modeling.transformers.TransformersModel` and kin)."""

    config: Any
    tokenizer: Any

    def trace(self, *inputs: Any, **kwargs: Any) -> Any: ...

    def edit(self, *inputs: Any, **kwargs: Any) -> Any: ...

    def clear_edits(self) -> None: ...


__all__ = ["Model"]
