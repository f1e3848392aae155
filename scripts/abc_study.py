"""Can the embedded model make ABC prompts ambiguous without losing IOI? (issue 18's ABC bar)

Fine-tunes the shipped model two ways and prints the held-out IOI metrics every 100 steps, then
`evaluate_model` of the fine-tuned weights (saved as float16, as a build saves them):

    python scripts/abc_study.py share --share 0.5 --steps 600
        the build's loss on a corpus where half the IOI sentences name three people
    python scripts/abc_study.py soft --weight 0.3 --steps 400
        the same loss plus `weight` x the cross-entropy of training-split ABC prompts to the 50/50
        target over the first two names (direct supervision of the ambiguity)

Each run is a fresh AdamW at a constant learning rate (default 2e-4, the build's final rate) after
20 warm-up steps, on 16 x 128-token batches with bfloat16 autocast; seed 0. Output: JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from sae_circuits.embedded.build import tokenized_corpus
from sae_circuits.embedded.evaluate import evaluate_ioi, evaluate_model, load_for_eval, token_id
from sae_circuits.models import embedded_model_path
from sae_circuits.progress import new_progress
from sae_circuits.task_text import ioi_examples

BATCH, CTX, WARMUP = 16, 128, 20


def abc_batches(tokenizer, n: int, seed: int):
    """Endless batches of training-split ABC prompts of one token length: (ids, id A, id B)."""
    examples = ioi_examples("train", n, seed)
    by_length: dict[int, list[tuple[list[int], int, int]]] = {}
    for e in examples:
        ids = tokenizer.encode(e.abc_prompt, add_special_tokens=False)
        row = (ids, token_id(tokenizer, e.answer), token_id(tokenizer, e.distractor))
        by_length.setdefault(len(ids), []).append(row)
    groups = [rows for rows in by_length.values() if len(rows) >= BATCH]
    g = torch.Generator().manual_seed(seed)
    while True:
        rows = groups[int(torch.randint(len(groups), (1,), generator=g))]
        pick = [rows[i] for i in torch.randperm(len(rows), generator=g)[:BATCH].tolist()]
        yield tuple(torch.tensor(column) for column in zip(*pick, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["share", "soft"])
    parser.add_argument("--share", type=float, default=0.15, help="ABC share of the corpus")
    parser.add_argument("--weight", type=float, default=0.3, help="weight of the 50/50 loss")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_for_eval(embedded_model_path())
    with new_progress() as progress:
        tokens, _, _ = tokenized_corpus(
            tokenizer.backend_tokenizer, args.steps * BATCH * CTX, 1, args.share, progress
        )
    windows = tokens.view(-1, CTX)
    windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))]
    abc = abc_batches(tokenizer, 4000, 5) if args.mode == "soft" else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    print(json.dumps({"step": 0, **evaluate_ioi(model, tokenizer)}), flush=True)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / WARMUP)
        batch = windows[step * BATCH : (step + 1) * BATCH]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
            if abc is not None:
                ids, a, b = next(abc)
                logp = model(input_ids=ids).logits[:, -1].float().log_softmax(-1)
                rows = torch.arange(len(ids))
                loss = loss - args.weight * 0.5 * (logp[rows, a] + logp[rows, b]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            model.eval()
            row = {"step": step + 1, "elapsed_s": round(time.time() - t0, 1)}
            print(json.dumps({**row, **evaluate_ioi(model, tokenizer)}), flush=True)
            model.train()
    with tempfile.TemporaryDirectory() as folder:
        model.eval().half().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        saved, saved_tokenizer = load_for_eval(folder)
        final = evaluate_model(saved, saved_tokenizer, 400, 0, CTX)
    print(json.dumps({"final": vars(args), **final}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
