"""Remote execution: the dictionaries travel inside each request and give the local numbers.

Two simulations: nnsight's own `remote="local"` (serialises the request, deserialises it with this
package's modules hidden, runs it here), and a stricter one that also runs the request on a
second, bare copy of the model, as a server that never saw the splice would.
"""

from __future__ import annotations

import importlib.abc
import sys

import pytest
import torch
from conftest import random_untied
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.serialization import UnknownPersistentIdError
from nnsight.schema.request import RequestModel
from nnsight.tracing.tracer import push_result

from sae_circuits import attach, detach, engine, load_model, spliced
from sae_circuits.engine import SiteEdit
from sae_circuits.errors import UserInputError
from sae_circuits.remote import check_remote, codec, parse_remote
from sae_circuits.sites import Site


class _NotInstalled(importlib.abc.MetaPathFinder):
    """Imports of this package fail, as on a server that never installed it (an editable install
    keeps a finder that nnsight's simulation does not remove)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] == "sae_circuits":
            raise ModuleNotFoundError(f"No module named {name!r} on the server")


class BareServer(LocalSimulationBackend):
    """Serialise the request, deserialise it against another, bare copy of the model with this
    package not importable, run it on that copy and bring back what it saved."""

    def __call__(self, tracer) -> None:
        from nnsight.ndif import pull_env

        pull_env()
        blob = RequestModel.serialize(tracer)
        hidden = self._hide_local_modules()
        blocker = _NotInstalled()
        sys.meta_path.insert(0, blocker)
        try:
            restored = RequestModel.deserialize(blob, self.model._remoteable_persistent_objects())
            restored.execute(restored.info.code)
        finally:
            sys.meta_path.remove(blocker)
            self._restore(hidden)
        # only the saved values come back, as from a server
        push_result(tracer.info.frame, dict(restored.info.frame.f_locals))


@pytest.fixture(params=["local", "server"])
def spliced_lm(request, lm, bare, monkeypatch):
    """The model with dictionaries at resid.0 and resid.1, its remote runs simulated either by
    nnsight (`remote="local"`) or on the bare copy."""
    d = lm.config.hidden_size
    attach(lm, {"resid.0": random_untied(d, seed=1), "resid.1": random_untied(d, seed=2)})
    if request.param == "server":
        monkeypatch.setattr(lm, "_remote_backend", lambda *args: BareServer(bare), raising=False)
    yield lm
    detach(lm)


PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The keys are"]


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 5] - logits[:, -1, 7]


def test_read_gives_the_local_features_errors_logits_and_metric(spliced_lm):
    tokens = engine.tokenize(spliced_lm, PROMPTS)
    sites = [Site.parse("resid.0"), Site.parse("resid.1")]
    here = engine.read(spliced_lm, tokens, sites, _metric)
    there = engine.read(spliced_lm, tokens, sites, _metric, remote="local")
    for site in sites:
        torch.testing.assert_close(there.features[site], here.features[site], rtol=0, atol=1e-6)
        torch.testing.assert_close(there.errors[site], here.errors[site], rtol=0, atol=1e-6)
    torch.testing.assert_close(there.logits, here.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(there.metric, here.metric, rtol=0, atol=1e-5)
    assert float(here.features[sites[1]].abs().sum()) > 0  # features fire


def test_all_logits_and_activations(spliced_lm):
    tokens = engine.tokenize(spliced_lm, PROMPTS)
    site = Site.parse("resid.0")
    here = engine.read(spliced_lm, tokens, [site], all_logits=True, activations=True)
    there = engine.read(
        spliced_lm, tokens, [site], remote="local", all_logits=True, activations=True
    )
    torch.testing.assert_close(there.logits, here.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(there.activations[site], here.activations[site], rtol=0, atol=1e-6)
    with torch.no_grad():
        hidden = spliced_lm._module(**tokens.inputs(), output_hidden_states=True).hidden_states
    torch.testing.assert_close(here.activations[site], hidden[1], rtol=0, atol=1e-5)
    assert here.logits.shape[:2] == tokens.input_ids.shape
    copies = [{}, {site: SiteEdit(error_mask=torch.ones(1, dtype=torch.bool))}]
    here = engine.edited(spliced_lm, tokens, copies, all_logits=True)
    there = engine.edited(spliced_lm, tokens, copies, remote="local", all_logits=True)
    torch.testing.assert_close(there.logits, here.logits, rtol=0, atol=1e-5)
    assert here.logits.shape[:3] == (2, *tokens.input_ids.shape)


def test_a_read_that_stops_after_its_site(spliced_lm):
    tokens = engine.tokenize(spliced_lm, PROMPTS)
    site = Site.parse("resid.0")
    full = engine.read(spliced_lm, tokens, [site])
    for remote in (False, "local"):
        stopped = engine.read(spliced_lm, tokens, [site], _metric, remote=remote, stop=True)
        assert stopped.logits is None and stopped.metric is None
        torch.testing.assert_close(stopped.features[site], full.features[site], rtol=0, atol=1e-6)


def test_a_feature_activation_matches_plain_torch(spliced_lm):
    """The carried splice encodes what the dictionary encodes, read off an unspliced model."""
    tokens = engine.tokenize(spliced_lm, PROMPTS)
    site = Site.parse("resid.0")
    dictionary = spliced(spliced_lm, site)._module.dictionary
    with torch.no_grad():
        hidden = spliced_lm._module(**tokens.inputs(), output_hidden_states=True).hidden_states
    there = engine.read(spliced_lm, tokens, [site], remote="local")
    torch.testing.assert_close(
        there.features[site], dictionary.encode(hidden[1]), rtol=0, atol=1e-5
    )


def test_edited_gives_the_local_patching_effects(spliced_lm):
    """An exact patching curve point (the metric with one feature set) and a node effect (the
    metric with the error term of resid.0 zeroed), in one forward of three copies."""
    tokens = engine.tokenize(spliced_lm, PROMPTS)
    first, second = Site.parse("resid.0"), Site.parse("resid.1")
    feature = torch.zeros(64, dtype=torch.bool)
    feature[3] = True
    copies = [
        {},
        {second: SiteEdit(features_mask=feature, features_value=2.0)},
        {first: SiteEdit(error_mask=torch.ones(1, dtype=torch.bool), error_value=0.0)},
    ]
    here = engine.edited(spliced_lm, tokens, copies, _metric)
    there = engine.edited(spliced_lm, tokens, copies, _metric, remote="local")
    torch.testing.assert_close(there.logits, here.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(there.metric, here.metric, rtol=0, atol=1e-5)
    assert not torch.allclose(here.metric[1], here.metric[0])  # the edits change the metric
    assert not torch.allclose(here.metric[2], here.metric[0])


def test_a_metric_that_branches_on_shapes_travels_as_a_graph():
    from sae_circuits.remote import portable_metric

    answers = torch.tensor([3, 5])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1] if logits.dim() == 3 else logits
        return last[torch.arange(last.shape[0], device=last.device), answers.to(last.device)]

    graph = portable_metric(metric, (2, 4, 10))
    logits = torch.randn(2, 4, 10)
    assert graph is not None
    torch.testing.assert_close(graph(logits), metric(logits))


def test_an_untraceable_metric_is_computed_here(spliced_lm):
    def metric(logits: torch.Tensor) -> torch.Tensor:
        if float(logits.sum()) > float("inf"):  # branches on data: torch.fx cannot trace it
            raise AssertionError
        return _metric(logits)

    tokens = engine.tokenize(spliced_lm, PROMPTS)
    here = engine.read(spliced_lm, tokens, [], metric)
    there = engine.read(spliced_lm, tokens, [], metric, remote="local")
    torch.testing.assert_close(there.metric, here.metric, rtol=0, atol=1e-5)


def test_the_local_splice_is_back_after_a_remote_run(spliced_lm):
    tokens = engine.tokenize(spliced_lm, PROMPTS)
    site = Site.parse("resid.1")
    before = engine.read(spliced_lm, tokens, [site]).features[site]
    engine.read(spliced_lm, tokens, [site], remote="local")
    torch.testing.assert_close(engine.read(spliced_lm, tokens, [site]).features[site], before)


def test_a_mounted_splice_cannot_be_run_by_a_server(lm, bare):
    """Why the dictionaries must travel: a request that uses the local splice's hook points
    refers to a submodule the server's model does not have, and to this package's classes."""
    attach(lm, {"resid.0": random_untied(lm.config.hidden_size)})
    try:
        hook = spliced(lm, "resid.0")
        ids = engine.tokenize(lm, PROMPTS).input_ids
        with (
            pytest.raises((UnknownPersistentIdError, ModuleNotFoundError), match="sae"),
            torch.no_grad(),
            lm.trace(ids, backend=BareServer(bare)),
        ):
            hook.features.output.save()
    finally:
        detach(lm)


def test_every_trainable_kind_travels_as_plain_torch():
    from sae_circuits import Dictionary, DictionaryConfig

    x = torch.randn(2, 3, 16)
    for kind, extra in [("untied", {}), ("tied", {}), ("topk", {"k": 4}), ("jumprelu", {})]:
        dictionary = Dictionary.from_config(
            DictionaryConfig(kind=kind, d_in=16, d_dict=32, **extra)
        )
        portable = codec(dictionary)
        torch.testing.assert_close(portable.encode(x), dictionary.encode(x))
        f = dictionary.encode(x)
        torch.testing.assert_close(portable.reconstruct(f, x), dictionary.reconstruct(f, x))


def test_remote_without_an_api_key_is_one_clear_error(lm, monkeypatch):
    import nnsight

    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(UserInputError, match="NDIF_API_KEY"):
        check_remote(lm, True)


def test_ndif_runs_only_hub_models(lm, monkeypatch):
    import nnsight

    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "key")
    with pytest.raises(UserInputError, match="hub id"):
        check_remote(lm, True)


def test_parse_remote():
    assert parse_remote(None) is False
    assert parse_remote("ndif") is True
    assert parse_remote("local") == "local"
    with pytest.raises(UserInputError, match="--remote takes"):
        parse_remote("cloud")


def test_the_remote_option():
    import argparse

    from sae_circuits.cli.common import add_remote_argument

    parser = argparse.ArgumentParser()
    add_remote_argument(parser)
    assert parser.parse_args([]).remote is False
    assert parser.parse_args(["--remote"]).remote is True
    assert parser.parse_args(["--remote", "local"]).remote == "local"
    with pytest.raises(SystemExit):
        parser.parse_args(["--remote", "cloud"])


def test_evaluate_gives_the_local_metrics(lm, bare, monkeypatch):
    from sae_circuits import evaluate

    d = lm.config.hidden_size
    dictionaries = {"resid.0": random_untied(d, seed=1), "resid.1": random_untied(d, seed=2)}
    batches = [engine.tokenize(lm, PROMPTS).input_ids]
    here = evaluate(lm, dictionaries, batches, progress=False)
    there = evaluate(lm, dictionaries, batches, progress=False, remote="local")
    monkeypatch.setattr(lm, "_remote_backend", lambda *args: BareServer(bare), raising=False)
    server = evaluate(lm, dictionaries, batches, progress=False, remote="local")
    for site, metrics in here.items():
        for key, value in metrics.items():
            assert there[site][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
            assert server[site][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key


def test_cli_eval_remote_local(model_dirs, tmp_path, capsys, monkeypatch):
    import json

    import nnsight

    from sae_circuits.cli import main

    d = load_model(model_dirs["gpt_neox"]).config.hidden_size
    random_untied(d, site="resid.0").save(tmp_path / "d")
    argv = ["eval", "--model", str(model_dirs["gpt_neox"]), "--dictionary", str(tmp_path / "d")]
    argv += ["--tokens", "64", "--ctx-len", "16", "--json"]
    assert main(argv) == 0
    here = json.loads(capsys.readouterr().out)
    assert main([*argv, "--remote", "local"]) == 0
    there = json.loads(capsys.readouterr().out)
    assert here.keys() == there.keys()
    for key, value in here.items():
        assert there[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    assert main([*argv, "--remote"]) == 2
    err = capsys.readouterr().err.strip()
    assert "NDIF_API_KEY" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def embedded():
    return load_model()


@pytest.mark.parametrize("simulation", ["local", "server"])
def test_an_ioi_curve_gives_the_local_points(embedded, simulation, monkeypatch):
    from sae_circuits import load_dictionaries, load_task
    from sae_circuits.patching_curves import patching_curve

    if simulation == "server":
        bare = BareServer(load_model())
        monkeypatch.setattr(embedded, "_remote_backend", lambda *args: bare, raising=False)

    site = Site.parse("resid.2")
    dictionary = load_dictionaries("main", [site])[site]
    train = load_task("ioi", embedded, n=8, seed=1, split="train")
    test = load_task("ioi", embedded, n=8, seed=2, split="heldout")
    here = patching_curve(embedded, train, test, site, dictionary, max_features=3)
    there = patching_curve(embedded, train, test, site, dictionary, max_features=3, remote="local")
    assert there.features == here.features
    assert there.restored == pytest.approx(here.restored, rel=1e-4, abs=1e-5)
    assert there.kl == pytest.approx(here.kl, rel=1e-4, abs=1e-6)
    assert there.ceiling == pytest.approx(here.ceiling, rel=1e-4, abs=1e-5)
    assert there.error_restored == pytest.approx(here.error_restored, rel=1e-4, abs=1e-5)
    assert here.clean_metric != pytest.approx(here.corrupt_metric)


def test_cli_harvest_remote_local(model_dirs, tmp_path, capsys):
    from safetensors.torch import load_file

    from sae_circuits.buffer import read_shard_index
    from sae_circuits.cli import main

    argv = ["harvest", "--model", str(model_dirs["gpt_neox"]), "--site", "resid.1"]
    argv += ["--site", "mlp.0", "--tokens", "100", "--ctx-len", "16", "--batch-size", "4"]
    argv += ["--json"]
    assert main([*argv, "--out", str(tmp_path / "here")]) == 0
    assert main([*argv, "--out", str(tmp_path / "there"), "--remote", "local"]) == 0
    capsys.readouterr()
    shards = read_shard_index(tmp_path / "here")["shards"]
    assert shards and shards == read_shard_index(tmp_path / "there")["shards"]
    for shard in shards:
        name = shard if isinstance(shard, str) else shard["file"]
        here, there = load_file(tmp_path / "here" / name), load_file(tmp_path / "there" / name)
        assert here.keys() == there.keys()
        for key in here:
            torch.testing.assert_close(there[key], here[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "mode", [["resid.0/3"], ["resid.0", "--frequencies"], ["resid.0", "--vs-neurons"]]
)
def test_cli_inspect_remote_local(model_dirs, tmp_path, capsys, mode):
    import json

    from sae_circuits.cli import main

    d = load_model(model_dirs["gpt_neox"]).config.hidden_size
    random_untied(d, site="resid.0").save(tmp_path / "d")
    argv = ["inspect", *mode, "--model", str(model_dirs["gpt_neox"])]
    argv += ["--dictionary", str(tmp_path / "d"), "--tokens", "64", "--ctx-len", "16", "--json"]
    assert main(argv) == 0
    here = json.loads(capsys.readouterr().out)
    assert main([*argv, "--remote", "local"]) == 0
    there = json.loads(capsys.readouterr().out)
    _assert_close_json(there, here)


def _assert_close_json(there, here) -> None:
    """Equal structure, numbers equal to float rounding."""
    if isinstance(here, dict):
        assert there.keys() == here.keys()
        for key in here:
            _assert_close_json(there[key], here[key])
    elif isinstance(here, list):
        assert len(there) == len(here)
        for a, b in zip(there, here, strict=True):
            _assert_close_json(a, b)
    elif isinstance(here, float):
        assert there == pytest.approx(here, rel=1e-4, abs=1e-5, nan_ok=True)
    else:
        assert there == here
