"""sparsify files, written by sparsify's own `save_to_disk`, read with sparsify's numbers."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from sae_circuits.dictionary import Dictionary, DictionaryConfig
from sae_circuits.errors import UserInputError
from sae_circuits.formats import sparsify as reader
from sae_circuits.sites import Site

try:
    import sparsify
except ImportError:
    sparsify = None
needs_sparsify = pytest.mark.skipif(
    sparsify is None, reason="eai-sparsify (the interop extra) is not installed"
)

D_IN, N_LATENTS, K = 16, 48, 6


def _coder(seed: int = 0, **cfg):
    """A sparsify coder with every parameter random (biases too, so that latents fire)."""
    torch.manual_seed(seed)
    config = sparsify.SparseCoderConfig(num_latents=N_LATENTS, k=K, **cfg)
    coder = sparsify.SparseCoder(D_IN, config)
    with torch.no_grad():
        for parameter in coder.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    return coder


def _their_numbers(coder, x):
    """(dense features, reconstruction) as sparsify computes them."""
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        features = torch.zeros(len(x), coder.num_latents).scatter(-1, top_indices, top_acts)
        return features, coder(x).sae_out


def _our_numbers(dictionary, x):
    with torch.no_grad():
        x_hat, features = dictionary(x)
        return features, x_hat


VARIANTS = {
    "topk": ({}, "topk"),
    "groupmax": ({"activation": "groupmax"}, "groupmax"),
    "transcoder": ({"transcode": True}, "transcoder"),
    "skip transcoder": ({"transcode": True, "skip_connection": True}, "transcoder"),
    "autoencoder with skip": ({"skip_connection": True}, "transcoder"),
}


@needs_sparsify
@pytest.mark.parametrize("variant", VARIANTS)
def test_reads_every_variant_with_sparsify_numbers(tmp_path, variant):
    cfg, kind = VARIANTS[variant]
    coder = _coder(**cfg)
    folder = tmp_path / "layers.1.mlp"
    coder.save_to_disk(folder)
    assert reader.detect(folder)
    dictionary = reader.read(folder)
    assert dictionary.kind == kind
    assert (dictionary.d_in, dictionary.d_dict, dictionary.config.k) == (D_IN, N_LATENTS, K)

    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))
    theirs, ours = _their_numbers(coder, x), _our_numbers(dictionary, x)
    assert (theirs[0] > 0).any(), "no latent fired: the comparison would prove nothing"
    for their, our in zip(theirs, ours, strict=True):
        assert (our - their).abs().max().item() <= 1e-5


@needs_sparsify
def test_sites_come_from_the_hookpoint_folder(tmp_path):
    _coder().save_to_disk(tmp_path / "layers.2")
    assert reader.read(tmp_path / "layers.2").config.site == Site("resid", 2)
    _coder(transcode=True).save_to_disk(tmp_path / "transcoder" / "layers.3.mlp")
    config = reader.read(tmp_path / "transcoder" / "layers.3.mlp").config
    assert (config.in_site, config.out_site) == (Site("mlp_in", 3), Site("mlp", 3))


@needs_sparsify
def test_unknown_hookpoint_keeps_an_autoencoder_loadable_and_takes_a_site(tmp_path):
    folder = tmp_path / "some.module"
    _coder().save_to_disk(folder)
    assert reader.read(folder).config.site is None
    assert reader.read(folder, Site.parse("resid.1")).config.site == Site("resid", 1)


@needs_sparsify
def test_transcoder_at_a_module_of_unknown_input_is_refused(tmp_path):
    folder = tmp_path / "some.module"
    _coder(transcode=True).save_to_disk(folder)
    with pytest.raises(UserInputError, match="reads the input of its hookpoint"):
        reader.read(folder)


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


@needs_sparsify
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"activation": "relu"}, "activation='relu' is not supported"),
        ({"signed": True}, "signed=True is not supported"),
        ({"jumprelu": False}, "option jumprelu not supported"),
        ({"activation": "groupmax", "transcode": True}, "groupmax with transcode"),
        ({"k": 0}, "k must be a positive integer"),
        ({"num_latents": 40}, r"encoder.weight has shape \[48, 16\], expected \[d_sae, d_in\]"),
        ({"skip_connection": True}, "lacks W_skip"),
    ],
)
def test_options_it_does_not_implement_are_refused_by_name(tmp_path, changes, message):
    folder = tmp_path / "layers.1"
    _coder().save_to_disk(folder)
    _edit_cfg(folder, **changes)
    with pytest.raises(UserInputError, match=message):
        reader.read(folder)


@needs_sparsify
def test_groupmax_needs_k_dividing_the_latents(tmp_path):
    folder = tmp_path / "layers.1"
    _coder(activation="groupmax").save_to_disk(folder)
    _edit_cfg(folder, k=5)
    with pytest.raises(UserInputError, match="k >= 1 dividing its 48 latents"):
        reader.read(folder)


@needs_sparsify
def test_a_transcoder_spliced_at_its_hookpoint_has_sparsifys_features(models, prompts):
    from sae_circuits import attach, detach, spliced
    from sae_circuits.sites import read_site

    model = models["gpt_neox"]
    detach(model)
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(
        model.config.hidden_size, sparsify.SparseCoderConfig(num_latents=32, k=4, transcode=True)
    )
    with torch.no_grad():
        for parameter in coder.parameters():
            parameter.copy_(torch.randn_like(parameter))
    with model.trace(prompts):
        mlp_input = read_site(model, "mlp_in.1").save()
    with tempfile.TemporaryDirectory() as tmp:
        coder.save_to_disk(Path(tmp) / "layers.1.mlp")
        attach(model, {"mlp.1": reader.read(Path(tmp) / "layers.1.mlp")})
    try:
        with model.trace(prompts):
            features = spliced(model, "mlp.1").features.output.save()
    finally:
        detach(model)
    theirs, _ = _their_numbers(coder, mlp_input.reshape(-1, mlp_input.shape[-1]))
    assert (theirs > 0).any()
    assert (features.reshape(theirs.shape) - theirs).abs().max().item() <= 1e-5


@needs_sparsify
def test_a_skip_connection_without_transcode_is_an_older_skip_transcoder(tmp_path):
    coder = _coder(skip_connection=True)
    folder = tmp_path / "layers.2.mlp"
    coder.save_to_disk(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["transcode"], cfg["activation"]
    (folder / "cfg.json").write_text(json.dumps({**cfg, "signed": False}))
    dictionary = reader.read(folder)
    assert (dictionary.config.in_site, dictionary.config.out_site) == (
        Site("mlp_in", 2),
        Site("mlp", 2),
    )
    coder = sparsify.SparseCoder.load_from_disk(folder)
    x = torch.randn(32, D_IN)
    for their, our in zip(_their_numbers(coder, x), _our_numbers(dictionary, x), strict=True):
        assert (our - their).abs().max().item() <= 1e-5


def test_groupmax_keeps_the_largest_relu_pre_activation_of_each_group():
    config = DictionaryConfig(kind="groupmax", d_in=D_IN, d_dict=12, k=3)
    dictionary = Dictionary.from_config(config)
    with torch.no_grad():
        dictionary.b_enc.normal_()
    x = torch.randn(5, D_IN)
    pre = torch.relu((x - dictionary.b_dec) @ dictionary.W_enc + dictionary.b_enc)
    expected = torch.zeros_like(pre)
    for group in range(3):
        block = slice(4 * group, 4 * group + 4)
        values, indices = pre[:, block].max(dim=1)
        expected[torch.arange(5), 4 * group + indices] = values
    with torch.no_grad():
        torch.testing.assert_close(dictionary.encode(x), expected, rtol=0, atol=0)
