"""L0 against CE increase and KL at one site of the embedded model, by dictionary recipe.

Stage 1 trains, in one pass over one activation harvest, untied dictionaries with an L1 penalty
(resampled), topk and batchtopk (AuxK) and jumprelu (L0 penalty) at several sparsities. Stage 2
continues every topk dictionary for the same number of tokens twice: with the KL objective through
the spliced model, and with MSE (the control at equal tokens). Every dictionary is evaluated on the
same held-out text; the table and the plot are written to `--out`. Each stage resumes from its
checkpoint and skips dictionaries already saved, so rerunning the same command continues.

    python scripts/pareto_study.py [--site resid.2] [--tokens 400000] [--finetune-tokens 100000]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from sae_circuits import Dictionary, load_model
from sae_circuits.models import EMBEDDED_MODEL_NAME
from sae_circuits.pipeline import output_folder, train_and_evaluate
from sae_circuits.plotting import new_figure
from sae_circuits.text import default_documents, training_documents
from sae_circuits.training import TrainSpec

RECIPES = {  # name: (kind, sparsity values: l1 or k, extra TrainSpec fields)
    "L1 (untied)": ("untied", [2.0, 4.0, 8.0], {"resample_every": 250}),
    "topk": ("topk", [12, 24, 48], {}),
    "batchtopk": ("batchtopk", [12, 24, 48], {}),
    "jumprelu": ("jumprelu", [0.1, 1.0, 10.0], {"resample_every": 250}),
}


def stage_one_specs(site: str, d_dict: int) -> dict[str, list[TrainSpec]]:
    base = TrainSpec(key=site, d_dict=d_dict, warmup_steps=200, dead_window=500, normalize=True)
    specs = {}
    for name, (kind, values, extra) in RECIPES.items():
        sparsity = "k" if kind in ("topk", "batchtopk") else "l1"
        specs[name] = [replace(base, kind=kind, **{sparsity: v}, **extra) for v in values]
    return specs


def finetune_specs(topk: list[tuple[Path, TrainSpec]], loss: str) -> list[TrainSpec]:
    return [
        replace(spec, init=str(folder), loss=loss, normalize=False, lr=3e-4, warmup_steps=20)
        for folder, spec in topk
    ]


def train_missing(model, specs, tokens, out, args) -> None:
    """Train and evaluate `specs` into `out` unless every one is saved already."""
    grid = len(specs) > len({spec.key for spec in specs})
    if all((output_folder(out, spec, grid) / "config.json").is_file() for spec in specs):
        return
    train_and_evaluate(
        model,
        specs,
        tokens,
        out,
        training_documents(True, args.seed),
        default_documents(True),
        batch_size=args.batch_size,
        eval_tokens=args.eval_tokens,
        seed=args.seed,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="resid.2")
    parser.add_argument("--dict-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--finetune-tokens", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("pareto_out"))
    args = parser.parse_args()
    model = load_model()

    recipes = stage_one_specs(args.site, args.dict_size)
    all_specs = [spec for specs in recipes.values() for spec in specs]
    train_missing(model, all_specs, args.tokens, args.out / "mse", args)
    rows = [
        _row(name, output_folder(args.out / "mse", spec, True))
        for name, specs in recipes.items()
        for spec in specs
    ]
    topk = [(output_folder(args.out / "mse", spec, True), spec) for spec in recipes["topk"]]
    for loss, name in (("kl", "topk + KL fine-tune"), ("mse", "topk + MSE (control)")):
        specs = finetune_specs(topk, loss)
        out = args.out / f"finetune-{loss}"
        train_missing(model, specs, args.finetune_tokens, out, args)
        rows += [_row(name, output_folder(out, spec, True)) for spec in specs]

    (args.out / "pareto.json").write_text(json.dumps(rows, indent=2) + "\n")
    _plot(rows, args.out / "pareto.png", args.site)
    print(f"{'recipe':24} {'sparsity':>8} {'L0':>7} {'CE +':>7} {'KL':>7} {'FVE':>6} {'dead':>6}")
    for row in rows:
        print(
            f"{row['recipe']:24} {row['sparsity']:>8g} {row['l0']:7.1f} {row['ce_delta']:7.3f} "
            f"{row['kl']:7.3f} {row['fve']:6.3f} {row['frac_dead']:6.1%}"
        )
    print(f"wrote {args.out / 'pareto.json'} and {args.out / 'pareto.png'}")


def _row(recipe: str, folder: Path) -> dict:
    config = Dictionary.load(folder).config
    hyper, metrics = config.hyperparameters, config.metrics
    sparsity = hyper["k"] if hyper["sparsity"] == "topk" else hyper["l1"]
    keys = ("l0", "ce_delta", "kl", "fve", "nmse", "frac_dead", "frac_dense", "loss_recovered_mean")
    return {
        "recipe": recipe,
        "sparsity": sparsity,
        "tokens": hyper["tokens"],
        "folder": str(folder),
        **{key: metrics[key] for key in keys},
    }


def _plot(rows: list[dict], path: Path, site: str) -> None:
    figure = new_figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    for recipe in dict.fromkeys(row["recipe"] for row in rows):
        points = sorted((r["l0"], r["ce_delta"], r["kl"]) for r in rows if r["recipe"] == recipe)
        l0, ce, kl = zip(*points, strict=True)
        axes[0].plot(l0, ce, marker="o", label=recipe)
        axes[1].plot(l0, kl, marker="o", label=recipe)
    for ax, label in zip(axes, ("CE increase (nats)", "KL(clean ‖ spliced)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("L0 (active features per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(
        f"{EMBEDDED_MODEL_NAME} {site}: sparsity against damage to the model, by recipe"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
