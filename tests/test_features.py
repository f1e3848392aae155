"""Feature inspection on a constructed case: a dictionary at `embed` whose feature 0 fires exactly on
the token " John" and feature 1 exactly on " Mary" (features 2 and 3 never fire)."""

import json
import math

import pytest
import torch
from conftest import random_untied

from sae_circuits import Dictionary, DictionaryConfig, load_model, token_batches
from sae_circuits.cli import main
from sae_circuits.features import (
    ablation_effects,
    collect,
    compare_with_neurons,
    concentration,
    direct_effects,
    feature_frequencies,
    inspect_features,
)
from sae_circuits.sites import torch_module
from sae_circuits.testing import SAMPLE_TEXT, save_random_model, site_hook

WORDS = (" John", " Mary")
DOCUMENTS = [SAMPLE_TEXT[i:] + SAMPLE_TEXT[:i] for i in range(0, len(SAMPLE_TEXT), 9)]


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("features") / "neox", "gpt_neox")


@pytest.fixture(scope="module")
def neox(neox_dir):
    torch.set_num_threads(2)
    model = load_model(neox_dir)
    with torch.no_grad():  # a non-trivial final norm, so that folding it in is tested
        torch_module(model).gpt_neox.final_layer_norm.weight.uniform_(0.5, 1.5)
    return model


def word_ids(model):
    ids = [model.tokenizer(word, add_special_tokens=False)["input_ids"] for word in WORDS]
    assert all(len(i) == 1 for i in ids)
    return [i[0] for i in ids]


@pytest.fixture(scope="module")
def wired(neox):
    """Feature j fires exactly on WORDS[j]: encoder = that token's unit embedding, bias halfway
    between its own score and the best score of any other token (checked to separate them)."""
    embeddings = torch_module(neox).gpt_neox.embed_in.weight.detach()
    torch.manual_seed(0)
    dictionary = Dictionary.from_config(
        DictionaryConfig(kind="untied", d_in=embeddings.shape[1], d_dict=4, site="embed")
    )
    with torch.no_grad():
        dictionary.W_enc.zero_()
        dictionary.b_enc.fill_(-1.0)
        for j, token in enumerate(word_ids(neox)):
            unit = embeddings[token] / embeddings[token].norm()
            scores = embeddings @ unit
            others = torch.cat([scores[:token], scores[token + 1 :]]).max()
            assert scores[token] - others > 0.01
            dictionary.W_enc[:, j] = unit
            dictionary.b_enc[j] = -(scores[token] + others) / 2
        fires = dictionary.encode(embeddings) > 0  # (V, d_dict): which tokens fire which feature
    assert fires[:, :2].sum(0).tolist() == [1, 1] and not fires[:, 2:].any()
    return dictionary


def batches(model, ctx_len=32, rows=16):
    return list(token_batches(model.tokenizer, DOCUMENTS, ctx_len, rows))


def test_top_contexts_histogram_and_frequency(neox, wired):
    data = batches(neox)
    reports = inspect_features(neox, "embed", wired, data, [0, 1], top_k=5, progress=False)
    scored = torch.cat([b[:, 1:] for b in data])  # the BOS position is not scored
    for report, token, word in zip(reports, word_ids(neox), WORDS, strict=True):
        n = int((scored == token).sum())
        assert n > 5
        assert [c.token for c in report.contexts] == [word] * 5
        assert report.contexts[0].text.endswith(f"[[{word}]]" + report.contexts[0].after)
        assert report.frequency == pytest.approx(n / scored.numel())
        assert report.positions == scored.numel()
        assert report.top_tokens[0].token == word and report.top_tokens[0].value == 1.0
        assert sum(report.histogram_counts) == n
        assert report.histogram_split[0] == (word, report.histogram_counts)
    frequencies = feature_frequencies(neox, "embed", wired, data, progress=False)
    assert frequencies.frequencies[:2].tolist() == pytest.approx([r.frequency for r in reports])
    assert frequencies.dead == 2


def test_top_k_is_merged_across_batches(neox):
    dictionary = random_untied(neox.config.hidden_size, d_dict=8, site="resid.0")
    data = batches(neox, rows=8)
    stats = collect(neox, "resid.0", dictionary, data, top_k=4, progress=False)
    with torch.no_grad(), neox.trace(torch.cat(data)):
        x = neox.gpt_neox.layers[0].output.save()
    f = dictionary.encode(x)[:, 1:].reshape(-1, 8)
    torch.testing.assert_close(stats.top_values, f.topk(4, dim=0).values.T)
    assert stats.fires.tolist() == (f > 0).sum(0).tolist()


def plain_ablation(model, site, dictionary, feature, rows, positions):
    """Reference: x -> x - f_i(x) d_i at every position, with a plain torch hook."""

    def ablate(x):
        return x - dictionary.encode(x)[..., feature, None] * dictionary.decoder_directions[feature]

    at = torch.arange(len(rows))
    with torch.no_grad():
        clean = torch_module(model)(input_ids=rows).logits[at, positions]
        with site_hook(model, site, ablate):
            ablated = torch_module(model)(input_ids=rows).logits[at, positions]
    return ablated - clean


def test_logit_effect_matches_plain_torch(neox, wired):
    data = batches(neox)
    (report,) = inspect_features(neox, "embed", wired, data, [0], top_k=5, progress=False)
    stats = collect(neox, "embed", wired, data, [0], top_k=5, progress=False)
    rows, positions = stats.top_rows[0], stats.top_positions[0]
    expected = plain_ablation(neox, "embed", wired, 0, rows, positions)
    torch.testing.assert_close(report.logit_effect_values, expected.mean(0), atol=1e-5, rtol=1e-4)
    assert report.logit_effects["down"][0].value == pytest.approx(expected.mean(0).min().item())


def test_ablation_effects_on_each_architecture(model):
    site = "resid.0"
    dictionary = random_untied(model.config.hidden_size, site=site)
    rows = next(token_batches(model.tokenizer, DOCUMENTS, 12, 3))
    positions = torch.tensor([11, 5, 8])
    got = ablation_effects(model, site, dictionary, 2, rows, positions)
    expected = plain_ablation(model, site, dictionary, 2, rows, positions)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


FINAL_NORMS = {"gpt_neox": ("gpt_neox.final_layer_norm", True), "gpt2": ("transformer.ln_f", True)}


def test_direct_effect_is_unembedding_of_direction(model, arch):
    path, centred = FINAL_NORMS.get(arch, ("model.norm", False))  # llama: RMSNorm, no centring
    module = torch_module(model)
    norm = module.get_submodule(path)
    saved = norm.weight.detach().clone()
    directions = torch.randn(3, model.config.hidden_size)
    try:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        d = directions - directions.mean(-1, keepdim=True) if centred else directions
        by_hand = (d * norm.weight) @ module.get_output_embeddings().weight.T
        torch.testing.assert_close(direct_effects(model, directions), by_hand)
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)
    assert direct_effects(model, torch.randn(2, 7)) is None  # not a residual-stream direction


def test_report_direct_effects(neox, wired):
    (report,) = inspect_features(neox, "embed", wired, batches(neox), [1], top_k=3, progress=False)
    expected = direct_effects(neox, wired.W_dec[1:2].detach())[0]
    assert report.direct_effects["up"][0].value == pytest.approx(expected.max().item())
    assert report.direct_effects["down"][0].value == pytest.approx(expected.min().item())


def test_concentration_on_constructed_units():
    values = torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -2.0, -math.inf]])
    tokens = torch.tensor([[5, 5, 7], [1, 2, 3], [4, 4, -1]])
    share = concentration(values, tokens)
    assert share[:2].tolist() == pytest.approx([5 / 6, 1 / 3])
    assert share[2].isnan()  # no positive activation: dead


def test_features_vs_neurons(neox, wired):
    result = compare_with_neurons(neox, "embed", wired, batches(neox), top_k=5, progress=False)
    features, neurons = result["features"], result["neurons"]
    assert (features["units"], features["alive"]) == (4, 2)
    assert features["token_concentration_mean"] == 1.0
    assert neurons["units"] == neox.config.hidden_size
    assert 0 < neurons["token_concentration_mean"] <= 1


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, neox_dir, wired):
    root = tmp_path_factory.mktemp("inspect")
    wired.save(root / "dictionary")
    (root / "text.txt").write_text("\n\n".join(DOCUMENTS))
    common = ["--model", str(neox_dir), "--dictionary", str(root / "dictionary")]
    common += ["--text", str(root / "text.txt"), "--tokens", "512", "--ctx-len", "16"]
    return root, common


def test_cli_json(cli_inputs, capsys):
    root, common = cli_inputs
    png = root / "feature.png"
    assert main(["inspect", "embed/0", *common, "--top-k", "3", "--json", "--png", str(png)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["png"] == str(png) and png.is_file()
    assert f"wrote {png}" in err.splitlines()
    assert {"feature", "frequency", "top_contexts", "top_tokens", "logit_effects"} <= set(result)
    assert result["feature"] == "embed/0" and 0 < result["frequency"] < 1
    assert len(result["top_contexts"]) == 3
    assert {"text", "token", "activation"} <= set(result["top_contexts"][0])
    assert result["top_contexts"][0]["token"] == " John"
    assert result["top_tokens"][0]["token"] == " John"
    assert set(result["logit_effects"]) == {"up", "down"}
    assert {"token", "logit_change"} <= set(result["logit_effects"]["down"][0])
    assert png.stat().st_size > 1000

    assert main(["inspect", "embed", *common, "--frequencies", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["frequencies"]) == 4 and result["dead"] == 2


@pytest.mark.parametrize(
    "target,message",
    [("embed/4", "out of range"), ("resid.9/1", "out of range"), ("bogus.1/0", "unknown site"),
     ("embed/x", "bad feature"), ("embed", "name a feature")],
)  # fmt: skip
def test_cli_bad_input(cli_inputs, capsys, target, message):
    _, common = cli_inputs
    assert main(["inspect", target, *common]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_views(neox, wired, tmp_path):
    import io

    from rich.console import Console

    data = batches(neox)
    (report,) = inspect_features(neox, "embed", wired, data, [0], top_k=3, progress=False)
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(report)
    console.print(feature_frequencies(neox, "embed", wired, data, progress=False))
    text = console.export_text()
    assert "top activating contexts" in text and "' John' 100%" in text and "2 dead" in text
    top = report.contexts[0]
    assert f"{top.before}[[{top.token}]]{top.after}".replace("\n", "⏎") in text  # plain marks
    assert report._repr_html_().startswith("<iframe srcdoc=")
    assert report.save_png(tmp_path / "f.png").stat().st_size > 1000
