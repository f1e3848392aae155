"""Train dictionaries on a model end to end: nnsight buffer -> trainer -> evaluation -> saved folders."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from sae_circuits.buffer import ActivationBuffer, ShardStream, read_shard_index
from sae_circuits.dictionary import Dictionary
from sae_circuits.distributed import rank_and_world, share
from sae_circuits.errors import UserInputError
from sae_circuits.evaluation import evaluate, mean_activations
from sae_circuits.models import model_name
from sae_circuits.objectives import ContextStream
from sae_circuits.protocols import Model
from sae_circuits.sites import Site
from sae_circuits.text import token_batches
from sae_circuits.training import TrainSpec, train_dictionaries

CHECKPOINT_DIR = ".checkpoint"


def checkpoint_dir(out: Path, specs: list[TrainSpec], run: dict[str, Any] | None = None) -> Path:
    """`out/.checkpoint/<digest>` of the specs and the `run` settings (model, data): runs into one
    folder keep separate checkpoints, and a resume never continues another model's run."""
    key = repr(([asdict(spec) for spec in specs], sorted((run or {}).items())))
    return out / CHECKPOINT_DIR / hashlib.sha1(key.encode()).hexdigest()[:12]


def model_fingerprint(model: Model) -> str:
    """Name plus a hash of a strided sample of every parameter: changes when the weights do."""
    digest = hashlib.sha1(model_name(model).encode())
    with torch.no_grad():
        for p in model.parameters():
            sample = p.detach().flatten()[:: max(1, p.numel() // 1024)].float().cpu()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def output_folder(out: Path, spec: TrainSpec, grid: bool, seeds: bool = False) -> Path:
    """`out/<site>` (the site the dictionary is spliced at: a transcoder's target), or below it
    `<kind>_<size>_l1-<l1>` (top-k: `_k-<k>`) for a grid, with `_seed-<seed>` when the grid
    holds several seeds."""
    site_folder = out / (spec.target_key or spec.key)
    sparsity = f"k-{spec.k}" if spec.sparsity == "topk" else f"l1-{spec.l1:g}"
    name = f"{spec.kind}_{spec.d_dict}_{sparsity}" + (f"_seed-{spec.seed}" if seeds else "")
    return site_folder / name if grid else site_folder


def train_and_evaluate(
    model: Model,
    specs: list[TrainSpec],
    tokens: int,
    out: Path,
    documents: Iterable[str],
    eval_documents: Iterable[str],
    batch_size: int = 1024,
    ctx_len: int = 128,
    n_ctxs: int = 256,
    eval_tokens: int = 16384,
    checkpoint_every: int = 500,
    seed: int = 0,
    storage_dtype: torch.dtype | None = None,
    keep_checkpoint: bool = False,
    shards: Path | None = None,
    autocast: torch.dtype | None = None,
    distribute_sites: bool = False,
) -> list[tuple[Path, Dictionary]]:
    """Train `specs` on one buffer stream (or, for kl and e2e-ds losses, on token contexts through
    the spliced model), evaluate each, save each with its metrics.

    `shards`: train on the activations harvested there by `write_shards` (from this `model`)
    instead of running the model. `storage_dtype` (e.g. torch.float16) shrinks the saved weights;
    loading restores float32. `autocast` and `distribute_sites` are those of
    `train_dictionaries`; the dictionaries train on the model's device. Once every dictionary is
    saved, the run's checkpoint is removed (and `out/.checkpoint` if nothing else is left in it)
    unless `keep_checkpoint`.

    Under a process group (see `sae_circuits.distributed`) every rank calls this: each harvests
    its share of the contexts (every world-th context batch; from shards, its share of every
    global batch) and trains on `batch_size / world` activations a step; rank 0 alone
    evaluates, saves and returns the dictionaries (the other ranks return an empty list).
    """
    rank, world = rank_and_world()
    sites = sorted({Site.parse(spec.key) for spec in specs})
    read = sorted({Site.parse(key) for spec in specs for key in (spec.key, spec.target_key) if key})
    through_model = any(spec.through_model for spec in specs)
    fingerprint = model_fingerprint(model)
    if shards is not None:
        if through_model:
            raise UserInputError(
                "training from shards needs loss mse (kl and e2e-ds run the model)"
            )
        harvested_from = (read_shard_index(shards).get("source") or {}).get("model")
        if harvested_from != fingerprint:
            raise UserInputError(f"the activations in {shards} were not harvested from this model")
        source = ShardStream(shards, batch_size, seed=seed, rank=rank, world=world)
        steps = math.ceil(tokens / batch_size)
    elif through_model:  # whole contexts through the spliced model, about batch_size tokens a step
        contexts_per_step = max(1, round(batch_size / (ctx_len - 1)))
        batches = token_batches(model.tokenizer, documents, ctx_len, contexts_per_step)
        source = ContextStream(islice(batches, rank, None, world))
        steps = math.ceil(tokens / (world * contexts_per_step * (ctx_len - 1)))
    else:
        contexts = token_batches(
            model.tokenizer, documents, ctx_len, batch_size=max(n_ctxs // 8, 1)
        )
        source = ActivationBuffer(
            model,
            read,
            islice(contexts, rank, None, world),
            max(n_ctxs // world, 1),
            ctx_len,
            share(batch_size, "the batch size"),
            seed=seed,
        )
        steps = math.ceil(tokens / batch_size)
    run = {
        "model": fingerprint,
        "tokens": tokens,
        "batch_size": batch_size,
        "ctx_len": ctx_len,
        "n_ctxs": n_ctxs,
        "seed": seed,
        **({"shards": str(Path(shards).resolve())} if shards is not None else {}),
        **({"processes": world} if world > 1 else {}),
    }
    checkpoint = checkpoint_dir(out, specs, run)
    dictionaries = train_dictionaries(
        source,
        specs,
        steps,
        checkpoint_dir=checkpoint,
        checkpoint_every=checkpoint_every,
        model=model if through_model else model_name(model),
        device=next(model.parameters()).device,
        autocast=autocast,
        distribute_sites=distribute_sites,
    )
    if rank != 0:
        return []
    eval_batches = list(token_batches(model.tokenizer, eval_documents, ctx_len, 16, eval_tokens))
    grid = len(specs) > len(sites)
    seeds = len({spec.seed for spec in specs}) > 1
    # one mean-activation pass for all: each dictionary is then evaluated against the same means
    means = mean_activations(model, {d.config.site for d in dictionaries}, eval_batches)
    saved = []
    for spec, dictionary in zip(specs, dictionaries, strict=True):
        site = dictionary.config.site
        metrics = evaluate(model, {site: dictionary}, eval_batches, means={site: means[site]})
        dictionary.config.metrics.update(metrics[site])
        folder = output_folder(out, spec, grid, seeds)
        dictionary.save(folder, dtype=storage_dtype)
        saved.append((folder, dictionary))
    if not keep_checkpoint:
        shutil.rmtree(checkpoint, ignore_errors=True)
        if checkpoint.parent.is_dir() and not any(checkpoint.parent.iterdir()):
            checkpoint.parent.rmdir()
    return saved
