"""Quality metrics of a causal LM on the embedded tasks (plain torch/HF forward passes).

Prompts are batched by token length, without padding, so position -1 is every prompt's last token.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from sae_circuits.corpus import stdlib_documents, text_documents
from sae_circuits.errors import UserInputError
from sae_circuits.task_text import ioi_examples, sva_examples


def token_id(tokenizer: Any, word: str) -> int:
    """The id of `word` (with its leading space); raises if it is not exactly one token."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{word!r} is not a single token ({ids})")
    return ids[0]


@torch.no_grad()
def final_logits(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """Logits at the last position of each prompt, shape [len(prompts), vocab], in float32."""
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    out: torch.Tensor | None = None
    device = next(model.parameters()).device
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            logits = model(input_ids=ids).logits[:, -1].float().cpu()
            if out is None:
                out = torch.empty(len(prompts), logits.shape[-1])
            out[chunk] = logits
    if out is None:
        raise ValueError("no prompts")
    return out


def _pair_diff(
    logits: torch.Tensor, tokenizer: Any, good: list[str], bad: list[str]
) -> torch.Tensor:
    g = torch.tensor([token_id(tokenizer, w) for w in good])
    b = torch.tensor([token_id(tokenizer, w) for w in bad])
    rows = torch.arange(len(good))
    return logits[rows, g] - logits[rows, b]


def _ioi_diffs(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logit(IO) - logit(S) per example on the clean and on the ABC prompts."""
    io = [e.answer for e in examples]
    s = [e.distractor for e in examples]
    clean = final_logits(model, tokenizer, [e.prompt for e in examples])
    abc = final_logits(model, tokenizer, [e.abc_prompt for e in examples])
    return _pair_diff(clean, tokenizer, io, s), _pair_diff(abc, tokenizer, io, s)


def _ioi_summary(clean: torch.Tensor, abc: torch.Tensor) -> dict[str, float]:
    return {
        "ioi_accuracy": (clean > 0).float().mean().item(),
        "ioi_logit_diff": clean.mean().item(),
        "ioi_abc_logit_diff": abc.mean().item(),
        "ioi_abc_abs_logit_diff": abc.abs().mean().item(),
        "ioi_n": len(clean),
    }


def _sva_diffs(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Any]) -> torch.Tensor:
    logits = final_logits(model, tokenizer, [e.prompt for e in examples])
    return _pair_diff(logits, tokenizer, [e.correct for e in examples], [e.wrong for e in examples])


def _sva_summary(diff: torch.Tensor) -> dict[str, float]:
    return {
        "sva_accuracy": (diff > 0).float().mean().item(),
        "sva_logit_diff": diff.mean().item(),
        "sva_n": len(diff),
    }


def evaluate_ioi(
    model: torch.nn.Module, tokenizer: Any, n: int = 400, seed: int = 0, split: str = "heldout"
) -> dict[str, float]:
    """IOI: fraction with logit(IO) > logit(S), mean logit(IO) - logit(S) on clean prompts, and the
    mean and mean absolute value of the same difference on ABC prompts (second mention of S
    replaced by a third name)."""
    return _ioi_summary(*_ioi_diffs(model, tokenizer, ioi_examples(split, n, seed)))


def evaluate_sva(
    model: torch.nn.Module, tokenizer: Any, n: int = 400, seed: int = 0, split: str = "heldout"
) -> dict[str, float]:
    """Agreement: fraction of prompts where the right verb form beats the wrong one."""
    return _sva_summary(_sva_diffs(model, tokenizer, sva_examples(split, n, seed)))


def _by_shape(examples: Sequence[Any]) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        rows[e.shape].append(i)
    return rows


def evaluate_shapes(
    model: torch.nn.Module, tokenizer: Any, n: int = 400, seed: int = 0, split: str = "heldout"
) -> list[dict[str, Any]]:
    """The IOI and SVA metrics of `split` per grammar shape: one row per shape, with `task`,
    `shape`, `accuracy`, `logit_diff`, `abc_logit_diff` and `abc_abs_logit_diff` (IOI), `n`."""
    model.eval()
    rows: list[dict[str, Any]] = []
    ioi = ioi_examples(split, n, seed)
    clean, abc = _ioi_diffs(model, tokenizer, ioi)
    for shape, index in _by_shape(ioi).items():
        m = _ioi_summary(clean[index], abc[index])
        rows.append({"task": "ioi", "shape": shape, **{k[4:]: v for k, v in m.items()}})
    sva = sva_examples(split, n, seed)
    diff = _sva_diffs(model, tokenizer, sva)
    for shape, index in _by_shape(sva).items():
        m = _sva_summary(diff[index])
        rows.append({"task": "sva", "shape": shape, **{k[4:]: v for k, v in m.items()}})
    return rows


@torch.no_grad()
def evaluate_text_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    documents: Iterable[str],
    n_sequences: int = 64,
    ctx: int = 128,
    batch_size: int = 16,
) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) on `documents` (e.g. held-out text files, never trained
    on), packed into `n_sequences` windows of `ctx` tokens separated by `<|endoftext|>`."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in documents:
        stream.extend(tokenizer.encode(doc, add_special_tokens=False))
        stream.append(eos)
        if len(stream) >= n_sequences * ctx:
            break
    n = min(n_sequences, len(stream) // ctx)
    data = torch.tensor(stream[: n * ctx]).view(n, ctx)
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, n, batch_size):
        ids = data[start : start + batch_size].to(device)
        total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
    return {"text_loss": total / n, "text_tokens": n * (ctx - 1)}


def evaluate_model(
    model: torch.nn.Module, tokenizer: Any, n: int = 400, seed: int = 0, ctx: int = 128
) -> dict[str, float]:
    """All quality metrics on held-out data (see `QUALITY_BAR`)."""
    model.eval()
    metrics: dict[str, float] = {}
    metrics.update(evaluate_ioi(model, tokenizer, n, seed))
    metrics.update(evaluate_sva(model, tokenizer, n, seed))
    metrics.update(evaluate_text_loss(model, tokenizer, text_documents("heldout"), 128, ctx))
    stdlib = evaluate_text_loss(model, tokenizer, stdlib_documents("heldout"), ctx=ctx)
    metrics.update({f"stdlib_{k}": v for k, v in stdlib.items()})
    return metrics


# metric -> (comparison, threshold); the shipped model must satisfy all of them.
QUALITY_BAR: dict[str, tuple[str, float]] = {
    "ioi_accuracy": (">=", 0.95),
    "ioi_logit_diff": (">=", 3.5),
    "ioi_abc_abs_logit_diff": ("<=", 1.0),
    "sva_accuracy": (">=", 0.90),
}


def quality_checks(metrics: dict[str, float]) -> dict[str, bool]:
    """Which entries of `QUALITY_BAR` the metrics pass."""
    out = {}
    for key, (op, threshold) in QUALITY_BAR.items():
        value = metrics[key]
        out[key] = value >= threshold if op == ">=" else value <= threshold
    return out


def load_for_eval(folder: str | Path) -> tuple[torch.nn.Module, Any]:
    """Load a model folder (weights in any dtype) as float32 GPTNeoXForCausalLM + tokenizer."""
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserInputError(f"not a model folder (no config.json): {folder}")
    model = GPTNeoXForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model.eval(), tokenizer
