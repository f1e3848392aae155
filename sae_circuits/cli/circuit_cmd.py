"""`sae-circuits circuit`: feature circuits for a task (attribution or exact patching) or rooted at a
feature (recursive exact ablation), verified, with faithfulness, written as JSON/GraphML/DOT/PNG and
as an interactive page (`--html`); `--remote [local]` runs its forwards as NDIF requests."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sae_circuits.circuits.methods import ABLATIONS, METHODS
from sae_circuits.cli.common import (
    add_json_argument,
    add_model_argument,
    add_remote_argument,
    model_from_args,
    print_json,
    print_result,
    wrote,
)
from sae_circuits.constants import TASKS
from sae_circuits.errors import UserInputError
from sae_circuits.nodes import Node
from sae_circuits.sites import Site, SiteMap

if TYPE_CHECKING:
    from sae_circuits.protocols import Model
    from sae_circuits.tasks import Task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "circuit",
        description=(
            "With --task: nodes are the features and error terms of the spliced sites (default: "
            "every resid site of the set), scored by their effect on the task metric "
            "when patched from the clean into the corrupted run (attribution patching, or exact "
            "patching with --method ablation); edges join consecutive sites. Kept nodes and edges "
            "are re-measured the other way and the agreement reported; faithfulness is measured "
            "with everything outside the circuit mean-ablated. With --feature: the tree of "
            "upstream features by exact ablation on the feature's top-activating contexts. "
            "--html FILE writes a page that opens offline: the circuit by layer (pan/zoom, hover "
            "for effects, a slider pruning edges by |weight|); clicking a node opens its top "
            "contexts and logit effects, found on --text (or the held-out text) with --contexts, "
            "--tokens and --ctx-len. --remote sends every forward of the discovery to NDIF "
            "(--remote local: nnsight's simulation of a request, here), the dictionaries inside "
            "each request."
        ),
    )
    add_model_argument(parser)
    root = parser.add_mutually_exclusive_group(required=True)
    root.add_argument("--task", help=f"a built-in task ({', '.join(TASKS)}) or a task JSON file")
    root.add_argument("--feature", help="target feature <site>/<index>, e.g. resid.3/1234")
    parser.add_argument(
        "--dictionaries",
        default="main",
        metavar="SET|DIR",
        help="a dictionary set shipped for the model, or a folder with one sub-folder per site "
        "(default: main)",
    )
    parser.add_argument("--sites", nargs="+", help="sites to splice for --task")
    task = parser.add_argument_group("task circuits")
    task.add_argument("--method", choices=METHODS, default="attribution")
    task.add_argument("--node-threshold", type=float, default=0.0, help="min |node effect|")
    task.add_argument("--edge-threshold", type=float, default=0.0, help="min |edge weight|")
    task.add_argument("--max-nodes", type=int, default=100, help="keep at most N nodes")
    task.add_argument("--steps", type=int, default=1, help="integrated-gradient steps (1: plain)")
    task.add_argument("--prompts", type=int, default=64, help="prompt pairs of a built-in task")
    task.add_argument("--corruption", help="corruption of a built-in task (default: its first)")
    task.add_argument("--no-verify", action="store_true", help="skip the re-measurement")
    task.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[5, 10, 20, 50, 100, 200],
        help="circuit sizes of the faithfulness curve",
    )
    task.add_argument(
        "--ablation",
        choices=ABLATIONS,
        default="mean",
        help="how faithfulness removes the nodes outside the circuit: their mean per template and "
        "position over the clean prompts (Marks et al.; default) or their value on the corrupted "
        "prompt (activation patching: the contrast the node scores measure)",
    )
    feature = parser.add_argument_group("feature-rooted circuits (and the panels of --html)")
    feature.add_argument("--depth", type=int, default=3, help="levels below the target")
    feature.add_argument("--top-k", type=int, default=3, help="parents kept per feature")
    feature.add_argument("--contexts", type=int, default=8, help="top contexts per feature")
    feature.add_argument("--tokens", type=int, default=32768, help="corpus tokens searched")
    feature.add_argument("--ctx-len", type=int, default=64, help="corpus context length")
    feature.add_argument("--text", help=".txt/.jsonl corpus (default: the model's held-out text)")
    parser.add_argument(
        "--out",
        help="folder for circuit_<task>.json (--feature resid.3/12: circuit_resid.3_12.json) "
        "with the node-link graph and the report, and the same graph as .graphml, .dot and .png",
    )
    parser.add_argument(
        "--html",
        metavar="FILE",
        help="also write the interactive page of the circuit, with a feature panel per node",
    )
    add_remote_argument(parser)
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sae_circuits.circuits import feature_circuit, task_circuit
    from sae_circuits.circuits.export import node_link
    from sae_circuits.cli.tables import circuit_table, feature_tree
    from sae_circuits.models import is_embedded
    from sae_circuits.remote import check_remote
    from sae_circuits.splice import attach, detach
    from sae_circuits.text import default_documents, read_documents, token_batches
    from sae_circuits.views import circuit_view, node_reports, write_page

    model = model_from_args(args)
    check_remote(model, args.remote)
    progress = not args.json
    if args.task:
        dictionaries = circuit_dictionaries(args.dictionaries, args.sites, args.device)
        attach(model, dictionaries)
        circuit = task_circuit(
            model,
            _task(args, model),
            method=args.method,
            node_threshold=args.node_threshold,
            max_nodes=args.max_nodes,
            edge_threshold=args.edge_threshold,
            steps=args.steps,
            verify=not args.no_verify,
            sizes=args.sizes,
            progress=progress,
            remote=args.remote,
            ablation=args.ablation,
        )
        name = "circuit_" + Path(args.task).stem
    else:
        target = Node.parse(args.feature)
        site = target.site
        if site.layer is None:
            raise UserInputError(f"--feature needs a per-layer site, not {site}")
        low = max(site.layer - args.depth, 0)
        chain = [Site(site.kind, layer) for layer in range(low, site.layer + 1)]
        dictionaries = circuit_dictionaries(args.dictionaries, chain, args.device)
        attach(model, dictionaries)
        documents = read_documents(args.text) if args.text else None
        circuit = feature_circuit(
            model,
            target,
            depth=args.depth,
            top_k=args.top_k,
            documents=documents,
            tokens=args.tokens,
            ctx_len=args.ctx_len,
            contexts=args.contexts,
            progress=progress,
            remote=args.remote,
        )
        name = "circuit_" + target.id.replace("/", "_")
    files = circuit.save(args.out, name) if args.out else []
    if args.html:
        detach(model)
        documents = (
            read_documents(args.text) if args.text else default_documents(is_embedded(model))
        )
        batches = token_batches(model.tokenizer, documents, args.ctx_len, 16, args.tokens)
        reports = node_reports(
            model, circuit, dictionaries, batches, args.contexts, progress, args.remote
        )
        files.append(write_page(circuit_view(circuit, reports, name), args.html))
    if args.json:
        print_json({**circuit.summary(files), "graph": node_link(circuit.graph)})
    else:
        if args.feature:
            print_result(feature_tree(circuit, target.id))
        print_result(circuit_table(circuit))
    wrote(*files)
    return 0


def _task(args: argparse.Namespace, model: Model) -> Task:
    from sae_circuits.tasks import Task, load_task

    if Path(args.task).suffix == ".json":
        return Task.from_json(args.task, model)
    return load_task(args.task, model, corruption=args.corruption, n=args.prompts)


def circuit_dictionaries(source: str, sites: Sequence[str | Site] | None, device: str) -> SiteMap:
    """Dictionaries at `sites` (default: the resid sites) from a shipped set or a folder."""
    from sae_circuits.dictionary import CONFIG_FILE, Dictionary, load_dictionaries

    folder = Path(source)
    if folder.is_dir():
        present = sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
        wanted = [Site.parse(site) for site in (present if sites is None else sites)]
        missing = [str(site) for site in wanted if str(site) not in present]
        if missing:
            raise UserInputError(f"{folder} has no dictionary at {', '.join(missing)}")
        found = SiteMap(
            (site, Dictionary.load(folder / str(site), device=device)) for site in wanted
        )
    else:
        found = load_dictionaries(source, sites=sites, device=device)
    if sites is None:
        found = SiteMap((site, d) for site, d in found.items() if site.kind == "resid")
    if not found:
        raise UserInputError(f"no resid dictionaries in {source}; name --sites")
    return found
