"""Circuit discovery on a constructed model whose answer is known.

A tiny GPT-NeoX whose block 1 is the identity (attention and MLP outputs zeroed), with hand-built
dictionaries at resid.0 and resid.1: feature 0 of each reads and writes the direction d along which
the clean and corrupted prompts differ (they differ only in their last token), and the unembedding
is tilted so that d raises the metric. So resid.0/0 -> resid.1/0 -> metric is the circuit.
"""

from __future__ import annotations

import json
import math

import networkx as nx
import pytest
import torch
from conftest import random_untied

from sae_circuits import attach, detach, engine, load_model
from sae_circuits.circuits import (
    faithfulness,
    faithfulness_curve,
    feature_circuit,
    read_node_link,
    sign_agreement,
    spearman,
    task_circuit,
)
from sae_circuits.circuits import patching as P
from sae_circuits.cli import main
from sae_circuits.errors import UserInputError
from sae_circuits.sites import Site
from sae_circuits.testing import save_random_model

UP, DOWN = "resid.0", "resid.1"
A, B = 5, 7  # metric: logit(A) - logit(B)
TOKEN, OTHER = 40, 41  # the clean / corrupted last token


class ToyTask:
    def __init__(self, clean: torch.Tensor, corrupt: torch.Tensor) -> None:
        self.clean, self.corrupt = clean, corrupt

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, A] - logits[:, -1, B]


def make_task(n: int = 4, length: int = 6, seed: int = 0) -> ToyTask:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(50, 250, (n, length), generator=generator)
    clean[:, -1] = TOKEN
    corrupt = clean.clone()
    corrupt[:, -1] = OTHER
    return ToyTask(clean, corrupt)


def build(folder, epsilon: float):
    """The constructed model (OTHER's embedding = TOKEN's + epsilon * noise) and its task."""
    torch.manual_seed(0)
    model = load_model(save_random_model(folder, "gpt_neox", d_model=32, n_layers=2))
    module = model._module
    block = module.gpt_neox.layers[1]
    with torch.no_grad():
        for linear in (block.attention.dense, block.mlp.dense_4h_to_h):
            linear.weight.zero_()
            linear.bias.zero_()
        embed = module.gpt_neox.embed_in.weight
        embed[OTHER] = embed[TOKEN] + epsilon * torch.randn(embed.shape[1]) * embed[TOKEN].norm()
    task = make_task()
    with torch.no_grad(), model.trace(task.clean):
        x_clean = model.gpt_neox.layers[0].output[:, -1].save()
    with torch.no_grad(), model.trace(task.corrupt):
        x_corrupt = model.gpt_neox.layers[0].output[:, -1].save()
    d = (x_clean - x_corrupt).mean(0)
    d = d / d.norm()
    with torch.no_grad():  # make d raise the metric
        unembed = module.get_output_embeddings().weight
        unembed[A] += 5 * d
        unembed[B] -= 5 * d
    bias = 1.0 - (x_corrupt @ d).min()  # U0, D0 active on every clean and corrupted prompt
    dictionaries = {}
    for seed, site in enumerate((UP, DOWN), 1):
        dictionary = random_untied(32, d_dict=16, site=site, seed=seed)
        with torch.no_grad():
            dictionary.b_dec.zero_()
            dictionary.b_enc.fill_(-0.5)
            dictionary.W_enc[:, 0] = d
            dictionary.b_enc[0] = bias
            dictionary.W_dec[0] = d
        dictionaries[site] = dictionary
    attach(model, dictionaries)
    return model, task


@pytest.fixture(scope="module")
def wired(tmp_path_factory):
    return build(tmp_path_factory.mktemp("wired"), epsilon=1.0)


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    return build(tmp_path_factory.mktemp("linear"), epsilon=0.01)


def feature_edges(graph):
    return {
        (u, v): d
        for u, v, d in graph.edges(data=True)
        if graph.nodes[u]["kind"] == "feature" and graph.nodes[v]["kind"] == "feature"
    }


@pytest.mark.parametrize("method", ["attribution", "ablation"])
def test_both_methods_find_the_wired_edge(wired, method):
    model, task = wired
    circuit = task_circuit(model, task, method=method, max_nodes=10, sizes=None, progress=False)
    graph = circuit.graph
    edges = feature_edges(graph)
    strongest = max(edges, key=lambda e: abs(edges[e]["weight"]))
    assert strongest == (f"{UP}/0", f"{DOWN}/0")
    assert edges[strongest]["weight"] > 0
    assert graph.has_edge(f"{DOWN}/0", "metric")
    for name in (f"{UP}/0", f"{DOWN}/0"):
        assert graph.nodes[name]["effect"] > 0
        assert graph.nodes[name]["effect_exact"] > 0
    assert circuit.report["verification"]["edges"]["n"] > 0


def test_attribution_matches_exact_patching_in_linear_regime(linear):
    model, task = linear
    circuit = task_circuit(model, task, max_nodes=None, sizes=None, progress=False)
    graph = circuit.graph
    nodes = [d for _, d in graph.nodes(data=True) if "effect_attribution" in d]
    edges = [d for _, _, d in graph.edges(data=True) if "weight_attribution" in d]
    est = torch.tensor([d["effect_attribution"] for d in nodes])
    exact = torch.tensor([d["effect_exact"] for d in nodes])
    torch.testing.assert_close(est, exact, rtol=0, atol=0.01 * exact.abs().max().item())
    est = torch.tensor([d["weight_attribution"] for d in edges])
    exact = torch.tensor([d["weight_exact"] for d in edges])
    torch.testing.assert_close(est, exact, rtol=0, atol=0.01 * exact.abs().max().item())
    assert circuit.report["verification"]["nodes"]["spearman"] == pytest.approx(1.0)


def test_integrated_gradients_are_complete(wired):
    """Every node of a site patched together restores the clean metric (everything downstream
    reads the site), so a site's integrated-gradient attributions sum to m(clean) − m(corrupt),
    up to the O(1/steps) error of the Riemann sum; the plain gradient is far off here."""
    model, task = wired
    sites = [Site.parse(UP), Site.parse(DOWN)]
    inputs = engine.task_tokens(model, task)
    clean = engine.read(model, inputs.clean, sites, inputs.metric)
    corrupt = engine.read(model, inputs.corrupt, sites, inputs.metric)
    total = float(clean.metric.mean() - corrupt.metric.mean())
    grads = P.integrated_gradients(model, inputs, sites, clean, corrupt, steps=32)
    plain = P.gradients(model, inputs, sites)
    for site in sites:
        integrated = P.node_attribution(grads, clean, corrupt, site).values.sum()
        assert float(integrated) == pytest.approx(total, rel=0.1)
        assert float(P.node_attribution(plain, clean, corrupt, site).values.sum()) < 0.5 * total


def test_faithfulness_full_graph_and_by_hand(wired):
    model, task = wired
    circuit = task_circuit(model, task, max_nodes=None, sizes=[3], progress=False)
    curve = {p["nodes"]: p for p in circuit.report["faithfulness"]}
    everything = max(curve)
    assert curve[everything]["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    assert curve[0]["faithfulness"] == 0.0
    top = sorted(
        (n for n, d in circuit.graph.nodes(data=True) if d["kind"] != "metric"),
        key=lambda n: -abs(circuit.graph.nodes[n]["effect"]),
    )[:3]
    assert faithfulness(model, task, top) == pytest.approx(curve[3]["faithfulness"], abs=1e-6)
    full, circuit_metric, empty = by_hand(model, task, top)
    assert curve[everything]["metric"] == pytest.approx(full, abs=1e-4)
    assert curve[3]["metric"] == pytest.approx(circuit_metric, abs=1e-4)
    assert curve[0]["metric"] == pytest.approx(empty, abs=1e-4)
    hand = (circuit_metric - empty) / (full - empty)
    assert curve[3]["faithfulness"] == pytest.approx(hand, rel=0.01)


def test_mean_ablation_uses_per_group_means(wired):
    """Half the prompts end in OTHER: one mean over all prompts mixes the two kinds, per-group
    means (`task.groups`) do not. Both match plain torch hooks."""
    model, task = wired
    clean, corrupt = task.clean.clone(), task.corrupt.clone()
    clean[1::2, -1], corrupt[1::2, -1] = OTHER, TOKEN
    mixed, grouped = ToyTask(clean, corrupt), ToyTask(clean, corrupt)
    grouped.groups = ["token", "other", "token", "other"]
    nodes = [f"{UP}/0", f"{DOWN}/error"]
    empties = []
    for case in (mixed, grouped):
        empty, kept = (p["metric"] for p in faithfulness_curve(model, case, nodes, [2]))
        _, circuit_metric, hand_empty = by_hand(model, case, nodes)
        assert empty == pytest.approx(hand_empty, abs=1e-4)
        assert kept == pytest.approx(circuit_metric, abs=1e-4)
        empties.append(empty)
    assert abs(empties[0] - empties[1]) > 1.0


def test_faithfulness_with_one_prompt_per_group_is_undefined(wired):
    model, task = wired
    single = ToyTask(task.clean, task.corrupt)
    single.groups = ["a", "b", "c", "d"]
    with pytest.warns(UserWarning) as warned:
        curve = faithfulness_curve(model, single, [f"{UP}/0"], [1])
    messages = " | ".join(str(w.message) for w in warned)
    assert "single prompt" in messages and "undefined" in messages
    assert all(math.isnan(point["faithfulness"]) for point in curve)


def test_corrupt_ablation_matches_plain_torch(wired):
    """With ablation="corrupt" the nodes outside the circuit take their corrupted-run values: the
    empty circuit is the corrupted run, the full one the clean run, and a partial circuit matches
    plain torch hooks."""
    model, task = wired
    nodes = [f"{UP}/0", f"{DOWN}/error"]
    curve = faithfulness_curve(model, task, nodes, [2], ablation="corrupt")
    full, circuit_metric, empty = by_hand(model, task, nodes, ablation="corrupt")
    corrupted = task.metric(model._module(task.corrupt).logits).mean().item()
    assert empty == pytest.approx(corrupted, abs=1e-4)
    assert curve[0]["metric"] == pytest.approx(empty, abs=1e-4)
    assert curve[1]["metric"] == pytest.approx(circuit_metric, abs=1e-4)
    assert curve[1]["faithfulness"] == pytest.approx((circuit_metric - empty) / (full - empty))
    everything = task_circuit(model, task, max_nodes=None, sizes=[], ablation="corrupt")
    assert everything.report["faithfulness"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserInputError, match="unknown ablation"):
        faithfulness_curve(model, task, nodes, [2], ablation="zero")


def by_hand(model, task, nodes, ablation="mean") -> tuple[float, float, float]:
    """m(M), m(C), m(∅) with plain torch forward hooks on the Hugging Face model; the nodes
    outside take their per-group means, or with ablation="corrupt" their corrupted-run values."""
    saes = {
        site: model._module.gpt_neox.layers[int(site[-1])].sae.dictionary for site in (UP, DOWN)
    }
    keep = {site: torch.zeros(17, dtype=torch.bool) for site in saes}
    for node in nodes:
        site, index = node.split("/")
        keep[site][16 if index == "error" else int(index)] = True

    def metric(mode, means=None, prompts=task.clean):
        store = {}

        def hook_for(site):
            def hook(module, args, x):
                sae = saes[site]
                f = sae.encode(x)
                e = x - sae.decode(f)
                store[site] = (f, e)
                if mode == "clean":
                    return x
                k = keep[site] if mode == "circuit" else torch.zeros(17, dtype=torch.bool)
                f = torch.where(k[:-1], f, means[site][0])
                e = e if k[-1] else means[site][1].expand_as(e)
                return sae.decode(f) + e

            return hook

        layers = model._module.gpt_neox.layers
        handles = [layers[int(s[-1])].register_forward_hook(hook_for(s)) for s in saes]
        try:
            with torch.no_grad():
                value = task.metric(model._module(prompts).logits).mean().item()
        finally:
            for handle in handles:
                handle.remove()
        return value, store

    full, store = metric("clean")
    if ablation == "corrupt":
        _, corrupted = metric("clean", prompts=task.corrupt)
        circuit, _ = metric("circuit", corrupted)
        empty, _ = metric("empty", corrupted)
        return full, circuit, empty
    labels = getattr(task, "groups", None) or [""] * len(task.clean)
    same = torch.tensor([[a == b for b in labels] for a in labels], dtype=torch.float32)
    same = same / same.sum(1, keepdim=True)  # row b averages the prompts of b's group
    means = {
        s: (torch.einsum("bc,c...->b...", same, f), torch.einsum("bc,c...->b...", same, e))
        for s, (f, e) in store.items()
    }
    circuit, _ = metric("circuit", means)
    empty, _ = metric("empty", means)
    return full, circuit, empty


def test_exports_round_trip(wired, tmp_path):
    model, task = wired
    circuit = task_circuit(model, task, max_nodes=6, sizes=None, progress=False)
    files = circuit.save(tmp_path)
    assert sorted(p.suffix for p in files) == [".dot", ".graphml", ".json", ".png"]
    assert nx.utils.graphs_equal(read_node_link(tmp_path / "circuit.json"), circuit.graph)
    back = nx.read_graphml(tmp_path / "circuit.graphml")
    assert set(back.edges) == set(circuit.graph.edges)
    assert "digraph" in (tmp_path / "circuit.dot").read_text()
    assert circuit._repr_png_().startswith(b"\x89PNG")
    report = json.loads((tmp_path / "circuit.json").read_text())["report"]
    assert report["method"] == "attribution"


def test_feature_circuit_finds_the_wired_parent(wired):
    model, _ = wired
    documents = [" ".join(f"w{i % 7}" for i in range(k, k + 40)) for k in range(30)]
    circuit = feature_circuit(
        model,
        f"{DOWN}/0",
        depth=2,
        top_k=2,
        documents=documents,
        tokens=2048,
        ctx_len=32,
        contexts=4,
        progress=False,
    )
    parents = {u: d["weight"] for u, _, d in circuit.graph.in_edges(f"{DOWN}/0", data=True)}
    assert max(parents, key=lambda u: abs(parents[u])) == f"{UP}/0"
    assert parents[f"{UP}/0"] > 0
    assert circuit.report["verification"]["edges"]["n"] == len(parents)


def test_statistics():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # scipy's value
    assert spearman([1], [2]) is None
    assert sign_agreement([1, -1, 2], [3, 1, 0]) == pytest.approx(1 / 3)


@pytest.fixture
def feature_circuit_argv(tmp_path, model_dirs):
    """`circuit --feature resid.1/3` on a tiny random model with dictionaries from a folder."""
    for i, site in enumerate(("resid.0", "resid.1")):
        random_untied(32, d_dict=16, site=site, seed=i).save(tmp_path / "dicts" / site)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"The keys {i} are on the table {i}." * 3 for i in range(40)))
    argv = [
        "circuit", "--model", str(model_dirs["gpt_neox"]), "--dictionaries",
        str(tmp_path / "dicts"), "--feature", "resid.1/3", "--depth", "1", "--top-k", "2",
        "--text", str(text), "--tokens", "1024", "--ctx-len", "32", "--contexts", "4",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    return argv


def test_cli_json(tmp_path, feature_circuit_argv):
    argv = [*feature_circuit_argv, "--json"]
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    result = json.loads(stdout.getvalue())
    keys = {"nodes", "edges", "faithfulness", "faithfulness_ablation", "verification", "files"}
    assert set(result) == keys | {"graph"}
    assert set(result["verification"]) == {"spearman", "sign_agreement"}
    assert result["nodes"] >= 1 and len(result["files"]) == 4
    ids = [node["id"] for node in result["graph"]["nodes"]]
    assert len(ids) == result["nodes"] and "resid.1/3" in ids
    assert len(result["graph"]["edges"]) == result["edges"]
    assert (tmp_path / "out" / "circuit_resid.1_3.json").is_file()
    argv[argv.index("--feature") + 1] = "resid.1/999"
    assert main(argv[:-3]) == 2  # out of range: a one-line error


def test_cli_feature_tree_names_the_parents(tmp_path, feature_circuit_argv, capsys):
    """Without --json: the tree of parent features (effect, tokens) on stdout, one `wrote` line
    per file on stderr."""
    assert main(feature_circuit_argv) == 0
    out, err = capsys.readouterr()
    graph = json.loads((tmp_path / "out" / "circuit_resid.1_3.json").read_text())
    parents = [e["source"] for e in graph["edges"] if e["target"] == "resid.1/3"]
    assert out.startswith("resid.1/3  effect ")
    assert parents and all(f"── {parent}  effect " in out for parent in parents)
    assert "nodes / edges" in out
    written = [line for line in err.splitlines() if line.startswith("wrote ")]
    assert written == [f"wrote {tmp_path / 'out' / 'circuit_resid.1_3'}{ext}" for ext in
                       (".json", ".graphml", ".dot", ".png")]  # fmt: skip


def test_bad_input(wired):
    model, task = wired
    with pytest.raises(ValueError, match="unknown method"):
        task_circuit(model, task, method="magic")
    with pytest.raises(ValueError, match="no dictionary is attached"):
        task_circuit(model, task, sites=["resid.5"])
    with pytest.raises(ValueError, match="error node"):
        feature_circuit(model, f"{DOWN}/error")
    uneven = ToyTask(task.clean, task.corrupt[:, 1:])
    with pytest.raises(ValueError, match="equal token lengths"):
        task_circuit(model, uneven)
    dictionaries = detach(model)
    try:
        with pytest.raises(ValueError, match="no dictionaries"):
            task_circuit(model, task)
    finally:
        attach(model, dictionaries)
