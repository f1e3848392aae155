"""GPU throughput on a Pythia-70M-shaped model (random GPT-NeoX, 6 layers, d=512): activations
harvested per second, and dictionary training tokens per second (the trainer alone, on
activations already on the GPU, and `train_and_evaluate` end to end), in float32 and under
bfloat16 autocast. Without a CUDA GPU it says so and exits 0 (`--device cpu` runs the same
measurements on the CPU, e.g. as a quick check of the script with small sizes).

    python benchmarks/bench_gpu.py [--site resid.3] [--dict 16384] [--batch 4096] [--steps 100]
        [--kinds untied topk] [--dtypes float32 bfloat16] [--train-tokens 2000000] [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from sae_circuits.batches import split_batch
from sae_circuits.buffer import harvest
from sae_circuits.models import AUTOCAST_DTYPES, load_model
from sae_circuits.pipeline import train_and_evaluate
from sae_circuits.sites import Site
from sae_circuits.testing import save_pythia_70m_shaped
from sae_circuits.text import default_documents, token_batches
from sae_circuits.training import TrainSpec, train_dictionaries

EVAL_TOKENS = 2048


def _spec(kind: str, site: str, size: int) -> TrainSpec:
    extra = {"k": 32} if kind == "topk" else {"l1": 1e-3}
    return TrainSpec(site, kind=kind, d_dict=size, warmup_steps=10, **extra)


def trainer_rate(kind: str, dtype: str, args: argparse.Namespace) -> float:
    """Tokens per second of `train_dictionaries` on random activations already on the GPU."""
    batches = [torch.randn(args.batch, 512, device=args.device) for _ in range(8)]
    autocast = AUTOCAST_DTYPES.get(dtype)
    spec = _spec(kind, "x", args.dict)

    def run(steps: int) -> float:
        stream = ({"x": batches[i % len(batches)]} for i in range(steps))
        _synchronize(args.device)
        start = time.perf_counter()
        train_dictionaries(
            stream, [spec], steps, progress=False, device=args.device, autocast=autocast
        )
        _synchronize(args.device)
        return time.perf_counter() - start

    run(10)  # warm-up: kernels, allocator
    return args.steps * args.batch / run(args.steps)


def harvest_rate(model: object, site: Site, args: argparse.Namespace) -> float:
    """Activations per second harvested at `site` (32 contexts of 128 tokens per forward)."""
    contexts = list(
        islice(token_batches(model.tokenizer, default_documents(False), 128, 32), args.batches)
    )
    harvest(model, [site], *split_batch(contexts[0]))  # warm-up
    _synchronize(args.device)
    start, rows = time.perf_counter(), 0
    for batch in contexts:
        rows += len(harvest(model, [site], *split_batch(batch))[str(site)])
    _synchronize(args.device)
    return rows / (time.perf_counter() - start)


def end_to_end_rate(model: object, kind: str, args: argparse.Namespace, out: Path) -> float:
    """Training tokens per second of `train_and_evaluate` (harvest, train, and an evaluation
    on EVAL_TOKENS tokens)."""
    documents = default_documents(False)
    start = time.perf_counter()
    train_and_evaluate(
        model,
        [_spec(kind, args.site, args.dict)],
        args.train_tokens,
        out,
        documents,
        default_documents(False),
        batch_size=args.batch,
        n_ctxs=max(256, 4 * args.batch // 127),
        eval_tokens=EVAL_TOKENS,
    )
    _synchronize(args.device)
    return args.train_tokens / (time.perf_counter() - start)


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", default="resid.3")
    parser.add_argument("--dict", type=int, default=16384, help="dictionary size")
    parser.add_argument("--batch", type=int, default=4096, help="activations per step")
    parser.add_argument("--steps", type=int, default=100, help="timed trainer steps")
    parser.add_argument("--batches", type=int, default=20, help="timed harvest forwards")
    parser.add_argument("--kinds", nargs="+", default=["untied", "topk"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--train-tokens", type=int, default=2_000_000)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA GPU on this machine: nothing to measure (bench_gpu.py needs one)")
            return
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"Pythia-70M-shaped model, site {args.site}, dict {args.dict}, batch {args.batch}")
    site = Site.parse(args.site)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pythia_70m_shaped(Path(tmp) / "model")
        for dtype in args.dtypes:
            model = load_model(folder, device=args.device, autocast=AUTOCAST_DTYPES.get(dtype))
            print(f"[{dtype}] harvest: {harvest_rate(model, site, args):,.0f} activations/s")
            for kind in args.kinds:
                rate = trainer_rate(kind, dtype, args)
                print(f"[{dtype}] trainer {kind}: {rate:,.0f} tokens/s")
                full = end_to_end_rate(model, kind, args, Path(tmp) / f"out-{dtype}-{kind}")
                print(f"[{dtype}] train_and_evaluate {kind}: {full:,.0f} tokens/s end to end")


if __name__ == "__main__":
    main()
