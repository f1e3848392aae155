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
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import nnsight
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_circuits.batches import TokenBatch, scored_positions, split_batch, trace_inputs
from sae_circuits.carried import site_value
from sae_circuits.errors import UserInputError
from sae_circuits.progress import progress_bar
from sae_circuits.protocols import Model
from sae_circuits.remote import Remote, request
from sae_circuits.sites import Site, site_envoy

Batch = dict[str, torch.Tensor]


def harvest(
    model: Model,
    sites: list[Site],
    ids: torch.Tensor,
    mask: torch.Tensor,
    keep_bos: bool = False,
    remote: Remote = False,
) -> Batch:
    """Activations `{site label: (n_positions, d)}` of one batch of contexts (`sites` in forward
    order), real positions only, of the model without its splices.

    One trace reads every site in forward order and stops the forward after the last one.
    `remote` (True: NDIF, "local": nnsight's simulation of a request) runs it as a request.
    """
    mask = mask.bool()
    places = [site_envoy(model, site) for site in sites]
    with (
        request(model, remote),
        torch.no_grad(),
        model.trace(trace_inputs(ids, mask), remote=remote) as tracer,
    ):
        values = nnsight.save([site_value(*place) for place in places])
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
    source: dict[str, Any] | None = None,
    remote: Remote = False,
) -> Path:
    """Harvest `tokens` activations per site into safetensors shards of `shard_size` rows
    (`remote` as for `harvest`).

    The index (`shards.json`) is rewritten after each shard with where the written rows end in
    `contexts` (whole context batches, then rows of the next). Called again on the same folder,
    with the same sites and `source` (a JSON description of where the activations come from:
    model, text; recorded in the index), a harvest continues where it stopped: the context
    batches already harvested are skipped without running the model. If the contexts run out
    first, the rows harvested are written and the index says so (`rows` < `tokens`).
    """
    if not sites:
        raise UserInputError("write_shards needs at least one site")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    parsed = sorted(Site.parse(s) for s in sites)
    index = _resumed_index(directory, [str(s) for s in parsed], source)
    pending: dict[str, list[torch.Tensor]] = {site: [] for site in index["sites"]}
    written = index["rows"]
    # the rows each harvested batch spans, for the batches not yet entirely written
    spans: deque[tuple[int, int]] = deque()
    batches = iter(contexts)
    for _ in range(index["contexts"]):
        if next(batches, None) is None:
            raise UserInputError(
                f"the contexts are shorter than the harvest in {directory} being continued"
            )
    end = written - index["skip"]
    with progress_bar("harvesting", tokens, enabled=progress) as bar:
        bar.update(0, completed=min(written, tokens))
        for batch in batches if written < tokens else ():
            harvested = harvest(model, parsed, *split_batch(batch), keep_bos, remote)
            rows = next(iter(harvested.values())).shape[0]
            spans.append((end, end + rows))
            cut = max(0, written - end)  # rows written before (a continued harvest's first batch)
            end += rows
            for key, value in harvested.items():
                pending[key].append(value[cut:])
            while end - written >= shard_size or (end > written and end >= tokens):
                written = _flush(directory, index, pending, min(shard_size, tokens - written))
                _advance(directory, index, spans, written)
                bar.update(0, completed=written)
                if written >= tokens:
                    break
            if written >= tokens:
                break
        if (
            written < tokens and end > written
        ):  # the contexts ran out: the rest makes a last, smaller shard
            written = _flush(directory, index, pending, end - written)
            _advance(directory, index, spans, written)
    index["complete"] = True
    _write_index(directory, index)
    return directory


def _resumed_index(directory: Path, sites: list[str], source: dict[str, Any] | None) -> dict:
    """The index of an unfinished (or shorter) harvest in `directory` of the same sites and
    source, or a fresh one."""
    path = directory / SHARD_INDEX
    fresh = {"sites": sites, "source": source, "shards": [], "rows": 0, "contexts": 0, "skip": 0}
    if not path.is_file():
        return {**fresh, "complete": False}
    index = json.loads(path.read_text())
    if index.get("sites") != sites or index.get("source") != source:
        raise UserInputError(
            f"{directory} holds a harvest of other sites or from another source "
            f"({', '.join(index.get('sites', []))}); use another folder"
        )
    return {**fresh, **index, "complete": False}


def _flush(directory: Path, index: dict, pending: dict[str, list[torch.Tensor]], rows: int) -> int:
    """Write the next shard of `rows` pending rows; returns the rows written so far."""
    index["shards"].append(_write_shard(directory, len(index["shards"]), pending, rows))
    index["rows"] += rows
    return index["rows"]


def _advance(directory: Path, index: dict, spans: deque[tuple[int, int]], written: int) -> None:
    """Record in the index where `written` rows end in the contexts, and rewrite it."""
    while spans and spans[0][1] <= written:
        spans.popleft()
        index["contexts"] += 1
    index["skip"] = written - spans[0][0] if spans else 0
    _write_index(directory, index)


def _write_index(directory: Path, index: dict) -> None:
    tmp = directory / (SHARD_INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    tmp.replace(directory / SHARD_INDEX)


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


def read_shard_index(directory: str | Path) -> dict[str, Any]:
    """The index of a finished harvest in `directory` (sites, shards, rows, source)."""
    path = Path(directory) / SHARD_INDEX
    if not path.is_file():
        raise UserInputError(f"{directory} holds no activation shards ({SHARD_INDEX})")
    index = json.loads(path.read_text())
    if not index.get("complete", True):
        raise UserInputError(
            f"the harvest in {directory} did not finish: run it again to continue it"
        )
    return index


class ShardStream:
    """Shuffled batches `{site: (batch, d)}` from shards written by `write_shards`, for `epochs`
    passes (shards in a seeded random order, rows shuffled within each shard).

    With `world` > 1 (one stream per process of a distributed run), each global batch of
    `batch_size` rows is the same as for one process, and this stream serves rank `rank`'s
    `batch_size / world` of its rows.
    """

    def __init__(
        self,
        directory: str | Path,
        batch_size: int = 1024,
        epochs: int = 1,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.directory = Path(directory)
        self.index = read_shard_index(self.directory)
        self.sites: list[str] = self.index["sites"]
        self.shards: list[str] = self.index["shards"]
        if batch_size % world:
            raise UserInputError(f"batch size {batch_size} does not split over {world} processes")
        self.share = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
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
                    chosen = order[start : start + self.batch_size][self.share]
                    yield {site: data[site][chosen] for site in self.sites}

    def __iter__(self) -> Iterator[Batch]:
        for number, batch in enumerate(self._batches()):
            if number >= self.position:
                self.position = number + 1
                yield batch

    def __len__(self) -> int:
        """Batches served in all (the rest of each shard, under a batch, is left out)."""
        per_epoch = 0
        for shard in self.shards:
            with safe_open(str(self.directory / shard), "pt") as f:
                per_epoch += f.get_slice(self.sites[0]).get_shape()[0] // self.batch_size
        return self.epochs * per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]
