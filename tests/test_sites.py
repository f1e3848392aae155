import pytest

from sae_circuits import Site, UserInputError, read_site, valid_sites, write_site
from sae_circuits.sites import architecture_of


@pytest.mark.parametrize(
    "text",
    ["embed", "resid.0", "attn.3", "mlp.12", "mlp_in.1", "mlp_hidden.2", "module:a.b.3.c"],
)
def test_parse_round_trip(text):
    assert str(Site.parse(text)) == text
    assert Site.parse(Site.parse(text)) == Site.parse(text)


@pytest.mark.parametrize("text", ["resid", "foo.1", "resid.x", "module:", "module:a..b", "embed.2"])
def test_parse_rejects_with_valid_forms(text):
    with pytest.raises(UserInputError, match="valid forms|bad module path"):
        Site.parse(text)


def test_forward_order():
    names = ["resid.1", "mlp.0", "embed", "attn.1", "mlp_in.0", "resid.0", "mlp_hidden.0"]
    ordered = sorted((Site.parse(n) for n in names), key=lambda s: s.order)
    assert [str(s) for s in ordered] == [
        "embed",
        "mlp_in.0",
        "mlp_hidden.0",
        "mlp.0",
        "resid.0",
        "attn.1",
        "resid.1",
    ]


EXPECTED_PATHS = {
    "gpt_neox": {
        "embed": ("gpt_neox.embed_in", "output"),
        "resid.1": ("gpt_neox.layers.1", "output"),
        "attn.0": ("gpt_neox.layers.0.attention", "output"),
        "mlp.1": ("gpt_neox.layers.1.mlp", "output"),
        "mlp_hidden.1": ("gpt_neox.layers.1.mlp.act", "output"),
    },
    "gpt2": {
        "embed": ("transformer.drop", "output"),
        "resid.1": ("transformer.h.1", "output"),
        "attn.0": ("transformer.h.0.attn", "output"),
        "mlp_hidden.1": ("transformer.h.1.mlp.act", "output"),
    },
    "llama": {
        "embed": ("model.embed_tokens", "output"),
        "resid.0": ("model.layers.0", "output"),
        "attn.1": ("model.layers.1.self_attn", "output"),
        "mlp_hidden.0": ("model.layers.0.mlp.down_proj", "input"),
    },
}


def test_resolve_per_architecture(model, arch):
    for site, expected in EXPECTED_PATHS[arch].items():
        assert Site.parse(site).resolve(model) == expected


def test_out_of_range_layer_lists_valid_range(model):
    with pytest.raises(UserInputError, match=r"layers 0\.\.1"):
        Site.parse("resid.2").resolve(model)


def test_unknown_module_path(model):
    with pytest.raises(UserInputError, match="no module"):
        Site.parse("module:does.not.exist").resolve(model)


def test_unsupported_architecture_suggests_module_paths():
    class Fake:
        class config:
            model_type = "bert"

    with pytest.raises(UserInputError, match="module:"):
        architecture_of(Fake())


def test_qwen2_counts_as_llama_family(model_dirs):
    from sae_circuits import load_model

    assert architecture_of(load_model(model_dirs["qwen2"])).name == "llama"


def test_read_and_write_every_site(model, prompts):
    """Writing a site's value back unchanged keeps the logits; zeroing it changes them."""
    with model.trace(prompts):
        base = model.output.logits.save()
    for site in valid_sites(model) + ["module:" + Site.parse("resid.0").resolve(model)[0]]:
        with model.trace(prompts):
            value = read_site(model, site)
            write_site(model, site, value * 1.0)
            same = model.output.logits.save()
        with model.trace(prompts):
            value = read_site(model, site)
            write_site(model, site, value * 0.0)
            zeroed = model.output.logits.save()
        assert (same - base).abs().max() < 1e-5, site
        assert (zeroed - base).abs().max() > 1e-4, site
