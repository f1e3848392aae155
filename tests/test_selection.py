"""Choosing size and sparsity without ground truth: MMCS baselines, proposals, `select` on models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_circuits import Dictionary
from sae_circuits.cli import main
from sae_circuits.selection import (
    GRIDS,
    METHODS,
    RESULTS_FILE,
    mmcs,
    mmcs_larger,
    propose,
    random_mmcs,
    seed_mmcs,
)
from sae_circuits.testing import save_random_model

TINY_ARGS = [
    "--ctx-len",
    "32",
    "--n-ctxs",
    "32",
    "--batch-size",
    "128",
    "--eval-tokens",
    "512",
    "--warmup-steps",
    "5",
    "--dead-window",
    "10",
    "--checkpoint-every",
    "10",
]


def _grid(rows: list[list[torch.Tensor]]) -> np.ndarray:
    grid = np.empty((len(rows), len(rows[0])), dtype=object)
    for index, _ in np.ndenumerate(grid):
        grid[index] = rows[index[0]][index[1]]
    return grid


def test_random_mmcs_is_the_chance_level() -> None:
    """MMCS against random directions does not depend on the reference: any fixed set of unit
    vectors (here very far from isotropic) scores the baseline against isotropic directions."""
    generator = torch.Generator().manual_seed(0)
    width, n, m = 16, 64, 128
    draws = [random_mmcs(width, n, m, seed=s) for s in range(8)]
    spread = float(np.std(draws))
    assert 0 < spread < 0.05
    clustered = F.normalize(torch.ones(n, width) + 0.1 * torch.randn(n, width, generator=generator))
    against = [mmcs(clustered, torch.randn(m, width, generator=generator)) for _ in range(8)]
    assert np.mean(against) == pytest.approx(np.mean(draws), abs=3 * spread)
    # the plain definition: mean over the reference of the max cosine
    a, b = torch.randn(n, width, generator=generator), torch.randn(m, width, generator=generator)
    plain = (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T).amax(1).mean()
    assert mmcs(a, b) == pytest.approx(float(plain), abs=1e-6)
    # more random directions to choose from: a higher chance level
    assert random_mmcs(width, n, 4 * m) > random_mmcs(width, n, m)


def test_mmcs_larger_and_seed_mmcs_on_constructed_grids() -> None:
    generator = torch.Generator().manual_seed(1)
    big = F.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    small = big[:10]  # every small feature is in the larger dictionary
    other = torch.randn(10, 8, generator=generator)
    grid = _grid([[small, other], [big, big]])
    larger = mmcs_larger(grid)
    assert larger[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert larger[0, 1] == pytest.approx(mmcs(other, big))
    assert np.isnan(larger[1]).all()
    same = seed_mmcs(grid, grid)
    np.testing.assert_allclose(same, 1.0, atol=1e-6)
    swapped = seed_mmcs(grid, _grid([[big, other], [small, big]]))
    assert swapped[0, 0] == pytest.approx((1.0 + mmcs(big, small)) / 2)


def test_proposals() -> None:
    dead = np.array([[0, 0, 3], [0, 2, 9]])
    ssll_grid = np.array([[1.0, -2.0, 0.5], [0.0, -1.0, np.nan]])
    larger = np.array([[0.4, 0.9, 0.6], [np.nan] * 3])
    assert propose(dead, ssll_grid, larger) == {
        "dead": (1, 0),
        "ssll": (0, 1),
        "mmcs_larger": (0, 1),
    }
    # for k (a smaller k is sparser) the sparsest dead-free column of the largest row is the first
    no_dead = np.zeros((2, 3))
    assert propose(no_dead, ssll_grid, larger, sparser_right=False)["dead"] == (1, 0)
    assert propose(no_dead, ssll_grid, larger)["dead"] == (1, 2)


def _run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _arrays(document: dict, name: str) -> np.ndarray:
    shape = (len(document["sizes"]), len(document["coefficients"]))
    values = [np.nan if p[name] is None else p[name] for p in document["grid"]]
    return np.array(values, dtype=float).reshape(shape)


def test_select_on_a_tiny_random_model(tmp_path, capsys) -> None:
    model_dir = save_random_model(tmp_path / "model")
    out = tmp_path / "select"
    argv = ["select", "--model", str(model_dir), "--site", "resid.0", "--out", str(out)]
    argv += ["--dict-size", "48", "16", "--l1", "0.3", "0.01", "--tokens", "2560", *TINY_ARGS]
    document = _run_json(capsys, [*argv, "--json"])
    assert json.loads((out / RESULTS_FILE).read_text()) == document
    assert document["sizes"] == [16, 48] and document["coefficients"] == [0.01, 0.3]
    assert document["seeds"] == [0, 1] and document["sparsity"] == "l1"
    assert [(p["dict_size"], p["l1"]) for p in document["grid"]] == [
        (16, 0.01),
        (16, 0.3),
        (48, 0.01),
        (48, 0.3),
    ]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{name}.png" for name in GRIDS)
    assert not list(out.rglob("*.tmp*")) and not (out / ".checkpoint").exists()
    # proposals are the cells the rules pick from the reported grids
    proposed = propose(
        _arrays(document, "dead"), _arrays(document, "ssll"), _arrays(document, "mmcs_larger")
    )
    assert set(document["proposals"]) == set(METHODS)
    for method, (r, c) in proposed.items():
        assert document["proposals"][method] == document["grid"][2 * r + c]
    # the grids against the saved dictionaries
    grid = np.empty((2, 2), dtype=object)
    for point in document["grid"]:
        dictionary = Dictionary.load(point["path"])
        assert dictionary.d_dict == point["dict_size"] and str(dictionary.config.site) == "resid.0"
        assert dictionary.config.hyperparameters["l1"] == point["l1"]
        # the first initialisation; sizes never share a seed (their initial directions would)
        assert dictionary.config.hyperparameters["seed"] == 2 * document["sizes"].index(
            point["dict_size"]
        )
        assert dictionary.config.metrics["ce_delta"] == pytest.approx(point["ce_delta"])
        assert dictionary.config.metrics["l0"] == pytest.approx(point["l0"])
        grid[
            document["sizes"].index(point["dict_size"]), document["coefficients"].index(point["l1"])
        ] = dictionary
    np.testing.assert_allclose(_arrays(document, "mmcs_larger"), mmcs_larger(grid))
    # MMCS of a dictionary with itself is 1, with a random one the chance level
    small = grid[0, 0]
    assert mmcs(small, small) == pytest.approx(1.0, abs=1e-6)
    random_decoder = torch.randn(48, small.d_in, generator=torch.Generator().manual_seed(3))
    chance = document["chance"]["mmcs_larger"][0]
    assert chance == pytest.approx(random_mmcs(small.d_in, 16, 48))
    draws = [random_mmcs(small.d_in, 16, 48, seed=s) for s in range(1, 9)]
    assert mmcs(small, random_decoder) == pytest.approx(chance, abs=4 * np.std(draws))
    assert document["chance"]["mmcs_larger"][1] is None
    stability = _arrays(document, "seed_mmcs")
    assert ((stability > 0) & (stability <= 1 + 1e-6)).all()


def test_select_top_k_grid_and_errors(tmp_path, capsys) -> None:
    model_dir = save_random_model(tmp_path / "model")
    out = tmp_path / "select"
    argv = ["select", "--model", str(model_dir), "--site", "resid.1", "--out", str(out)]
    argv += ["--dict-size", "32", "64", "--k", "8", "2", "--seeds", "1", "--tokens", "1280"]
    document = _run_json(capsys, [*argv, *TINY_ARGS, "--json"])
    assert document["sparsity"] == "k" and document["coefficients"] == [2, 8]
    assert all(p["seed_mmcs"] is None for p in document["grid"])
    for point in document["grid"]:
        assert Dictionary.load(point["path"]).kind == "topk"
        assert point["l0"] == pytest.approx(point["k"], abs=1e-6)
    assert main([*argv, "--kind", "tied"]) == 2
    assert "top-k kind" in capsys.readouterr().err
    assert main([*argv, "--seeds", "0"]) == 2


@pytest.mark.slow
def test_select_on_the_embedded_model(tmp_path, capsys) -> None:
    from sae_circuits import load_model

    model = load_model()
    width = model.config.hidden_size
    out = tmp_path / "select"
    argv = ["select", "--site", "resid.1", "--out", str(out), "--dict-size", "64", "128"]
    argv += ["--l1", "0.3", "3", "--tokens", "8192", "--ctx-len", "64", "--n-ctxs", "64"]
    argv += ["--batch-size", "256", "--eval-tokens", "1024", "--warmup-steps", "5"]
    document = _run_json(capsys, [*argv, "--dead-window", "10", "--json"])
    assert len(document["grid"]) == 4 and set(document["proposals"]) == set(METHODS)
    assert document["chance"]["seed_mmcs"] == [random_mmcs(width, n, n) for n in (64, 128)]
    l0 = _arrays(document, "l0")
    assert (l0[:, 1] < l0[:, 0]).all()  # the larger L1 coefficient is sparser
    assert np.isfinite(_arrays(document, "ce_delta")).all()


def test_select_resumes_an_interrupted_run(tmp_path, capsys, monkeypatch) -> None:
    """Interrupted in training, a rerun continues from the last checkpoint and gives the
    dictionaries of an uninterrupted run."""
    from sae_circuits import training

    model_dir = save_random_model(tmp_path / "model")
    argv = ["select", "--model", str(model_dir), "--site", "resid.0", "--dict-size", "16", "32"]
    argv += ["--l1", "0.1", "--tokens", "1280", *TINY_ARGS, "--checkpoint-every", "5", "--json"]
    whole = _run_json(capsys, [*argv, "--out", str(tmp_path / "whole")])
    out = tmp_path / "resumed"
    steps = []
    original = training.learning_rate

    def interrupted(spec, step, total):
        if step == 7:
            raise RuntimeError("interrupted")
        return original(spec, step, total)

    def recorded(spec, step, total):
        steps.append(step)
        return original(spec, step, total)

    with monkeypatch.context() as patch:
        patch.setattr(training, "learning_rate", interrupted)
        with pytest.raises(RuntimeError, match="interrupted"):
            main([*argv, "--out", str(out)])
    assert (out / ".checkpoint").is_dir() and not (out / RESULTS_FILE).exists()
    with monkeypatch.context() as patch:
        patch.setattr(training, "learning_rate", recorded)
        resumed = _run_json(capsys, [*argv, "--out", str(out)])
    assert min(steps) == 5 and max(steps) == 9  # the 10 steps of 128 from the step-5 checkpoint
    for a, b in zip(whole["grid"], resumed["grid"], strict=True):
        first, second = Dictionary.load(a["path"]), Dictionary.load(b["path"])
        for name, tensor in first.state_dict().items():
            torch.testing.assert_close(second.state_dict()[name], tensor)
        assert b["ce_delta"] == pytest.approx(a["ce_delta"])
