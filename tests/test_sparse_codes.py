"""Sparse top-k kernels against the dense plain-torch formulation (topk + scatter + dense matmuls)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae_circuits.errors import UserInputError
from sae_circuits.sparse_codes import (
    SparseCodes,
    gather_linear,
    select_batch_topk,
    select_threshold,
    select_topk,
    sparse_decode,
)

N, D, M, K = 24, 16, 64, 5
NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")


def make_inputs(dtype: torch.dtype, seed: int = 0, integer: bool = False) -> list[torch.Tensor]:
    """x, W_enc, b_enc, W_dec, b_dec as leaves; `integer` values make exact ties in pre."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        x = torch.randint(-2, 3, (N, D), generator=g).to(dtype)
        W_enc = torch.randint(-1, 2, (D, M), generator=g).to(dtype)
        b_enc = torch.zeros(M, dtype=dtype)
        b_dec = torch.zeros(D, dtype=dtype)
    else:
        x = torch.randn(N, D, generator=g, dtype=dtype)
        W_enc = torch.randn(D, M, generator=g, dtype=dtype) / D**0.5
        b_enc = 0.1 * torch.randn(M, generator=g, dtype=dtype)
        b_dec = 0.1 * torch.randn(D, generator=g, dtype=dtype)
    W_dec = F.normalize(torch.randn(M, D, generator=g, dtype=dtype), dim=-1)
    return [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, W_dec, b_dec)]


def dense_topk(pre: torch.Tensor, k: int, batch: bool) -> torch.Tensor:
    """The reference selection: a 0/1 mask of the top k per row (or the top n·k of the batch, ties
    to the lowest flat index)."""
    mask = torch.zeros_like(pre)
    if batch:
        order = torch.sort(pre.reshape(-1), descending=True, stable=True).indices
        return mask.view(-1).scatter(0, order[: k * len(pre)], 1.0).view_as(pre)
    return mask.scatter(-1, torch.topk(pre, min(k, pre.shape[1]), dim=-1).indices, 1.0)


def dense_step(inputs: list[torch.Tensor], k: int, batch: bool) -> tuple[torch.Tensor, list]:
    """Loss and gradients of the dense TopK step: topk, scatter into zeros, dense matmuls."""
    x, W_enc, b_enc, W_dec, b_dec = inputs
    xc = x - b_dec
    pre = xc @ W_enc + b_enc
    f = torch.relu(pre) * dense_topk(pre.detach(), k, batch)
    loss = ((f @ W_dec + b_dec) - x).pow(2).sum(-1).mean()
    return loss, torch.autograd.grad(loss, inputs)


def sparse_step(
    inputs: list[torch.Tensor], k: int, batch: bool, use_pre: bool = True
) -> tuple[torch.Tensor, list]:
    """The same step with the sparse kernels (the trainer's intended TopK step)."""
    x, W_enc, b_enc, W_dec, b_dec = inputs
    xc = x - b_dec
    with torch.no_grad():
        pre = xc @ W_enc + b_enc
    rows, latents = (select_batch_topk if batch else select_topk)(pre, k)
    values = torch.relu(
        gather_linear(xc, W_enc, b_enc, rows, latents, pre=pre if use_pre else None)
    )
    x_hat = sparse_decode(values, rows, latents, W_dec, len(x)) + b_dec
    loss = (x_hat - x).pow(2).sum(-1).mean()
    return loss, torch.autograd.grad(loss, inputs)


def assert_same_step(inputs: list[torch.Tensor], k: int, batch: bool, use_pre: bool = True):
    loss, grads = sparse_step(inputs, k, batch, use_pre)
    ref_loss, ref_grads = dense_step(inputs, k, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, grad, ref in zip(NAMES, grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")
        assert grad.shape == ref.shape and grad.dtype == ref.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
@pytest.mark.parametrize("use_pre", [True, False], ids=["from-pre", "recomputed"])
def test_step_matches_dense(dtype, batch, use_pre):
    assert_same_step(make_inputs(dtype), K, batch, use_pre)


@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
def test_ties_match_dense(batch):
    inputs = make_inputs(torch.float64, integer=True)
    x, W_enc, b_enc, _, b_dec = inputs
    pre = (x - b_dec) @ W_enc + b_enc
    ranked = pre.detach().sort(dim=-1, descending=True).values
    assert (ranked[:, K - 1] == ranked[:, K]).sum() > N / 2  # the k-th value ties with the next
    ranked = ranked.flatten().sort(descending=True).values
    assert ranked[N * K - 1] == ranked[N * K]
    assert_same_step(inputs, K, batch)
    rows, latents = (select_batch_topk if batch else select_topk)(pre.detach(), K)
    assert len(set(zip(rows.tolist(), latents.tolist(), strict=True))) == len(rows) == N * K


@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
def test_k_equal_to_d_dict(batch):
    inputs = make_inputs(torch.float32, seed=1)
    assert_same_step(inputs, M, batch)
    with torch.no_grad():
        rows, latents = (select_batch_topk if batch else select_topk)(torch.randn(N, M), M + 3)
    assert len(rows) == N * M and torch.equal(torch.bincount(rows), torch.full((N,), M))


def test_batch_topk_rows_without_active_latents():
    inputs = make_inputs(torch.float32, seed=2)
    x, W_enc, b_enc, _, b_dec = inputs
    with torch.no_grad():
        x[3] = x[7] = b_dec  # pre-activations b_enc (~0.1), far below the batch's top n·k
        pre = (x - b_dec) @ W_enc + b_enc
    rows, _ = select_batch_topk(pre, K)
    assert 3 not in rows.tolist() and 7 not in rows.tolist()
    assert len(rows) == N * K
    assert_same_step(inputs, K, batch=True)


@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
def test_empty_selection(batch):
    inputs = make_inputs(torch.float32, seed=3)
    loss, grads = sparse_step(inputs, 0, batch)
    ref_loss, ref_grads = dense_step(inputs, 0, batch)
    torch.testing.assert_close(loss, ref_loss)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref)
    assert not grads[1].any() and not grads[3].any()  # no latent touched


def test_any_entries_match_dense():
    """Arbitrary entries (unsorted latents, a repeated pair, empty rows), as AuxK passes them."""
    leaves = make_inputs(torch.float64, seed=4)[:4]  # x, W_enc, b_enc, W_dec
    rows = torch.tensor([0, 0, 0, 2, 2, 5, 5, 5, 5, N - 1])
    latents = torch.tensor([9, 3, 9, 0, M - 1, 7, 2, 40, 1, 5])
    weights = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def sparse(x, W_enc, b_enc, W_dec):
        values = gather_linear(x, W_enc, b_enc, rows, latents)
        return values, sparse_decode(values, rows, latents, W_dec, N)

    def dense(x, W_enc, b_enc, W_dec):
        values = (x @ W_enc + b_enc)[rows, latents]
        f = torch.zeros(N, M, dtype=values.dtype).index_put(
            (rows, latents), values, accumulate=True
        )
        return values, f @ W_dec

    results = []
    for fn in (sparse, dense):
        values, out = fn(*leaves)
        grads = torch.autograd.grad((out * weights).sum() + values.pow(2).sum(), leaves)
        results.append((values, out, *grads))
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    g = torch.Generator().manual_seed(6)
    n, d, m = 5, 4, 7
    x = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    W_enc = torch.randn(d, m, dtype=torch.float64, generator=g, requires_grad=True)
    b_enc = torch.randn(m, dtype=torch.float64, generator=g, requires_grad=True)
    W_dec = torch.randn(m, d, dtype=torch.float64, generator=g, requires_grad=True)
    rows = torch.tensor([0, 0, 1, 3, 3, 3, 4])  # row 2 has no entry
    latents = torch.tensor([6, 1, 1, 0, 5, 2, 6])
    values = torch.randn(len(rows), dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: gather_linear(x, w, b, rows, latents), (x, W_enc, b_enc)
    )
    assert torch.autograd.gradcheck(
        lambda v, w: sparse_decode(v, rows, latents, w, n), (values, W_dec)
    )


def test_values_from_pre_equal_recomputed():
    x, W_enc, b_enc, _, _ = make_inputs(torch.float64, seed=7)
    pre = (x @ W_enc + b_enc).detach()
    rows, latents = select_topk(pre, K)
    from_pre = gather_linear(x, W_enc, b_enc, rows, latents, pre=pre)
    recomputed = gather_linear(x, W_enc, b_enc, rows, latents)
    torch.testing.assert_close(from_pre, recomputed)
    grad = torch.randn_like(from_pre)
    a = torch.autograd.grad(from_pre, (x, W_enc, b_enc), grad)
    b = torch.autograd.grad(recomputed, (x, W_enc, b_enc), grad)
    for left, right in zip(a, b, strict=True):
        assert torch.equal(left, right)


def test_forward_under_inference_mode():
    x, W_enc, b_enc, W_dec, _ = (t.detach() for t in make_inputs(torch.float32, seed=12))
    with torch.inference_mode():
        pre = x @ W_enc + b_enc
        rows, latents = select_topk(pre, K)
        values = gather_linear(x, W_enc, b_enc, rows, latents)
        out = sparse_decode(values, rows, latents, W_dec, N)
    torch.testing.assert_close(values, pre[rows, latents])
    f = torch.zeros(N, M).index_put((rows, latents), values)
    torch.testing.assert_close(out, f @ W_dec)


def test_select_batch_topk_by_hand():
    pre = torch.tensor(
        [
            [0.1, 5.0, -1.0, 2.0],
            [-3.0, -2.0, -4.0, -5.0],
            [4.0, 0.0, 3.0, 6.0],
        ]
    )
    rows, latents = select_batch_topk(pre, 2)  # the 6 largest of the 12: 6, 5, 4, 3, 2, 0.1
    assert rows.tolist() == [0, 0, 0, 2, 2, 2]
    assert latents.tolist() == [0, 1, 3, 0, 2, 3]
    rows, latents = select_batch_topk(torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.0, 2.0]]), 1)
    assert rows.tolist() == [0, 0] and latents.tolist() == [1, 2]  # ties: the lowest indices
    rows, latents = select_topk(pre, 2)
    assert rows.tolist() == [0, 0, 1, 1, 2, 2]
    assert [sorted(latents[i : i + 2].tolist()) for i in (0, 2, 4)] == [[1, 3], [0, 1], [0, 3]]


@pytest.mark.parametrize(
    ("outliers", "k"),
    [(0, 3), (1, 3), (3, 3), (1, 20)],
    ids=["typical", "one", "three", "whole-row"],
)
@pytest.mark.parametrize("integer", [False, True], ids=["distinct", "ties"])
def test_select_batch_topk_matches_flat_search(outliers, k, integer):
    """Outlier rows hold more than 4k (16k, or all) of the batch's top n·k entries."""
    g = torch.Generator().manual_seed(11)
    n, m = 40, 512
    pre = torch.randn(n, m, generator=g)
    if integer:
        pre = torch.randint(-3, 4, (n, m), generator=g).float()
    pre[:outliers] += 10.0
    rows, latents = select_batch_topk(pre, k)
    expected = dense_topk(pre, k, batch=True).nonzero(as_tuple=True)
    assert torch.equal(rows, expected[0]) and torch.equal(latents, expected[1])
    assert (rows < outliers).sum() > 4 * k or not outliers


def test_select_threshold():
    pre = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.7, 0.2]])
    rows, latents = select_threshold(pre, 0.3)
    assert rows.tolist() == [0, 0, 1] and latents.tolist() == [0, 2, 1]
    rows, latents = select_threshold(pre, torch.tensor([0.0, 1.0, 0.1]))
    assert rows.tolist() == [0, 0, 1] and latents.tolist() == [0, 2, 2]


def test_sparse_codes_dense_and_fire_counts():
    pre = torch.randn(N, M, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    rows, latents = select_batch_topk(pre, K)
    values = torch.relu(pre[rows, latents]).requires_grad_(True)
    codes = SparseCodes(rows, latents, values, N, M)
    reference = torch.relu(pre) * dense_topk(pre, K, batch=True)
    dense = codes.to_dense()
    torch.testing.assert_close(dense, reference)
    torch.testing.assert_close(codes.fire_counts(), (reference > 0).sum(0).to(torch.float32))
    W_dec = torch.randn(M, D, dtype=torch.float64)
    torch.testing.assert_close(codes.decode(W_dec), reference @ W_dec)
    dense.sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))


def test_deterministic():
    inputs = make_inputs(torch.float32, seed=9)
    first, second = sparse_step(inputs, K, True), sparse_step(inputs, K, True)
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close(dtype):
    inputs = make_inputs(torch.float32, seed=10)
    half = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    loss, grads = sparse_step(half, K, batch=False)
    ref_loss, ref_grads = dense_step(inputs, K, batch=False)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(loss.float(), ref_loss, rtol=0.05, atol=0.05)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.float(), ref, rtol=0.05, atol=0.05)


def test_bad_arguments():
    with pytest.raises(UserInputError, match="k must be >= 0"):
        select_topk(torch.zeros(2, 3), -1)
    with pytest.raises(UserInputError, match=r"\(n, d_dict\)"):
        select_batch_topk(torch.zeros(3), 1)
