"""circuit-tracer transcoder sets and Gemma Scope `params.npz`, written and computed by circuit-tracer
(scripts/make_circuit_tracer_fixtures.py), read with its numbers, stored beside them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from sae_circuits.errors import UserInputError
from sae_circuits.formats import circuit_tracer, detect_format, gemma_scope, read_dictionary
from sae_circuits.sites import Site

FIXTURES = Path(__file__).parent / "fixtures"
SETS = FIXTURES / "circuit_tracer"


def _assert_same_numbers(dictionary, expected, suffix=""):
    x = expected[f"x{suffix}"]
    with torch.no_grad():
        features = dictionary.encode(x)
        x_hat = dictionary.decode(features) + dictionary.skip_term(x)
    assert (expected[f"features{suffix}"] > 0).any()
    assert (features - expected[f"features{suffix}"]).abs().max().item() <= 1e-5
    assert (x_hat - expected[f"x_hat{suffix}"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("variant", "kind", "skip"),
    [("relu_skip", "transcoder", True), ("jumprelu", "jumprelu_transcoder", False)],
)
def test_reads_every_layer_with_circuit_tracers_numbers(variant, kind, skip):
    folder = SETS / variant
    assert detect_format(folder).name == "circuit_tracer"
    transcoders = circuit_tracer.read_transcoder_set(folder)
    assert list(transcoders.text_keys()) == ["mlp.0", "mlp.1"]
    expected = load_file(str(folder / "expected.safetensors"))
    for layer, transcoder in enumerate(transcoders.values()):
        assert (transcoder.kind, transcoder.config.skip) == (kind, skip)
        assert transcoder.config.in_site == Site("mlp_in", layer)
        assert transcoder.config.model == "meta-llama/Llama-3.2-1B"
        _assert_same_numbers(transcoder, expected, f".{layer}")


def test_read_picks_the_layer_of_the_site():
    transcoder = read_dictionary(SETS / "relu_skip", site="mlp.1")
    assert transcoder.config.hyperparameters["layer"] == 1
    with pytest.raises(UserInputError, match="holds transcoders for layers 0, 1"):
        read_dictionary(SETS / "relu_skip")
    with pytest.raises(UserInputError, match="no transcoder for the layer of site mlp.5"):
        read_dictionary(SETS / "relu_skip", site="mlp.5")


def _copy_set(tmp_path: Path, **config_changes) -> Path:
    folder = tmp_path / "set"
    shutil.copytree(SETS / "jumprelu", folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config.update(config_changes)
    (folder / "config.yaml").write_text(yaml.dump(config))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_kind": "cross_layer_transcoder"}, "model_kind='cross_layer_transcoder' is not"),
        ({"transcoders": ["hf://a/b/layer_0.safetensors"]}, r"files to download \(transcoders\)"),
        ({"normalize": True}, "option normalize not supported"),
        ({"feature_input_hook": "hook_resid_mid"}, "what the transcoders read is unknown"),
    ],
)
def test_options_it_does_not_implement_are_refused_by_name(tmp_path, changes, message):
    with pytest.raises(UserInputError, match=message):
        circuit_tracer.read(_copy_set(tmp_path, **changes), Site.parse("mlp.0"))


def test_an_unknown_output_hook_takes_a_site(tmp_path):
    folder = _copy_set(tmp_path, feature_output_hook="hook_something")
    with pytest.raises(UserInputError, match="--site"):
        circuit_tracer.read_transcoder_set(folder)
    assert circuit_tracer.read(folder, Site.parse("resid.0")).config.out_site == Site("resid", 0)


# ----------------------------------------------------------------------------------- Gemma Scope
def _gemma_scope_folder(tmp_path: Path, *parts: str) -> Path:
    folder = tmp_path.joinpath(*parts)
    folder.mkdir(parents=True)
    shutil.copy(FIXTURES / "gemma_scope" / "params.npz", folder / "params.npz")
    return folder


@pytest.mark.parametrize(
    ("release", "kind", "in_site", "out_site"),
    [
        ("gemma-scope-2b-pt-res", "jumprelu", "resid.3", "resid.3"),
        ("gemma-scope-2b-pt-mlp-canonical", "jumprelu", None, None),
        ("gemma-scope-2b-pt-transcoders", "jumprelu_transcoder", "mlp_in.3", None),
    ],
)
def test_gemma_scope_with_circuit_tracers_numbers_and_the_paths_site(
    tmp_path, release, kind, in_site, out_site
):
    post_norm = "module:model.layers.3.post_feedforward_layernorm"
    in_site, out_site = in_site or post_norm, out_site or post_norm
    folder = _gemma_scope_folder(tmp_path, release, "layer_3", "width_16k", "average_l0_5")
    assert detect_format(folder).name == "gemma_scope"
    dictionary = gemma_scope.read(folder)
    assert dictionary.kind == kind
    assert (str(dictionary.config.in_site), str(dictionary.config.out_site)) == (in_site, out_site)
    _assert_same_numbers(
        dictionary, load_file(str(FIXTURES / "gemma_scope" / "expected.safetensors"))
    )


def test_gemma_scope_without_a_release_in_the_path_is_an_sae_of_unknown_site(tmp_path):
    folder = _gemma_scope_folder(tmp_path, "downloads", "layer_3")
    assert gemma_scope.read(folder).config.site is None
    assert gemma_scope.read(folder, Site.parse("resid.3")).config.site == Site("resid", 3)


def test_gemma_scope_refuses_what_it_does_not_implement(tmp_path):
    folder = _gemma_scope_folder(tmp_path, "gemma-scope-2b-pt-res", "layer_0")
    arrays = dict(np.load(folder / "params.npz"))
    np.savez(folder / "params.npz", **{**arrays, "threshold": -arrays["threshold"]})
    with pytest.raises(UserInputError, match="negative JumpReLU thresholds"):
        gemma_scope.read(folder)
    np.savez(folder / "params.npz", **arrays, log_scale=np.ones(2, np.float32))
    with pytest.raises(UserInputError, match="log_scale are not supported"):
        gemma_scope.read(folder)
    np.savez(folder / "params.npz", **{**arrays, "W_enc": arrays["W_enc"][0]})
    with pytest.raises(UserInputError, match=r"W_enc has shape \[32\], expected a matrix"):
        gemma_scope.read(folder)


def test_gemma_scope_attention_saes_load_without_a_site_only(tmp_path):
    folder = _gemma_scope_folder(tmp_path, "gemma-scope-2b-pt-att", "layer_3")
    assert gemma_scope.read(folder).config.site is None
    with pytest.raises(UserInputError, match="reads hook_z"):
        gemma_scope.read(folder, Site.parse("attn.3"))
