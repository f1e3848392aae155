"""Trainer step throughput against a minimal plain-PyTorch loop, side by side in one run.

`--kind untied` (default): both train an untied dictionary (L1 penalty, unit-norm decoder rows kept
by gradient projection and renormalisation, Adam) on the same pre-generated activation batches.

`--kind topk`: TopK dictionaries (k active latents per input, plain MSE, the same decoder
constraint and Adam) trained four ways: `plain`, a dense PyTorch loop (topk, scatter into zeros,
dense decoder); `trainer`, our `train_dictionaries`; `sparsify`, EleutherAI sparsify's
`SparseCoder` step as its trainer runs it (skipped when `eai-sparsify` is not installed); and
`kernel`, the step written with `sae_circuits.sparse_codes` (dense encoder forward, sparse
everything else), which shows what the trainer can reach; `kernel-fused` is the same with
`torch.optim.Adam(fused=True)`. `--profile` prints where the kernel loop's time goes, `--check`
how far the kernel step's loss and gradients are from the dense step's, and how far fused Adam
moves the kernel loop's weights.

Each timed block includes creating the parameters and the optimizer. Repetitions alternate the
order of the loops (reversed every other repetition) after a warm-up of each. Each repetition gives
paired ratios (steps per second of two loops from the same repetition, so that load from other jobs
on shared cores hits both alike); the printed ratios are medians of the paired ratios. On cores
that other jobs share, two-thread wall times swing by 2-3x per block (every parallel region waits
for a descheduled thread); `--cpu-time --threads 1` counts only the work done.

    python benchmarks/bench_trainer.py [--kind untied|topk] [--d 512] [--dict 8192] [--k 32]
        [--batch 1024] [--steps 4] [--reps 7] [--threads 2] [--cpu-time] [--profile] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from sae_circuits.sparse_codes import (
    SparseCodes,
    gather_linear,
    select_topk,
    sparse_decode,
)
from sae_circuits.training import TrainSpec, train_dictionaries

Loop = Callable[[list[torch.Tensor]], object]
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
PHASES = (
    "encoder matmul",
    "top-k",
    "gather",
    "decode + loss",
    "backward",
    "decoder projection",
    "Adam",
    "renormalise",
    "fire counts",
)


def _unit_dictionary(d: int, d_dict: int) -> list[torch.nn.Parameter]:
    """W_enc, b_enc, W_dec, b_dec: unit decoder rows, encoder their transpose, zero biases."""
    W_dec = torch.nn.Parameter(F.normalize(torch.randn(d_dict, d), dim=-1))
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    return [
        W_enc,
        torch.nn.Parameter(torch.zeros(d_dict)),
        W_dec,
        torch.nn.Parameter(torch.zeros(d)),
    ]


def _project_decoder_gradient(W_dec: torch.Tensor) -> None:
    with torch.no_grad():
        W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec


def _renormalise(W_dec: torch.Tensor) -> None:
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=1, keepdim=True)


def plain_loss(
    params: list[torch.nn.Parameter], x: torch.Tensor, l1: float, k: int | None
) -> torch.Tensor:
    """The plain loop's loss: features ReLU(pre) with an L1 penalty, or with `k` the top k
    pre-activations of each input scattered into zeros (dense TopK)."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = (x - b_dec) @ W_enc + b_enc
    if k is None:
        f = torch.relu(pre)
    else:
        top = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    x_hat = f @ W_dec + b_dec
    loss = (x_hat - x).pow(2).sum(-1).mean()
    return loss + l1 * f.sum(-1).mean() if l1 else loss


def plain_loop(
    batches: list[torch.Tensor], d_dict: int, lr: float, l1: float = 0.0, k: int | None = None
) -> list[torch.nn.Parameter]:
    """The minimal loop: forward, loss, backward, decoder-gradient projection, Adam, renormalise."""
    params = _unit_dictionary(batches[0].shape[1], d_dict)
    optimizer = torch.optim.Adam(params, lr=lr)
    for x in batches:
        loss = plain_loss(params, x, l1, k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _project_decoder_gradient(params[2])
        optimizer.step()
        _renormalise(params[2])
    return params


def trainer_loop(batches: list[torch.Tensor], spec: TrainSpec) -> None:
    train_dictionaries(({"x": x} for x in batches), [spec], len(batches), progress=False)


def kernel_loss(
    params: list[torch.nn.Parameter], x: torch.Tensor, k: int, pre: torch.Tensor
) -> tuple[torch.Tensor, SparseCodes]:
    """The sparse TopK step's loss and codes; `pre` (batch, d_dict) is overwritten.

    `pre` is reused across steps because a fresh block each step costs its page faults; its values
    are those of `xc @ W_enc + b_enc`, bit for bit.
    """
    W_enc, b_enc, W_dec, b_dec = params
    with record_function("encoder matmul"):
        xc = x - b_dec
        with torch.no_grad():
            torch.matmul(xc, W_enc, out=pre).add_(b_enc)
    with record_function("top-k"):
        rows, latents = select_topk(pre, k)
    with record_function("gather"):
        values = torch.relu(gather_linear(xc, W_enc, b_enc, rows, latents, pre=pre))
    with record_function("decode + loss"):
        x_hat = sparse_decode(values, rows, latents, W_dec, len(x)) + b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean()
    return loss, SparseCodes(rows, latents, values, len(x), len(b_enc))


def kernel_loop(
    batches: list[torch.Tensor], d_dict: int, k: int, lr: float, fused: bool = False
) -> list[torch.nn.Parameter]:
    """The sparse TopK step of `sae_circuits.sparse_codes`, with Adam and the decoder constraint."""
    params = _unit_dictionary(batches[0].shape[1], d_dict)
    optimizer = torch.optim.Adam(params, lr=lr, fused=fused)
    fired = torch.zeros(d_dict)
    pre = torch.empty(len(batches[0]), d_dict)
    for x in batches:
        loss, codes = kernel_loss(params, x, k, pre)
        with record_function("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("decoder projection"):
            _project_decoder_gradient(params[2])
        with record_function("Adam"):
            optimizer.step()
        with record_function("renormalise"):
            _renormalise(params[2])
        with record_function("fire counts"):
            fired += codes.fire_counts()
    return params


def sparsify_loop(
    batches: list[torch.Tensor], d_dict: int, k: int, lr: float, sparsify: tuple
) -> None:
    """sparsify's own step: unit-norm decoder, forward, FVU backward, projection, Adam."""
    SparseCoder, SparseCoderConfig = sparsify
    coder = SparseCoder(batches[0].shape[1], SparseCoderConfig(num_latents=d_dict, k=k))
    optimizer = torch.optim.Adam(coder.parameters(), lr=lr)
    did_fire = torch.zeros(d_dict, dtype=torch.bool)
    for x in batches:
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x)
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()


def import_sparsify() -> tuple | None:
    """(SparseCoder, SparseCoderConfig), or None when eai-sparsify is not installed."""
    with contextlib.redirect_stdout(io.StringIO()):  # it prints which decoder kernel it uses
        try:
            from sparsify import SparseCoder, SparseCoderConfig
        except ImportError:
            return None
    return SparseCoder, SparseCoderConfig


def timed(loop: Loop, batches: list[torch.Tensor], clock: Callable[[], float]) -> float:
    """Steps per second of one run."""
    start = clock()
    loop(batches)
    return len(batches) / (clock() - start)


def alternate(
    loops: dict[str, Loop],
    batches: list[torch.Tensor],
    reps: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list]:
    """Steps per second of each loop per repetition, the order reversed every other repetition."""
    for loop in loops.values():  # warm-up
        timed(loop, batches[:2], clock)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    order = list(loops.items())
    for rep in range(reps):
        for name, loop in order if rep % 2 == 0 else order[::-1]:
            rates[name].append(timed(loop, batches, clock))
    return rates


def paired(rates: dict[str, list[float]], top: str, bottom: str) -> list[float]:
    return [t / b for t, b in zip(rates[top], rates[bottom], strict=True)]


def print_rates(rates: dict[str, list[float]]) -> None:
    width = max(8, *map(len, rates))
    for name, values in rates.items():
        listed = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:{width}s} steps/s: median {statistics.median(values):.3f}  ({listed})")


def print_profile(batches: list[torch.Tensor], d_dict: int, k: int) -> None:
    """Wall time per phase of the kernel loop, and per autograd node inside its backward."""
    kernel_loop(batches[:2], d_dict, k, 1e-3)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        kernel_loop(batches, d_dict, k, 1e-3)
    events = {e.key: e.cpu_time_total / 1e3 / len(batches) for e in prof.key_averages()}
    total = sum(events[phase] for phase in PHASES)
    print(f"kernel loop profile, ms per step (total of the phases {total:.1f}):")
    for phase in PHASES:
        print(f"  {phase:22s} {events[phase]:8.2f}  {100 * events[phase] / total:5.1f}%")
    prefix = "autograd::engine::evaluate_function: "
    nodes = sorted(((t, key[len(prefix) :]) for key, t in events.items() if key.startswith(prefix)))
    print("  backward by autograd node:")
    for t, node in nodes[::-1]:
        if t >= 0.05:
            print(f"    {node:30s} {t:8.2f}")


def print_check(batches: list[torch.Tensor], d_dict: int, k: int) -> None:
    """How far the kernel step's loss and gradients are from the dense step's (same weights and
    batch), and the kernel loop's weights with fused Adam from those with the default Adam."""
    torch.manual_seed(0)
    params = _unit_dictionary(batches[0].shape[1], d_dict)
    dense = plain_loss(params, batches[0], 0.0, k)
    dense_grads = torch.autograd.grad(dense, params)
    sparse, _ = kernel_loss(params, batches[0], k, torch.empty(len(batches[0]), d_dict))
    sparse_grads = torch.autograd.grad(sparse, params)
    diffs = ", ".join(
        f"{name} {(a - b).abs().max().item():.1e} (of {b.abs().max().item():.1e})"
        for name, a, b in zip(PARAMS, sparse_grads, dense_grads, strict=True)
    )
    print(
        f"kernel - dense step: loss {abs(sparse.item() - dense.item()):.1e}; max |gradient "
        f"difference|: {diffs}"
    )
    finals = []
    for fused in (False, True):
        torch.manual_seed(0)
        finals.append(kernel_loop(batches, d_dict, k, 1e-3, fused=fused))
    diffs = ", ".join(
        f"{name} {(a - b).abs().max().item():.1e}"
        for name, a, b in zip(PARAMS, *finals, strict=True)
    )
    print(f"kernel-fused - kernel after {len(batches)} steps, max |weight difference|: {diffs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("untied", "topk"), default="untied")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--dict", type=int, default=8192, dest="d_dict")
    parser.add_argument("--k", type=int, default=32, help="active latents per input (topk)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--profile", action="store_true", help="topk: also profile the kernel loop by phase"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time blocks by this process's CPU time instead of wall time: with --threads 1, "
        "steady on cores shared with other jobs (with more threads it counts idle spinning)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="topk: also print how far the kernel step's gradients are from the dense step's",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch, args.d, generator=generator) for _ in range(args.steps)]
    header = (
        f"d={args.d} dict={args.d_dict} batch={args.batch} steps/block={args.steps} "
        f"reps={args.reps} threads={torch.get_num_threads()}"
    ) + (" clock=cpu" if args.cpu_time else "")
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.kind == "untied":
        spec = TrainSpec("x", kind="untied", d_dict=args.d_dict, l1=1e-3, lr=1e-3)
        loops = {
            "plain": partial(plain_loop, d_dict=args.d_dict, lr=1e-3, l1=1e-3),
            "trainer": partial(trainer_loop, spec=spec),
        }
        rates = alternate(loops, batches, args.reps, clock)
        ratios = paired(rates, "trainer", "plain")
        print(header)
        print_rates(rates)
        print(f"paired ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
        print(
            f"ratio trainer/plain (median of paired): {statistics.median(ratios):.3f}  "
            "(target >= 0.9)"
        )
        return

    topk = {"d_dict": args.d_dict, "k": args.k, "lr": 1e-3}
    spec = TrainSpec("x", kind="topk", d_dict=args.d_dict, k=args.k, sparsity="topk", lr=1e-3)
    loops = {
        "plain": partial(plain_loop, **topk),
        "trainer": partial(trainer_loop, spec=spec),
        "kernel": partial(kernel_loop, **topk),
        "kernel-fused": partial(kernel_loop, **topk, fused=True),
    }
    sparsify = import_sparsify()
    if sparsify is not None:
        loops["sparsify"] = partial(sparsify_loop, **topk, sparsify=sparsify)
    rates = alternate(loops, batches, args.reps, clock)
    print(f"{header} k={args.k}")
    print_rates(rates)
    if sparsify is None:
        print("sparsify: not installed (pip install eai-sparsify), skipped")
    goals = {"plain": ">= 3", "sparsify": ">= 1.5"}
    for top in ("trainer", "kernel", "kernel-fused"):
        for bottom in ("plain", "sparsify"):
            if bottom in rates:
                ratios = paired(rates, top, bottom)
                goal = f"  (goal {goals[bottom]})" if top == "trainer" else ""
                print(
                    f"ratio {top}/{bottom} (median of paired): {statistics.median(ratios):.3f}"
                    f"{goal}  [{', '.join(f'{r:.2f}' for r in ratios)}]"
                )
    if args.profile:
        print_profile(batches, args.d_dict, args.k)
    if args.check:
        print_check(batches, args.d_dict, args.k)


if __name__ == "__main__":
    main()
