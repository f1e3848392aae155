"""KL-objective training step through the spliced model against the same step in plain PyTorch.

Both train a top-k dictionary at one site of the embedded model on the same token batches: a clean
forward without gradients (log-probabilities), a forward with the dictionary replacing the site's
activation (but at BOS), KL(clean ‖ spliced), backward into the dictionary only, Adam, unit-norm
decoder rows. Ours is `train_dictionaries(..., model=<the nnsight model>)` with
`TrainSpec(loss="kl")`: nnsight traces, the splice users trace, its error term zeroed. Plain is a
forward hook on the Hugging Face module. Repetitions alternate after a warm-up of each; the
printed ratio is the median of paired ratios (ours / plain seconds per step; goal ≤ 1.3).

    python benchmarks/bench_objectives.py [--site resid.2] [--contexts 8] [--steps 4] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sae_circuits import load_model
from sae_circuits.sites import Site
from sae_circuits.training import TrainSpec, train_dictionaries


def plain_loop(hf, module, batches, d_dict: int, k: int, d: int) -> None:
    W_dec = torch.nn.Parameter(F.normalize(torch.randn(d_dict, d), dim=-1))
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(d_dict))
    b_dec = torch.nn.Parameter(torch.zeros(d))
    optimizer = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4)

    def splice(_, __, output):
        x = output[0] if isinstance(output, tuple) else output
        pre = torch.relu((x - b_dec) @ W_enc + b_enc)
        top = pre.topk(k, dim=-1)
        x_hat = torch.zeros_like(pre).scatter(-1, top.indices, top.values) @ W_dec + b_dec
        x_hat = torch.cat([x[:, :1], x_hat[:, 1:]], 1)
        return (x_hat, *output[1:]) if isinstance(output, tuple) else x_hat

    for ids in batches:
        with torch.no_grad():
            clean = hf(ids).logits[:, :-1].log_softmax(-1).flatten(0, 1)
        handle = module.register_forward_hook(splice)
        logits = hf(ids).logits[:, :-1].log_softmax(-1).flatten(0, 1)
        handle.remove()
        loss = F.kl_div(logits, clean, log_target=True, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        optimizer.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)


def our_loop(model, batches, site: str, d_dict: int, k: int, d: int) -> None:
    spec = TrainSpec(site, kind="topk", k=k, d_dict=d_dict, loss="kl", lr=1e-4, aux_k=0)
    train_dictionaries(iter(batches), [spec], len(batches), model=model, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="resid.2")
    parser.add_argument("--dict", type=int, default=1024, dest="d_dict")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--contexts", type=int, default=8, help="contexts of 128 tokens per step")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    hf = model._module
    path, _ = Site.parse(args.site).resolve(model)
    module = hf.get_submodule(path)
    d = model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [
        torch.randint(1, vocab, (args.contexts, 128), generator=generator)
        for _ in range(args.steps)
    ]
    loops = {
        "plain": lambda: plain_loop(hf, module, batches, args.d_dict, args.k, d),
        "ours": lambda: our_loop(model, batches, args.site, args.d_dict, args.k, d),
    }
    for loop in loops.values():  # warm-up
        loop()
    seconds: dict[str, list[float]] = {"plain": [], "ours": []}
    for rep in range(args.reps):
        order = list(loops.items())
        for name, loop in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            loop()
            seconds[name].append((time.perf_counter() - start) / args.steps)
    ratios = [o / p for o, p in zip(seconds["ours"], seconds["plain"], strict=True)]
    print(
        f"site={args.site} dict={args.d_dict} k={args.k} tokens/step={args.contexts * 128} "
        f"threads={args.threads}: plain {statistics.median(seconds['plain']):.3f} s/step, "
        f"ours {statistics.median(seconds['ours']):.3f} s/step, "
        f"ratio ours/plain {statistics.median(ratios):.3f} (pairs: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + ")"
    )


if __name__ == "__main__":
    main()
