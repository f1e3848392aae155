import pytest
import torch
from conftest import random_untied

from sae_circuits import (
    Dictionary,
    DictionaryConfig,
    Site,
    UserInputError,
    attach,
    attached,
    detach,
    spliced,
    temporarily_attached,
    valid_sites,
)
from sae_circuits.sites import SiteMap, torch_module
from sae_circuits.splice import Location, SplicedDictionary


def site_width(model, site):
    hidden = model.config.hidden_size
    if Site.parse(site).kind == "mlp_hidden":
        return getattr(model.config, "intermediate_size", None) or 4 * hidden
    return hidden


def dictionaries_for(model, sites):
    return {s: random_untied(site_width(model, s), site=s, seed=i) for i, s in enumerate(sites)}


def logits(model, prompts):
    with model.trace(prompts):
        out = model.output.logits.save()
    return out


def test_exact_with_every_site_spliced(model, prompts):
    base = logits(model, prompts)
    attach(model, dictionaries_for(model, valid_sites(model)))
    assert list(attached(model)) == [Site.parse(site) for site in valid_sites(model)]
    torch.testing.assert_close(logits(model, prompts), base, atol=1e-5, rtol=0)
    detach(model)
    torch.testing.assert_close(logits(model, prompts), base, atol=0, rtol=0)


def plain_torch_splice(model, site, dictionary, prompts, edit=None):
    """Reference: the same splice with a plain torch forward hook on the Hugging Face model."""
    path, io = Site.parse(site).resolve(model)
    module = torch_module(model).get_submodule(path)
    captured = {}

    def replace(x):
        f = dictionary.encode(x).detach().requires_grad_(True)
        captured["f"] = f
        error = x - dictionary.decode(f).detach()
        g = edit(f) if edit else f
        return dictionary.decode(g) + error

    if io == "output":

        def hook(mod, args, output):
            if isinstance(output, tuple):
                return (replace(output[0]), *output[1:])
            return replace(output)

        handle = module.register_forward_hook(hook)
    else:

        def hook(mod, args):
            return (replace(args[0]), *args[1:])

        handle = module.register_forward_pre_hook(hook)
    try:
        batch = model.tokenizer(prompts, return_tensors="pt", padding=True)
        out = torch_module(model)(**batch).logits
    finally:
        handle.remove()
    return out, captured["f"]


@pytest.mark.parametrize("site", ["resid.0", "attn.1", "mlp_hidden.0", "embed"])
def test_feature_gradient_matches_plain_torch(model, prompts, site):
    dictionary = random_untied(site_width(model, site), site=site)
    attach(model, {site: dictionary})
    with model.trace(prompts):
        features = spliced(model, site).features.output
        out = model.output.logits
        metric = (out[:, -1, 5] - out[:, -1, 7]).sum()
        with metric.backward():
            grad = features.grad.save()
    assert grad.abs().sum() > 0
    for row, prompt in enumerate(prompts):  # unpadded, one prompt at a time
        ref_logits, f = plain_torch_splice(model, site, dictionary, [prompt])
        (ref_logits[:, -1, 5] - ref_logits[:, -1, 7]).sum().backward()
        n = f.shape[1]
        torch.testing.assert_close(grad[row, -n:], f.grad[0], atol=1e-5, rtol=1e-4)


def test_setting_a_feature_adds_its_decoder_direction(model, prompts):
    site, k, value = "resid.0", 3, 2.5
    dictionary = random_untied(model.config.hidden_size, site=site)
    attach(model, {site: dictionary})
    with model.trace(prompts):
        spliced(model, site).features.output[:, :, k] = value
        edited = model.output.logits.save()

    def edit(f):
        g = f.clone()
        g[:, :, k] = value
        return g

    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            reference, _ = plain_torch_splice(model, site, dictionary, [prompt], edit)
        n = reference.shape[1]
        torch.testing.assert_close(edited[row, -n:], reference[0], atol=1e-5, rtol=0)


def test_gradient_through_spliced_site_is_identity(model, prompts):
    """d(out)/dx through a splice equals the unspliced model's: upstream attribution is exact."""
    up, down = "resid.0", "resid.1"
    d_up = random_untied(model.config.hidden_size, site=up)
    attach(model, {up: d_up})
    with model.trace(prompts):
        f = spliced(model, up).features.output
        metric = model.output.logits[:, -1, 4].sum()
        with metric.backward():
            alone = f.grad.save()
    attach(model, {down: random_untied(model.config.hidden_size, site=down, seed=5)})
    with model.trace(prompts):
        f = spliced(model, up).features.output
        metric = model.output.logits[:, -1, 4].sum()
        with metric.backward():
            both = f.grad.save()
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-4)


def test_transcoder_reads_mlp_input(model, prompts):
    hidden = model.config.hidden_size
    base = logits(model, prompts)
    transcoder = Dictionary.from_config(
        DictionaryConfig(
            kind="transcoder", d_in=hidden, d_dict=32, in_site="mlp_in.1", out_site="mlp.1"
        )
    )
    attach(model, {"mlp.1": transcoder})
    torch.testing.assert_close(logits(model, prompts), base, atol=1e-5, rtol=0)
    with model.trace(prompts):
        spliced(model, "mlp.1").error.output[:] = 0
        replaced = model.output.logits.save()
    assert (replaced - base).abs().max() > 1e-4


def test_temporarily_attached_restores_previous(model, prompts):
    first = random_untied(model.config.hidden_size, site="resid.0")
    second = random_untied(model.config.hidden_size, site="resid.0", seed=9)
    attach(model, {"resid.0": first})
    with temporarily_attached(model, {"resid.0": second, "resid.1": second}):
        assert attached(model)["resid.0"] is second
    assert attached(model) == {Site.parse("resid.0"): first}


def test_bad_attachments(model):
    with pytest.raises(UserInputError, match="width"):
        attach(model, {"resid.0": random_untied(7)})
    with pytest.raises(UserInputError, match="out of range"):
        attach(model, {"resid.9": random_untied(model.config.hidden_size)})
    with pytest.raises(UserInputError, match="no dictionary is attached"):
        detach(model, ["resid.0"])
    with pytest.raises(UserInputError, match="no dictionary is attached"):
        spliced(model, "resid.1")


def test_spliced_dictionary_keeps_its_site_and_location(model):
    """A dictionary trained at resid.1 attached at resid.0 reads and writes resid.0; the splice
    keeps the resolved location; `attached` and `detach` give SiteMaps."""
    site = Site.parse("resid.0")
    dictionary = random_untied(model.config.hidden_size, site="resid.1")
    attach(model, {site: dictionary})
    path, io = site.resolve(model)
    module = torch_module(model).get_submodule(f"{path}.sae")
    assert isinstance(module, SplicedDictionary) and module.dictionary is dictionary
    assert (module.site, module.reads, module.location) == (site, site, Location(path, io))
    assert isinstance(attached(model), SiteMap) and attached(model)["resid.0"] is dictionary
    removed = detach(model, ["resid.0"])
    assert isinstance(removed, SiteMap) and removed == {site: dictionary}
    assert not hasattr(torch_module(model).get_submodule(path), "sae")


def test_a_dictionary_reads_a_site_before_the_one_it_writes(model):
    hidden = model.config.hidden_size
    later = Dictionary.from_config(
        DictionaryConfig(
            kind="transcoder", d_in=hidden, d_dict=8, in_site="resid.1", out_site="mlp.1"
        )
    )
    with pytest.raises(UserInputError, match="reads resid.1, which does not come before it"):
        attach(model, {"mlp.1": later})
    assert not attached(model)
