"""`evaluate(..., worst=N)` and `eval --worst`: the predictions a spliced dictionary makes worst."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_untied
from test_views import browser, load

from sae_circuits import evaluate, token_batches
from sae_circuits.cli import main
from sae_circuits.sites import torch_module
from sae_circuits.testing import SAMPLE_TEXT, site_hook
from sae_circuits.views import write_page
from sae_circuits.views.feature_html import worst_contexts_html, worst_view

SITE = "resid.0"


def token_ce(model, ids: torch.Tensor, rewrite=None) -> torch.Tensor:
    """Plain torch: `(rows, ctx - 1)` next-token CE, the site's activation through `rewrite`."""
    with torch.no_grad(), site_hook(model, SITE, rewrite):
        logits = torch_module(model)(input_ids=ids).logits.double()
    log_probs = logits[:, :-1].log_softmax(-1)
    return -log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)


def spliced(dictionary):
    """Every position but the first (BOS, which evaluation leaves alone) reconstructed."""

    def rewrite(x: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(x.shape[:2], dtype=torch.bool)
        keep[:, 0] = True
        return torch.where(keep[..., None], x, dictionary(x)[0])

    return rewrite


@pytest.fixture
def neox(models):
    from sae_circuits import detach

    model = models["gpt_neox"]
    detach(model)
    yield model
    detach(model)


def test_worst_tokens_match_plain_torch(neox):
    dictionary = random_untied(neox.config.hidden_size, site=SITE)
    batches = list(token_batches(neox.tokenizer, [SAMPLE_TEXT * 4], 20, 3))[:2]
    n = 6
    rows = evaluate(neox, {SITE: dictionary}, batches, worst=n, progress=False)[SITE]["worst"]
    expected = []
    for b, ids in enumerate(batches):
        clean = token_ce(neox, ids)
        increase = token_ce(neox, ids, spliced(dictionary)) - clean
        for (row, position), value in zip(
            torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(ids.shape[1] - 1)),
            increase.flatten(),
            strict=True,
        ):
            expected.append(
                (float(value), b, int(row), int(position) + 1, float(clean[row, position]))
            )
    expected.sort(key=lambda item: -item[0])
    assert len(rows) == n
    for row, (value, b, r, target, clean_ce) in zip(rows, expected[:n], strict=True):
        assert row["ce_increase"] == pytest.approx(value, abs=1e-6)
        assert (row["batch"], row["row"], row["position"]) == (b, r, target)
        assert row["ce_clean"] == pytest.approx(clean_ce, abs=1e-6)
        assert row["ce_spliced"] == pytest.approx(clean_ce + value, abs=1e-6)
        ids = batches[b][r].tolist()
        decode = neox.tokenizer.decode
        assert row["token"] == decode(ids[target : target + 1])
        assert row["before"] == decode(ids[max(0, target - 12) : target])
        assert row["after"] == decode(ids[target + 1 : target + 5])
        assert row["context"] == f"{row['before']}[[{row['token']}]]{row['after']}"
    assert rows[0]["ce_increase"] > 0


def test_worst_tokens_skip_pads(neox):
    """A left-padded row gives the same worst predictions as the row alone, without pads."""
    dictionary = random_untied(neox.config.hidden_size, site=SITE, seed=2)
    row = next(token_batches(neox.tokenizer, [SAMPLE_TEXT * 2], 10, 1))
    pad = torch.full((1, 6), neox.tokenizer.pad_token_id)
    padded = (torch.cat([pad, row], 1), torch.cat([torch.zeros_like(pad), torch.ones_like(row)], 1))
    alone = evaluate(neox, {SITE: dictionary}, [row], worst=4, progress=False)[SITE]["worst"]
    with_pads = evaluate(neox, {SITE: dictionary}, [padded], worst=4, progress=False)[SITE]["worst"]
    for a, b in zip(alone, with_pads, strict=True):
        assert b["ce_increase"] == pytest.approx(a["ce_increase"], abs=1e-4)
        assert b["position"] == a["position"] + 6
        assert (b["before"], b["token"], b["after"]) == (a["before"], a["token"], a["after"])


def test_eval_cli_worst(model_dirs, tmp_path, capsys):
    folder = random_untied(32, site="resid.1").save(tmp_path / "d")
    argv = ["eval", "--model", str(model_dirs["gpt_neox"]), "--tokens", "256", "--ctx-len", "32"]
    argv += ["--dictionary", str(folder), "--worst", "3"]
    assert main([*argv, "--json"]) == 0
    worst = json.loads(capsys.readouterr().out)["worst"]
    assert len(worst) == 3
    assert [w["ce_increase"] for w in worst] == sorted(
        (w["ce_increase"] for w in worst), reverse=True
    )
    assert main([*argv, "--html", str(tmp_path / "worst.html")]) == 0
    out = capsys.readouterr().out
    assert "largest CE increases" in out and f"[[{worst[0]['token']}]]".replace("\n", "⏎") in out
    page = (tmp_path / "worst.html").read_text()
    assert "where the dictionaries fail" in page and "sc-worst" in page
    assert main([*argv[:-2], "--html", str(tmp_path / "x.html")]) == 2
    assert "--worst" in capsys.readouterr().err


@browser
def test_worst_page_in_chromium(tmp_path):
    rows = [
        {
            "ce_increase": 2.0 - k,
            "ce_clean": 0.5,
            "batch": 0,
            "row": k,
            "position": 3,
            "before": "gave a <drink>",
            "token": " to",
            "after": " Mary\n",
        }
        for k in range(2)
    ]
    path = write_page(worst_view({"resid.2": rows}), tmp_path / "worst.html")
    data, errors = load(path, selectors=[".sc-worst tr", ".sc-ctx b"])
    assert errors == []
    assert data["rendered"] == {".sc-worst tr": 3, ".sc-ctx b": 2}
    assert "gave a &lt;drink&gt;<b" in worst_contexts_html(rows)  # escaped, the token marked
