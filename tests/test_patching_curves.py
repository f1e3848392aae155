"""Patching curves and the greedy search, checked against plain torch on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import random_untied
from test_interventions import tiny_task

from sae_circuits import LinearBasis
from sae_circuits.engine import task_tokens, tokenize
from sae_circuits.errors import UserInputError
from sae_circuits.greedy_search import greedy_search
from sae_circuits.patching_curves import (
    baseline_bases,
    corpus_activations,
    curves_for_bases,
    k_grid,
)
from sae_circuits.site_runs import forward_plan, patched_runs, read_run, site_width
from sae_circuits.sites import Site, torch_module

SITES = ["embed", "attn.1", "mlp_in.1", "mlp_hidden.1", "mlp.1", "resid.0", "resid.1"]


def hooked_last_logits(model, site, ids, mask, value):
    """Plain torch: last-position logits with the site's activation replaced by `value` (a
    left-padded row's tokens keep their own positions, as nnsight supplies them)."""
    path, io = Site.parse(site).resolve(model)
    module = torch_module(model).get_submodule(path)
    if io == "output":

        def hook(mod, args, output):
            return (value, *output[1:]) if isinstance(output, tuple) else value

        handle = module.register_forward_hook(hook)
    else:

        def pre_hook(mod, args):
            return (value, *args[1:])

        handle = module.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            return torch_module(model)(
                input_ids=ids, attention_mask=mask, position_ids=positions
            ).logits[:, -1]
    finally:
        handle.remove()


@pytest.mark.parametrize("site", SITES)
def test_patched_runs_match_plain_torch(model, site):
    tokens = tokenize(model, ["When Mary and John went out, John gave it to", "The key is"])
    width = site_width(model, site)
    torch.manual_seed(0)
    values = torch.randn(3, len(tokens), tokens.length, width)
    start = read_run(model, tokens, site, None, forward_plan(model, site)).start
    logits, metric = patched_runs(model, tokens, site, values, start, lambda lg: lg[:, -1, 0])
    for copy in range(3):
        expected = hooked_last_logits(
            model, site, tokens.input_ids, tokens.attention_mask, values[copy]
        )
        torch.testing.assert_close(logits[copy], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(metric[copy], expected[:, 0], atol=1e-4, rtol=1e-4)


def test_curves_and_ceiling(model):
    task = tiny_task(model)
    site = "resid.1"
    width = model.config.hidden_size
    sae = random_untied(width, d_dict=24, site=site, seed=3)
    bases = {"sae": sae, "neurons": LinearBasis.neurons(width, site=site)}
    every = curves_for_bases(model, task, task, site, bases, max_features=24, every_k=True)
    grid = curves_for_bases(model, task, task, site, bases, max_features=24)
    for name, curve in grid.items():
        assert curve.ks == k_grid(24) and len(curve.restored) == len(curve.ks)
        # the grid's points are the same as the full curve's at those k
        full = dict(zip(every[name].ks, every[name].restored, strict=True))
        assert curve.restored == pytest.approx([full[k] for k in curve.ks], abs=1e-5)
    # patching all directions of the sae = the ceiling
    assert every["sae"].restored[-1] == pytest.approx(every["sae"].ceiling, abs=1e-5)
    # the full neuron basis restores the clean run exactly
    assert every["neurons"].ceiling == pytest.approx(1.0, abs=1e-4)
    assert every["neurons"].ceiling_kl == pytest.approx(0.0, abs=1e-5)
    # the sae's ceiling: clean reconstruction + corrupted error term, by hand
    batch = task_tokens(model, task)
    clean = read_run(model, batch.clean, site, batch.metric)
    corrupt = read_run(model, batch.corrupt, site, batch.metric)
    mask = batch.clean.mask.unsqueeze(-1)
    with torch.no_grad():
        patched = corrupt.x + (sae.decode(sae.encode(clean.x)) - sae.decode(sae.encode(corrupt.x)))
    patched = torch.where(mask, patched, corrupt.x)
    last = hooked_last_logits(
        model, site, batch.corrupt.input_ids, batch.corrupt.attention_mask, patched
    )
    metric = batch.metric(last).mean().item()
    expected = (metric - corrupt.metric.mean().item()) / (
        clean.metric.mean().item() - corrupt.metric.mean().item()
    )
    assert every["sae"].ceiling == pytest.approx(expected, abs=1e-4)
    # the error term alone: x_corrupt + (e_clean - e_corrupt), by hand; none for exact bases
    with torch.no_grad():
        error = (clean.x - sae.decode(sae.encode(clean.x))) - (
            corrupt.x - sae.decode(sae.encode(corrupt.x))
        )
    patched = torch.where(mask, corrupt.x + error, corrupt.x)
    last = hooked_last_logits(
        model, site, batch.corrupt.input_ids, batch.corrupt.attention_mask, patched
    )
    expected = (batch.metric(last).mean().item() - corrupt.metric.mean().item()) / (
        clean.metric.mean().item() - corrupt.metric.mean().item()
    )
    assert every["sae"].error_restored == pytest.approx(expected, abs=1e-4)
    assert every["neurons"].error_restored == pytest.approx(0.0, abs=1e-4)


def test_k_grid():
    assert k_grid(5) == [1, 2, 3, 4, 5]
    assert k_grid(50) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 50]
    assert k_grid(130)[-4:] == [80, 100, 120, 130]
    assert k_grid(7, every_k=True) == list(range(1, 8))
    with pytest.raises(UserInputError):
        k_grid(0)


def test_baselines(models):
    model = models["gpt_neox"]
    task = tiny_task(model)
    found = baseline_bases(
        model, task, "resid.0", names=["pca_task", "pca_corpus"], corpus_tokens=512
    )
    width = model.config.hidden_size
    for basis in found.values():
        gram = basis.components @ basis.components.T
        torch.testing.assert_close(gram, torch.eye(width), atol=1e-4, rtol=0)
    both = corpus_activations(model, ["resid.1", "resid.0"], n_tokens=512)
    activations = both["resid.0"]
    assert activations.shape[1] == width and activations.shape[0] >= 500
    torch.testing.assert_close(found["pca_corpus"].offset, activations.mean(0), atol=1e-3, rtol=0)
    # one pass for two sites reads what a pass for one site reads, and a given corpus is used
    alone = corpus_activations(model, ["resid.1"], n_tokens=512)["resid.1"]
    torch.testing.assert_close(both["resid.1"], alone)
    given = baseline_bases(model, task, "resid.1", names=["pca_corpus"], corpus=alone)
    torch.testing.assert_close(given["pca_corpus"].offset, alone.mean(0), atol=1e-5, rtol=0)
    with pytest.raises(UserInputError, match="unknown baseline"):
        baseline_bases(model, task, "resid.0", names=["pca"])


def test_greedy_search_matches_sequential_reference(models):
    model = models["gpt_neox"]
    task = tiny_task(model)
    site = "resid.0"
    width = model.config.hidden_size
    sae = random_untied(width, d_dict=16, site=site, seed=5)
    thresholds = [1e-4, 1e-2]
    fast = greedy_search(model, task, site, {"sae": sae}, thresholds, seed=1, rows_per_trace=64)
    slow = greedy_search(model, task, site, {"sae": sae}, thresholds, seed=1, rows_per_trace=1)
    assert fast["sae"].kept == slow["sae"].kept
    assert fast["sae"].features == slow["sae"].features
    assert fast["sae"].kl == pytest.approx(slow["sae"].kl, abs=1e-6)
    curve = fast["sae"]
    assert curve.thresholds == thresholds
    # a larger threshold never keeps more features than there are candidates
    assert all(0 <= kept <= curve.candidates for kept in curve.kept)
    # a tiny threshold keeps more than a large one here (removals cost more than 1e-4)
    assert curve.kept[0] >= curve.kept[1]
