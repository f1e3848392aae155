"""Resampling on a plain dictionary and Adam optimizer: which latents, which directions, the reset
of their optimizer state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_training import D, PlantedSource

from sae_circuits.dictionary import Dictionary, DictionaryConfig
from sae_circuits.resampling import Resampler, reset_adam_state

torch.set_num_threads(1)  # tiny tensors: one thread is faster on the shared cores


def plain_resampler(kind: str = "untied", d_dict: int = 64, lr: float = 1e-2, **rules) -> Resampler:
    """A fresh dictionary (seed 0), its Adam optimizer and a resampler with `rules`."""
    torch.manual_seed(0)
    dictionary = Dictionary.from_config(DictionaryConfig(kind=kind, d_in=D, d_dict=d_dict))
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=lr)
    return Resampler(dictionary, optimizer, generator=torch.Generator().manual_seed(0), **rules)


def step(resampler: Resampler, x: torch.Tensor, l1: float = 1e-3) -> None:
    """One plain training step (MSE + L1, decoder constraint, Adam), observed by the resampler."""
    d = resampler.dictionary
    x_hat, f = d(x)
    loss = (x_hat - x).pow(2).sum(-1).mean() + l1 * f.sum(-1).mean()
    resampler.optimizer.zero_grad()
    loss.backward()
    d.project_decoder_gradient()
    resampler.optimizer.step()
    d.normalize_decoder()
    resampler.observe(x, (f > 0).sum(0))


def test_resample_reinitialises_dead_features() -> None:
    """Forced-dead features are moved to (unit) input directions, encoder bias 0, Adam state reset,
    and fire again afterwards."""
    resampler = plain_resampler(dead_window=5)
    batches = iter(PlantedSource())
    for _ in range(3):
        step(resampler, next(batches)["x"], 0.01)
    with torch.no_grad():
        resampler.dictionary.b_enc[:16] = -100.0
    for _ in range(5):
        step(resampler, next(batches)["x"], 0.01)
    assert resampler.dead[:16].all()
    x = next(batches)["x"]
    dead = resampler.dead.nonzero().squeeze(1)
    assert resampler.resample(x) == len(dead)
    d, state = resampler.dictionary, resampler.optimizer.state
    directions = F.normalize(x, dim=-1)
    # each decoder row is one of the inputs' unit directions, the encoder column a multiple of it
    assert ((d.W_dec[dead] @ directions.T).amax(1) > 1 - 1e-5).all()
    assert (F.cosine_similarity(d.W_enc[:, dead].T, d.W_dec[dead], dim=1) > 1 - 1e-5).all()
    assert not d.b_enc[dead].any()
    for param in (d.W_dec, d.b_enc):
        assert (
            not state[param]["exp_avg"][dead].any() and not state[param]["exp_avg_sq"][dead].any()
        )
    assert not state[d.W_enc]["exp_avg"][:, dead].any()
    assert not resampler.dead.any()
    for _ in range(5):
        step(resampler, next(batches)["x"], 0.01)
    assert (resampler.since_fired[dead] < 5).float().mean() > 0.9


def duplicate_resampler(kind: str = "untied", **rules) -> Resampler:
    """A resampler after one step whose dictionary's 8 decoder directions are orthonormal except
    that latents 2 and 6 both point along direction 2 (cos 1 - 1e-5), with activation counts set."""
    resampler = plain_resampler(kind, d_dict=8, lr=1e-3, dead_window=100, **rules)
    step(resampler, next(iter(PlantedSource()))["x"])  # Adam state exists, nothing is dead
    rows = torch.linalg.qr(torch.randn(D, 8, generator=torch.Generator().manual_seed(4)))[0].T
    rows[6] = F.normalize(rows[2] + 3e-3 * rows[7], dim=0)
    d = resampler.dictionary
    with torch.no_grad():
        if kind == "tied":
            d.W.copy_(rows)
            d.b.zero_()
        else:
            d.W_dec.copy_(rows)
            d.W_enc.copy_(rows.T)
            d.b_enc.zero_()
            d.b_dec.zero_()
    if resampler.fired is not None:
        resampler.fired.copy_(torch.tensor([50, 40, 30, 20, 20, 20, 60, 20]))
    return resampler


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_duplicate_resampling_reinitialises_one_of_a_pair(kind: str) -> None:
    """Of two near-identical decoder directions, the less active latent is re-initialised (with
    fresh Adam state) and the more active one kept; the other latents are untouched."""
    resampler = duplicate_resampler(kind, duplicates=0.9)
    d = resampler.dictionary
    before = {name: p.detach().clone() for name, p in d.named_parameters()}
    assert resampler.duplicates().tolist() == [False, False, True] + [False] * 5  # 6 fired more
    assert resampler.resample(next(iter(PlantedSource(seed=3)))["x"]) == 1
    changed = (d.decoder_directions != before["W" if kind == "tied" else "W_dec"]).any(1)
    assert changed.tolist() == [False, False, True] + [False] * 5
    for name, param in d.named_parameters():  # all other latents keep every parameter
        axis = 1 if name == "W_enc" else 0
        if param.ndim == 1 and len(param) != 8:
            continue  # b_dec
        keep = torch.tensor([i != 2 for i in range(8)])
        kept, old = param.detach().index_select(axis, keep.nonzero().squeeze(1)), before[name]
        assert torch.equal(kept, old.index_select(axis, keep.nonzero().squeeze(1))), name
    state = resampler.optimizer.state[d.W if kind == "tied" else d.W_dec]
    assert not state["exp_avg"][2].any() and state["exp_avg"][6].any()
    assert resampler.fired is not None and not resampler.fired.any()  # counts restart
    # equal counts: the lower index is kept; blocks of any size give the same answer
    resampler = duplicate_resampler(kind, duplicates=0.9)
    resampler.fired.fill_(7)
    assert resampler.duplicates().nonzero().squeeze(1).tolist() == [6]
    assert resampler.duplicates(max_block=8).nonzero().squeeze(1).tolist() == [6]


def test_duplicate_resampling_off_by_default() -> None:
    """Without `duplicates` (None) the duplicate pair survives resampling and no activations are
    counted (nor inputs kept)."""
    resampler = duplicate_resampler()
    assert resampler.fired is None and resampler.target.state() == {}
    before = [p.detach().clone() for p in resampler.dictionary.parameters()]
    assert resampler.resample(next(iter(PlantedSource(seed=3)))["x"]) == 0
    after = list(resampler.dictionary.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_rarely_firing_latents_are_resampled() -> None:
    """`min_fires=25` re-initialises the latents that fired 20 times, and only those (the
    duplicate pair is kept: duplicates are not checked)."""
    resampler = duplicate_resampler(min_fires=25)
    before = resampler.dictionary.W_dec.detach().clone()
    assert resampler.resample(next(iter(PlantedSource(seed=3)))["x"]) == 4
    changed = (resampler.dictionary.W_dec != before).any(1)
    assert changed.tolist() == [False, False, False, True, True, True, False, True]


def test_residual_target_finds_the_uncovered_feature() -> None:
    """Latents 0-5 are features 0-5, latent 6 duplicates latent 2 (and fired more), latent 7
    duplicates latent 0 (and fired less); the inputs also contain feature 7, which no latent
    covers. The least-squares residual of those inputs is along feature 7, so both re-initialised
    latents (2 and 7) land on it, with encoder norm, bias and Adam second moments like the live
    latents'."""
    resampler = duplicate_resampler(duplicates=0.9, target="residual")
    d, optimizer = resampler.dictionary, resampler.optimizer
    features = d.W_dec.detach().clone()
    with torch.no_grad():
        d.W_dec[7] = d.W_enc[:, 7] = features[0]
        d.W_enc[:, 3] *= 3.0  # live encoder norms 1, 1, 1, 1, 1, 3: median 1
    generator = torch.Generator().manual_seed(5)
    present = torch.tensor([0, 1, 2, 3, 4, 5, 7])
    active = torch.rand(512, 7, generator=generator) < 0.3
    x = (torch.rand(512, 7, generator=generator) * active) @ features[present]
    live = torch.tensor([0, 1, 3, 4, 5, 6])
    v_live = optimizer.state[d.W_dec]["exp_avg_sq"][live].mean(0)
    pool = resampler.target.pool
    assert len(pool) == 1  # the training batch
    pool.clear()  # resample from x alone
    assert resampler.resample(x) == 2
    assert (d.W_dec[[2, 7]] @ features[7]).min() > 0.999
    torch.testing.assert_close(d.W_enc[:, [2, 7]].norm(dim=0), torch.ones(2))
    assert not d.b_enc[[2, 7]].any()  # the live biases are all 0
    for latent in (2, 7):
        torch.testing.assert_close(optimizer.state[d.W_dec]["exp_avg_sq"][latent], v_live)
        assert not optimizer.state[d.W_dec]["exp_avg"][latent].any()


def test_adam_reset_zeroes_or_takes_the_live_mean() -> None:
    """Along either axis: moments of the chosen latents become 0, or with live latents given their
    second moments become the live mean; other latents keep theirs."""
    for axis in (0, 1):
        param = torch.nn.Parameter(torch.zeros(4, 4))
        optimizer = torch.optim.Adam([param])
        param.grad = torch.arange(16.0).reshape(4, 4) + 1
        optimizer.step()
        state = optimizer.state[param]
        before = {name: state[name].clone() for name in ("exp_avg", "exp_avg_sq")}
        chosen, live = torch.tensor([1, 3]), torch.tensor([0, 2])
        reset_adam_state(optimizer, param, axis, chosen[:1])
        assert not state["exp_avg"].index_select(axis, chosen[:1]).any()
        assert not state["exp_avg_sq"].index_select(axis, chosen[:1]).any()
        reset_adam_state(optimizer, param, axis, chosen, live)
        mean = before["exp_avg_sq"].index_select(axis, live).mean(axis, keepdim=True)
        for latent in chosen:
            torch.testing.assert_close(state["exp_avg_sq"].index_select(axis, latent[None]), mean)
        assert not state["exp_avg"].index_select(axis, chosen).any()
        for name in before:
            assert torch.equal(
                state[name].index_select(axis, live), before[name].index_select(axis, live)
            )
