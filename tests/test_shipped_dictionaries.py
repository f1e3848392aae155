"""The shipped dictionary sets meet the quality bar of issue 5, re-measured on the committed files."""

import pytest

from sae_circuits import Site, evaluate, load_dictionaries, load_model, shipped_sets, token_batches
from sae_circuits.cli import main
from sae_circuits.text import default_documents

EVAL_TOKENS = 8192


@pytest.fixture(scope="module")
def embedded():
    return load_model()


@pytest.fixture(scope="module")
def batches(embedded):
    return list(token_batches(embedded.tokenizer, default_documents(True), 128, 16, EVAL_TOKENS))


def test_sets_are_shipped():
    assert {"main", "wide"} <= set(shipped_sets())


@pytest.mark.parametrize("set_name", ["main", "wide"])
def test_set_quality(embedded, batches, set_name):
    dictionaries = load_dictionaries(set_name)
    if set_name == "main":
        expected = {"embed"} | {f"{k}.{layer}" for k in ("resid", "attn", "mlp") for layer in range(4)}
        assert set(dictionaries) == expected
    results = evaluate(embedded, dictionaries, batches, progress=False)
    for site, metrics in results.items():
        kind = Site.parse(site).kind
        if kind == "resid":
            assert metrics["loss_recovered"] >= 0.90, (site, metrics)
            assert metrics["l0"] <= 30, (site, metrics)
        elif kind in ("attn", "mlp"):
            assert metrics["loss_recovered"] >= 0.85, (site, metrics)
        if set_name == "main":
            dead = 1 - dictionaries[site].config.metrics["frac_alive"]
            assert dead <= 0.10, (site, dead)


def test_eval_by_set_name(capsys):
    assert main(["eval", "--dictionaries", "main", "--site", "resid.2", "--tokens", "2048", "--json"]) == 0
    assert "loss_recovered" in capsys.readouterr().out
