"""Write the notebooks in this folder from the cell sources below (run after editing them).

    python notebooks/make_notebooks.py            # sources only
    python notebooks/make_notebooks.py --execute  # run each top to bottom and store its outputs

Each notebook reads SAE_CIRCUITS_QUICK=1 (set by the test suite) to use small settings; with
--execute they run at full settings (--quick: small ones). Stored outputs are deterministic: stderr (progress bars,
warnings, timings) and execution timestamps are left out, and Bokeh's element ids are numbered.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import nbformat

HERE = Path(__file__).parent
SETUP = "import os\nQUICK = os.environ.get('SAE_CIRCUITS_QUICK') == '1'  # small settings in CI"

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}


def notebook(name: str, cells: list[tuple[str, str]]) -> None:
    NOTEBOOKS[name] = cells


notebook(
    "01_quickstart",
    [
        (
            "md",
            "# Quickstart: a dictionary spliced into a model\n\nLoad the embedded model (a small GPT-NeoX, the architecture of Pythia) and a shipped dictionary, splice it in, and read, edit and differentiate its features with plain nnsight.",
        ),
        ("code", SETUP),
        (
            "code",
            "from sae_circuits import load_model, load_dictionaries, attach, spliced, detach, evaluate, token_batches\n\nmodel = load_model()  # offline: the model shipped with the package\nmodel",
        ),
        (
            "md",
            "Splice the residual-stream dictionary of layer 2. From now on every trace runs `decode(f) + error` there; with nothing edited, the outputs are unchanged.",
        ),
        (
            "code",
            "dictionaries = load_dictionaries('main', sites=['resid.2'])\nattach(model, dictionaries)\nsae = spliced(model, 'resid.2')   # the same envoy as model.gpt_neox.layers[2].sae\nprompt = 'When Mary and John went to the store, John gave a drink to'",
        ),
        ("md", "## Read features with plain nnsight"),
        (
            "code",
            "with model.trace(prompt):\n    features = model.gpt_neox.layers[2].sae.features.output.save()\n    error = sae.error.output.save()\n    logits = model.output.logits.save()\n\nlast = features[0, -1]\nprint('active features at the last token:', (last > 0).sum().item())\nprint('top features:', last.topk(5))\nprint('prediction:', model.tokenizer.decode(logits[0, -1].argmax()))",
        ),
        ("md", "## Ablate the most active feature and watch the IOI logit difference"),
        (
            "code",
            "mary, john = (model.tokenizer.encode(' ' + name)[0] for name in ('Mary', 'John'))\ntop = last.argmax().item()\n\nwith model.trace(prompt):\n    clean = model.output.logits[0, -1].save()\nwith model.trace(prompt):\n    sae.features.output[:, -1, top] = 0\n    ablated = model.output.logits[0, -1].save()\n\nprint('logit(Mary) - logit(John): clean', (clean[mary] - clean[john]).item(), 'ablated', (ablated[mary] - ablated[john]).item())",
        ),
        ("md", "## Gradients: attribution of the logit difference to each feature"),
        (
            "code",
            "with model.trace(prompt):\n    f = sae.features.output\n    out = model.output.logits\n    metric = out[0, -1, mary] - out[0, -1, john]\n    with metric.backward():\n        grad = f.grad.save()\n\nattribution = (grad * features)[0].sum(0)\nprint('features with the largest grad x activation:', attribution.abs().topk(5))",
        ),
        ("md", "## Quality of the dictionary, measured through spliced traces"),
        (
            "code",
            "from sae_circuits.text import default_documents\n\nbatches = list(token_batches(model.tokenizer, default_documents(True), 128, 16, 2048 if QUICK else 16384))\nevaluate(model, dictionaries, batches, progress=False)['resid.2']",
        ),
        ("code", "detach(model)"),
    ],
)


notebook(
    "02_ioi_patching",
    [
        (
            "md",
            "# IOI feature patching\n\nPatch dictionary features from clean IOI prompts into ABC-corrupted ones, `x' = x̄ + Σ_{i∈F} (c_i − c̄_i) d_i`, first by hand in plain nnsight, then as curves against PCA, neurons and random directions.",
        ),
        ("code", SETUP),
        (
            "code",
            "import torch\nfrom sae_circuits import load_model, load_dictionaries, attach, detach, spliced, load_task\nfrom sae_circuits.interventions import run\nfrom sae_circuits.patching_curves import compare_bases\n\nmodel = load_model()\nn = 12 if QUICK else 64\ntrain = load_task('ioi', model, 'abc', n, 0, 'train')\ntest = load_task('ioi', model, 'abc', n, 0, 'heldout')\nprint(test.clean[0], '|', test.corrupt[0])\nclean, corrupt = run(model, test).metric, run(model, test, corrupted=True).metric\nprint('logit(IO) - logit(S): clean', clean.mean().item(), 'corrupted', corrupt.mean().item())",
        ),
        (
            "md",
            "## By hand: copy the clean values of a few features into the corrupted run\n\nThe splice keeps the corrupted error term, so setting features is exactly the patching formula.",
        ),
        (
            "code",
            "site = 'resid.2'\nattach(model, load_dictionaries('main', sites=[site]))\nsae = spliced(model, site)\nwith model.trace(test.clean):\n    c = sae.features.output.save()\nchosen = (c[:, -1] > 0).float().sum(0).topk(5).indices   # five features active on many clean prompts\nwith model.trace(test.corrupt):\n    f = sae.features.output.clone()\n    f[:, :, chosen] = c[:, :, chosen]\n    sae.features.output = f\n    logits = model.output.logits.save()\npatched = test.metric(logits)\nprint('restored share with 5 features:', ((patched.mean() - corrupt.mean()) / (clean.mean() - corrupt.mean())).item())\ndetach(model)",
        ),
        (
            "md",
            "## Curves: features ranked by attribution on the train templates, patched on held-out ones",
        ),
        (
            "code",
            "dictionary = load_dictionaries('main', sites=[site])[site]\ncurves = compare_bases(model, train, test, site, dictionary, max_features=10 if QUICK else 50)\nfor name, curve in curves.items():\n    print(f'{name:8s} k for 50%: {curve.k_to_restore(0.5)}  k for 80%: {curve.k_to_restore(0.8)}  restored at K: {curve.restored[-1]:.2f}')",
        ),
        (
            "code",
            "import matplotlib.pyplot as plt\nfor name, curve in curves.items():\n    plt.plot(curve.ks, curve.restored, label=name)\nplt.xlabel('directions patched'); plt.ylabel('share of the IOI gap restored'); plt.legend(); plt.show()",
        ),
    ],
)

notebook(
    "03_circuit_discovery",
    [
        (
            "md",
            "# Circuit discovery\n\nA metric-rooted IOI circuit over the residual-stream dictionaries by attribution patching, every kept edge re-measured by exact patching, and a feature-rooted tree by exact ablation.",
        ),
        ("code", SETUP),
        (
            "code",
            "from sae_circuits import load_model, load_dictionaries, attach, detach, load_task\nfrom sae_circuits.circuits import task_circuit, feature_circuit\n\nmodel = load_model()\nlayers = model.config.num_hidden_layers\nsites = [f'resid.{layer}' for layer in range(layers)]\nattach(model, load_dictionaries('main', sites=sites))\ntask = load_task('ioi', model, 'swap', 20 if QUICK else 32, 0, 'heldout')  # name swap: node scores see the name features",
        ),
        (
            "code",
            "circuit = task_circuit(model, task, max_nodes=20 if QUICK else 100, steps=5, sizes=(5, 10, 20, 50, 100), progress=False)  # steps=5: integrated gradients\nprint(circuit.summary())\ncircuit   # renders inline",
        ),
        (
            "md",
            "The graph is a plain `networkx.DiGraph`: nodes `<site>/<feature>` (and `<site>/error`, `metric`), edges with the attribution `weight` and the exactly measured `weight_exact`.",
        ),
        (
            "code",
            "g = circuit.graph\nsorted(g.edges(data=True), key=lambda e: -abs(e[2]['weight']))[:5]",
        ),
        (
            "code",
            "top = max((n for n in g if n.startswith(f'resid.{layers - 1}/') and not n.endswith('/error')), key=lambda n: abs(g.nodes[n].get('effect', 0)), default=None)\nif top is not None:\n    tree = feature_circuit(model, top, depth=1, top_k=3, tokens=4096 if QUICK else 32768, progress=False)\n    print(tree.summary())\ndetach(model)",
        ),
    ],
)

notebook(
    "04_toy_ground_truth",
    [
        (
            "md",
            "# Ground truth: do we recover planted features?\n\nSynthetic activations from known sparse features (Sharkey et al.), a grid of L1 × dictionary size trained in one pass, scored by mean max cosine similarity (MMCS) with the truth, and the three ways of choosing (size, L1) without ground truth.",
        ),
        ("code", SETUP),
        (
            "code",
            "from sae_circuits.toy import ToyConfig, ToyData, sweep, select\n\nconfig = ToyConfig(h=32, g=64, seed=0) if QUICK else ToyConfig()\ndata = ToyData(config)\nresult = sweep(data, l1s=(0.01, 0.1, 1.0) if QUICK else (0.003, 0.01, 0.03, 0.1, 0.3, 1.0), ratios=(0.5, 1.0, 2.0), steps=300 if QUICK else 3000, progress=False)\nresult.mmcs.round(3)",
        ),
        ("code", "select(result)"),
        ("code", "for row in result.rows():\n    print(row)"),
    ],
)


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        for kind, src in cells
    ]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # stable ids: a rebuilt notebook differs only where its cells do
    return nb


def execute(nb: nbformat.NotebookNode, quick: bool = False) -> None:
    """Run `nb` in a fresh kernel in this folder and keep only its deterministic outputs."""
    import nbclient

    env = {
        "SAE_CIRCUITS_QUICK": "1" if quick else "0",
        "BOKEH_SIMPLE_IDS": "1",
        "PYTHONHASHSEED": "0",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(
            nb,
            timeout=1800,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(HERE)}},
        ).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = [o for o in cell.outputs if o.get("name") != "stderr"]
        for output in cell.outputs:
            for key, value in output.get("data", {}).items():
                if isinstance(value, str) and key.startswith("text/html"):
                    output["data"][key] = _numbered_ids(value)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _numbered_ids(html: str) -> str:
    """`html` with each random UUID (Bokeh's document and element ids) replaced by a number in
    order of appearance, so that re-running gives the same file."""
    ids: dict[str, str] = {}
    return _UUID.sub(lambda m: ids.setdefault(m.group(0), f"id-{len(ids) + 1}"), html)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--execute", action="store_true", help="run them and store the outputs")
    parser.add_argument("--quick", action="store_true", help="with --execute: small settings")
    parser.add_argument("names", nargs="*", help="only these notebooks (default: all)")
    args = parser.parse_args()
    for name, cells in NOTEBOOKS.items():
        if args.names and name not in args.names:
            continue
        nb = build(name, cells)
        if args.execute:
            execute(nb, args.quick)
        path = HERE / f"{name}.ipynb"
        tmp = path.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)
        print(f"wrote notebooks/{name}.ipynb")


if __name__ == "__main__":
    main()
