"""Token batches as harvesting, evaluation and feature collection take them, and the positions
they score.

A batch is token ids `(batch, ctx)` (no padding, as `text.token_batches` packs them) or an
`(ids, attention_mask)` pair. Tokenizers pad on the left, so a row's first real token (BOS) is
found from the mask, not assumed at position 0.
"""

from __future__ import annotations

import torch

TokenBatch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def split_batch(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, mask)` of a batch, the mask boolean; bare ids have every position real."""
    if isinstance(batch, tuple):
        ids, mask = batch
        return ids, mask.bool()
    return batch, torch.ones_like(batch, dtype=torch.bool)


def scored_positions(mask: torch.Tensor, skip_first: bool) -> torch.Tensor:
    """`(batch, ctx)` bool: the real positions of a boolean `mask`, without each row's first real
    one when `skip_first`."""
    if not skip_first:
        return mask
    first_real = mask & (mask.long().cumsum(-1) == 1)
    return mask & ~first_real


def trace_inputs(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The keyword inputs of a trace over `ids` with a boolean `mask`."""
    return {"input_ids": ids, "attention_mask": mask.long()}


def from_rows(rows: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, mask)` of context rows that mark pad positions with -1 (`FeatureStats.top_rows`),
    the pads filled with `pad_id`."""
    mask = rows >= 0
    return rows.masked_fill(~mask, pad_id), mask


__all__ = ["TokenBatch", "from_rows", "scored_positions", "split_batch", "trace_inputs"]
