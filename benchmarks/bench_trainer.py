"""Trainer step throughput against a minimal plain-PyTorch loop, side by side in one run.

Both train an untied dictionary (L1 penalty, unit-norm decoder rows kept by gradient projection and
renormalisation, Adam) on the same pre-generated activation batches. Each timed block includes
creating the parameters and the optimizer. Repetitions alternate between the two loops after a
warm-up of each. Each repetition gives a paired ratio (trainer / plain steps per second, from two
adjacent blocks, so that load from other jobs on shared cores hits both alike); the printed ratio
is the median of the paired ratios and should be at least 0.9.

    python benchmarks/bench_trainer.py [--d 512] [--dict 8192] [--batch 1024] [--steps 10] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sae_circuits.training import TrainSpec, train_dictionaries


def plain_loop(batches: list[torch.Tensor], d_dict: int, l1: float, lr: float) -> None:
    """The minimal loop: forward, loss, backward, decoder-gradient projection, Adam, renormalise."""
    d = batches[0].shape[1]
    W_dec = torch.nn.Parameter(F.normalize(torch.randn(d_dict, d), dim=-1))
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(d_dict))
    b_dec = torch.nn.Parameter(torch.zeros(d))
    optimizer = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr)
    for x in batches:
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
        x_hat = f @ W_dec + b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean() + l1 * f.sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        optimizer.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)


def trainer_loop(batches: list[torch.Tensor], d_dict: int, l1: float, lr: float) -> None:
    spec = TrainSpec("x", kind="untied", d_dict=d_dict, l1=l1, lr=lr)
    train_dictionaries(({"x": x} for x in batches), [spec], len(batches), progress=False)


def timed(loop, batches: list[torch.Tensor], d_dict: int) -> float:
    """Steps per second of one run."""
    start = time.perf_counter()
    loop(batches, d_dict, 1e-3, 1e-3)
    return len(batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--dict", type=int, default=8192, dest="d_dict")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch, args.d, generator=generator) for _ in range(args.steps)]

    for loop in (plain_loop, trainer_loop):  # warm-up
        timed(loop, batches[:2], args.d_dict)
    rates: dict[str, list[float]] = {"plain": [], "trainer": []}
    for rep in range(args.reps):
        order = [("plain", plain_loop), ("trainer", trainer_loop)]
        for name, loop in order if rep % 2 == 0 else order[::-1]:
            rates[name].append(timed(loop, batches, args.d_dict))
    ratios = [t / p for t, p in zip(rates["trainer"], rates["plain"], strict=True)]
    print(
        f"d={args.d} dict={args.d_dict} batch={args.batch} steps/block={args.steps} "
        f"reps={args.reps} threads={torch.get_num_threads()}"
    )
    for name in ("plain", "trainer"):
        values = ", ".join(f"{v:.3f}" for v in rates[name])
        print(f"{name:8s} steps/s: median {statistics.median(rates[name]):.3f}  ({values})")
    print(f"paired ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(
        f"ratio trainer/plain (median of paired): {statistics.median(ratios):.3f}  (target >= 0.9)"
    )


if __name__ == "__main__":
    main()
