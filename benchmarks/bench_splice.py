"""Overhead of nnsight traces and spliced dictionaries against the raw Hugging Face forward.

Model: random GPT-NeoX shaped like Pythia-70M (6 layers, d=512, 8 heads, MLP 2048, vocab 50304).
Each configuration is timed in interleaved rounds on the same token batch; the medians are compared.

    python benchmarks/bench_splice.py [--batch 8] [--ctx 128] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from sae_circuits import Dictionary, DictionaryConfig, attach, detach, load_model
from sae_circuits.sites import torch_module
from sae_circuits.testing import save_pythia_70m_shaped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dict-size", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        model = load_model(save_pythia_70m_shaped(folder))
    ids = torch.randint(0, 50304, (args.batch, args.ctx))
    hf = torch_module(model)

    def dictionary(site: str) -> Dictionary:
        return Dictionary.from_config(
            DictionaryConfig(kind="untied", d_in=512, d_dict=args.dict_size, site=site)
        )

    def raw() -> None:
        hf(input_ids=ids)

    def trace() -> None:
        with model.trace(ids):
            model.output.logits.save()

    one = {"resid.3": dictionary("resid.3")}
    every = {f"resid.{layer}": dictionary(f"resid.{layer}") for layer in range(6)}

    def spliced(dictionaries):
        def run() -> None:
            attach(model, dictionaries)
            try:
                with model.trace(ids):
                    model.output.logits.save()
            finally:
                detach(model)

        return run

    def timed_once(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    configs = {
        "raw HF forward": raw,
        "nnsight trace": trace,
        "trace + 1 spliced SAE": spliced(one),
        "trace + 6 spliced SAEs": spliced(every),
    }
    with torch.no_grad():
        attach(model, one)  # time the trace only, not attach/detach
        detach(model)
        for fn in configs.values():
            fn()  # warm-up
        times = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, fn in configs.items():
                if name.startswith("trace +"):
                    sites = one if "1 spliced" in name else every
                    attach(model, sites)
                    times[name].append(timed_once(trace))
                    detach(model)
                else:
                    times[name].append(timed_once(fn))
    base = statistics.median(times["raw HF forward"])
    print(
        f"batch {args.batch} x {args.ctx} tokens, dictionary {args.dict_size}, {args.rounds} rounds"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>24}: {median * 1e3:8.1f} ms   ratio to raw {median / base:5.3f}")


if __name__ == "__main__":
    main()
