"""Train sparse dictionaries on a stream of activation batches.

A *stream* is any iterable of batches, each a `dict[str, Tensor]` mapping a key (a site name such as
`"resid.2"`, or any label) to a `(batch, d)` float tensor. Every dictionary whose `TrainSpec.key`
names an entry trains on that tensor, so a grid of dictionaries (L1 values × sizes, or several
sites) shares one pass over the stream. A stream with `state_dict()` / `load_state_dict(state)` is
checkpointed with the trainer, so a resumed run continues bit for bit like an uninterrupted one.

Per step and dictionary: forward, loss (reconstruction + sparsity), backward, Adam step, with the
kind's decoder constraint around it (untied kinds: the decoder gradient's component along each row
is removed before the step, the rows are renormalised after it). Dead features (no activation in
the last `dead_window` steps) are resampled every `resample_every` steps towards inputs the
dictionary reconstructs worst. Optionally, latents that are wasted without being dead are resampled
too: duplicates of a more active latent (`resample_duplicates`) and latents that fired fewer than
`resample_min_fires` times since the last resampling; `resample_target="residual"` re-initialises
towards least-squares residuals of recent inputs instead of the inputs themselves (see
`sae_circuits.resampling`). What differs by dictionary kind is a method of its class.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from sae_circuits.batches import TokenBatch
from sae_circuits.dictionary import Dictionary, DictionaryConfig, TrainingForward, load_weights
from sae_circuits.distributed import Replicas, balanced_owners, module_state
from sae_circuits.errors import UserInputError
from sae_circuits.models import model_name
from sae_circuits.objectives import CleanRun, clean_run, downstream_sites, spliced_loss
from sae_circuits.progress import new_progress
from sae_circuits.protocols import Model
from sae_circuits.resampling import Resampler
from sae_circuits.sites import Site
from sae_circuits.sparse_codes import SparseCodes
from sae_circuits.splice import replace_dictionary, temporarily_attached
from sae_circuits.train_spec import KIND_TRAINING, KINDS, TrainSpec

Batch = dict[str, torch.Tensor]

CHECKPOINT_FILE = "checkpoint.pt"
_EPS = 1e-9
# the running means a member keeps; sse: the squared error summed over dimensions
_STATS = ("sse", "sparsity", "l0", "loss")


def _fit_schedules(specs: list[TrainSpec], steps: int) -> list[TrainSpec]:
    """The specs with a warm-up that does not end within `steps` clipped to a tenth of the run,
    and a decay that would start after the run dropped, each with a one-line warning."""
    fitted = []
    for spec in specs:
        changes: dict[str, Any] = {}
        if spec.warmup_steps >= steps:
            changes["warmup_steps"] = max(1, steps // 10)
            warnings.warn(
                f"TrainSpec({spec.key!r}): the warm-up of {spec.warmup_steps} steps does not end "
                f"within the run's {steps} steps: clipped to {changes['warmup_steps']}",
                stacklevel=3,
            )
        if spec.decay_start is not None and spec.decay_start >= max(steps, 1):
            changes["decay_start"] = None
            warnings.warn(
                f"TrainSpec({spec.key!r}): the decay starts at step {spec.decay_start:g}, after "
                f"the run's {steps} steps: no decay",
                stacklevel=3,
            )
        fitted.append(replace(spec, **changes) if changes else spec)
    return fitted


def learning_rate(spec: TrainSpec, step: int, steps: int) -> float:
    """The LR at 0-based `step` of `steps`: linear warm-up, constant, optional linear decay to 0."""
    scale = min(1.0, (step + 1) / spec.warmup_steps) if spec.warmup_steps else 1.0
    if spec.decay_start is not None:
        start = spec.decay_start * steps if spec.decay_start < 1 else spec.decay_start
        if step >= start:
            scale *= max(0.0, (steps - step) / max(steps - start, 1.0))
    return spec.lr * scale


def train_dictionaries(
    source: Iterable[Batch] | Iterable[TokenBatch],
    specs: list[TrainSpec],
    steps: int,
    *,
    d_in: dict[str, int] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    progress: bool = True,
    site_names: Mapping[str, str | Site] | None = None,
    model: str | Model | None = None,
    normalize_batches: int = 8,
    log_every: int = 10,
    device: str | torch.device = "cpu",
    autocast: torch.dtype | None = None,
    distribute_sites: bool = False,
) -> list[Dictionary]:
    """Train one dictionary per spec for `steps` batches of `source`, all in the same pass.

    `source` yields activation batches, or, when `model` is the language model itself (needed by
    the `kl` and `e2e-ds` losses), token batches (`ids` or `(ids, attention_mask)`): each is run
    clean once, and every dictionary trains on the activations of its site (stream keys are then
    site names) or through the spliced model (`sae_circuits.objectives`). `model` as a string is
    only the name written into the configs.

    `d_in` (widths per key) is read from the first batch when not given. With `checkpoint_dir`,
    the full state (dictionaries, Adam, resampling counters, RNGs, the stream's state) is written
    atomically every `checkpoint_every` steps and at the end; with `resume`, an existing checkpoint
    is continued. Normalised keys get a scale estimated from the first `normalize_batches` batches;
    it is folded into the returned weights, so they work on raw activations, and recorded as
    `hyperparameters["activation_scale"]`. `site_names` maps keys to the sites written into the
    configs (default: the key, if it names a site). Each dictionary's config records its spec,
    `steps` and `tokens`, and `metrics` gets `train_mse` (per dimension), `train_sse` (summed over
    dimensions), `train_sparsity`, `train_l0`, `train_loss` (means over the last `log_every`
    steps), `train_dead` and `train_dead_fraction`.

    `autocast` (torch.bfloat16 or torch.float16) runs the dictionaries' forward and backward in
    that precision under `torch.autocast`, their weights and Adam state staying float32 (float16
    with a gradient scaler).

    Under an initialised `torch.distributed` process group (`sae_circuits.distributed`), each
    process passes its own `source`: its share of every global batch (equal sizes on every rank).
    By default every rank holds every dictionary (data parallelism): gradients are averaged over
    the ranks, latent fire counts (dead latents, AuxK, resampling), statistics and the
    normalisation scale computed from all ranks' inputs, resampling done on the gathered global
    batch then broadcast from rank 0, so the ranks stay identical and the result is that of one
    process on the concatenated batches. With `distribute_sites`, each dictionary lives on one
    rank (balanced by size) and the batch entries it trains on are gathered to that rank; the
    returned list is then complete on every rank. Only rank 0 shows progress and writes the
    checkpoint (which holds every rank's stream state; resume with the same number of processes).
    """
    if not specs:
        raise UserInputError("no dictionaries to train")
    if steps < 1 or checkpoint_every < 1 or log_every < 1 or normalize_batches < 1:
        raise UserInputError("steps, checkpoint_every, log_every, normalize_batches must be >= 1")
    language_model = None if model is None or isinstance(model, str) else model
    _check_objectives(specs, language_model)
    specs = _fit_schedules(specs, steps)
    device = torch.device(device)
    replicas = Replicas.current()
    rank, world = (replicas.rank, replicas.world) if replicas else (0, 1)
    sharded = distribute_sites and replicas is not None
    if sharded and language_model is not None:
        raise UserInputError("distributing the dictionaries over processes needs loss mse")
    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    state = None
    if path and resume and path.is_file():
        state = _load_checkpoint(path, specs, source, rank, world)

    stream = _Stream(source, state["streams"][rank]["pending"] if state else [])
    reader = _BatchReader(language_model, specs)
    if state:
        widths, scales, start = state["d_in"], state["scales"], state["step"]
    else:
        normalized = sorted({spec.key for spec in specs if spec.normalize})
        first = [reader.read(raw) for raw in stream.peek(normalize_batches if normalized else 1)]
        widths = _input_widths(first[0], specs, d_in)
        scales = {key: _activation_scale(first, key, replicas) for key in normalized}
        start = 0
    if sharded:
        owners = balanced_owners([_size(spec, widths) for spec in specs], world)
        needs: dict[str, list[int]] = {}  # the ranks that train on each entry
        for owner, spec in zip(owners, specs, strict=True):
            for key in filter(None, (spec.key, spec.target_key)):
                needs[key] = sorted({*needs.get(key, []), owner})
    else:
        owners = [rank] * len(specs)
    local = [i for i, owner in enumerate(owners) if owner == rank]
    names = site_names or {}
    keys = {spec.key for spec in specs} | {spec.target_key for spec in specs if spec.target_key}
    sites = {key: _config_site(key, names) for key in keys}
    indicators = _Indicators()
    members = [
        _Member(
            specs[i],
            widths[specs[i].key],
            widths.get(specs[i].target_key),
            sites,
            model_name(language_model) if language_model is not None else model,
            device,
            scales.get(specs[i].key) if specs[i].normalize else None,
            indicators,
            autocast,
            None if sharded else replicas,
        )
        for i in local
    ]
    if state:
        for member, i in zip(members, local, strict=True):
            member.load_state(state["members"][i])

    done = start
    shown = progress and rank == 0
    with _ProgressBar(shown, steps, start) as bar, reader.splices(members):
        for step in range(start, steps):
            raw = stream.next()
            more = raw is not None
            if replicas is not None:  # every rank stops at the first rank's end
                more = replicas.all(more, device)
            if not more:
                if rank == 0:
                    warnings.warn(f"the stream ended after {step} of {steps} steps", stacklevel=2)
                break
            batch = reader.read(raw)
            if sharded:
                batch = _gathered(batch, needs, replicas)
            inputs: dict[tuple[str, bool], torch.Tensor] = {}
            for member in members:
                spec = member.spec
                if (spec.key, spec.normalize) not in inputs:
                    x = batch[spec.key].to(device, torch.float32)
                    inputs[spec.key, spec.normalize] = x * scales[spec.key] if spec.normalize else x
                x = inputs[spec.key, spec.normalize]
                target = batch[spec.target_key].to(device, torch.float32) if spec.target_key else x
                member.step(x, target, learning_rate(spec, step, steps), reader.objective(member))
                if (
                    spec.resample_every
                    and (step + 1) % spec.resample_every == 0
                    and step + 1 < steps
                ):
                    member.resample(x)
            done = step + 1
            if done % log_every == 0 or done == steps:
                for member in members:
                    member.flush_stats()
                bar.update(done, members)
            if path is not None and (done % checkpoint_every == 0 or done == steps):
                streams, states = _checkpoint_parts(stream, members, local, replicas, sharded)
                if rank == 0:
                    _save_checkpoint(path, done, specs, widths, scales, streams, states)
    finished = [
        member.finish(done, scales[member.spec.key] if member.spec.normalize else None)
        for member in members
    ]
    if not sharded:
        return finished
    parts = replicas.all_gather_objects(
        [(i, d.cpu()) for i, d in zip(local, finished, strict=True)]
    )
    return [d.to(device) for _, d in sorted((pair for part in parts for pair in part), key=_first)]


def _first(pair: tuple[int, Any]) -> int:
    return pair[0]


def _size(spec: TrainSpec, widths: dict[str, int]) -> int:
    """A dictionary's weights (its share of the training work)."""
    d_in = widths[spec.key]
    return spec.d_dict * (d_in + widths.get(spec.target_key, d_in))


def _gathered(batch: Batch, needs: dict[str, list[int]], replicas: Replicas) -> Batch:
    """The global batch of each entry on the ranks whose dictionaries train on it."""
    gathered = {}
    for key, ranks in needs.items():
        for destination in ranks:
            rows = replicas.gather_rows_to(batch[key], destination)
            if rows is not None:
                gathered[key] = rows
    return gathered


def _checkpoint_parts(
    stream: _Stream,
    members: list[_Member],
    local: list[int],
    replicas: Replicas | None,
    sharded: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every rank's stream state and every dictionary's state, in spec order, on rank 0 (the
    data-parallel replicas are identical: rank 0's own states)."""
    states = {i: member.state() for i, member in zip(local, members, strict=True)}
    if replicas is None:
        return [stream.state()], [states[i] for i in sorted(states)]
    streams = replicas.gather_objects(stream.state())
    if sharded:
        parts = replicas.gather_objects(states)
        states = {i: s for part in parts or [] for i, s in part.items()}
    return streams or [], [states[i] for i in sorted(states)]


def _check_objectives(specs: list[TrainSpec], language_model: Model | None) -> None:
    through = [spec for spec in specs if spec.through_model]
    if through and language_model is None:
        raise UserInputError(
            f"loss {through[0].loss} trains through the model: pass the language model as model="
        )
    for spec in through:
        if spec.normalize:
            raise UserInputError(
                f"TrainSpec({spec.key!r}): loss {spec.loss} trains on raw activations; "
                "normalize is for mse (an --init dictionary trained normalized has its scale folded)"
            )
    if language_model is not None:
        for spec in specs:
            for key in filter(None, (spec.key, spec.target_key)):
                try:
                    Site.parse(key).resolve(language_model)
                except UserInputError as error:
                    raise UserInputError(
                        f"training on token batches: stream key {key!r} must be a site ({error})"
                    ) from None


class _BatchReader:
    """Turns what the source yields into activation batches: as is, or (with a language model)
    by a clean run of a token batch, which the kl and e2e-ds members then train against."""

    def __init__(self, language_model: Model | None, specs: list[TrainSpec]) -> None:
        self.model = language_model
        self.sites: list[Site] = []  # read by each clean run
        self.downstream: dict[Site, list[Site]] = {}  # of the e2e-ds members' sites
        if language_model is not None:
            for spec in specs:
                if spec.loss == "e2e-ds":
                    site = Site.parse(spec.key)
                    self.downstream[site] = downstream_sites(language_model, site)
            keys = {k for spec in specs for k in (spec.key, spec.target_key) if k}
            later = (s for sites in self.downstream.values() for s in sites)
            self.sites = sorted({*(Site.parse(key) for key in keys), *later})
        self.clean: CleanRun | None = None
        self.slots: dict[Site, Dictionary] = {}  # the dictionary each splice holds between steps

    def read(self, raw: Batch | TokenBatch) -> Batch:
        if self.model is None:
            return raw
        for site, dictionary in self.slots.items():  # the clean run passes the same splices
            replace_dictionary(self.model, site, dictionary)
        self.clean = clean_run(self.model, raw, self.sites)
        return {str(site): self.clean.scored_activations(site) for site in self.sites}

    @contextmanager
    def splices(self, members: list[_Member]) -> Iterator[None]:
        """One splice per site trained through the model, its dictionary swapped per member; the
        model's own weights frozen meanwhile."""
        through = {}
        for member in members:
            if member.spec.through_model:
                through.setdefault(Site.parse(member.spec.key), member.dictionary)
        if not through:
            yield
            return
        self.slots = through
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with temporarily_attached(self.model, through):
                yield
        finally:
            self.slots = {}
            for p in frozen:
                p.requires_grad_(True)

    def objective(self, member: _Member) -> Callable[[], torch.Tensor] | None:
        """The loss of a kl or e2e-ds member on the current batch (None: mse)."""
        spec = member.spec
        if not spec.through_model:
            return None
        site = Site.parse(spec.key)

        def loss() -> torch.Tensor:
            replace_dictionary(self.model, site, member.dictionary)
            downstream = self.downstream.get(site) if spec.loss == "e2e-ds" else None
            return spliced_loss(
                self.model,
                site,
                self.clean,
                downstream,
                spec.downstream_coefficient,
                spec.error_swap,
            )

        return loss


class _Indicators:
    """`f > 0` as float 0/1 in a buffer reused across steps and dictionaries of the same shape.

    On CPU a fresh (batch, d_dict) tensor per step costs more in page faults than the comparison,
    and reducing a bool tensor is several times slower than reducing a float one.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def of(self, f: torch.Tensor) -> torch.Tensor:
        key = (tuple(f.shape), f.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(f.shape, device=f.device)
        return torch.gt(f, 0, out=self.buffers[key])


# --------------------------------------------------------------------------------- one dictionary
class _Member:
    """A dictionary in training with its optimizer, resampler, statistics and RNG."""

    def __init__(
        self,
        spec: TrainSpec,
        d_in: int,
        d_out: int | None,
        sites: Mapping[str, Site | None],
        model: str | None,
        device: torch.device,
        scale: float | None = None,
        indicators: _Indicators | None = None,
        autocast: torch.dtype | None = None,
        replicas: Replicas | None = None,
    ) -> None:
        self.spec = spec
        self.indicators = indicators or _Indicators()
        self.replicas = replicas  # data parallel: the other ranks hold replicas of this member
        self.world = replicas.world if replicas is not None else 1
        config = DictionaryConfig(
            kind=spec.kind,
            d_in=d_in,
            d_dict=spec.d_dict,
            in_site=sites[spec.key],
            out_site=sites[spec.target_key or spec.key],
            model=model,
            d_out=d_out if spec.target_key else None,
            k=spec.k,
            skip=spec.skip,
        )
        report = spec.recipe == "report"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.dictionary = Dictionary.from_config(config)
            if report:
                self.dictionary.orthogonal_init()
        if spec.init is not None:
            _initialise_from(self.dictionary, spec.init, scale)
        self.dictionary.to(device)
        # the report recipe: held at 0
        frozen = KIND_TRAINING[spec.kind].decoder_bias if report else None
        if frozen is not None:
            getattr(self.dictionary, frozen).requires_grad_(False)
        scales = self.dictionary.learning_rate_scales
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, p in self.dictionary.named_parameters():
            if name != frozen:
                groups.setdefault(scales.get(name, 1.0), []).append(p)
        self.trainable = [p for ps in groups.values() for p in ps]
        self.optimizer = torch.optim.Adam(
            [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()],
            lr=spec.lr,
            fused=True,  # one kernel per parameter: about half the time of the loop on CPU
        )
        # estimated from batches in training (batchtopk's threshold): averaged over replicas
        self.float_buffers = [b for b in self.dictionary.buffers() if b.is_floating_point()]
        self.autocast = autocast
        self.scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None
        self.mse_scale = 1.0 / d_in if report else 1.0
        self.penalty = 0.0 if spec.sparsity == "topk" else spec.l1 / (spec.d_dict if report else 1)
        self.aux_k = (
            (config.output_dim // 2 if spec.aux_k is None else spec.aux_k)
            if (spec.sparsity == "topk")
            else 0
        )
        self.generator = torch.Generator(device).manual_seed(spec.seed)
        self.resampler = Resampler(
            self.dictionary,
            self.optimizer,
            dead_window=spec.dead_window,
            duplicates=spec.resample_duplicates,
            min_fires=spec.resample_min_fires,
            target=spec.resample_target,
            generator=self.generator,
        )
        self.totals = torch.zeros(len(_STATS), device=device)  # sums since the last flush
        self.count = 0
        self.stats = torch.full((len(_STATS),), math.nan)
        self.tokens = 0

    def step(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        lr: float,
        objective: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        """One optimizer step on inputs `x` reconstructing `target` (`x` itself but for
        transcoders); `objective` replaces the squared error in the loss (kl, e2e-ds)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        precision = torch.autocast(x.device.type, self.autocast) if self.autocast else nullcontext()
        with precision:
            out, mse, sparsity, loss = self._losses(x, target, objective)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.replicas is not None:
            self.replicas.average_gradients(self.trainable)
        self.dictionary.project_decoder_gradient()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.dictionary.normalize_decoder()
        with torch.no_grad():
            fire_counts = self._fire_counts(out.features)
            l0 = fire_counts.sum() / len(x)
            if self.replicas is not None:
                self.replicas.average(self.float_buffers)
                fire_counts = self.replicas.sum(fire_counts)
            self.resampler.observe(x, fire_counts)
            self.totals += torch.stack([mse.detach(), sparsity.detach(), l0, loss.detach()]).float()
        self.count += 1
        self.tokens += len(x) * self.world

    def _losses(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        objective: Callable[[], torch.Tensor] | None,
    ) -> tuple[TrainingForward, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward pass, squared error, S(f) and the loss of one step."""
        if self.spec.noise_std:
            noise = torch.randn(x.shape, generator=self.generator, device=x.device)
            out = self.dictionary.training_forward(x + self.spec.noise_std * noise)
        else:
            out = self.dictionary.training_forward(x)
        mse = (out.x_hat - target).pow(2).sum(-1).mean()
        sparsity = self._sparsity(out)
        loss = self.mse_scale * mse if objective is None else objective()
        if self.penalty:
            loss = loss + self.penalty * sparsity
        if self.aux_k:
            aux = self.dictionary.auxiliary_reconstruction(
                x, out.pre, self.resampler.dead, self.aux_k
            )
            if aux is not None:
                residual = (target - out.x_hat).detach()
                aux_loss = (residual - aux).pow(2).sum(-1).mean()
                loss = loss + self.spec.aux_coefficient * self.mse_scale * aux_loss
        return out, mse, sparsity, loss

    def resample(self, x: torch.Tensor) -> None:
        """Re-initialise the wasted latents (data parallel: on the global batch, then every
        replica takes rank 0's weights and Adam state)."""
        if self.replicas is None:
            self.resampler.resample(x)
            return
        self.resampler.resample(self.replicas.gather_rows(x))
        self.replicas.broadcast(module_state(self.dictionary, self.optimizer))

    def _sparsity(self, out: TrainingForward) -> torch.Tensor:
        """The penalty's S(f) (for the statistics also when there is no penalty: then L1)."""
        if self.spec.sparsity == "entropy":
            return _entropy(out.features)
        if self.spec.sparsity == "l0":
            return out.l0.mean()
        values = out.features.values if isinstance(out.features, SparseCodes) else out.features
        return values.sum() / out.x_hat.shape[0]

    def _fire_counts(self, features: torch.Tensor | SparseCodes) -> torch.Tensor:
        if isinstance(features, SparseCodes):
            return features.fire_counts()
        return self.indicators.of(features).sum(0)

    def flush_stats(self) -> None:
        if self.count:
            if self.replicas is not None:
                self.replicas.average([self.totals])
            self.stats = (self.totals / self.count).cpu()
            self.totals.zero_()
            self.count = 0

    def state(self) -> dict[str, Any]:
        return {
            "dictionary": self.dictionary.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "totals": self.totals,
            "count": self.count,
            "stats": self.stats,
            "tokens": self.tokens,
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            **self.resampler.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.dictionary.load_state_dict(state["dictionary"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.totals.copy_(state["totals"])
        self.count, self.stats, self.tokens = state["count"], state["stats"], state["tokens"]
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.resampler.load_state(state)

    @torch.no_grad()
    def finish(self, steps: int, scale: float | None) -> Dictionary:
        """The trained dictionary for raw activations, with its spec and training metrics recorded."""
        d = self.dictionary
        if scale is not None:  # trained on s·x
            d.fold_activation_scale(scale)
        d.requires_grad_(True)
        sse, sparsity, l0, loss = (float(v) for v in self.stats)
        if scale is not None:  # metrics in raw units, like the weights
            sse /= scale**2
            loss = math.nan if self.penalty or self.aux_k else loss / scale**2
            sparsity /= 1.0 if self.spec.sparsity == "entropy" else scale
        dead = int(self.resampler.dead.sum())
        d.config.hyperparameters = {
            **asdict(self.spec),
            "steps": steps,
            "tokens": self.tokens,
            "activation_scale": scale,
        }
        d.config.metrics.update(
            train_mse=sse / d.config.output_dim,
            train_sse=sse,
            train_sparsity=sparsity,
            train_l0=l0,
            train_loss=loss,
            train_dead=dead,
            train_dead_fraction=dead / d.d_dict,
        )
        return d


def _config_site(key: str, site_names: Mapping[str, str | Site]) -> Site | None:
    """The site recorded for `key`'s dictionaries: `site_names[key]`, else the key if it names a
    site (a stream key may be any label)."""
    if key in site_names:
        return Site.parse(site_names[key])
    try:
        return Site.parse(key)
    except UserInputError:
        return None


def _initialise_from(dictionary: Dictionary, folder: str, scale: float | None) -> None:
    """Copy the weights of the dictionary in `folder` into `dictionary` (a kind with the same
    parameters, or more: e.g. untied into topk); with `scale`, moved to scaled activations."""
    start = Dictionary.load(folder)
    if start.config.normalization != "none":
        raise UserInputError(
            f"--init {folder}: dictionaries that normalise their input "
            f"({start.config.normalization}) cannot be trained here"
        )
    if scale is not None:
        start.fold_activation_scale(1 / scale)
    load_weights(dictionary, start.state_dict(), f"--init {folder}", subset=True)


def _entropy(f: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the features normalised to sum 1 per input."""
    p = f / (f.sum(-1, keepdim=True) + _EPS)
    return -(p * torch.log(p + _EPS)).sum(-1).mean()


# --------------------------------------------------------------------------------- stream & state
class _Stream:
    """The source's iterator plus batches read ahead (for normalisation), which checkpoints keep."""

    def __init__(self, source: Iterable[Batch], pending: list[Batch]) -> None:
        self.source = source
        self.pending = deque(pending)
        self.iterator: Iterator[Batch] = iter(source)

    def peek(self, n: int) -> list[Batch]:
        while len(self.pending) < n:
            batch = next(self.iterator, None)
            if batch is None:
                break
            self.pending.append(batch)
        if not self.pending:
            raise UserInputError("the activation stream is empty")
        return list(self.pending)

    def next(self) -> Batch | None:
        return self.pending.popleft() if self.pending else next(self.iterator, None)

    def state(self) -> dict[str, Any]:
        source_state = self.source.state_dict() if hasattr(self.source, "state_dict") else None
        return {"source": source_state, "pending": list(self.pending)}


def _input_widths(
    batch: Batch, specs: list[TrainSpec], given: dict[str, int] | None
) -> dict[str, int]:
    widths = dict(given or {})
    for key in {k for spec in specs for k in (spec.key, spec.target_key) if k}:
        if key not in batch:
            raise UserInputError(
                f"the stream has no entry {key!r}; it has {', '.join(sorted(batch))}"
            )
        tensor = batch[key]
        if tensor.ndim != 2 or widths.setdefault(key, tensor.shape[1]) != tensor.shape[1]:
            raise UserInputError(
                f"stream entry {key!r} has shape {tuple(tensor.shape)}; expected (batch, {widths[key]})"
            )
    return widths


def _activation_scale(batches: list[Batch], key: str, replicas: Replicas | None = None) -> float:
    """The factor s that makes the mean squared norm of s·x equal to d (x: every rank's rows)."""
    x = torch.cat([batch[key].float() for batch in batches])
    if replicas is None:
        mean_square = x.pow(2).sum(-1).mean().item()
    else:  # a float64 sum, so that the mean does not depend on how the rows are split
        totals = torch.stack([x.double().pow(2).sum(), torch.tensor(len(x), dtype=torch.float64)])
        total, rows = replicas.sum(totals.to(x.device)).tolist()
        mean_square = total / rows
    if not mean_square > 0:
        raise UserInputError(f"cannot normalise {key!r}: its activations are all zero")
    return math.sqrt(x.shape[1] / mean_square)


def _save_checkpoint(
    path: Path,
    step: int,
    specs: list[TrainSpec],
    widths: dict[str, int],
    scales: dict[str, float],
    streams: list[dict[str, Any]],
    members: list[dict[str, Any]],
) -> None:
    """Write the whole training state (`streams`: one per rank; `members`: one per spec) to a
    temporary file and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "version": 2,
        "step": step,
        "specs": [asdict(spec) for spec in specs],
        "d_in": widths,
        "scales": scales,
        "streams": streams,
        "members": members,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(
    path: Path, specs: list[TrainSpec], source: Any, rank: int = 0, world: int = 1
) -> dict[str, Any]:
    """The checkpoint's state, its stream state (this rank's) loaded into `source`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise UserInputError(f"cannot read checkpoint {path}: {error}") from None
    if "stream" in state:  # version 1: one process
        state["streams"] = [state.pop("stream")]
    if len(state["streams"]) != world:
        raise UserInputError(
            f"checkpoint {path} was written by {len(state['streams'])} process(es), not {world}: "
            "resume with as many, or use another directory"
        )
    # fields added since a checkpoint was written take their defaults
    defaults = {f.name: f.default for f in fields(TrainSpec) if f.default is not MISSING}
    saved = [{**defaults, **spec} for spec in state.get("specs", [])]
    if saved != [asdict(spec) for spec in specs]:
        raise UserInputError(
            f"checkpoint {path} was written for other TrainSpecs; use another directory"
        )
    stream = state["streams"][rank]
    if stream["source"] is not None and hasattr(source, "load_state_dict"):
        source.load_state_dict(stream["source"])
    else:
        warnings.warn("the stream has no saved state: resuming on a fresh stream", stacklevel=3)
    return state


class _ProgressBar:
    """Progress on stderr with tokens/s and, over the dictionaries, the mean per-dimension MSE,
    loss, L0 and dead fraction."""

    def __init__(self, enabled: bool, steps: int, start: int) -> None:
        self.progress = new_progress("{task.fields[stats]}") if enabled else None
        self.steps, self.start = steps, start

    def __enter__(self) -> _ProgressBar:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(
                "training", total=self.steps, completed=self.start, stats=""
            )
            self.clock, self.tokens = time.monotonic(), None
        return self

    def update(self, done: int, members: list[_Member]) -> None:
        if self.progress is None:
            return
        stats = torch.stack([member.stats for member in members]).nanmean(0)
        mse = sum(float(m.stats[0]) / m.dictionary.config.output_dim for m in members)
        dead = sum(float(m.resampler.dead.float().mean()) for m in members) / len(members)
        tokens = members[0].tokens
        if self.tokens is None:  # the rate counts from the first update (after a resume, too)
            self.clock, self.tokens = time.monotonic(), tokens
        seconds = time.monotonic() - self.clock
        rate = f"{(tokens - self.tokens) / seconds:.3g} tok/s  " if tokens > self.tokens else ""
        text = (
            f"{rate}mse {mse / len(members):.4g}  loss {stats[3]:.4g}  L0 {stats[2]:.1f}  "
            f"dead {100 * dead:.1f}%"
        )
        if len(members) > 1:
            text += f" (mean of {len(members)})"
        self.progress.update(self.task, completed=done, stats=text)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


__all__ = ["KINDS", "TrainSpec", "learning_rate", "train_dictionaries"]
