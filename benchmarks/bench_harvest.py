"""Harvest throughput: the nnsight activation buffer against a raw Hugging Face forward with a hook,
and the activations per second of a full train run.

Model: random GPT-NeoX shaped like Pythia-70M (6 layers, d=512). Site: resid.5, the last block, so
that the forward cannot stop much earlier than the baseline's. Both sides harvest the same token
batches, interleaved in one run; the baseline is measured twice: a plain forward hook over the full
forward (what a hand-written harvester does), and one that raises after the site to skip the
unembedding (the best a hand-written harvester can do).

    python benchmarks/bench_harvest.py [--batches 6] [--train-tokens 65536] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from sae_circuits import Site, load_model, token_batches
from sae_circuits.buffer import harvest
from sae_circuits.pipeline import train_and_evaluate
from sae_circuits.sites import torch_module
from sae_circuits.testing import save_pythia_70m_shaped
from sae_circuits.text import default_documents
from sae_circuits.training import TrainSpec

SITE = Site.parse("resid.5")


class _Stop(Exception):
    pass


def raw_harvest(model, ids: torch.Tensor, stop_early: bool) -> torch.Tensor:
    """Plain torch: a forward hook on the block collects its output (dropping BOS like ours)."""
    module = torch_module(model).get_submodule(SITE.resolve(model)[0])
    captured = []

    def hook(mod, args, output):
        captured.append(output[:, 1:].reshape(-1, output.shape[-1]).float())
        if stop_early:
            raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        torch_module(model)(input_ids=ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6, help="token batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-tokens", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # results survive a timeout
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        model = load_model(save_pythia_70m_shaped(folder))
    # the corpus stream is unbounded: take only the batches needed
    batches = list(
        islice(token_batches(model.tokenizer, default_documents(False), 128, 16), args.batches)
    )
    ours = lambda ids: harvest(model, [SITE], ids, torch.ones_like(ids))[str(SITE)]  # noqa: E731
    methods = {
        "sae-circuits harvest": ours,
        "raw forward + hook": lambda ids: raw_harvest(model, ids, stop_early=False),
        "raw + hook, stop early": lambda ids: raw_harvest(model, ids, stop_early=True),
    }
    with torch.no_grad():
        reference = raw_harvest(model, batches[0], False)
        assert torch.allclose(ours(batches[0]), reference, atol=1e-4), "harvests disagree"
        rates = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, method in methods.items():
                start = time.perf_counter()
                rows = sum(method(ids).shape[0] for ids in batches)
                rates[name].append(rows / (time.perf_counter() - start))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"harvest of {SITE}, {args.batches} batches of 16 x 128 tokens, {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    for name, rate in median.items():
        print(f"{name:>24}: {rate:10.0f} activations/s")
    for name in ("raw forward + hook", "raw + hook, stop early"):
        print(f"ratio ours / {name}: {median['sae-circuits harvest'] / median[name]:.3f}")

    spec = TrainSpec(key="resid.3", d_dict=8192, l1=1e-3, warmup_steps=50)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train_and_evaluate(
            model,
            [spec],
            args.train_tokens,
            Path(out),
            default_documents(False),
            default_documents(False),
            batch_size=1024,
            eval_tokens=2048,
        )
        seconds = time.perf_counter() - start
    print(
        f"full train run (harvest + train + eval), dictionary 8192 at resid.3: "
        f"{args.train_tokens / seconds:.0f} activations/s ({seconds:.1f} s for {args.train_tokens})"
    )


if __name__ == "__main__":
    main()
