import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_untied

from sae_circuits import METRIC_KEYS, LinearBasis, Site, evaluate, token_batches
from sae_circuits.cli import main
from sae_circuits.cli.tables import metrics_table
from sae_circuits.sites import SiteMap, torch_module
from sae_circuits.testing import SAMPLE_TEXT, site_hook


def token_batch(model, n_rows=4, ctx_len=12):
    return next(token_batches(model.tokenizer, [SAMPLE_TEXT * 3], ctx_len, n_rows))


def hooked_logits(model, site, ids, replace=None):
    """Plain torch forward; `replace(x)` maps the site's activation (all positions)."""
    with torch.no_grad(), site_hook(model, site, replace) as seen:
        logits = torch_module(model)(input_ids=ids).logits
    return logits.double(), seen["x"]


def plain_metrics(model, site, dictionary, groups):
    """The metrics by plain torch over `groups` of unpadded rows `(n, ctx)`, each group run on its
    own; every position but a row's first (BOS) is reconstructed, zero-ablated, or replaced by the
    mean of the site's activation over all those positions of all groups."""
    cleans = [hooked_logits(model, site, ids) for ids in groups]
    xs = torch.cat([x[:, 1:].reshape(-1, x.shape[-1]).double() for _, x in cleans])
    mean = xs.mean(0).float()
    ce = dict.fromkeys(("clean", "spliced", "zero", "mean"), 0.0)
    kl, pairs = 0.0, 0
    for ids, (clean, _) in zip(groups, cleans, strict=True):
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        keep[:, 0] = True  # the first (BOS) position keeps its activation
        replacements = {
            "spliced": lambda act: dictionary(act)[0],
            "zero": torch.zeros_like,
            "mean": lambda act: mean.expand_as(act),
        }
        logits = {"clean": clean}
        for name, replace in replacements.items():

            def rewrite(act, replace=replace, keep=keep):
                return torch.where(keep[..., None], act, replace(act))

            logits[name] = hooked_logits(model, site, ids, rewrite)[0]
        targets = ids[:, 1:].reshape(-1)
        log_probs = {
            name: value[:, :-1].reshape(-1, value.shape[-1]).log_softmax(-1)
            for name, value in logits.items()
        }
        for name, value in log_probs.items():
            ce[name] += F.nll_loss(value, targets, reduction="sum").item()
        lp_clean, lp_spliced = log_probs["clean"], log_probs["spliced"]
        kl += (lp_clean.exp() * (lp_clean - lp_spliced)).sum().item()
        pairs += targets.numel()
    with torch.no_grad():
        x_hat, f = (t.double() for t in dictionary(xs.float()))
    ce = {name: value / pairs for name, value in ce.items()}
    squared_error = (xs - x_hat).pow(2).sum().item()
    variance = (xs - xs.mean(0)).pow(2).sum().item()
    frequency = (f != 0).double().mean(0)
    return {
        "ce_delta": ce["spliced"] - ce["clean"],
        "kl": kl / pairs,
        "l0": (f != 0).sum(-1).double().mean().item(),
        "loss_recovered_mean": (ce["mean"] - ce["spliced"]) / (ce["mean"] - ce["clean"]),
        "loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
        "nmse": squared_error / variance,
        "fve": 1 - squared_error / variance,
        "mse": (xs - x_hat).pow(2).mean().item(),
        "cosine": F.cosine_similarity(xs, x_hat, dim=-1).mean().item(),
        "l1": f.abs().sum(-1).mean().item(),
        "frac_alive": (frequency > 0).double().mean().item(),
        "frac_dead": (frequency == 0).double().mean().item(),
        "frac_dense": (frequency > 0.1).double().mean().item(),
        **{f"ce_{name}": value for name, value in ce.items()},
        "tokens": xs.shape[0],
    }


def with_dead_and_dense(dictionary):
    """`dictionary` with its first 8 features never firing and its next 8 firing everywhere."""
    with torch.no_grad():
        dictionary.W_enc[:, :16] = 0
        dictionary.b_enc[:8] = -1.0
        dictionary.b_enc[8:16] = 0.5
    return dictionary


ALL_KEYS = (*METRIC_KEYS, "ce_clean", "ce_spliced", "ce_zero", "ce_mean", "tokens")


def test_metrics_match_plain_torch(model):
    site = "resid.0"
    dictionary = with_dead_and_dense(random_untied(model.config.hidden_size, site=site))
    groups = [token_batch(model), token_batch(model, n_rows=3, ctx_len=9)]
    result = evaluate(model, {site: dictionary}, groups, progress=False)[site]
    expected = plain_metrics(model, site, dictionary, groups)
    assert set(result) == set(ALL_KEYS)
    for key in ALL_KEYS:
        assert result[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert result["frac_dead"] >= 8 / 64 and result["frac_dense"] >= 8 / 64
    assert result["nmse"] == pytest.approx(1 - result["fve"])


def test_left_padded_batch_equals_rows_alone(model):
    """Rows of different lengths, left-padded as a tokenizer pads them: the metrics are those of
    each row evaluated unpadded on its own (pads never count, each row's BOS is skipped)."""
    site = "resid.0"
    dictionary = random_untied(model.config.hidden_size, site=site)
    full = token_batch(model)
    rows = [row[:length] for row, length in zip(full, (12, 7, 10, 4), strict=True)]
    pad = model.tokenizer.pad_token_id
    ids = torch.stack([F.pad(row, (12 - len(row), 0), value=pad) for row in rows])
    mask = torch.stack([F.pad(torch.ones_like(row), (12 - len(row), 0)) for row in rows])
    result = evaluate(model, {site: dictionary}, [(ids, mask)], progress=False)[site]
    expected = plain_metrics(model, site, dictionary, [row[None] for row in rows])
    assert result["tokens"] == expected["tokens"] == sum(len(row) - 1 for row in rows)
    for key in ALL_KEYS:
        assert result[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_pad_positions_never_count(model):
    site = "resid.1"
    dictionary = random_untied(model.config.hidden_size, site=site)
    ids = token_batch(model, n_rows=2)
    full = evaluate(model, {site: dictionary}, [ids], progress=False)[site]
    # The same rows with 5 pad tokens in front: identical metrics when the mask excludes them.
    pad = torch.full((2, 5), model.tokenizer.pad_token_id)
    padded_ids = torch.cat([pad, ids], dim=1)
    mask = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], dim=1)
    padded = evaluate(
        model, {site: dictionary}, [(padded_ids, mask)], skip_first=False, progress=False
    )
    unpadded = evaluate(model, {site: dictionary}, [ids], skip_first=False, progress=False)
    assert padded[site]["tokens"] == unpadded[site]["tokens"] == ids.numel()
    for key in ("mse", "l0", "cosine", "kl"):
        assert padded[site][key] == pytest.approx(unpadded[site][key], rel=1e-3, abs=1e-5), key
    assert full["tokens"] == ids.numel() - ids.shape[0]


def test_results_are_a_site_map_in_forward_order(model):
    dictionaries = {
        Site.parse("resid.0"): random_untied(model.config.hidden_size, site="resid.0"),
        "mlp.0": random_untied(model.config.hidden_size, site="mlp.0", seed=1),
    }
    result = evaluate(model, dictionaries, [token_batch(model, n_rows=2)], progress=False)
    assert isinstance(result, SiteMap)
    assert list(result) == [Site.parse("mlp.0"), Site.parse("resid.0")]
    assert result["resid.0"] is result[Site.parse("resid.0")]
    assert set(METRIC_KEYS) <= set(result["mlp.0"])


def test_exact_basis_recovers_all_loss(model):
    ids = token_batch(model)
    result = evaluate(
        model, {"mlp.0": LinearBasis.neurons(model.config.hidden_size)}, [ids], progress=False
    )
    assert result["mlp.0"]["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert result["mlp.0"]["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert result["mlp.0"]["nmse"] == pytest.approx(0.0, abs=1e-6)
    assert result["mlp.0"]["kl"] == pytest.approx(0.0, abs=1e-6)


def eval_args(model_dirs, folder, *extra):
    tiny = ["--model", str(model_dirs["gpt_neox"]), "--tokens", "256", "--ctx-len", "32"]
    return ["eval", *tiny, "--dictionary", str(folder), *extra]


def test_eval_cli_json(model_dirs, tmp_path, capsys):
    folder = random_untied(32, site="resid.1").save(tmp_path / "d")
    assert main(eval_args(model_dirs, folder, "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == list(ALL_KEYS)
    assert result["tokens"] == 256 - 256 // 32
    assert all(isinstance(result[key], float) for key in ALL_KEYS if key != "tokens")


def test_eval_table_leads_with_ce_increase_and_kl(model):
    site = "resid.0"
    dictionary = random_untied(model.config.hidden_size, site=site)
    result = evaluate(model, {site: dictionary}, [token_batch(model, n_rows=2)], progress=False)
    table = metrics_table(result)
    assert [column.header for column in table.columns][:4] == ["site", "ce_delta", "kl", "l0"]
    assert table.row_count == 1


def test_eval_cli_several_shipped_sites_in_one_run(capsys):
    """`--dictionaries SET` with several sites evaluates them in one run, keyed by site, with the
    numbers of each site evaluated alone."""
    tokens = ["--tokens", "256", "--ctx-len", "64", "--json"]
    assert (
        main(["eval", "--dictionaries", "main", "--site", "resid.0", "--site", "mlp.0", *tokens])
        == 0
    )
    both = json.loads(capsys.readouterr().out)
    assert list(both) == ["mlp.0", "resid.0"]
    assert main(["eval", "--dictionaries", "main", "--site", "resid.0", *tokens]) == 0
    alone = json.loads(capsys.readouterr().out)
    for key in ALL_KEYS:
        assert both["resid.0"][key] == pytest.approx(alone[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--site", "resid.7"], "out of range"),
        (["--site", "bogus"], "unknown site"),
        (["--dictionary", "/nonexistent/dir"], "not found"),
        (["--text", "/nonexistent.txt"], "not found"),
        (["--site", "resid.0", "--site", "resid.1"], "at most one --site"),
    ],
)
def test_eval_cli_bad_input_exits_2_with_one_line(model_dirs, tmp_path, capsys, extra, message):
    folder = random_untied(32, site="resid.1").save(tmp_path / "d")
    args = [
        "eval",
        "--model",
        str(model_dirs["gpt_neox"]),
        "--dictionary",
        str(folder),
        "--tokens",
        "64",
        "--ctx-len",
        "32",
    ]
    if extra[0] == "--dictionary":
        args[4] = extra[1]
    else:
        args += extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_eval_cli_width_mismatch(model_dirs, tmp_path, capsys):
    folder = random_untied(20, site="resid.0").save(tmp_path / "d")
    assert main(["eval", "--model", str(model_dirs["gpt2"]), "--dictionary", str(folder)]) == 2
    assert "width" in capsys.readouterr().err


def test_precomputed_means_give_the_same_metrics(models):
    """`evaluate(..., means=mean_activations(...))` skips the first pass and changes nothing."""
    from sae_circuits.evaluation import mean_activations

    model = models["gpt_neox"]
    width = model.config.hidden_size
    dictionary = random_untied(width, site="resid.0")
    batches = [
        torch.randint(
            1, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(i)
        )
        for i in range(2)
    ]
    alone = evaluate(model, {"resid.0": dictionary}, batches, progress=False)["resid.0"]
    means = mean_activations(model, ["resid.0"], batches)
    given = evaluate(model, {"resid.0": dictionary}, batches, progress=False, means=means)[
        "resid.0"
    ]
    for key, value in alone.items():
        assert given[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


ABLATION_KEYS = ("loss_recovered_mean", "loss_recovered", "ce_zero", "ce_mean")


def test_without_ablations_the_other_metrics_are_unchanged(models):
    """`ablations=False` skips the ablated runs: their four metrics are NaN, every other one equals
    the full evaluation's."""
    model = models["gpt_neox"]
    dictionary = random_untied(model.config.hidden_size, site="resid.0")
    batches = [token_batch(model, n_rows=2)]
    full = evaluate(model, {"resid.0": dictionary}, batches, progress=False)["resid.0"]
    lean = evaluate(model, {"resid.0": dictionary}, batches, progress=False, ablations=False)[
        "resid.0"
    ]
    assert list(lean) == list(full)
    for key, value in full.items():
        if key in ABLATION_KEYS:
            assert math.isnan(lean[key]) and not math.isnan(value), key
        else:
            assert lean[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_eval_cli_no_ablations_writes_null(model_dirs, tmp_path, capsys):
    folder = random_untied(32, site="resid.1").save(tmp_path / "d")
    assert main(eval_args(model_dirs, folder, "--json", "--no-ablations")) == 0
    result = json.loads(capsys.readouterr().out)  # strict JSON: not measured is null, not NaN
    assert all(result[key] is None for key in ABLATION_KEYS)
    assert isinstance(result["ce_delta"], float) and isinstance(result["kl"], float)
