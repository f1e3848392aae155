"""Circuit discovery as remote requests: the dictionaries travel and the circuit is the local one.

Each check runs under nnsight's `remote="local"` simulation and on a bare copy of the model with
this package unimportable (`BareServer`, which catches a trace body that still uses the local
splice), on a tiny random model with random dictionaries at resid.0 and resid.1.
"""

from __future__ import annotations

import json

import nnsight
import pytest
import torch
from conftest import random_untied
from test_remote import BareServer

from sae_circuits import attach, detach, load_model
from sae_circuits.circuits import feature_circuit, task_circuit
from sae_circuits.cli import main
from sae_circuits.splice import attached

A, B = 5, 7  # metric: logit(A) - logit(B)
SITES = ("resid.0", "resid.1")


class ToyTask:
    """Random clean prompts; the corrupted ones differ in their last token."""

    def __init__(self, n: int = 4, length: int = 6) -> None:
        generator = torch.Generator().manual_seed(0)
        self.clean = torch.randint(50, 250, (n, length), generator=generator)
        self.corrupt = self.clean.clone()
        self.corrupt[:, -1] = (self.clean[:, -1] + 1) % 250

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, A] - logits[:, -1, B]


@pytest.fixture(params=["local", "server"])
def spliced_lm(request, lm, bare, monkeypatch):
    """The model with dictionaries at resid.0 and resid.1; remote runs simulated by nnsight
    (`remote="local"`) or on the bare copy."""
    d = lm.config.hidden_size
    attach(lm, {site: random_untied(d, d_dict=16, seed=i) for i, site in enumerate(SITES, 1)})
    if request.param == "server":
        monkeypatch.setattr(lm, "_remote_backend", lambda *args: BareServer(bare), raising=False)
    yield lm
    detach(lm)


def assert_same_graph(there, here) -> None:
    """Same nodes and edges, every number within float32 rounding."""
    assert set(there.nodes) == set(here.nodes)
    assert set(there.edges) == set(here.edges)
    pairs = [(key, there.nodes[key], data) for key, data in here.nodes(data=True)]
    pairs += [((u, v), there.edges[u, v], data) for u, v, data in here.edges(data=True)]
    for key, found, data in pairs:
        for name, value in data.items():
            if isinstance(value, float):
                assert found[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, name)
            else:
                assert found[name] == value, (key, name)


@pytest.mark.parametrize(
    "options",
    [{"method": "attribution"}, {"method": "ablation"}, {"method": "attribution", "steps": 3}],
    ids=["attribution", "ablation", "integrated-gradients"],
)
def test_a_task_circuit_gives_the_local_nodes_edges_and_faithfulness(spliced_lm, options):
    task = ToyTask()
    kwargs = {"max_nodes": 8, "sizes": [2, 4], "progress": False, **options}
    here = task_circuit(spliced_lm, task, **kwargs)
    there = task_circuit(spliced_lm, task, remote="local", **kwargs)
    assert_same_graph(there.graph, here.graph)
    for point, local in zip(there.report["faithfulness"], here.report["faithfulness"], strict=True):
        assert point == pytest.approx(local, rel=1e-4, abs=1e-5, nan_ok=True)
    assert there.report["metric_clean"] == pytest.approx(here.report["metric_clean"], rel=1e-5)
    kept = [
        d for u, v, d in here.graph.edges(data=True) if v != "metric" and d["weight_exact"]
    ]  # an edge between features or error terms of resid.0 and resid.1, measured both ways
    assert kept and any(d["weight_attribution"] for d in kept)


def test_a_node_effect_matches_plain_torch_patching(spliced_lm):
    """The exact effect of the resid.0 error term, measured in a request, equals patching its
    clean value into the corrupted run by hand, with a forward hook on the unspliced module (the
    splice at resid.1 leaves the output unchanged: nothing is edited there)."""
    task = ToyTask()
    circuit = task_circuit(
        spliced_lm, task, max_nodes=None, sizes=None, progress=False, remote="local"
    )
    effect = circuit.graph.nodes["resid.0/error"]["effect_exact"]
    dictionary = attached(spliced_lm)["resid.0"]
    module = spliced_lm._module

    def run(ids: torch.Tensor, error: torch.Tensor | None = None):
        errors = []

        def splice(_, __, out):
            reconstruction = dictionary.decode(dictionary.encode(out))
            errors.append(out - reconstruction)
            return reconstruction + (errors[0] if error is None else error)

        handle = module.gpt_neox.layers[0].register_forward_hook(splice)
        try:
            with torch.no_grad():
                logits = module(ids).logits
        finally:
            handle.remove()
        return task.metric(logits).mean(), errors[0]

    _, clean_error = run(task.clean)
    corrupt_metric, _ = run(task.corrupt)
    patched_metric, _ = run(task.corrupt, clean_error)
    assert effect == pytest.approx(float(patched_metric - corrupt_metric), rel=1e-4, abs=1e-5)
    assert abs(effect) > 1e-4


@pytest.fixture(scope="module")
def documents():
    return [f"The keys {i} are on the table {i}. " * 3 for i in range(12)]


def test_a_feature_circuit_gives_the_local_tree(spliced_lm, documents):
    with torch.no_grad(), spliced_lm.trace(ToyTask().clean):
        acts = spliced_lm.gpt_neox.layers[1].sae.features.output.save()
    target = int(acts.amax((0, 1)).argmax())  # a feature that fires
    kwargs = {"depth": 1, "top_k": 3, "documents": documents, "tokens": 512, "ctx_len": 16}
    here = feature_circuit(spliced_lm, f"resid.1/{target}", progress=False, **kwargs)
    there = feature_circuit(
        spliced_lm, f"resid.1/{target}", progress=False, remote="local", **kwargs
    )
    assert_same_graph(there.graph, here.graph)
    assert here.graph.number_of_edges() > 0


@pytest.fixture
def task_file(tmp_path):
    """A task JSON file whose pairs tokenise to equal lengths on the tiny model."""
    names = [" Mary", " John", " Alice", " Bob"]
    pairs = [
        {
            "clean": f"When{a} and{b} went to the store,{b} gave a drink to",
            "corrupt": f"When{a} and{b} went to the store,{a} gave a drink to",
            "answer": a,
            "distractor": b,
        }
        for a in names
        for b in names
        if a != b
    ]
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({"name": "toy", "pairs": pairs}))
    return path


@pytest.mark.parametrize("root", ["task", "feature"])
def test_cli_circuit_remote_local_is_the_local_run(
    root, model_dirs, tmp_path, task_file, capsys, monkeypatch
):
    d = load_model(model_dirs["gpt_neox"]).config.hidden_size
    for i, site in enumerate(SITES):
        random_untied(d, d_dict=16, site=site, seed=i).save(tmp_path / "dicts" / site)
    argv = ["circuit", "--model", str(model_dirs["gpt_neox"])]
    argv += ["--dictionaries", str(tmp_path / "dicts"), "--json"]
    if root == "task":
        argv += ["--task", str(task_file), "--max-nodes", "6", "--sizes", "2", "4"]
    else:
        text = tmp_path / "corpus.txt"
        text.write_text("\n\n".join(f"The keys {i} are on the table {i}." * 3 for i in range(20)))
        argv += ["--feature", "resid.1/3", "--depth", "1", "--top-k", "2", "--text", str(text)]
        argv += ["--tokens", "512", "--ctx-len", "16", "--contexts", "4"]
    assert main(argv) == 0
    here = json.loads(capsys.readouterr().out)
    assert main([*argv, "--remote", "local"]) == 0
    there = json.loads(capsys.readouterr().out)
    assert there.keys() == here.keys()
    assert there["nodes"] == here["nodes"] and there["edges"] == here["edges"]
    assert there["faithfulness"] == pytest.approx(here["faithfulness"], rel=1e-4, abs=1e-5)
    local_nodes = {node["id"]: node for node in here["graph"]["nodes"]}
    for node in there["graph"]["nodes"]:
        for key, value in local_nodes[node["id"]].items():
            if isinstance(value, float):
                assert node[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (node["id"], key)
    assert here["edges"] > 0
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    assert main([*argv, "--remote"]) == 2
    err = capsys.readouterr().err.strip()
    assert "NDIF_API_KEY" in err and "Traceback" not in err
