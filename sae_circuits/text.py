"""Text sources and token batches for harvesting and evaluation.

Documents come from a text iterator, `.txt` files (one document per blank-line separated paragraph
block) or `.jsonl` files (a `text` field per line). `token_batches` packs them into fixed-length
contexts, each starting with the tokenizer's BOS token, so that no position is padding.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from sae_circuits.corpus import iter_corpus, stdlib_documents
from sae_circuits.errors import UserInputError


def read_documents(path: str | Path) -> Iterator[str]:
    """Documents of a `.txt` or `.jsonl` file."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"text file not found: {path}")
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    if path.suffix == ".txt":
        return _txt_documents(path)
    raise UserInputError(f"unsupported text file {path.name}: use .txt or .jsonl")


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserInputError(
                    f"{path}:{number}: expected a JSON object with 'text'"
                ) from None


def _txt_documents(path: Path) -> Iterator[str]:
    block: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block)
                block = []
    if block:
        yield "".join(block)


def default_documents(model_is_embedded: bool) -> Iterator[str]:
    """Held-out text: the embedded model's held-out corpus, or for any other model a sample of
    English and code (docstrings, comments and functions of the Python standard library)."""
    if model_is_embedded:
        return iter_corpus("heldout", seed=0)
    return itertools.cycle(stdlib_documents("heldout"))


def training_documents(model_is_embedded: bool, seed: int = 0) -> Iterator[str]:
    """Text to train dictionaries on: the embedded model's own training corpus (from `seed`), or
    for any other model the sample of `default_documents`."""
    if model_is_embedded:
        return iter_corpus("train", seed=seed)
    return default_documents(False)


def token_batches(
    tokenizer: Any,
    documents: Iterable[str],
    ctx_len: int = 128,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> Iterator[torch.Tensor]:
    """Pack documents, separated by EOS, into (batch, ctx_len) token tensors that start with BOS.

    Stops after `max_tokens` tokens (rounded up to whole contexts) or when documents run out; a
    last partial batch is yielded.
    """
    if ctx_len < 2:
        raise UserInputError("ctx_len must be at least 2")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    body = ctx_len - 1
    pending: list[int] = []
    rows: list[list[int]] = []
    produced = 0
    for document in documents:
        pending.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if eos is not None:
            pending.append(eos)
        while len(pending) >= body:
            rows.append([bos, *pending[:body]])
            del pending[:body]
            produced += ctx_len
            if len(rows) == batch_size:
                yield torch.tensor(rows)
                rows = []
            if max_tokens is not None and produced >= max_tokens:
                if rows:
                    yield torch.tensor(rows)
                return
    if rows:
        yield torch.tensor(rows)
