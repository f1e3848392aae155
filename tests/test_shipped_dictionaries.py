"""The shipped dictionary sets meet their quality bar (dictionaries/neox-ioi-4l/README.md), re-measured on the committed files."""

import pytest

from sae_circuits import evaluate, load_dictionaries, load_model, shipped_sets, token_batches
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


# Where the bars cannot apply (see dictionaries/neox-ioi-4l/README.md): at attn.3, mlp.1
# and mlp.2 zero ablation barely changes the loss, so loss recovered is undefined there and the KL
# is checked instead. The test fails if a miss disappears as well as if a new one appears, so this
# list stays true.
KNOWN_MISSES = {
    ("main", "attn.3", "loss_recovered_undefined"),
    ("main", "mlp.1", "loss_recovered_undefined"),
    ("main", "mlp.2", "loss_recovered_undefined"),
}


# Below this, zero-ablating a site barely changes the loss and "loss recovered" divides by noise.
ZERO_ABLATION_MIN_NATS = 0.05


def quality_misses(set_name, dictionaries, results):
    misses = set()
    for site, metrics in results.items():
        name = str(site)
        if site.kind == "resid":
            if metrics["loss_recovered"] < 0.90:
                misses.add((set_name, name, "loss_recovered"))
            if metrics["l0"] > 30:
                misses.add((set_name, name, "l0"))
        elif site.kind in ("attn", "mlp"):
            if metrics["ce_zero"] - metrics["ce_clean"] < ZERO_ABLATION_MIN_NATS:
                # loss recovered is a ratio of noise here; the spliced output must match instead
                misses.add((set_name, name, "loss_recovered_undefined"))
                if metrics["kl"] > 0.01:
                    misses.add((set_name, name, "kl"))
            elif metrics["loss_recovered"] < 0.85:
                misses.add((set_name, name, "loss_recovered"))
        if set_name == "main" and 1 - dictionaries[name].config.metrics["frac_alive"] > 0.10:
            misses.add((set_name, name, "dead"))
    return misses


@pytest.mark.parametrize("set_name", ["main", "wide"])
def test_set_quality(embedded, batches, set_name):
    dictionaries = load_dictionaries(set_name)
    if set_name == "main":
        expected = {"embed"} | {
            f"{k}.{layer}" for k in ("resid", "attn", "mlp") for layer in range(4)
        }
    else:
        expected = {f"resid.{layer}" for layer in range(4)}
    assert {str(site) for site in dictionaries} == expected
    results = evaluate(embedded, dictionaries, batches, progress=False)
    known = {miss for miss in KNOWN_MISSES if miss[0] == set_name}
    assert quality_misses(set_name, dictionaries, results) == known, results


def test_eval_by_set_name(capsys):
    assert (
        main(["eval", "--dictionaries", "main", "--site", "resid.2", "--tokens", "2048", "--json"])
        == 0
    )
    assert "loss_recovered" in capsys.readouterr().out
