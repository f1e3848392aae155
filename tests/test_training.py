"""The trainer: formulas against plain torch, decoder constraint, resampling, grids, resume, seeds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sae_circuits.dictionary import Dictionary, DictionaryConfig
from sae_circuits.errors import UserInputError
from sae_circuits.training import KINDS, TrainSpec, _Member, learning_rate, train_dictionaries

torch.set_num_threads(1)  # tiny tensors: one thread is faster on the shared cores
D, G = 32, 48


class PlantedSource:
    """Batches `{"x": c @ F}` of sparse non-negative combinations of G unit features, resumable."""

    def __init__(self, seed: int = 1, batch: int = 128, crash_at: int | None = None) -> None:
        self.features = F.normalize(
            torch.randn(G, D, generator=torch.Generator().manual_seed(0)), dim=-1
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.batch, self.crash_at, self.pulled = batch, crash_at, 0

    def __iter__(self):
        while True:
            self.pulled += 1
            if self.pulled == self.crash_at:
                raise RuntimeError("simulated crash")
            active = torch.rand(self.batch, G, generator=self.generator) < 3 / G
            yield {
                "x": (active * torch.rand(self.batch, G, generator=self.generator)) @ self.features
            }

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def weights(dictionaries: list[Dictionary]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in d.state_dict().items()} for d in dictionaries]


def assert_identical(a: list[Dictionary], b: list[Dictionary]) -> None:
    for wa, wb in zip(weights(a), weights(b), strict=True):
        for name in wa:
            assert torch.equal(wa[name], wb[name]), name


def fvu(dictionary: Dictionary, x: torch.Tensor) -> float:
    """Fraction of variance unexplained."""
    with torch.no_grad():
        return float((dictionary(x)[0] - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_learning_rate_schedule() -> None:
    spec = TrainSpec("x", lr=1e-3, warmup_steps=4, decay_start=0.6)
    values = [learning_rate(spec, step, 10) for step in range(10)]
    expected = [0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3]
    assert values == pytest.approx(expected)
    assert learning_rate(TrainSpec("x", warmup_steps=0, decay_start=8), 9, 10) == pytest.approx(
        0.5e-3
    )


@pytest.mark.parametrize("recipe", ["standard", "report"])
def test_steps_match_plain_torch(recipe: str) -> None:
    """Three trainer steps (warm-up LR, loss, projected gradient, Adam, renormalisation) equal a
    hand-written torch loop."""
    spec = TrainSpec("x", d_dict=64, l1=0.05, lr=1e-2, warmup_steps=2, recipe=recipe, seed=3)
    (trained,) = train_dictionaries(PlantedSource(), [spec], 3, progress=False)

    torch.manual_seed(3)
    d = Dictionary.from_config(DictionaryConfig(kind="untied", d_in=D, d_dict=64))
    W_enc, b_enc, W_dec, b_dec = (p.detach().clone() for p in (d.W_enc, d.b_enc, d.W_dec, d.b_dec))
    if recipe == "report":
        torch.nn.init.orthogonal_(W_dec)
        W_dec = F.normalize(W_dec, dim=-1)
        W_enc, b_enc, b_dec = W_dec.T.clone(), torch.zeros(64), torch.zeros(D)
    params = [p.requires_grad_() for p in (W_enc, b_enc, W_dec)] + (
        [] if recipe == "report" else [b_dec.requires_grad_()]
    )
    opt = torch.optim.Adam(params, lr=1e-2)
    for step, batch in zip(range(3), PlantedSource(), strict=False):
        x = batch["x"]
        for group in opt.param_groups:
            group["lr"] = 1e-2 * min(1.0, (step + 1) / 2)
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
        sq = (f @ W_dec + b_dec - x).pow(2).sum(-1)
        l1 = f.abs().sum(-1)
        loss = (sq / D + 0.05 / 64 * l1).mean() if recipe == "report" else (sq + 0.05 * l1).mean()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec.copy_(F.normalize(W_dec, dim=-1))
    for name, plain in {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}.items():
        torch.testing.assert_close(getattr(trained, name), plain.detach(), rtol=1e-5, atol=1e-6)
    if recipe == "report":
        assert not trained.b_dec.any()


def test_decoder_norm_stays_one() -> None:
    specs = [
        TrainSpec("x", kind=kind, d_dict=64, lr=3e-2, warmup_steps=0, **extra)
        for kind, extra in (
            ("untied", {}),
            ("topk", {"k": 4}),
            ("batchtopk", {"k": 4}),
            ("jumprelu", {"l1": 1e-2}),
        )
    ]
    for d in train_dictionaries(PlantedSource(), specs, 40, progress=False):
        torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-5)


def test_projected_gradient_is_tangent_and_has_no_history() -> None:
    """The projected decoder gradient is orthogonal to each (unit) row and carries no autograd
    graph (a graph there would grow with every step)."""
    member = _Member(TrainSpec("x", d_dict=64), D, None, {"x": None}, None, torch.device("cpu"))
    member.optimizer.step = lambda: None  # keep the weights the gradient was projected against
    x = next(iter(PlantedSource()))["x"]
    member.step(x, x, 1e-3)
    decoder = member.dictionary.W_dec
    grad, rows = decoder.grad, decoder.detach()
    assert grad.grad_fn is None and not grad.requires_grad
    assert (grad * rows).sum(1).abs().max() < 1e-6 * grad.norm()


def test_resampling_schedule_revives_dead_features() -> None:
    """Inputs on a few positive rays leave about half the random features dead for good; the
    resampling schedule brings them back."""

    class Rays:
        rays = F.normalize(torch.rand(3, D, generator=torch.Generator().manual_seed(0)), dim=-1)

        def __iter__(self):
            generator = torch.Generator().manual_seed(1)
            while True:
                yield {"x": torch.rand(128, 3, generator=generator) @ self.rays}

    base = TrainSpec("x", d_dict=64, l1=1e-3, lr=1e-2, warmup_steps=0, dead_window=20)
    plain, resampled = train_dictionaries(
        Rays(), [base, replace(base, resample_every=25)], 110, progress=False
    )
    assert plain.config.metrics["train_dead_fraction"] > 0.1
    assert (
        resampled.config.metrics["train_dead_fraction"]
        < 0.5 * plain.config.metrics["train_dead_fraction"]
    )


def test_grid_trains_in_one_pass() -> None:
    source = PlantedSource()
    specs = [
        TrainSpec("x", d_dict=size, l1=l1, warmup_steps=5)
        for size in (32, 64)
        for l1 in (1e-3, 1e-2, 1e-1)
    ]
    grid = train_dictionaries(source, specs, 20, progress=False)
    assert source.pulled == 20  # one stream read per step for all six dictionaries
    assert [(d.d_dict, d.config.hyperparameters["l1"]) for d in grid] == [
        (s.d_dict, s.l1) for s in specs
    ]
    assert all(d.config.hyperparameters["tokens"] == 20 * 128 for d in grid)
    alone = train_dictionaries(PlantedSource(), [specs[4]], 20, progress=False)
    assert_identical([grid[4]], alone)


@pytest.mark.parametrize("crash_at", [9, 17])
def test_resume_equals_uninterrupted(tmp_path, crash_at: int) -> None:
    """Crash mid-run (at batch 9 the checkpoint of step 5 still holds read-ahead batches for the
    normalisation estimate), resume from the last checkpoint: same weights and metrics."""
    specs = [
        TrainSpec(
            "x",
            d_dict=64,
            l1=1e-2,
            warmup_steps=6,
            decay_start=0.5,
            resample_every=8,
            dead_window=4,
            noise_std=0.05,
            normalize=True,
        ),
        TrainSpec("x", kind="topk", k=3, d_dict=48, seed=5, dead_window=3),  # AuxK on
        TrainSpec("x", kind="batchtopk", k=3, d_dict=32, seed=3),  # with its threshold
        TrainSpec("x", kind="jumprelu", d_dict=32, l1=1e-2, resample_every=8, dead_window=4),
        TrainSpec(  # activation counts and the input pool are checkpointed too
            "x",
            d_dict=32,
            l1=3e-2,
            warmup_steps=0,
            resample_every=6,
            dead_window=3,
            resample_duplicates=0.8,
            resample_min_fires=50,
            resample_target="residual",
            seed=2,
        ),
    ]
    run = dict(steps=30, progress=False, checkpoint_every=5)
    reference = train_dictionaries(PlantedSource(), specs, **run)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_dictionaries(PlantedSource(crash_at=crash_at), specs, checkpoint_dir=tmp_path, **run)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 5 * (
        (crash_at - 1) // 5
    )
    resumed = train_dictionaries(PlantedSource(), specs, checkpoint_dir=tmp_path, **run)
    assert_identical(reference, resumed)
    assert [d.config.to_dict() for d in reference] == [d.config.to_dict() for d in resumed]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left
    with pytest.raises(UserInputError, match="other TrainSpecs"):
        train_dictionaries(PlantedSource(), specs[:1], checkpoint_dir=tmp_path, **run)


def test_checkpoint_without_newer_fields_resumes(tmp_path) -> None:
    """A checkpoint written before the resampling fields existed resumes: absent fields are
    taken at their defaults."""
    specs = [TrainSpec("x", d_dict=32, warmup_steps=0, resample_every=4, dead_window=2)]
    run = dict(steps=12, progress=False, checkpoint_every=5)
    reference = train_dictionaries(PlantedSource(), specs, **run)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_dictionaries(PlantedSource(crash_at=9), specs, checkpoint_dir=tmp_path, **run)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for spec in state["specs"]:
        for name in ("resample_duplicates", "resample_min_fires", "resample_target"):
            del spec[name]
    torch.save(state, path)
    assert_identical(
        reference, train_dictionaries(PlantedSource(), specs, checkpoint_dir=tmp_path, **run)
    )


def test_seed_determines_weights() -> None:
    spec = TrainSpec("x", d_dict=64, noise_std=0.1, warmup_steps=3)
    a, b, c = (
        train_dictionaries(PlantedSource(), [s], 10, progress=False)[0]
        for s in (spec, spec, replace(spec, seed=1))
    )
    assert_identical([a], [b])
    assert not torch.equal(a.W_dec, c.W_dec)


def test_training_reduces_mse_on_planted_data() -> None:
    x = next(iter(PlantedSource(seed=9, batch=2048)))["x"]
    spec = TrainSpec("x", d_dict=64, l1=3e-3, lr=1e-2, warmup_steps=20)
    torch.manual_seed(0)
    initial = Dictionary.from_config(DictionaryConfig(kind="untied", d_in=D, d_dict=64))
    (trained,) = train_dictionaries(PlantedSource(), [spec], 400, progress=False)
    assert fvu(initial, x) > 0.5
    assert fvu(trained, x) < 0.05


def test_entropy_and_topk_give_sparse_codes() -> None:
    x = next(iter(PlantedSource(seed=9, batch=2048)))["x"]
    base = TrainSpec("x", d_dict=64, lr=1e-2, warmup_steps=20)
    specs = [
        replace(base, l1=0.0),
        replace(base, sparsity="entropy", l1=0.05),
        replace(base, kind="topk", k=4),
    ]
    dense, entropy, topk = train_dictionaries(PlantedSource(), specs, 400, progress=False)
    with torch.no_grad():
        l0 = [float((d.encode(x) > 0).sum(-1).float().mean()) for d in (dense, entropy, topk)]
    assert l0[1] < 0.5 * l0[0]  # the entropy penalty makes codes much sparser than no penalty
    assert l0[2] <= 4
    assert fvu(entropy, x) < 0.2 and fvu(topk, x) < 0.2


def test_normalisation_is_folded_into_weights() -> None:
    """Trained on s·x with mean ‖s·x‖² = d; the returned weights work on raw (large) activations."""

    class Scaled(PlantedSource):
        def __iter__(self):
            for batch in super().__iter__():
                yield {"x": 40.0 * batch["x"]}

    spec = TrainSpec("x", d_dict=64, l1=3e-3, lr=1e-2, warmup_steps=20, normalize=True)
    (d,) = train_dictionaries(Scaled(), [spec], 300, progress=False, normalize_batches=4)
    first = torch.cat([b["x"] for _, b in zip(range(4), Scaled(), strict=False)])
    expected = (D / first.pow(2).sum(-1).mean()).sqrt().item()
    assert d.config.hyperparameters["activation_scale"] == pytest.approx(expected, rel=1e-6)
    assert fvu(d, next(iter(Scaled(seed=9, batch=2048)))["x"]) < 0.05


def test_trainable_kinds_come_from_the_dictionary_classes() -> None:
    assert KINDS == ("tied", "untied", "topk", "batchtopk", "jumprelu", "transcoder")


def test_bad_input_raises_user_input_error() -> None:
    with pytest.raises(UserInputError, match="no entry 'y'"):
        train_dictionaries(PlantedSource(), [TrainSpec("y")], 2, progress=False)
    for bad in (
        dict(kind="sparse"),
        dict(kind="topk"),
        dict(sparsity="entropy", kind="topk", k=2),
        dict(lr=0.0),
        dict(resample_duplicates=0.0),
        dict(resample_duplicates=1.5),
        dict(resample_min_fires=-1),
        dict(resample_target="output"),
    ):
        with pytest.raises(UserInputError):
            TrainSpec("x", **bad)


# Sums and sums of squares of every trained weight (the resampling rules fire at every
# resampling); recorded before the kind-specific parts of the trainer moved onto the dictionary
# classes, and again when the trainer moved to fused Adam (changes of about 1e-6 relative).
TRAINED_CHECKSUMS = [
    {
        "W_dec": (4.3909043361, 64.0000008495),
        "W_enc": (7.9126594563, 26.2108249945),
        "b_enc": (0.0676472036, 0.0087909848),
        "b_dec": (0.0651745545, 0.0096690073),
    },
    {
        "W_dec": (9.1368268714, 64.0000003576),
        "W_enc": (0.7934901436, 46.5293887987),
        "b_enc": (-3.9387368928, 0.289027419),
        "b_dec": (0.0, 0.0),
    },
    {"W": (0.1075352411, 47.9767715924), "b": (-0.6601463924, 0.0085630263)},
    {"W": (-12.172487446, 47.8334865831), "b": (-6.6519777477, 0.7124101546)},
    {
        "W_dec": (11.8717120327, 63.9999998019),
        "W_enc": (6.5577166929, 36.4374045225),
        "b_enc": (-1.094832457, 0.0193385997),
        "b_dec": (0.1674340793, 0.0105084129),
    },
]


def test_trained_weights_are_unchanged() -> None:
    """Untied (standard and report recipe), tied and top-k dictionaries trained with every
    resampling rule and target give the recorded weights."""
    common = dict(
        d_dict=64, lr=1e-2, l1=0.1, warmup_steps=3, resample_every=6, dead_window=3, seed=1
    )
    specs = [
        TrainSpec("x", noise_std=0.05, normalize=True, resample_min_fires=300, **common),
        TrainSpec(
            "x", recipe="report", resample_target="residual", resample_duplicates=0.3, **common
        ),
        TrainSpec(
            "x",
            kind="tied",
            normalize=True,
            resample_duplicates=0.3,
            resample_min_fires=100,
            **common,
        ),
        TrainSpec("x", kind="tied", resample_target="residual", resample_min_fires=300, **common),
        TrainSpec(  # AuxK off: the recorded run predates it
            "x",
            kind="topk",
            k=3,
            aux_k=0,
            normalize=True,
            resample_target="residual",
            resample_duplicates=0.3,
            **common,
        ),
    ]
    trained = train_dictionaries(PlantedSource(), specs, 30, progress=False)
    for d, expected in zip(trained, TRAINED_CHECKSUMS, strict=True):
        sums = {
            name: (float(t.double().sum()), float(t.double().pow(2).sum()))
            for name, t in d.state_dict().items()
        }
        assert sums.keys() == expected.keys()
        for name, values in expected.items():
            assert sums[name] == pytest.approx(values, rel=1e-6, abs=1e-8), name
