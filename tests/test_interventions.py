"""Patching, ablation and pinning checked against plain-torch computations on the same tensors.

References run the Hugging Face model one prompt at a time (unpadded) with a forward hook that
rewrites the site's activation by the formula under test, using the dictionary's own tensors.
"""

import json

import pytest
import torch
from conftest import random_untied

from sae_circuits import LinearBasis, UserInputError, attach, attached, detach
from sae_circuits.cli import main
from sae_circuits.dictionary import CONFIG_FILE
from sae_circuits.interventions import ablate, generate_pinned, patch, pin, run
from sae_circuits.models import EMBEDDED_MODEL_NAME, embedded_model_path
from sae_circuits.patching_curves import compare_bases, patching_curve, rank_features
from sae_circuits.resources import asset_dir
from sae_circuits.sites import Site, torch_module
from sae_circuits.tasks import Task

torch.set_num_threads(2)

# Clean/corrupted pairs whose answers (" Mary", " John") are single tokens for the tiny tokenizer;
# lengths differ between pairs so that batches are padded.
PAIRS = [
    ("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
    ("When John and Mary went to the store, Mary gave a drink to", " John", " Mary"),
    ("Then Mary and John sat down, and John gave the keys to", " Mary", " John"),
    ("John and Mary: Mary wrote to", " John", " Mary"),
]


def swap_last_name(text, answer):
    """The corruption: the last name mention becomes the answer (same token count here)."""
    head, _, tail = text.rpartition(" John" if answer == " Mary" else " Mary")
    return head + answer + tail


def tiny_task(model):
    pairs = [
        {"clean": c, "corrupt": swap_last_name(c, a), "answer": a, "distractor": d}
        for c, a, d in PAIRS
    ]
    return Task.from_pairs("tiny", model, pairs)


@pytest.fixture
def task(model):
    return tiny_task(model)


def site_hooked_logits(model, site, prompt, rewrite=None):
    """Plain torch, one unpadded prompt: (last-position logits, site activation before rewrite)."""
    path, io = Site.parse(site).resolve(model)
    module = torch_module(model).get_submodule(path)
    seen = {}

    def apply(x):
        seen["x"] = x
        return rewrite(x) if rewrite is not None else x

    def hook(mod, args, output):
        if isinstance(output, tuple):
            return (apply(output[0]), *output[1:])
        return apply(output)

    handle = module.register_forward_hook(hook)
    try:
        ids = model.tokenizer([prompt], return_tensors="pt")
        logits = torch_module(model)(**ids).logits[0, -1]  # frozen weights: no graph unless asked
    finally:
        handle.remove()
    return logits, seen["x"]


def select(shape, features, positions):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[..., slice(None) if positions == "all" else slice(-1, None), features] = True
    return mask


@pytest.mark.parametrize("positions", ["all", "last"])
def test_patch_formula_matches_plain_torch(model, task, positions):
    site, features = "resid.0", [1, 5, 9, 30]
    dictionary = random_untied(model.config.hidden_size, site=site)
    attach(model, {site: dictionary})
    result = patch(model, task, {site: features}, positions=positions, batch_size=3)
    directions = dictionary.decoder_directions
    for row in range(len(task)):
        _, x_clean = site_hooked_logits(model, site, task.clean[row])
        c = dictionary.encode(x_clean)

        def formula(x_bar, c=c):
            delta = (c - dictionary.encode(x_bar)) * select(c.shape, features, positions)
            return x_bar + delta @ directions  # x' = x̄ + Σ_{i∈F} (c_i − c̄_i) d_i

        expected, _ = site_hooked_logits(model, site, task.corrupt[row], formula)
        torch.testing.assert_close(result.logits[row], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.metric, task.metric(result.logits))


def test_patch_with_baseline_basis(model, task):
    """Patching every direction of an exact basis at every position of the last residual stream
    restores the clean run; a basis passed as `dictionaries` replaces the attached SAE for the call
    only."""
    site, width = f"resid.{model.config.num_hidden_layers - 1}", model.config.hidden_size
    sae = random_untied(width, site=site)
    attach(model, {site: sae})
    clean = run(model, task)
    basis = LinearBasis.random(width, seed=3, site=site)
    full = patch(model, task, {site: range(width)}, dictionaries={site: basis})
    torch.testing.assert_close(full.logits, clean.logits, atol=1e-4, rtol=1e-4)
    assert attached(model)[site] is sae
    some = patch(model, task, {site: [0, 2]}, dictionaries={site: basis})
    for row in (0, 3):
        _, x_clean = site_hooked_logits(model, site, task.clean[row])
        projection = basis.components[[0, 2]]

        def formula(x_bar, x_clean=x_clean, projection=projection):
            return x_bar + (x_clean - x_bar) @ projection.T @ projection

        expected, _ = site_hooked_logits(model, site, task.corrupt[row], formula)
        torch.testing.assert_close(some.logits[row], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_ablations_match_plain_torch(model, task, mode):
    site, features = "mlp.0", [0, 3, 7]
    dictionary = random_untied(model.config.hidden_size, site=site, seed=2)
    attach(model, {site: dictionary})
    # every clean prompt's only same-length reference is its corrupted pair: resampling is fixed
    result = ablate(model, task, {site: features}, mode=mode, reference=task.corrupt, batch_size=3)
    encoded = [dictionary.encode(site_hooked_logits(model, site, p)[1])[0] for p in task.corrupt]
    mean = torch.cat(encoded).mean(0)
    for row in range(len(task)):

        def ablated(x, row=row):
            f = dictionary.encode(x)
            if mode == "zero":
                value = torch.zeros_like(f)
            elif mode == "mean":
                value = mean.expand_as(f)
            else:
                value = encoded[row].unsqueeze(0)
            g = torch.where(select(f.shape, features, "all"), value, f)
            return x + dictionary.decode(g) - dictionary.decode(f)

        expected, _ = site_hooked_logits(model, site, task.clean[row], ablated)
        torch.testing.assert_close(result.logits[row], expected, atol=1e-4, rtol=1e-4)


def test_pin_matches_plain_torch(model, task):
    site, pins = "resid.1", {4: 3.0, 11: 0.0}
    dictionary = random_untied(model.config.hidden_size, site=site, seed=4)
    attach(model, {site: dictionary})
    result = pin(model, task.clean, {site: pins}, positions="last")
    assert result.metric is None
    for row, prompt in enumerate(task.clean):

        def pinned(x):
            g = dictionary.encode(x).clone()
            for feature, value in pins.items():
                g[:, -1, feature] = value
            return x + dictionary.decode(g) - dictionary.decode(dictionary.encode(x))

        expected, _ = site_hooked_logits(model, site, prompt, pinned)
        torch.testing.assert_close(result.logits[row], expected, atol=1e-4, rtol=1e-4)


def test_pinned_generation_matches_hf_generate(model):
    site, pins, prompt = "resid.0", {2: 8.0, 6: 8.0}, "When Mary and John went to the"
    dictionary = random_untied(model.config.hidden_size, site=site, seed=6)
    attach(model, {site: dictionary})
    tokens = generate_pinned(model, [prompt], {site: pins}, max_new_tokens=4, do_sample=False)
    plain = generate_pinned(model, [prompt], {site: {}}, max_new_tokens=4, do_sample=False)
    path, _ = Site.parse(site).resolve(model)
    module = torch_module(model).get_submodule(path)

    def hook(mod, args, output):
        x = output[0] if isinstance(output, tuple) else output
        f = dictionary.encode(x)
        g = f.clone()
        for feature, value in pins.items():
            g[..., feature] = value
        x = x + dictionary.decode(g) - dictionary.decode(f)  # at every step, every new position
        return (x, *output[1:]) if isinstance(output, tuple) else x

    handle = module.register_forward_hook(hook)
    try:
        ids = model.tokenizer([prompt], return_tensors="pt")
        expected = torch_module(model).generate(**ids, max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert tokens.shape == expected.shape and tokens.shape[1] > ids["input_ids"].shape[1]
    assert torch.equal(tokens, expected)
    assert not torch.equal(tokens, plain)  # the pin changed the continuation


def test_rankings_match_plain_torch(model, task):
    site = "resid.0"
    dictionary = random_untied(model.config.hidden_size, site=site, seed=8)
    attach(model, {site: dictionary})
    attribution = rank_features(model, task, site, "attribution", batch_size=3)
    difference = rank_features(model, task, site, "difference", batch_size=3)
    total, abs_diff = 0, 0
    for row in range(len(task)):
        c = dictionary.encode(site_hooked_logits(model, site, task.clean[row])[1])
        x_bar = site_hooked_logits(model, site, task.corrupt[row])[1]
        c_bar = dictionary.encode(x_bar).detach().requires_grad_(True)
        error = x_bar - dictionary.decode(c_bar).detach()
        logits, _ = site_hooked_logits(
            model,
            site,
            task.corrupt[row],
            lambda x, c_bar=c_bar, error=error: dictionary.decode(c_bar) + error,
        )
        task.subset([row]).metric(logits.unsqueeze(0)).sum().backward()
        total = total + ((c - c_bar) * c_bar.grad).sum((0, 1))
        abs_diff = abs_diff + (c - c_bar).abs().sum((0, 1))
    torch.testing.assert_close(attribution, total.abs().detach() / len(task), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(difference, abs_diff.detach() / len(task), atol=1e-4, rtol=1e-4)


def test_patching_curves(models):
    model = models["gpt_neox"]
    task = tiny_task(model)
    site, width, K = "resid.0", model.config.hidden_size, 4
    sae = random_untied(width, site=site)
    curves = compare_bases(model, task, task, site, sae, max_features=K)
    assert list(curves) == ["sae", "pca_task", "pca_corpus", "neurons", "random"]
    assert attached(model) == {}
    for curve in curves.values():
        assert len(curve.restored) == len(curve.kl) == len(curve.features) == K
        assert curve.clean_metric != curve.corrupt_metric
    # every direction of the neuron basis, at every position, is the clean activation
    full = patching_curve(
        model, task, task, site, LinearBasis.neurons(width), max_features=width, rows_per_trace=128
    )
    assert full.restored[-1] == pytest.approx(1.0, abs=1e-4)
    assert full.kl[-1] == pytest.approx(0.0, abs=1e-6)
    # stacking several k as invokes of one trace gives the numbers of one k per trace
    single = patching_curve(
        model, task, task, site, LinearBasis.neurons(width), max_features=3, rows_per_trace=1
    )
    assert single.restored == pytest.approx(full.restored[:3], abs=1e-5)
    assert full.k_to_restore(0.999) is not None and full.k_to_restore(2.0) is None


def test_bad_interventions(models):
    model = models["gpt_neox"]
    task = tiny_task(model)
    with pytest.raises(UserInputError, match="no dictionary is attached"):
        patch(model, task, {"resid.0": [1]})
    attach(model, {"resid.0": random_untied(model.config.hidden_size, site="resid.0")})
    try:
        with pytest.raises(UserInputError, match="must lie in"):
            patch(model, task, {"resid.0": [64]})
        with pytest.raises(UserInputError, match="mode"):
            ablate(model, task, {"resid.0": [1]}, mode="median")
        with pytest.raises(UserInputError, match="positions"):
            pin(model, task, {"resid.0": {1: 1.0}}, positions="first")
        with pytest.raises(UserInputError, match="token length"):
            ablate(model, task, {"resid.0": [1]}, mode="resample", reference=["a"])
        with pytest.raises(UserInputError, match="token length"):
            patch(model, (task.clean[:1], ["a b"]), {"resid.0": [1]})
    finally:
        detach(model)


# --------------------------------------------------------------- the command on the embedded model
def test_ioi_cli_json_on_embedded_model(capsys):
    """Needs the embedded model and its shipped `main` dictionaries (models/, dictionaries/)."""
    assert (embedded_model_path() / "config.json").is_file(), "embedded model missing"
    main_set = asset_dir("dictionaries") / EMBEDDED_MODEL_NAME / "main" / "resid.2"
    assert (main_set / CONFIG_FILE).is_file(), f"shipped dictionary missing at {main_set}"
    argv = ["ioi", "--site", "resid.2", "--max-features", "3", "--n-prompts", "16", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["clean_metric"] > result["corrupt_metric"]
    assert list(result["sites"]) == ["resid.2"]
    curves = result["sites"]["resid.2"]
    assert sorted(curves) == ["neurons", "pca_corpus", "pca_task", "random", "sae"]
    for curve in curves.values():
        assert curve["ks"] == [1, 2, 3] and len(curve["restored"]) == len(curve["kl"]) == 3
        assert curve["ceiling"] >= curve["restored"][-1] - 1.0  # a number, the share at K=all
    assert curves["neurons"]["ceiling"] == pytest.approx(1.0, abs=1e-3)
    assert curves["neurons"]["error_restored"] == pytest.approx(0.0, abs=1e-3)
    argv = ["ioi", "--site", "resid.2", "--search", "greedy", "--greedy-prompts", "8"]
    argv += ["--baseline", "pca_corpus", "--threshold", "0.05", "--json"]
    assert main(argv) == 0
    greedy = json.loads(capsys.readouterr().out)["sites"]["resid.2"]
    assert sorted(greedy) == ["pca_corpus", "sae"]
    assert greedy["sae"]["thresholds"] == [0.05]
    assert 0 <= greedy["sae"]["kept"][0] <= greedy["sae"]["candidates"]
    assert main(["ioi", "--site", "resid.9", "--json"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
