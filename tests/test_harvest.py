"""Harvest once, train many: resumable shards, `harvest`, `train --from-shards`."""

from __future__ import annotations

import json
from dataclasses import fields
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file

from sae_circuits.batches import split_batch
from sae_circuits.buffer import ShardStream, harvest, read_shard_index, write_shards
from sae_circuits.cli import main
from sae_circuits.dictionary import Dictionary
from sae_circuits.errors import UserInputError
from sae_circuits.sites import Site
from sae_circuits.testing import save_random_model
from sae_circuits.text import default_documents, token_batches
from sae_circuits.training import TrainSpec, train_dictionaries

SITES = [Site.parse("resid.0"), Site.parse("mlp.1")]


def _contexts(model, n: int = 12):
    return list(islice(token_batches(model.tokenizer, default_documents(False), 16, 4), n))


def _rows(folder) -> dict[str, torch.Tensor]:
    index = read_shard_index(folder)
    shards = [load_file(str(folder / name)) for name in index["shards"]]
    return {site: torch.cat([shard[site] for shard in shards]) for site in index["sites"]}


class Crash(RuntimeError):
    pass


def _crashing(batches, after: int):
    yield from batches[:after]
    raise Crash


def test_shards_hold_the_harvest_in_order(models, tmp_path) -> None:
    model = models["gpt_neox"]
    contexts = _contexts(model)
    write_shards(model, SITES, contexts, tmp_path, tokens=300, shard_size=64, progress=False)
    direct = [harvest(model, SITES, *split_batch(batch)) for batch in contexts]
    rows = _rows(tmp_path)
    for site in SITES:
        expected = torch.cat([part[str(site)] for part in direct])[:300]
        torch.testing.assert_close(rows[str(site)], expected, rtol=0, atol=0)
    index = read_shard_index(tmp_path)
    assert index["rows"] == 300 and index["complete"]
    assert len(ShardStream(tmp_path, batch_size=50)) == 4 * (64 // 50) + (300 - 4 * 64) // 50


@pytest.mark.parametrize("crash_after", [3, 7])
def test_interrupted_harvest_continues_to_the_same_shards(models, tmp_path, crash_after) -> None:
    """A crash between shards (and with rows of a context batch already written) then a second
    call: the same shards as one uninterrupted harvest, the harvested batches not run again."""
    model = models["gpt_neox"]
    contexts = _contexts(model)
    run = dict(tokens=600, shard_size=48, progress=False, source={"model": "m"})
    write_shards(model, SITES, contexts, tmp_path / "whole", **run)
    with pytest.raises(Crash):
        write_shards(model, SITES, _crashing(contexts, crash_after), tmp_path / "cut", **run)
    with pytest.raises(UserInputError, match="did not finish"):
        ShardStream(tmp_path / "cut")
    partial = json.loads((tmp_path / "cut" / "shards.json").read_text())
    assert partial["rows"] > 0 and partial["skip"] > 0  # rows of a batch were written
    skipped = []

    def counted(batches):
        for number, batch in enumerate(batches):
            skipped.append(number)
            yield batch

    calls = []
    original = harvest

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    import sae_circuits.buffer as buffer

    buffer.harvest, saved = spy, buffer.harvest
    try:
        write_shards(model, SITES, counted(contexts), tmp_path / "cut", **run)
    finally:
        buffer.harvest = saved
    assert len(calls) == len(skipped) - partial["contexts"]  # no batch harvested twice
    whole, cut = _rows(tmp_path / "whole"), _rows(tmp_path / "cut")
    for site in whole:
        torch.testing.assert_close(cut[site], whole[site], rtol=0, atol=0)
    assert (
        read_shard_index(tmp_path / "cut")["shards"]
        == read_shard_index(tmp_path / "whole")["shards"]
    )
    with pytest.raises(UserInputError, match="other sites or from another source"):
        write_shards(model, SITES[:1], contexts, tmp_path / "cut", **run)


def test_train_from_shards_equals_training_on_the_same_activations(
    model_dirs, tmp_path, capsys, monkeypatch
) -> None:
    """`harvest` then `train --from-shards`: the model is not run to train, and the dictionary is
    the one `train_dictionaries` gives on the shards' stream."""
    model_dir = str(model_dirs["gpt_neox"])
    shards = tmp_path / "shards"
    common = ["--model", model_dir, "--ctx-len", "16", "--json"]
    assert main(["harvest", *common, "--site", "resid.1", "--tokens", "700", "--out", str(shards),
                 "--shard-size", "256", "--batch-size", "8"]) == 0  # fmt: skip
    harvested = json.loads(capsys.readouterr().out)
    assert harvested["rows"] == 700 and harvested["shards"] == 3

    import sae_circuits.pipeline as pipeline

    def no_buffer(*args, **kwargs):
        raise AssertionError("the model was run to train")

    monkeypatch.setattr(pipeline, "ActivationBuffer", no_buffer)
    out = tmp_path / "out"
    train = ["train", *common, "--from-shards", str(shards), "--dict-size", "48",
             "--batch-size", "64", "--eval-tokens", "256", "--warmup-steps", "3",
             "--out", str(out), "--seed", "3"]  # fmt: skip
    assert main(train) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["site"] for row in rows] == ["resid.1"]
    trained = Dictionary.load(out / "resid.1")
    hyper = trained.config.hyperparameters
    assert hyper["tokens"] == 640  # 700 rows: 2 batches of 64 from each shard of 256, 1 from 188
    spec = TrainSpec(**{f.name: hyper[f.name] for f in fields(TrainSpec)})
    steps = hyper["steps"]
    (expected,) = train_dictionaries(
        ShardStream(shards, 64, seed=3), [spec], steps, progress=False, model="m"
    )
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], value, rtol=0, atol=1e-6)

    other = save_random_model(tmp_path / "other", "gpt_neox", seed=1)
    assert main([*train, "--model", str(other)]) == 2  # the last --model counts
    assert "not harvested from this model" in capsys.readouterr().err


def test_harvest_and_from_shards_refuse_bad_input(model_dirs, tmp_path, capsys) -> None:
    model = ["--model", str(model_dirs["gpt_neox"])]
    harvest_args = [
        "harvest",
        *model,
        "--site",
        "resid.9",
        "--tokens",
        "10",
        "--out",
        str(tmp_path),
    ]
    assert main(harvest_args) == 2
    assert "resid.9" in capsys.readouterr().err
    assert main(["train", *model, "--from-shards", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no activation shards" in capsys.readouterr().err
