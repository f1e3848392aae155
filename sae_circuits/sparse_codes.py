"""Sparse codes of top-k dictionaries, and encoder/decoder kernels whose backward touches only them.

A batch's active latents are a COO list of `(row, latent, value)` entries (`SparseCodes`), with rows
non-decreasing. A training step of a top-k dictionary computes the dense pre-activations once without
gradient, selects the active entries (`select_topk`, `select_batch_topk`, `select_threshold`), takes
their values with `gather_linear` and reconstructs with `sparse_decode`:

    xc = x - b_dec
    with torch.no_grad():
        pre = xc @ W_enc + b_enc
    rows, latents = select_topk(pre, k)
    values = torch.relu(gather_linear(xc, W_enc, b_enc, rows, latents, pre=pre))
    x_hat = sparse_decode(values, rows, latents, W_dec, len(x)) + b_dec

The gradients equal those of the dense formulation (scatter the values into a zero `(n, d_dict)`
matrix, multiply by `W_dec`), but no backward op is a dense `(n, d_dict)` matmul: every gradient is
an `embedding_bag` or `index_add_` over the entries. Any set of entries works (AuxK passes the top
dead latents of each row, selected from a masked copy of `pre`; `gather_linear` takes the unmasked
one), half precision included.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sae_circuits.errors import UserInputError

_BATCH_CANDIDATES = 4  # BatchTopK looks among the 4k, then 16k, ... largest entries of each row
_DOT_BLOCK = 1024  # entries per gathered block of `_entry_dots` under inference mode


class SparseCodes(NamedTuple):
    """The active latents of a batch: entry `e` is latent `latents[e]` of input `rows[e]`."""

    rows: torch.Tensor  # (nnz,) int64, non-decreasing
    latents: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,) float, differentiable
    n_rows: int
    d_dict: int

    def to_dense(self) -> torch.Tensor:
        """The `(n_rows, d_dict)` feature matrix, differentiable through `values`."""
        zeros = self.values.new_zeros(self.n_rows, self.d_dict)
        return zeros.index_put((self.rows, self.latents), self.values)

    def fire_counts(self) -> torch.Tensor:
        """`(d_dict,)` float32: in how many rows each latent is active (value > 0)."""
        fired = (self.values.detach() > 0).to(torch.float32)
        counts = torch.zeros(self.d_dict, device=self.values.device)
        return counts.index_add_(0, self.latents, fired)

    def decode(self, weight: torch.Tensor) -> torch.Tensor:
        """`sparse_decode` of these codes with the decoder `weight` (d_dict, d_out)."""
        return sparse_decode(self.values, self.rows, self.latents, weight, self.n_rows)


def _sort(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort 1-D `keys` as one row of a 2-D tensor.

    A long 1-D integer tensor would take torch's parallel radix sort, which stalls for hundreds of
    milliseconds when other processes share the cores; the row sort is serial and steady.
    """
    values, indices = keys.view(1, -1).sort()
    return values.view(-1), indices.view(-1)


def _check_pre(pre: torch.Tensor, k: int) -> None:
    if pre.dim() != 2:
        raise UserInputError(f"pre-activations must be (n, d_dict), got shape {tuple(pre.shape)}")
    if k < 0:
        raise UserInputError(f"k must be >= 0, got {k}")


@torch.no_grad()
def select_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, latents) of the k largest entries of each row of `pre` (n, d_dict), rows non-decreasing.

    `k` above d_dict selects every latent. Ties are broken as `torch.topk` breaks them.
    """
    _check_pre(pre, k)
    n, d_dict = pre.shape
    k = min(k, d_dict)
    latents = pre.topk(k, dim=-1, sorted=False).indices.reshape(-1)
    rows = torch.arange(n, device=pre.device).repeat_interleave(k)
    return rows, latents


@torch.no_grad()
def select_batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, latents) of the n·k largest entries of the whole batch `pre` (n, d_dict).

    BatchTopK (Bussmann et al. 2024): rows get different numbers of entries, possibly none. Ties at
    the n·k-th value go to the lowest (row, latent); entries are in row-major order.
    """
    _check_pre(pre, k)
    n, d_dict = pre.shape
    total = min(n * k, n * d_dict)
    if total == 0:
        empty = torch.zeros(0, dtype=torch.long, device=pre.device)
        return empty, empty
    values, flat, threshold = _batch_candidates(pre, total)
    above = flat[values > threshold]
    tied = _sort(flat[values == threshold])[0][: total - len(above)]
    flat = _sort(torch.cat([above, tied]))[0]
    return flat // d_dict, flat % d_dict


def _batch_candidates(
    pre: torch.Tensor, total: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values and flat indices of entries of `pre` that include all of its `total` largest, and the
    `total`-th largest value.

    The w = 4k, 16k, ... largest entries of each row hold them once every row's w-th value is below
    the threshold they give; a top-k over rows is much faster than one over the whole batch.
    """
    n, d_dict = pre.shape
    width = _BATCH_CANDIDATES * (total // n)
    while width < d_dict:
        top = pre.topk(width, dim=-1, sorted=False)
        values = top.values.reshape(-1)
        threshold = values.topk(total, sorted=False).values.min()
        if bool((top.values.min(-1).values < threshold).all()):
            flat = top.indices + d_dict * torch.arange(n, device=pre.device).unsqueeze(1)
            return values, flat.reshape(-1), threshold
        width *= _BATCH_CANDIDATES
    values = pre.reshape(-1)
    threshold = values.topk(total, sorted=False).values.min()
    return values, torch.arange(len(values), device=pre.device), threshold


@torch.no_grad()
def select_threshold(
    pre: torch.Tensor, threshold: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, latents) of the entries of `pre` (n, d_dict) above `threshold` (a scalar or (d_dict,)).

    Inference of a BatchTopK dictionary (one stored threshold) and the forward of JumpReLU (one per
    latent). Entries are in row-major order.
    """
    _check_pre(pre, 0)
    rows, latents = (pre > threshold).nonzero(as_tuple=True)
    return rows, latents


def _row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Start of each row's entries in `rows` (non-decreasing): `embedding_bag` offsets, one bag a row."""
    counts = torch.bincount(rows, minlength=n_rows)
    return counts.cumsum(0) - counts


def _bag_sum(
    offsets: torch.Tensor, indices: torch.Tensor, table: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(len(offsets), d): bag `i` sums `weights[e] · table[indices[e]]` over its entries."""
    return F.embedding_bag(
        indices,
        table.contiguous(),
        offsets,
        mode="sum",
        per_sample_weights=weights.to(table.dtype),
    )


def _latent_sum(
    latents: torch.Tensor,
    d_dict: int,
    rows: torch.Tensor,
    table: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """(d_dict, d): out[latents[e]] += weights[e] · table[rows[e]], summed in (latent, row) order.

    The sort key is unique per entry, so the order (and the rounding) does not depend on the sort.
    """
    order = _sort(latents * len(table) + rows)[1]
    return _bag_sum(_row_offsets(latents[order], d_dict), rows[order], table, weights[order])


def _entry_dots(
    a: torch.Tensor,
    rows: torch.Tensor,
    b: torch.Tensor,
    latents: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """(nnz,): the dot products `a[rows[e]] · b[latents[e]]`, rows grouped as `offsets` say.

    They are the gradient of `embedding_bag`'s per-sample weights, which torch computes entry by
    entry without gathering rows. Under `torch.inference_mode` there is no autograd: then they are
    computed from gathered blocks of entries (about 4x slower).
    """
    if torch.is_inference_mode_enabled() or a.is_inference() or b.is_inference():
        blocks = range(0, len(rows), _DOT_BLOCK)
        parts = [
            (a[rows[i : i + _DOT_BLOCK]] * b[latents[i : i + _DOT_BLOCK]]).sum(-1) for i in blocks
        ]
        return torch.cat(parts) if parts else a.new_zeros(0)
    weights = a.new_zeros(len(latents), requires_grad=True)
    with torch.enable_grad():
        bags = F.embedding_bag(latents, b.detach(), offsets, mode="sum", per_sample_weights=weights)
        return torch.autograd.grad(bags, weights, a)[0]


class _GatherLinear(torch.autograd.Function):
    """values[e] = x[rows[e]] · weight[:, latents[e]] + bias[latents[e]], backward over the entries."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        rows: torch.Tensor,
        latents: torch.Tensor,
        pre: torch.Tensor | None,
    ) -> torch.Tensor:
        offsets = _row_offsets(rows, len(x))
        ctx.save_for_backward(x, weight, rows, latents, offsets)
        if pre is not None:
            return pre[rows, latents]
        return _entry_dots(x, rows, weight.t().contiguous(), latents, offsets) + bias[latents]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rows, latents, offsets = ctx.saved_tensors
        d_dict = weight.shape[1]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _bag_sum(offsets, latents, weight.t(), grad)
        if ctx.needs_input_grad[1]:
            # built as (d_dict, d_in) rows; autograd lays the transpose out like `weight`
            grad_weight = _latent_sum(latents, d_dict, rows, x, grad).t()
        if ctx.needs_input_grad[2]:
            grad_bias = grad.new_zeros(d_dict).index_add_(0, latents, grad)
        return grad_x, grad_weight, grad_bias, None, None, None


class _SparseDecode(torch.autograd.Function):
    """out[rows[e]] += values[e] · weight[latents[e]], backward over the entries."""

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        rows: torch.Tensor,
        latents: torch.Tensor,
        weight: torch.Tensor,
        n_rows: int,
    ) -> torch.Tensor:
        offsets = _row_offsets(rows, n_rows)
        ctx.save_for_backward(values, rows, latents, weight, offsets)
        return _bag_sum(offsets, latents, weight, values)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, rows, latents, weight, offsets = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_values = _entry_dots(grad, rows, weight, latents, offsets).to(values.dtype)
        if ctx.needs_input_grad[3]:
            grad_weight = _latent_sum(latents, len(weight), rows, grad, values)
        return grad_values, None, None, grad_weight, None


def gather_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    rows: torch.Tensor,
    latents: torch.Tensor,
    *,
    pre: torch.Tensor | None = None,
) -> torch.Tensor:
    """values[e] = x[rows[e]] @ weight[:, latents[e]] + bias[latents[e]], weight (d_in, d_dict).

    With `pre` (`x @ weight + bias`, already computed without gradient) the values are read from it
    instead of recomputed. The gradients to x (n, d_in), weight and bias touch only the given
    entries (`embedding_bag` over them); none is a dense (n, d_dict) matmul.
    """
    return _GatherLinear.apply(x, weight, bias, rows, latents, pre)


def sparse_decode(
    values: torch.Tensor,
    rows: torch.Tensor,
    latents: torch.Tensor,
    weight: torch.Tensor,
    n_rows: int,
) -> torch.Tensor:
    """(n_rows, d_out): the sum of `values[e] · weight[latents[e]]` into row `rows[e]` (non-decreasing).

    `weight` is the decoder (d_dict, d_out); rows without entries decode to 0. Forward: one
    `embedding_bag` with per-sample weights. Backward: the gradient of `values` is the dot product of
    `grad[rows[e]]` with `weight[latents[e]]` per entry, that of `weight` a sum per latent over its
    entries (an `embedding_bag` over the entries grouped by latent).
    """
    return _SparseDecode.apply(values, rows, latents, weight, n_rows)
