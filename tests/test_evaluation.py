import json

import pytest
import torch
import torch.nn.functional as F
from conftest import random_untied

from sae_circuits import METRIC_KEYS, LinearBasis, Site, evaluate, token_batches
from sae_circuits.cli import main
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
    own; every position but a row's first (BOS) is reconstructed, or zero-ablated."""
    x_parts, ce, kl, pairs = [], {"clean": 0.0, "spliced": 0.0, "zero": 0.0}, 0.0, 0
    for ids in groups:
        clean, x = hooked_logits(model, site, ids)
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        keep[:, 0] = True  # the first (BOS) position keeps its activation

        def reconstruct(act, keep=keep):
            return torch.where(keep[..., None], act, dictionary(act)[0])

        def zero(act, keep=keep):
            return torch.where(keep[..., None], act, torch.zeros_like(act))

        with torch.no_grad():
            logits = {
                "clean": clean,
                "spliced": hooked_logits(model, site, ids, reconstruct)[0],
                "zero": hooked_logits(model, site, ids, zero)[0],
            }
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
        x_parts.append(x[:, 1:].reshape(-1, x.shape[-1]).double())
    xs = torch.cat(x_parts)
    with torch.no_grad():
        x_hat, f = (t.double() for t in dictionary(xs.float()))
    ce = {name: value / pairs for name, value in ce.items()}
    return {
        "mse": (xs - x_hat).pow(2).mean().item(),
        "l1": f.abs().sum(-1).mean().item(),
        "l0": (f != 0).sum(-1).double().mean().item(),
        "frac_alive": (f != 0).any(0).double().mean().item(),
        "fve": 1 - (xs - x_hat).pow(2).sum().item() / (xs - xs.mean(0)).pow(2).sum().item(),
        "cosine": F.cosine_similarity(xs, x_hat, dim=-1).mean().item(),
        "loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
        "kl": kl / pairs,
        "ce_delta": ce["spliced"] - ce["clean"],
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero": ce["zero"],
        "tokens": xs.shape[0],
    }


def test_metrics_match_plain_torch(model):
    site = "resid.0"
    dictionary = random_untied(model.config.hidden_size, site=site)
    ids = token_batch(model)
    result = evaluate(model, {site: dictionary}, [ids], progress=False)[site]
    expected = plain_metrics(model, site, dictionary, [ids])
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


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
    for key in (*METRIC_KEYS, "ce_clean", "ce_spliced", "ce_zero"):
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
    assert result["mlp.0"]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_eval_cli_json(model_dirs, tmp_path, capsys):
    folder = random_untied(32, site="resid.1").save(tmp_path / "d")
    code = main(
        [
            "eval",
            "--model",
            str(model_dirs["gpt_neox"]),
            "--dictionary",
            str(folder),
            "--tokens",
            "256",
            "--ctx-len",
            "32",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == set(METRIC_KEYS)
    assert all(isinstance(v, float) for v in result.values())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--site", "resid.7"], "out of range"),
        (["--site", "bogus"], "unknown site"),
        (["--dictionary", "/nonexistent/dir"], "not found"),
        (["--text", "/nonexistent.txt"], "not found"),
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
