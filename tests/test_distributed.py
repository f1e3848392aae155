"""Training under torch.distributed: 2 CPU processes (gloo) against 1 on the same batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_circuits.cli import main
from sae_circuits.dictionary import Dictionary
from sae_circuits.distributed import balanced_owners
from sae_circuits.training import TrainSpec, train_dictionaries

D, BATCH, STEPS = 16, 64, 24
SPECS = [
    TrainSpec(
        "a",
        kind="untied",
        d_dict=48,
        l1=3e-3,
        warmup_steps=4,
        resample_every=8,
        dead_window=4,
        normalize=True,
        seed=1,
    ),
    TrainSpec("a", kind="topk", d_dict=48, k=4, warmup_steps=4, dead_window=3, seed=2),
    TrainSpec("b", kind="jumprelu", d_dict=32, warmup_steps=4, seed=3),
]
RUN = dict(steps=STEPS, progress=False, checkpoint_every=8, log_every=4)


def planted_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(32, D, generator=generator)
    batches = []
    for _ in range(STEPS):
        active = torch.rand(BATCH, 32, generator=generator) < 0.1
        a = (active * torch.rand(BATCH, 32, generator=generator)) @ features
        batches.append({"a": a, "b": 2 * a.roll(1, dims=1) + 1})
    return batches


class Share:
    """Rank `rank`'s rows of every planted batch (all of them for one process), resumable;
    `stop`: the stream ends before that batch (a crash)."""

    def __init__(self, rank: int = 0, world: int = 1, stop: int | None = None) -> None:
        self.rank, self.world, self.stop = rank, world, stop
        self.position = 0

    def __iter__(self):
        for number, batch in enumerate(planted_batches()):
            if number < self.position:
                continue
            if self.stop is not None and number >= self.stop:
                return
            self.position = number + 1
            yield {key: value.chunk(self.world)[self.rank] for key, value in batch.items()}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def _worker(rank: int, port: int, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        run = dict(RUN, checkpoint_dir=Path(out) / "checkpoint")
        distribute = mode == "sites"
        if mode == "resume":  # crash after 13 batches (checkpoint at step 8), then resume
            train_dictionaries(Share(rank, 2, stop=13), SPECS, **run)
        trained = train_dictionaries(Share(rank, 2), SPECS, distribute_sites=distribute, **run)
        torch.save([d.state_dict() for d in trained], Path(out) / f"rank{rank}.pt")
        torch.save([d.config.metrics for d in trained], Path(out) / f"metrics{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path: Path, mode: str) -> list[list[dict[str, torch.Tensor]]]:
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path), mode), nprocs=2, start_method="spawn"
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    return train_dictionaries(Share(), SPECS, **RUN)


def _assert_close(states, reference) -> None:
    for state, expected in zip(states, reference, strict=True):
        for name, value in expected.items():
            scale = value.abs().max().clamp(min=1e-6)
            delta = (state[name] - value).abs().max()
            assert delta <= 1e-3 * scale, f"{name}: max |ΔW| {delta:.3g} (scale {scale:.3g})"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["data", "resume", "sites"])
def test_two_processes_train_the_dictionaries_of_one(tmp_path, one_process, mode) -> None:
    """Data parallel (also across a crash and resume) and dictionaries spread over the ranks
    (`distribute_sites`): the same weights as one process on the concatenated batches, and the
    same on both ranks; only rank 0 wrote the checkpoint, which holds both ranks' streams."""
    ranks = _two_processes(tmp_path, mode)
    _assert_close(ranks[0], [d.state_dict() for d in one_process])
    for mine, theirs in zip(ranks[0], ranks[1], strict=True):
        assert all(torch.equal(mine[name], theirs[name]) for name in mine)
    metrics = [torch.load(tmp_path / f"metrics{r}.pt", weights_only=True) for r in range(2)]
    assert repr(metrics[0]) == repr(metrics[1])  # equal, nan (no loss in raw units) included
    for got, dictionary in zip(metrics[0], one_process, strict=True):
        expected = dictionary.config.metrics
        assert got["train_dead"] == expected["train_dead"]
        assert got["train_l0"] == pytest.approx(expected["train_l0"], rel=1e-3)
        assert got["train_mse"] == pytest.approx(expected["train_mse"], rel=1e-3)
    checkpoint = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == STEPS and len(checkpoint["streams"]) == 2
    assert [s["source"]["position"] for s in checkpoint["streams"]] == [STEPS, STEPS]


def test_balanced_owners_spread_the_work() -> None:
    assert balanced_owners([4.0, 1.0, 1.0, 2.0], 2) == [0, 1, 1, 1]
    assert balanced_owners([1.0], 3) == [0]


@pytest.mark.slow
@pytest.mark.parametrize("spread", [[], ["--distribute-sites"]])
def test_torchrun_trains_from_shards_like_one_process(model_dirs, tmp_path, capsys, spread) -> None:
    """`torchrun --nproc-per-node 2 --no-python sae-circuits train --from-shards`: each process
    reads its half of every batch of the shards; the dictionaries rank 0 saves are the one
    process's (normalisation, resampling and dead latents included), and only rank 0 prints.
    With --distribute-sites each process trains one of the two sites' dictionaries."""
    model = str(model_dirs["gpt_neox"])
    shards = str(tmp_path / "shards")
    harvest = ["harvest", "--model", model, "--site", "resid.1", "--site", "mlp.0", "--tokens",
               "1024", "--out", shards, "--ctx-len", "16", "--batch-size", "8"]  # fmt: skip
    assert main(harvest) == 0
    train = ["train", "--model", model, "--from-shards", shards, "--dict-size", "48",
             "--batch-size", "64", "--eval-tokens", "256", "--ctx-len", "16", "--warmup-steps",
             "3", "--resample-every", "5", "--dead-window", "3", "--normalize", "--json"]  # fmt: skip
    assert main([*train, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "--no-python", "sae-circuits", *train, *spread, "--out", str(tmp_path / "two")]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)  # one JSON document: rank 0's
    assert [row["site"] for row in rows] == ["mlp.0", "resid.1"]
    for row in rows:
        one, two = (Dictionary.load(tmp_path / run / row["site"]) for run in ("one", "two"))
        assert two.config.hyperparameters["tokens"] == one.config.hyperparameters["tokens"]
        _assert_close([two.state_dict()], [one.state_dict()])
        assert row["fve"] == pytest.approx(one.config.metrics["fve"], rel=1e-3, abs=1e-4)
