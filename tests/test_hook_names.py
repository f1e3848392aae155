"""Other libraries' hook names and module paths, translated to our sites (and back)."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from sae_circuits.formats.hook_names import (
    hook_from_site,
    model_type_from_name,
    module_from_site,
    site_from_hook,
)
from sae_circuits.sites import ARCHITECTURES, Site
from sae_circuits.testing import random_model_config

TABLE = [
    # TransformerLens: our resid.L is the output of block L
    ("blocks.0.hook_resid_pre", None, "embed"),
    ("blocks.3.hook_resid_pre", None, "resid.2"),
    ("blocks.3.hook_resid_post", None, "resid.3"),
    ("blocks.3.hook_mlp_out", "gpt2", "mlp.3"),
    ("blocks.3.hook_attn_out", None, "attn.3"),
    ("blocks.3.mlp.hook_post", "llama", "mlp_hidden.3"),
    ("blocks.3.hook_resid_mid", "gpt2", None),  # no module outputs the mid residual
    ("blocks.3.hook_mlp_in", "gpt2", None),  # the residual before ln_2, not the MLP's input
    ("blocks.3.hook_mlp_in", "gpt_neox", "resid.2"),  # parallel block: the block's input
    ("blocks.3.attn.hook_z", "gpt_neox", None),
    ("blocks.3.ln2.hook_normalized", "gpt2", None),
    ("hook_embed", "gpt_neox", "embed"),
    ("hook_embed", "llama", "embed"),
    ("hook_embed", "gpt2", "module:transformer.wte"),  # GPT-2's embed adds positions
    ("hook_embed", None, None),
    ("hook_pos_embed", "gpt2", "module:transformer.wpe"),
    ("blocks.2.mlp.hook_pre", "gpt2", "module:transformer.h.2.mlp.c_fc"),
    ("blocks.2.mlp.hook_pre", "gpt_neox", "module:gpt_neox.layers.2.mlp.dense_h_to_4h"),
    # Hugging Face module paths, from the top or relative to the base model (sparsify)
    ("layers.3", None, "resid.3"),
    ("layers.3.mlp", None, "mlp.3"),
    ("layers.3.attention", None, None),  # GPT-NeoX and Llama both have `layers`
    ("layers.3.attention", "gpt_neox", "attn.3"),
    ("gpt_neox.layers.3", None, "resid.3"),
    ("gpt_neox.layers.3.mlp", None, "mlp.3"),
    ("gpt_neox.layers.3.attention", None, "attn.3"),
    ("gpt_neox.layers.3.mlp.act", None, "mlp_hidden.3"),
    ("h.3", None, "resid.3"),
    ("transformer.h.3", None, "resid.3"),
    ("h.3.attn", None, "attn.3"),
    ("model.layers.3", None, "resid.3"),
    ("model.layers.3.mlp", None, "mlp.3"),
    ("model.layers.3.self_attn", None, "attn.3"),
    ("model.layers.3.mlp.act_fn", None, "module:model.layers.3.mlp.act_fn"),
    ("gpt_neox.embed_in", None, "embed"),
    ("embed_in", "gpt_neox", "embed"),
    ("model.embed_tokens", None, "embed"),
    ("transformer.wte", None, "module:transformer.wte"),
    # dictionary_learning
    ("resid_post_layer_3", None, "resid.3"),
    ("attn_out_layer_4", None, "attn.4"),
    ("mlp_out_layer_1", None, "mlp.1"),
    ("embed", None, "embed"),
    ("something else", None, None),
    (None, None, None),
]


@pytest.mark.parametrize(("name", "model_type", "site"), TABLE)
def test_site_from_hook_table(name, model_type, site):
    expected = None if site is None else Site.parse(site)
    assert site_from_hook(name, model_type) == expected


@pytest.mark.parametrize(
    ("path", "model_type", "site"),
    [
        ("layers.3.mlp", None, "mlp_in.3"),
        ("gpt_neox.layers.0", "gpt_neox", "embed"),
        ("model.layers.2", None, "resid.1"),
        ("model.layers.2", "gpt_neox", None),  # not a GPT-NeoX path
        ("layers.3.attention", "gpt_neox", None),
    ],
)
def test_module_inputs(path, model_type, site):
    expected = None if site is None else Site.parse(site)
    assert site_from_hook(path, model_type, io="input") == expected


@pytest.mark.parametrize(
    ("name", "model_type"),
    [
        ("EleutherAI/pythia-70m-deduped", "gpt_neox"),
        ("neox-ioi-6l", "gpt_neox"),
        ("gpt2-small", "gpt2"),
        ("meta-llama/Llama-3.2-1B", "llama"),
        ("Qwen/Qwen2.5-0.5B", "qwen2"),
        ("gemma-2-2b", None),
        (None, None),
    ],
)
def test_model_type_from_name(name, model_type):
    assert model_type_from_name(name) == model_type


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_module_paths_name_the_modules_our_sites_resolve_to(architecture):
    """Each module path maps to a site that resolves, on a real model, to that very module (and
    `module_from_site` gives the path back); an MLP's input path to `mlp_in`."""
    model = AutoModelForCausalLM.from_config(random_model_config(architecture, 64, n_layers=3))
    spec = ARCHITECTURES[architecture]
    base = spec.layers.split(".")[0]
    paths = [spec.embed[0], f"{spec.layers}.2", f"{spec.layers}.2.{spec.attn}"]
    paths += [f"{spec.layers}.2.{spec.mlp}"]
    paths += [f"{spec.layers}.2.{spec.mlp_hidden[0]}"] if spec.mlp_hidden[1] == "output" else []
    for path in paths:
        model.get_submodule(path)  # the path exists
        for name in (path, path[len(base) + 1 :]):
            site = site_from_hook(name, architecture)
            assert site.resolve(model) == (path, "output"), name
            assert module_from_site(site, architecture) == path[len(base) + 1 :]
    mlp = f"{spec.layers}.1.{spec.mlp}"
    site = site_from_hook(mlp, architecture, io="input")
    assert site == Site("mlp_in", 1) and site.resolve(model) == (mlp, "input")


def test_hook_from_site_inverts_site_from_hook():
    for site in ("embed", "resid.2", "attn.1", "mlp.0", "mlp_hidden.3"):
        hook = hook_from_site(Site.parse(site))
        assert site_from_hook(hook, "gpt2") == Site.parse(site)
    assert hook_from_site(Site.parse("mlp_in.1")) is None
    assert hook_from_site(None) is None
