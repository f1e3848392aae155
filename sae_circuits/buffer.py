"""Streaming activation buffer fed by nnsight traces, and on-disk activation shards.

`ActivationBuffer` harvests activations at one or several sites in one forward pass per batch of
contexts (the forward stops after the last site it needs), keeps about `n_ctxs × ctx_len` of them,
serves shuffled batches `{site: (batch, d)}`, and refills from new contexts when half of the buffer
has been served — the scheme used for the published Pythia-70M dictionaries. Pad positions never
enter; the first real position of each context (BOS) is dropped unless `keep_bos=True`.

`write_shards` stores a harvest as safetensors shards so a sweep can reuse it; `ShardStream`
serves shuffled batches from them, holding one shard in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import nnsight
import torch
from safetensors.torch import load_file, save_file

from sae_circuits.batches import TokenBatch, scored_positions, split_batch, trace_inputs
from sae_circuits.errors import UserInputError
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.sites import Site, read_site

Batch = dict[str, torch.Tensor]


def harvest(
    model: Model, sites: list[Site], ids: torch.Tensor, mask: torch.Tensor, keep_bos: bool = False
) -> Batch:
    """Activations `{site label: (n_positions, d)}` of one batch of contexts (`sites` in forward
    order), real positions only.

    One trace reads every site in forward order and stops the forward after the last one.
    """
    mask = mask.bool()
    with torch.no_grad(), model.trace(trace_inputs(ids, mask)) as tracer:
        values = nnsight.save([read_site(model, site) for site in sites])
        tracer.stop()
    keep = scored_positions(mask, skip_first=not keep_bos)
    return {str(site): value[keep].float() for site, value in zip(sites, values, strict=True)}


class ActivationBuffer:
    """Shuffled activation batches from a stream of token batches, refilled when half empty.

    `contexts` yields token ids `(n, ctx_len)` or `(ids, attention_mask)` pairs (e.g. from
    `sae_circuits.text.token_batches`). Iterating yields `{site: (batch_size, d)}` until the
    contexts run out. `state_dict()`/`load_state_dict()` capture the buffer, its random state and
    how many context batches were consumed, so a trainer can resume exactly (given the same
    `contexts` stream, which is then fast-forwarded).
    """

    def __init__(
        self,
        model: Model,
        sites: list[str | Site],
        contexts: Iterable[TokenBatch],
        n_ctxs: int = 512,
        ctx_len: int = 128,
        batch_size: int = 1024,
        keep_bos: bool = False,
        seed: int = 0,
    ) -> None:
        if not sites:
            raise UserInputError("the buffer needs at least one site")
        self.model = model
        self.sites = sorted(Site.parse(s) for s in sites)
        self.contexts = iter(contexts)
        self.capacity = n_ctxs * ctx_len
        self.batch_size = batch_size
        if batch_size > self.capacity // 2:
            raise UserInputError(
                f"batch size {batch_size} is more than half the buffer ({self.capacity}); "
                "raise n_ctxs or lower the batch size"
            )
        self.keep_bos = keep_bos
        self.generator = torch.Generator().manual_seed(seed)
        self.store: Batch = {}
        self.consumed = 0  # context batches taken from `contexts`
        self.exhausted = False

    @property
    def available(self) -> int:
        return next(iter(self.store.values())).shape[0] if self.store else 0

    def refill(self) -> None:
        """Harvest new contexts until the buffer is full or the contexts run out."""
        chunks = {key: [value] for key, value in self.store.items()}
        count = self.available
        while count < self.capacity:
            batch = next(self.contexts, None)
            if batch is None:
                self.exhausted = True
                break
            self.consumed += 1
            harvested = harvest(self.model, self.sites, *split_batch(batch), self.keep_bos)
            for key, value in harvested.items():
                chunks.setdefault(key, []).append(value)
            count += next(iter(harvested.values())).shape[0]
        store = {key: torch.cat(parts) for key, parts in chunks.items()}
        order = torch.randperm(count, generator=self.generator)
        self.store = {site: value[order] for site, value in store.items()}

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.available < self.capacity // 2 and not self.exhausted:
            self.refill()
        if self.available < self.batch_size:
            raise StopIteration
        # The store is kept shuffled: serve from the end, so refills keep the unread rest.
        batch = {site: value[-self.batch_size :] for site, value in self.store.items()}
        self.store = {site: value[: -self.batch_size] for site, value in self.store.items()}
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "store": dict(self.store),
            "generator": self.generator.get_state(),
            "consumed": self.consumed,
            "exhausted": self.exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; fast-forwards `contexts` past the batches consumed before."""
        for _ in range(state["consumed"] - self.consumed):
            if next(self.contexts, None) is None:
                raise UserInputError("the context stream is shorter than the one checkpointed")
        self.store = dict(state["store"])
        self.generator.set_state(state["generator"])
        self.consumed = state["consumed"]
        self.exhausted = state["exhausted"]


# ----------------------------------------------------------------------------------- shards
SHARD_INDEX = "shards.json"


def write_shards(
    model: Model,
    sites: list[str | Site],
    contexts: Iterable[TokenBatch],
    directory: str | Path,
    tokens: int,
    shard_size: int = 65536,
    keep_bos: bool = False,
    progress: bool = True,
) -> Path:
    """Harvest `tokens` activations per site into safetensors shards of `shard_size` rows."""
    if not sites:
        raise UserInputError("write_shards needs at least one site")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    parsed = sorted(Site.parse(s) for s in sites)
    pending: dict[str, list[torch.Tensor]] = {str(s): [] for s in parsed}
    shards: list[str] = []
    written = 0
    with progress_bar("harvesting", tokens, enabled=progress) as bar:
        for batch in contexts:
            for key, value in harvest(model, parsed, *split_batch(batch), keep_bos).items():
                pending[key].append(value)
            rows = sum(v.shape[0] for v in next(iter(pending.values())))
            while rows >= shard_size or (rows and written + rows >= tokens):
                take = min(shard_size, rows, tokens - written)
                shards.append(_write_shard(directory, len(shards), pending, take))
                written += take
                bar.update(0, completed=written)
                rows -= take
                if written >= tokens:
                    break
            if written >= tokens:
                break
    index = {"sites": list(pending), "shards": shards, "rows": written}
    (directory / SHARD_INDEX).write_text(json.dumps(index, indent=2))
    return directory


def _write_shard(
    directory: Path, number: int, pending: dict[str, list[torch.Tensor]], rows: int
) -> str:
    tensors = {}
    for site, parts in pending.items():
        merged = torch.cat(parts)
        tensors[site] = merged[:rows].contiguous()
        pending[site] = [merged[rows:]]
    name = f"shard_{number:05d}.safetensors"
    tmp = directory / (name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(directory / name)
    return name


class ShardStream:
    """Shuffled batches `{site: (batch, d)}` from shards written by `write_shards`, for `epochs`
    passes (shards in a seeded random order, rows shuffled within each shard)."""

    def __init__(
        self, directory: str | Path, batch_size: int = 1024, epochs: int = 1, seed: int = 0
    ) -> None:
        self.directory = Path(directory)
        index_path = self.directory / SHARD_INDEX
        if not index_path.is_file():
            raise UserInputError(f"{self.directory} holds no activation shards ({SHARD_INDEX})")
        index = json.loads(index_path.read_text())
        self.sites: list[str] = index["sites"]
        self.shards: list[str] = index["shards"]
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed
        self.position = 0  # batches served so far

    def _batches(self) -> Iterator[Batch]:
        for epoch in range(self.epochs):
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            for shard in torch.randperm(len(self.shards), generator=generator).tolist():
                data = load_file(str(self.directory / self.shards[shard]))
                rows = next(iter(data.values())).shape[0]
                order = torch.randperm(rows, generator=generator)
                for start in range(0, rows - self.batch_size + 1, self.batch_size):
                    chosen = order[start : start + self.batch_size]
                    yield {site: data[site][chosen] for site in self.sites}

    def __iter__(self) -> Iterator[Batch]:
        for number, batch in enumerate(self._batches()):
            if number >= self.position:
                self.position = number + 1
                yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]
