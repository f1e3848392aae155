import json

import pytest
import torch
from safetensors.torch import save_file

from sae_circuits import Dictionary, DictionaryConfig, LinearBasis, Site, UserInputError

D_IN, D_DICT = 16, 48


def make(kind, **extra):
    """A dictionary at resid.1 (a transcoder: from resid.1 to its `out_site`), random biases."""
    torch.manual_seed(0)
    sites = {"in_site": "resid.1"} if "out_site" in extra else {"site": "resid.1"}
    config = DictionaryConfig(kind=kind, d_in=D_IN, d_dict=D_DICT, **sites, **extra)
    dictionary = Dictionary.from_config(config)
    with torch.no_grad():
        for name, param in dictionary.named_parameters():
            if name.startswith("b"):
                param.normal_(0, 0.3)
    return dictionary


def test_tied_formula():
    d = make("tied")
    x = torch.randn(5, D_IN)
    f = torch.relu(x @ d.W.T + d.b)
    x_hat, features = d(x)
    torch.testing.assert_close(features, f)
    torch.testing.assert_close(x_hat, f @ d.W)


def test_untied_formula_and_unit_decoder():
    d = make("untied")
    x = torch.randn(5, D_IN)
    f = torch.relu((x - d.b_dec) @ d.W_enc + d.b_enc)
    x_hat, features = d(x)
    torch.testing.assert_close(features, f)
    torch.testing.assert_close(x_hat, f @ d.W_dec + d.b_dec)
    torch.testing.assert_close(d.W_dec.norm(dim=-1), torch.ones(D_DICT))


def test_topk_keeps_k_largest():
    d = make("topk", k=3)
    x = torch.randn(7, D_IN)
    pre = torch.relu((x - d.b_dec) @ d.W_enc + d.b_enc)
    f = d.encode(x)
    assert ((f != 0).sum(-1) <= 3).all()
    top = pre.topk(3, dim=-1)
    torch.testing.assert_close(f.gather(-1, top.indices), top.values)


def test_transcoder_maps_between_widths():
    d = make("transcoder", d_out=24, out_site="mlp.1")
    x_hat, f = d(torch.randn(4, D_IN))
    assert x_hat.shape == (4, 24) and f.shape == (4, D_DICT)


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("tied", {}),
        ("untied", {}),
        ("topk", {"k": 4}),
        ("transcoder", {"d_out": 8, "out_site": "mlp.1"}),
    ],
)
def test_save_load_round_trip(tmp_path, kind, extra):
    d = make(kind, **extra)
    d.config.metrics = {"mse": 0.5}
    d.save(tmp_path / "d")
    loaded = Dictionary.load(tmp_path / "d")
    assert type(loaded) is type(d) and loaded.config == d.config
    x = torch.randn(3, D_IN)
    torch.testing.assert_close(loaded(x)[0], d(x)[0])


def test_fp16_storage_loads_as_fp32(tmp_path):
    d = make("untied")
    d.save(tmp_path / "d", dtype=torch.float16)
    loaded = Dictionary.load(tmp_path / "d")
    assert loaded.W_dec.dtype == torch.float32
    torch.testing.assert_close(loaded.W_dec, d.W_dec, atol=1e-3, rtol=1e-3)


def test_bases():
    acts = torch.randn(200, D_IN) * torch.linspace(3, 0.1, D_IN) + 2.0
    pca = LinearBasis.pca(acts)
    eye = torch.eye(D_IN)
    torch.testing.assert_close(pca.components @ pca.components.T, eye, atol=1e-5, rtol=0)
    variances = pca.encode(acts).var(0)
    assert (variances[:-1] >= variances[1:] - 1e-4).all()
    for basis in (pca, LinearBasis.neurons(D_IN), LinearBasis.random(D_IN, seed=3)):
        x = torch.randn(4, D_IN)
        torch.testing.assert_close(basis.decode(basis.encode(x)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(LinearBasis.neurons(D_IN).encode(acts), acts)


def test_dictionary_learning_format(tmp_path):
    folder = tmp_path / "ae"
    folder.mkdir()
    state = {
        "encoder.weight": torch.randn(D_DICT, D_IN),
        "encoder.bias": torch.randn(D_DICT),
        # unit-norm decoder columns: the library (and our reader) rescale other decoders
        "decoder.weight": torch.nn.functional.normalize(torch.randn(D_IN, D_DICT), dim=0),
        "bias": torch.randn(D_IN),
    }
    torch.save(state, folder / "ae.pt")
    config = {
        "trainer": {
            "submodule_name": "resid_post_layer_3",
            "lm_name": "EleutherAI/pythia-70m-deduped",
        }
    }
    (folder / "config.json").write_text(json.dumps(config))
    d = Dictionary.load(folder)
    x = torch.randn(6, D_IN)
    f = torch.relu((x - state["bias"]) @ state["encoder.weight"].T + state["encoder.bias"])
    torch.testing.assert_close(d.encode(x), f)
    torch.testing.assert_close(d.decode(f), f @ state["decoder.weight"].T + state["bias"])
    assert d.config.in_site == d.config.out_site == Site.parse("resid.3")


def test_saelens_format(tmp_path):
    folder = tmp_path / "sl"
    folder.mkdir()
    state = {
        "W_enc": torch.randn(D_IN, D_DICT),
        "b_enc": torch.randn(D_DICT),
        "W_dec": torch.randn(D_DICT, D_IN),
        "b_dec": torch.randn(D_IN),
    }
    save_file(state, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"hook_name": "blocks.2.hook_mlp_out"}))
    d = Dictionary.load(folder)
    x = torch.randn(6, D_IN)
    f = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    torch.testing.assert_close(d(x)[0], f @ state["W_dec"] + state["b_dec"])
    assert d.config.in_site == d.config.out_site == Site.parse("mlp.2")


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        Dictionary.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="holds no dictionary"):
        Dictionary.load(tmp_path / "empty")
    d = make("untied")
    d.save(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserInputError, match="cannot read"):
        Dictionary.load(tmp_path / "corrupt")
    d.save(tmp_path / "mismatch")
    config = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    config["d_dict"] = 10
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="shape"):
        Dictionary.load(tmp_path / "mismatch")
    (tmp_path / "mismatch" / "config.json").write_text("{oops")
    with pytest.raises(UserInputError, match="not valid JSON"):
        Dictionary.load(tmp_path / "mismatch")
    with pytest.raises(UserInputError, match="unknown dictionary kind"):
        Dictionary.from_config(DictionaryConfig(kind="nope", d_in=2, d_dict=2))


def test_config_sites_are_parsed_once_and_written_as_text(tmp_path):
    config = DictionaryConfig(kind="untied", d_in=4, d_dict=8, site="resid.1")
    assert config.in_site == config.out_site == config.site == Site.parse("resid.1")
    assert (config.to_dict()["in_site"], config.to_dict()["out_site"]) == ("resid.1", "resid.1")
    transcoder = DictionaryConfig(
        kind="transcoder", d_in=4, d_dict=8, in_site="mlp_in.1", out_site=Site.parse("mlp.1")
    )
    assert transcoder.site == transcoder.out_site == Site.parse("mlp.1")
    assert DictionaryConfig.from_dict(transcoder.to_dict()) == transcoder
    with pytest.raises(UserInputError, match="either site or in_site"):
        DictionaryConfig(kind="untied", d_in=4, d_dict=8, site="resid.1", out_site="resid.2")
    with pytest.raises(UserInputError, match="in_site and out_site"):
        Dictionary.from_config(
            DictionaryConfig(kind="transcoder", d_in=4, d_dict=8, out_site="mlp.1")
        )
    with pytest.raises(UserInputError, match="unknown site"):
        DictionaryConfig(kind="untied", d_in=4, d_dict=8, site="nowhere")


@pytest.mark.parametrize(
    "kind,extra,old_sites,sites",
    [
        ("untied", {}, {"site": "resid.1", "out_site": None}, ("resid.1", "resid.1")),
        ("untied", {}, {"site": None}, (None, None)),
        (
            "transcoder",
            {"d_out": 8, "out_site": "mlp.1"},
            {"site": "resid.1", "out_site": "mlp.1"},
            ("resid.1", "mlp.1"),
        ),
    ],
)
def test_configs_of_the_older_format_load(tmp_path, kind, extra, old_sites, sites):
    """Before `in_site`, a config had `site` (the site read) and, for transcoders, `out_site`."""
    d = make(kind, **extra)
    d.save(tmp_path / "d")
    data = json.loads((tmp_path / "d" / "config.json").read_text())
    del data["in_site"], data["out_site"]
    (tmp_path / "d" / "config.json").write_text(json.dumps({**data, **old_sites}))
    loaded = Dictionary.load(tmp_path / "d").config
    expected = tuple(None if s is None else Site.parse(s) for s in sites)
    assert (loaded.in_site, loaded.out_site) == expected
    other = [key for key in loaded.to_dict() if not key.endswith("site")]
    assert [getattr(loaded, key) for key in other] == [getattr(d.config, key) for key in other]


@pytest.mark.parametrize(
    "kind,extra",
    [("tied", {}), ("untied", {}), ("topk", {"k": 4}), ("transcoder", {"out_site": "mlp.1"})],
)
def test_folding_a_scale_gives_the_features_on_raw_inputs(kind, extra):
    """Trained on s·x, folded: features f/s and reconstructions x̂/s on raw x."""
    d, scale, x = make(kind, **extra), 7.0, torch.randn(5, D_IN)
    folded = make(kind, **extra)
    folded.fold_activation_scale(scale)
    x_hat, f = d(scale * x)
    folded_x_hat, folded_f = folded(x)
    torch.testing.assert_close(folded_f, f / scale)
    torch.testing.assert_close(folded_x_hat, x_hat / scale)


def test_decoder_constraint_is_the_kinds():
    """Untied decoders keep unit rows (tangent gradients, renormalised rows); tied ones are free."""
    untied, tied = make("untied"), make("tied")
    for d in (untied, tied):
        for p in d.parameters():
            p.grad = torch.randn_like(p)
    untied.project_decoder_gradient()
    assert (untied.W_dec.grad * untied.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        untied.W_dec.mul_(3.0)
    untied.normalize_decoder()
    torch.testing.assert_close(untied.W_dec.norm(dim=1), torch.ones(D_DICT))
    W, grad = tied.W.detach().clone(), tied.W.grad.clone()
    tied.project_decoder_gradient()
    tied.normalize_decoder()
    assert torch.equal(tied.W, W) and torch.equal(tied.W.grad, grad)
