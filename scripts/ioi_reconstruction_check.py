"""Where an IOI patching ceiling is lost, checked with plain PyTorch hooks on the embedded model.

One prompt pair at a time, for each residual site, on the held-out IOI prompts (ABC corruption):
the share of the clean − corrupted logit-difference gap restored by three edits at every position:

- `ceiling`: the clean reconstruction plus the corrupted error term, x̄ + (x̂ − x̂̄)
  (what `sae-circuits ioi` reports as the ceiling);
- `error_alone`: the corrupted run with the error term patched, x̄ + (e − ē) (its `error_restored`);
- `reconstruction`: the clean run with x̂ in place of x (the dictionary spliced in, its error term
  dropped instead of kept; at a residual site this is also the corrupted run with x̂ everywhere);
- `corrupted_reconstruction`: the corrupted run with x̂̄ in place of x̄ (0 when the reconstruction
  keeps the corrupted behaviour);
- `ceiling_last_error`, `ceiling_earlier_errors`: the ceiling with the clean error term also patched
  at the last position only (where the logits are read), or at every position but the last: which
  positions' error terms hold what the ceiling misses.

    python scripts/ioi_reconstruction_check.py [--dictionaries main] [--site resid.3 ...] [--n 100]
"""

from __future__ import annotations

import argparse
import json

import torch

from sae_circuits import load_dictionaries, load_model, load_task
from sae_circuits.sites import torch_module


def run_with(
    hf: torch.nn.Module,
    block: torch.nn.Module,
    ids: torch.Tensor,
    pair: tuple[int, int],
    replace: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor]:
    """logit(answer) − logit(distractor) at the last position, and the block's output; with
    `replace`, the block's output is replaced by it."""
    seen = {}

    def hook(module, inputs, output):
        packed = isinstance(output, tuple)  # a block returns a tuple in some transformers versions
        seen["x"] = output[0] if packed else output
        if replace is not None:
            return (replace, *output[1:]) if packed else replace

    handle = block.register_forward_hook(hook)
    try:
        logits = hf(ids).logits[0, -1]
    finally:
        handle.remove()
    return (logits[pair[0]] - logits[pair[1]]).item(), seen["x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dictionaries", default="main")
    parser.add_argument("--site", action="append", help="default: every resid site")
    parser.add_argument("--n", type=int, default=100, help="held-out prompts")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model()
    hf = torch_module(model)
    layers = hf.gpt_neox.layers
    sites = args.site or [f"resid.{i}" for i in range(len(layers))]
    dictionaries = load_dictionaries(args.dictionaries, sites=sites)
    task = load_task("ioi", model, "abc", args.n, 0, "heldout")
    results = {}
    for site, dictionary in dictionaries.items():
        block = layers[site.layer]
        keys = ("clean", "corrupt", "ceiling", "error_alone", "reconstruction")
        keys += ("corrupted_reconstruction", "ceiling_last_error", "ceiling_earlier_errors")
        sums = dict.fromkeys(keys, 0.0)
        for i in range(len(task)):
            pair = (int(task.answers[i]), int(task.distractors[i]))
            clean = model.tokenizer(task.clean[i], return_tensors="pt").input_ids
            corrupt = model.tokenizer(task.corrupt[i], return_tensors="pt").input_ids
            m_clean, x = run_with(hf, block, clean, pair)
            m_corrupt, x_bar = run_with(hf, block, corrupt, pair)
            x_hat, x_hat_bar = dictionary(x)[0], dictionary(x_bar)[0]
            sums["clean"] += m_clean
            sums["corrupt"] += m_corrupt
            ceiling = x_bar + x_hat - x_hat_bar
            error_change = (x - x_hat) - (x_bar - x_hat_bar)
            last = torch.zeros(x.shape[:-1] + (1,))
            last[:, -1] = 1
            edits = {
                "ceiling": (corrupt, ceiling),
                "error_alone": (corrupt, x_bar + error_change),
                "reconstruction": (clean, x_hat),
                "corrupted_reconstruction": (corrupt, x_hat_bar),
                "ceiling_last_error": (corrupt, ceiling + error_change * last),
                "ceiling_earlier_errors": (corrupt, ceiling + error_change * (1 - last)),
            }
            for key, (ids, value) in edits.items():
                sums[key] += run_with(hf, block, ids, pair, value)[0]
        gap = sums["clean"] - sums["corrupt"]
        results[str(site)] = {
            key: round((value - sums["corrupt"]) / gap, 4)
            for key, value in sums.items()
            if key not in ("clean", "corrupt")
        }
        print(str(site), results[str(site)], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
