"""Short labels for feature nodes: the distinct tokens where a feature is most active."""

from __future__ import annotations

from typing import Any

import torch


def top_tokens(
    tokenizer: Any, ids: torch.Tensor, acts: torch.Tensor, mask: torch.Tensor, k: int = 3
) -> str:
    """Up to `k` distinct tokens at the positions of largest positive activation, as a label like
    `' Mary' ' John'` (empty if the feature never fires). `ids`, `acts`, `mask`: `(N, T)`."""
    values = acts.masked_fill(~mask.bool(), 0).flatten()
    order = values.argsort(descending=True)
    tokens: list[int] = []
    for position in order[values[order] > 0].tolist():
        token = int(ids.flatten()[position])
        if token not in tokens:
            tokens.append(token)
            if len(tokens) == k:
                break
    return " ".join(repr(tokenizer.decode([t])) for t in tokens)
