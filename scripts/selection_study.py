"""The study of docs/selection.md: `select` grids and `eval --worst` on the embedded model.

    python scripts/selection_study.py --out selection_study   # then copy OUT/summary.md's tables

For each site (default `resid.2` and `mlp_hidden.1`) it trains 4 sizes x 5 L1 coefficients x 2
seeds in one pass (`selection.select_on_model`) and writes OUT/<site>/ (dictionaries, heatmaps,
selection.json). Then it lists the `--worst` predictions of the shipped `main` dictionary at
`resid.2` on held-out text, sorted into kinds (OUT/worst.json). OUT/summary.md holds every signal
as a table, the proposals, the worst predictions by kind, and the seconds (wall and CPU) of each
part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from sae_circuits import evaluate, load_dictionaries, load_model, token_batches
from sae_circuits.models import is_embedded, model_name
from sae_circuits.selection import GRIDS, METHOD_TITLES, GridSelection, select_on_model
from sae_circuits.text import default_documents, training_documents
from sae_circuits.training import TrainSpec

GRIDS_BY_SITE = {
    "resid.2": ([128, 256, 512, 1024], [0.3, 1.0, 3.0, 10.0, 30.0]),
    "mlp_hidden.1": ([128, 256, 512, 1024], [0.03, 0.1, 0.3, 1.0, 3.0]),
}
SHOWN = (*GRIDS, "nmse")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _table(result: GridSelection, name: str) -> str:
    values = result.grids[name]
    lines = [
        "| size \\ L1 | " + " | ".join(f"{c:g}" for c in result.coefficients) + " |",
        "| ---: " * (len(result.coefficients) + 1) + "|",
    ]
    for size, row in zip(result.sizes, values, strict=True):
        cells = [
            "–" if not np.isfinite(v) else (f"{v:.0f}" if name == "dead" else f"{v:.3f}")
            for v in row
        ]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _summary(result: GridSelection, seconds: float, cpu: float) -> str:
    title = {**GRIDS, "nmse": "normalised MSE (held-out)"}
    parts = [f"## {result.site}\n", f"{seconds:.0f} s wall, {cpu:.0f} s CPU.\n"]
    for name in SHOWN:
        parts.append(f"{title[name]}:\n\n{_table(result, name)}\n")
    chance = result.chance
    parts.append(
        "chance MMCS (random directions) per size: larger "
        + ", ".join("–" if v is None else f"{v:.3f}" for v in chance["mmcs_larger"])
        + "; between seeds "
        + ", ".join(f"{v:.3f}" for v in chance["seed_mmcs"])
        + "\n"
    )
    rows = ["| method | size | L1 | CE increase | L0 | dead | MMCS seeds |", "| --- " * 7 + "|"]
    for method, (r, c) in result.proposals.items():
        g = result.grids
        rows.append(
            f"| {METHOD_TITLES[method]} | {result.sizes[r]} | {result.coefficients[c]:g} | "
            f"{g['ce_delta'][r, c]:.4f} | {g['l0'][r, c]:.1f} | {g['dead'][r, c]:.0f} | "
            f"{g['seed_mmcs'][r, c]:.3f} |"
        )
    parts.append("proposals:\n\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def worst_kind(row: dict) -> str:
    """A rough kind of badly predicted token (by its text): the rest of a word split into pieces,
    the name that ends an IOI-style sentence ("... gave a drink to[[ Mary]]", "waved at"), the
    verb after a sentence's subject name ("Emma[[ d]]rove"), or anything else."""
    before, token = row["before"], row["token"]
    last = before.split(" ")[-1] if before.split(" ") else ""
    if token[:1].isalpha() and before[-1:].isalpha():
        return "word continued"
    if token.startswith(" ") and token[1:2].isupper() and before.rstrip().endswith((" to", " at")):
        return "IOI name"
    if token.startswith(" ") and token[1:2].islower() and last[:1].isupper() and last.isalpha():
        return "verb after a name"
    return "other"


def _worst_summary(rows: list[dict], tokens: int, seconds: float, cpu: float) -> str:
    kinds: dict[str, int] = {}
    for row in rows:
        kinds[worst_kind(row)] = kinds.get(worst_kind(row), 0) + 1
    lines = [
        f"## eval --worst {len(rows)}: main dictionary at resid.2, {tokens:,} held-out tokens\n",
        f"{seconds:.0f} s wall, {cpu:.0f} s CPU.\n",
        "by kind: " + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())) + "\n",
        "| ΔCE | CE clean | kind | context |",
        "| ---: | ---: | --- | --- |",
    ]
    for row in rows[:15]:
        context = row["context"].replace("\n", "⏎").replace("|", "\\|")
        lines.append(
            f"| {row['ce_increase']:.2f} | {row['ce_clean']:.2f} | {worst_kind(row)} | "
            f"`{context}` |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("selection_study"))
    parser.add_argument("--site", nargs="*", default=list(GRIDS_BY_SITE))
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--worst", type=int, default=100, help="0: skip eval --worst")
    parser.add_argument("--worst-tokens", type=int, default=65536)
    args = parser.parse_args()
    model = load_model()
    embedded = is_embedded(model)
    template = TrainSpec(key="", warmup_steps=30, dead_window=100)
    summaries = [
        f"# selection study on {model_name(model)}\n\n{args.tokens:,} training tokens, "
        f"{args.eval_tokens:,} held-out tokens, {os.environ.get('OMP_NUM_THREADS', 'all')} "
        "threads.\n"
    ]
    for site in args.site:
        sizes, l1s = GRIDS_BY_SITE[site]
        start, cpu = time.perf_counter(), _cpu_seconds()
        result = select_on_model(
            model,
            site,
            sizes,
            l1s,
            args.tokens,
            args.out / site,
            training_documents(embedded),
            default_documents(embedded),
            template=template,
            eval_tokens=args.eval_tokens,
            checkpoint_every=100,
        )
        summaries.append(_summary(result, time.perf_counter() - start, _cpu_seconds() - cpu))
        (args.out / "summary.md").write_text("\n".join(summaries))
        print(json.dumps(result.to_json()["proposals"], indent=1), flush=True)
    if args.worst:
        start, cpu = time.perf_counter(), _cpu_seconds()
        batches = token_batches(
            model.tokenizer, default_documents(embedded), 128, 16, args.worst_tokens
        )
        dictionaries = load_dictionaries("main", ["resid.2"])
        rows = evaluate(model, dictionaries, batches, worst=args.worst)["resid.2"]["worst"]
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "worst.json").write_text(json.dumps(rows, indent=1))
        summaries.append(_worst_summary(rows, args.worst_tokens, seconds, cpu))
        (args.out / "summary.md").write_text("\n".join(summaries))


if __name__ == "__main__":
    main()
