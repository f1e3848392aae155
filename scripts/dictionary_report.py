"""Quality table and feature-frequency histograms of the shipped dictionary sets.

Reads `dictionaries/<model>/<set>/<site>/config.json` (metrics measured by `sae-circuits train`
on held-out text), measures feature frequencies on held-out tokens, and writes
`dictionaries/<model>/README.md` (the table, one row per site) and
`dictionaries/<model>/<set>/frequencies.png`.

    python scripts/dictionary_report.py [--tokens 32768]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sae_circuits import load_dictionaries, load_model, shipped_sets, token_batches
from sae_circuits.buffer import harvest
from sae_circuits.models import EMBEDDED_MODEL_NAME
from sae_circuits.plotting import new_figure
from sae_circuits.resources import asset_dir
from sae_circuits.sites import SiteMap
from sae_circuits.text import default_documents

COLUMNS = [
    ("l0", "L0", "{:.1f}"),
    ("ce_delta", "CE increase", "{:.4f}"),
    ("kl", "KL", "{:.4f}"),
    ("fve", "FVE", "{:.3f}"),
    ("frac_alive", "% alive", "{:.1%}"),
    ("frac_dense", "% dense", "{:.1%}"),
    ("loss_recovered_mean", "% loss recovered (mean abl.)", "{:.1%}"),
]


def frequencies(model, dictionaries: SiteMap, tokens: int) -> dict[str, torch.Tensor]:
    """Share of held-out positions on which each feature fires, per dictionary (in forward order
    of the sites they write)."""
    # the site each dictionary reads: its own, or a transcoder's input site
    reads = {site: d.config.in_site or site for site, d in dictionaries.items()}
    counts = {str(site): torch.zeros(d.d_dict) for site, d in dictionaries.items()}
    positions = 0
    for ids in token_batches(model.tokenizer, default_documents(True), 128, 16, tokens):
        acts = harvest(model, sorted(set(reads.values())), ids, torch.ones_like(ids))
        with torch.no_grad():
            for site, d in dictionaries.items():
                counts[str(site)] += (d.encode(acts[str(reads[site])]) > 0).sum(0)
        positions += next(iter(acts.values())).shape[0]
    return {site: c / positions for site, c in counts.items()}


def histogram(freqs: dict[str, torch.Tensor], path: Path, title: str) -> None:
    sites = list(freqs)
    cols = min(4, len(sites))
    rows = -(-len(sites) // cols)
    fig = new_figure((3.2 * cols, 2.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, site in zip(axes.flat, sites, strict=False):
        f = freqs[site]
        alive = f[f > 0]
        ax.hist(torch.log10(alive).numpy(), bins=40, color="tab:blue")
        ax.set_title(f"{site} ({(f == 0).sum().item()} never fired)", fontsize=8)
        ax.set_xlabel("log10 feature density", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(sites) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def table(set_name: str, dictionaries) -> list[str]:
    lines = [
        f"### Set `{set_name}`",
        "",
        "| site | kind | size | k / L1 | " + " | ".join(header for _, header, _ in COLUMNS) + " |",
        "| --- " * (4 + len(COLUMNS)) + "|",
    ]
    for site, d in dictionaries.items():
        metrics = d.config.metrics
        cells = [fmt.format(metrics[key]) for key, _, fmt in COLUMNS]
        lines.append(
            f"| {site} | {d.kind} | {d.d_dict} | {_sparsity(d.config.hyperparameters)} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _sparsity(hyperparameters: dict) -> str:
    """k for top-k dictionaries, else the L1 coefficient."""
    if hyperparameters.get("sparsity") == "topk":
        return f"k={hyperparameters['k']}"
    return f"L1={hyperparameters['l1']:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    model = load_model()
    root = asset_dir("dictionaries") / EMBEDDED_MODEL_NAME
    sections = []
    for set_name in shipped_sets():
        dictionaries = load_dictionaries(set_name)  # in forward order
        freqs = frequencies(model, dictionaries, args.tokens)
        histogram(
            freqs, root / set_name / "frequencies.png", f"feature frequencies, set {set_name}"
        )
        sections += table(set_name, dictionaries) + [
            "",
            f"![frequencies]({set_name}/frequencies.png)",
            "",
        ]
    readme = root / "README.md"
    header, _, _ = (
        readme.read_text().partition("<!-- table -->") if readme.exists() else ("", "", "")
    )
    readme.write_text(header + "<!-- table -->\n\n" + "\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    main()
