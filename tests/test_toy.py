"""Toy data with known features: generator statistics, MMCS, sweeps, selection and the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_circuits.cli import main
from sae_circuits.errors import UserInputError
from sae_circuits.selection import METHODS, max_cosine, mmcs, ssll
from sae_circuits.toy import TOY_SPEC, SweepResult, ToyConfig, ToyData, select, sweep
from sae_circuits.training import TrainSpec

torch.set_num_threads(1)  # tiny tensors: one thread is faster on the shared cores


def test_generator_statistics() -> None:
    data = ToyData(ToyConfig(h=32, g=64, n_active=3, decay=0.95, correlation_rank=4, seed=0))
    n = 60_000
    x, c = data.sample(n, torch.Generator().manual_seed(1))
    active = (c > 0).float()
    assert active.sum(1).mean().item() == pytest.approx(3.0, abs=0.05)
    # every feature's frequency matches its probability p_g ∝ λ^g (within 5 standard errors)
    p = data.probabilities
    assert (((active.mean(0) - p) / (p * (1 - p) / n).sqrt()).abs() < 5).all()
    slope = np.polyfit(np.arange(64), np.log(active.mean(0).numpy()), 1)[0]
    assert slope == pytest.approx(math.log(0.95), abs=0.005)
    # magnitudes U(0, 1); x is exactly the combination of unit features
    assert c[c > 0].mean().item() == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(data.features.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(x, c @ data.features)
    # deterministic from the seed
    again = ToyData(ToyConfig(h=32, g=64, n_active=3, decay=0.95, correlation_rank=4, seed=0))
    first = data.sample(10, torch.Generator().manual_seed(2))[0]
    assert torch.equal(again.sample(10, torch.Generator().manual_seed(2))[0], first)


def test_generator_correlation_sign() -> None:
    """Feature pairs with the most positive (negative) copula correlation are active together
    more (less) often than independence predicts."""
    data = ToyData(ToyConfig(h=8, g=16, n_active=4, decay=0.95, correlation_rank=4, seed=0))
    n = 60_000
    active = (data.sample(n, torch.Generator().manual_seed(1))[1] > 0).float()
    corr = data.correlation - torch.eye(16)
    empirical = torch.corrcoef(active.T)
    for sign in (1, -1):
        pairs = (sign * corr).flatten().topk(10).indices  # five pairs, each listed twice
        assert (sign * corr.flatten()[pairs] > 0.3).all()
        assert (sign * empirical.flatten()[pairs] > 5 / math.sqrt(n)).all()


def test_generator_options() -> None:
    base = ToyConfig(h=64, g=32, n_active=3)
    assert (ToyData(ToyConfig(h=64, g=32, n_active=3, nonnegative=True)).features >= 0).all()
    noisy = ToyData(ToyConfig(h=64, g=32, n_active=3, noise_std=0.1, jitter_std=0.3))
    x, c = noisy.sample(20_000, torch.Generator().manual_seed(0))
    residual = x - c @ noisy.features
    expected = 0.1**2 + 0.3**2 / 64 * c.pow(2).sum(1).mean()  # per-dimension variance
    assert residual.var().item() == pytest.approx(expected.item(), rel=0.03)
    with pytest.raises(UserInputError, match="too large"):
        ToyData(ToyConfig(h=8, g=4, n_active=3))
    assert ToyData(base).stream(16).__iter__().__next__()["toy"].shape == (16, 64)


def test_mmcs_on_constructed_cases() -> None:
    truth = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    scaled_permutation = truth[torch.randperm(50)] * torch.rand(50, 1).add(0.5)
    assert mmcs(truth, scaled_permutation) == pytest.approx(1.0, abs=1e-6)
    assert mmcs(truth[:20], truth) == pytest.approx(1.0, abs=1e-6)  # smaller against larger
    assert mmcs(truth, truth[:20]) < 0.99
    rotated = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # 45° from the standard basis
    assert mmcs(torch.eye(2), rotated) == pytest.approx(math.sqrt(0.5), abs=1e-6)
    a, b = torch.randn(300, 20), torch.randn(500, 20)
    torch.testing.assert_close(max_cosine(a, b, chunk=7), max_cosine(a, b, chunk=100_000))
    plain = (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T).amax(1)
    torch.testing.assert_close(max_cosine(a, b, chunk=64), plain)


def test_short_training_recovers_planted_features() -> None:
    data = ToyData(ToyConfig(h=16, g=24, n_active=2, seed=0))
    random = F.normalize(torch.randn(24, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    template = replace(TOY_SPEC, lr=1e-2)
    result = sweep(data, l1s=[0.1], ratios=[1.0], steps=1500, template=template, progress=False)
    assert mmcs(data.features, random) < 0.7
    assert result.mmcs[0, 0] > 0.95  # the "recovered" level of the report
    assert result.dead[0, 0] == 0


def test_selection_rules_and_ssll() -> None:
    recon = np.array([[1.0, 2.0, 4.0], [0.5, 1.0, 0.0]])
    l1 = np.array([[3.0, 2.0, 1.0], [6.0, 4.0, 2.0]])
    logs_r = np.log([1.0, 2.0, 4.0, 0.5, 1.0])  # the zero loss is left out (log 0)
    z_r = np.full((2, 3), np.nan)
    z_r[[0, 0, 0, 1, 1], [0, 1, 2, 0, 1]] = (logs_r - logs_r.mean()) / logs_r.std()
    expected = z_r + (np.log(l1) - np.log(l1).mean()) / np.log(l1).std()
    np.testing.assert_allclose(ssll(recon, l1), expected)

    result = SweepResult(
        l1s=[0.01, 0.1, 1.0],
        ratios=[1.0, 2.0],
        mmcs=np.array([[0.5, 0.97, 0.8], [0.6, 0.93, 0.7]]),
        dead=np.array([[0, 0, 3], [0, 2, 9]]),
        ssll=np.array([[1.0, -2.0, 0.5], [0.0, -1.0, np.nan]]),
        mmcs_larger=np.array([[0.4, 0.9, 0.6], [np.nan] * 3]),
        reconstruction=recon,
        l1_norm=l1,
        steps=1,
        seconds=0.0,
        dictionaries=[],
    )
    assert select(result) == {
        "dead": {"l1": 0.01, "ratio": 2.0, "mmcs": 0.6},
        "ssll": {"l1": 0.1, "ratio": 1.0, "mmcs": 0.97},
        "mmcs_larger": {"l1": 0.1, "ratio": 1.0, "mmcs": 0.97},
    }


def test_sweep_grid_on_tiny_data() -> None:
    data = ToyData(ToyConfig(h=8, g=12, n_active=2, seed=1))
    result = sweep(data, l1s=[1.0, 0.01, 0.1], ratios=[2.0, 0.5, 1.0], steps=60, progress=False)
    assert result.l1s == [0.01, 0.1, 1.0] and result.ratios == [0.5, 1.0, 2.0]
    assert [d.d_dict for d in result.dictionaries] == [6] * 3 + [12] * 3 + [24] * 3
    assert np.isnan(result.mmcs_larger[-1]).all() and np.isfinite(result.mmcs_larger[:-1]).all()
    # MMCS vs larger: the mean over the larger dictionaries at the same L1
    small, larger = result.dictionaries[1], result.dictionaries[4::3]
    assert result.mmcs_larger[0, 1] == pytest.approx(np.mean([mmcs(small, d) for d in larger]))
    assert result.mmcs[1, 2] == pytest.approx(mmcs(data.features, result.dictionaries[5]))
    assert set(select(result)) == set(METHODS)


def test_resampling_schedule_leaves_the_dead_window_alone() -> None:
    """Dead latents are resampled, but never within the dead window of the end (else latents that
    stay silent would not count as dead)."""
    data = ToyData(ToyConfig(h=8, g=12, n_active=2, seed=1))
    kwargs = {"l1s": [0.1], "ratios": [1.0], "steps": 100, "progress": False}

    def every(n: int | None) -> TrainSpec:
        return replace(TOY_SPEC, dead_window=20, resample_every=n)

    spec = sweep(data, template=every(40), **kwargs).dictionaries[0].config
    assert spec.hyperparameters["resample_every"] == 40  # resamples after steps 40 and 80
    with pytest.raises(UserInputError, match="within the dead window"):
        sweep(data, template=every(45), **kwargs)  # would resample after step 90
    for n in (None, 100):  # never, or not before the end
        spec = sweep(data, template=every(n), **kwargs).dictionaries[0].config
        assert spec.hyperparameters["resample_every"] is None


def test_cli_reaches_the_report_recipe(monkeypatch, capsys) -> None:
    """`--lr 1e-3 --decay-start 1 --resample-every 0` trains with the report's settings."""
    trained = []

    def recording_sweep(*args, **kwargs):
        result = sweep(*args, **kwargs)
        trained.extend(result.dictionaries)
        return result

    monkeypatch.setattr("sae_circuits.toy.sweep", recording_sweep)
    argv = ["toy", "--h", "8", "--g", "12", "--l1", "0.1", "--ratios", "1", "--steps", "20"]
    assert main([*argv, "--lr", "1e-3", "--decay-start", "1", "--resample-every", "0"]) == 0
    report = trained[-1].config.hyperparameters
    assert (report["lr"], report["decay_start"], report["resample_every"]) == (1e-3, 1.0, None)
    assert (report["resample_duplicates"], report["resample_min_fires"]) == (None, 0)
    assert report["recipe"] == "report" and report["steps"] == 20
    assert main(argv) == 0  # the defaults: faster LR, decayed over the last fifth
    default = trained[-1].config.hyperparameters
    assert (default["lr"], default["decay_start"]) == (TOY_SPEC.lr, TOY_SPEC.decay_start)
    capsys.readouterr()


def test_cli_resampling_options(monkeypatch, capsys) -> None:
    """The wasted-latent rules are on by default and can be switched off one by one."""
    specs = []

    def recording_sweep(*args, **kwargs):
        result = sweep(*args, **kwargs)
        specs.append(result.dictionaries[0].config.hyperparameters)
        return result

    monkeypatch.setattr("sae_circuits.toy.sweep", recording_sweep)
    argv = ["toy", "--h", "8", "--g", "12", "--l1", "0.1", "--ratios", "1", "--steps", "40"]
    argv += ["--dead-window", "10", "--resample-every", "20"]
    assert main(argv) == 0
    assert (
        specs[-1]["resample_duplicates"],
        specs[-1]["resample_min_fires"],
        specs[-1]["resample_target"],
    ) == (TOY_SPEC.resample_duplicates, TOY_SPEC.resample_min_fires, TOY_SPEC.resample_target)
    for off in ("0", "none"):
        assert main([*argv, "--resample-duplicates", off]) == 0
        assert specs[-1]["resample_duplicates"] is None
    off = ["--resample-min-fires", "0", "--resample-target", "input"]
    assert main([*argv, "--resample-duplicates", "0.8", *off]) == 0
    assert (
        specs[-1]["resample_duplicates"],
        specs[-1]["resample_min_fires"],
        specs[-1]["resample_target"],
    ) == (0.8, 0, "input")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, "--resample-duplicates", "1.5"])
    assert "(0, 1]" in capsys.readouterr().err


def test_cli_json_shape(tmp_path, capsys) -> None:
    argv = ["toy", "--h", "8", "--g", "12", "--l1", "0.03", "0.3", "--ratios", "1", "2"]
    assert main([*argv, "--steps", "40", "--json", "--out", str(tmp_path)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document) == {"grid", "selected"}
    assert len(document["grid"]) == 4
    for row in document["grid"]:
        assert set(row) == {"l1", "ratio", "mmcs", "dead", "ssll", "mmcs_larger"}
    assert [row["mmcs_larger"] is None for row in document["grid"]] == [False, False, True, True]
    assert set(document["selected"]) == set(METHODS)
    for choice in document["selected"].values():
        assert set(choice) == {"l1", "ratio", "mmcs"}
    assert sorted(p.name for p in tmp_path.glob("toy_*.png")) == [
        "toy_dead.png",
        "toy_mmcs.png",
        "toy_mmcs_larger.png",
        "toy_ssll.png",
    ]
    assert main(["toy", "--ratios", "0", "--steps", "1"]) == 2
    assert "ratios > 0" in capsys.readouterr().err
