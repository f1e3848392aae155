"""Train sparse dictionaries on a stream of activation batches.

A *stream* is any iterable of batches, each a `dict[str, Tensor]` mapping a key (a site name such as
`"resid.2"`, or any label) to a `(batch, d)` float tensor. Every dictionary whose `TrainSpec.key`
names an entry trains on that tensor, so a grid of dictionaries (L1 values × sizes, or several
sites) shares one pass over the stream. A stream with `state_dict()` / `load_state_dict(state)` is
checkpointed with the trainer, so a resumed run continues bit for bit like an uninterrupted one.

Per step and dictionary: forward, loss (reconstruction + sparsity), backward, removal of the decoder
gradient's component parallel to each decoder row, Adam step, decoder renormalisation. Dead
features (no activation in the last `dead_window` steps) are resampled every `resample_every` steps
towards inputs the dictionary reconstructs worst. Optionally, latents that are wasted without being
dead are resampled too: duplicates of a more active latent (`resample_duplicates`) and latents that
fired fewer than `resample_min_fires` times since the last resampling; `resample_target="residual"`
re-initialises towards least-squares residuals of recent inputs instead of the inputs themselves.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sae_circuits.dictionary import Dictionary, DictionaryConfig
from sae_circuits.errors import UserInputError
from sae_circuits.progress import new_progress

Batch = dict[str, torch.Tensor]

KINDS = ("tied", "untied", "topk")
SPARSITIES = ("l1", "entropy", "topk")
RECIPES = ("standard", "report")
RESAMPLE_TARGETS = ("input", "residual")
RESAMPLE_POOL = 2048  # inputs (rows) kept for resample_target="residual"
CHECKPOINT_FILE = "checkpoint.pt"
_EPS = 1e-9


@dataclass
class TrainSpec:
    """One dictionary to train.

    Losses per input `x` with reconstruction `x̂` and features `f`:
    - recipe "standard": `‖x − x̂‖² + l1 · S(f)`;
    - recipe "report" (Sharkey et al.): `(1/d)‖x − x̂‖² + (l1/d_dict) · S(f)`, no decoder bias,
      orthogonal initialisation;
    where `S` is the L1 norm (`sparsity="l1"`), the entropy of `f / Σf` (`"entropy"`), or nothing
    for top-k dictionaries (`kind="topk"`, `sparsity="topk"`, which keep the `k` largest features).
    """

    key: str
    kind: str = "untied"  # tied | untied | topk
    d_dict: int = 4096
    l1: float = 1e-3
    sparsity: str = "l1"  # l1 | entropy | topk (set automatically for kind="topk")
    k: int | None = None
    lr: float = 1e-3
    warmup_steps: int = 1000
    decay_start: float | None = (
        None  # linear decay to 0 from this step; values < 1: fraction of steps
    )
    resample_every: int | None = None
    dead_window: int = 1000  # a feature is dead if it did not fire in this many steps
    # at each resampling, also re-initialise every latent whose unit decoder direction has cosine
    # >= this with a latent that fired more since the last resampling (ties: the lower index)
    resample_duplicates: float | None = None
    # ... and every latent that fired fewer than this many times since the last resampling
    resample_min_fires: int = 0
    # "input": unit inputs drawn ∝ squared reconstruction error from the current batch, encoder
    # 0.2 × the mean live norm, bias 0, Adam moments 0 (Anthropic 2023); "residual": the largest
    # least-squares residuals of the last RESAMPLE_POOL inputs, encoder at the median live norm and
    # bias, Adam second moments at the live mean (see `_Member.resample`)
    resample_target: str = "input"
    noise_std: float = 0.0  # denoising: Gaussian noise added to the input, not to the target
    normalize: bool = False  # scale activations so that their mean squared norm is d
    recipe: str = "standard"  # standard | report
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind == "topk" and self.sparsity == "l1":
            self.sparsity = "topk"
        checks = [
            (self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}"),
            (self.sparsity in SPARSITIES, f"sparsity must be one of {', '.join(SPARSITIES)}"),
            ((self.kind == "topk") == (self.sparsity == "topk"), 'kind="topk" ⇔ sparsity="topk"'),
            (self.kind != "topk" or (self.k or 0) >= 1, "a topk dictionary needs k >= 1"),
            (self.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}"),
            (self.recipe != "report" or self.kind != "tied", "the report recipe is untied"),
            (
                self.d_dict >= 1 and self.lr > 0 and self.l1 >= 0,
                "need d_dict >= 1, lr > 0, l1 >= 0",
            ),
            (self.warmup_steps >= 0 and self.noise_std >= 0, "need warmup_steps, noise_std >= 0"),
            (self.dead_window >= 1, "dead_window must be >= 1"),
            (
                self.resample_every is None or self.resample_every >= 1,
                "resample_every must be >= 1",
            ),
            (self.decay_start is None or self.decay_start >= 0, "decay_start must be >= 0"),
            (
                self.resample_duplicates is None or 0 < self.resample_duplicates <= 1,
                "resample_duplicates must be a cosine in (0, 1]",
            ),
            (self.resample_min_fires >= 0, "resample_min_fires must be >= 0"),
            (
                self.resample_target in RESAMPLE_TARGETS,
                f"resample_target must be one of {', '.join(RESAMPLE_TARGETS)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserInputError(f"TrainSpec({self.key!r}): {message}")


def learning_rate(spec: TrainSpec, step: int, steps: int) -> float:
    """The LR at 0-based `step` of `steps`: linear warm-up, constant, optional linear decay to 0."""
    scale = min(1.0, (step + 1) / spec.warmup_steps) if spec.warmup_steps else 1.0
    if spec.decay_start is not None:
        start = spec.decay_start * steps if spec.decay_start < 1 else spec.decay_start
        if step >= start:
            scale *= max(0.0, (steps - step) / max(steps - start, 1.0))
    return spec.lr * scale


def train_dictionaries(
    source: Iterable[Batch],
    specs: list[TrainSpec],
    steps: int,
    *,
    d_in: dict[str, int] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    progress: bool = True,
    site_names: dict[str, str] | None = None,
    model: str | None = None,
    normalize_batches: int = 8,
    log_every: int = 10,
    device: str | torch.device = "cpu",
) -> list[Dictionary]:
    """Train one dictionary per spec for `steps` batches of `source`, all in the same pass.

    `d_in` (widths per key) is read from the first batch when not given. With `checkpoint_dir`,
    the full state (dictionaries, Adam, resampling counters, RNGs, the stream's state) is written
    atomically every `checkpoint_every` steps and at the end; with `resume`, an existing checkpoint
    is continued. Normalised keys get a scale estimated from the first `normalize_batches` batches;
    it is folded into the returned weights, so they work on raw activations, and recorded as
    `hyperparameters["activation_scale"]`. `site_names` maps keys to the sites written into the
    configs (default: the key). Each dictionary's config records its spec, `steps` and `tokens`,
    and `metrics` gets `train_mse`, `train_sparsity`, `train_l0` (means over the last `log_every`
    steps), `train_dead` and `train_dead_fraction`.
    """
    if not specs:
        raise UserInputError("no dictionaries to train")
    if steps < 1 or checkpoint_every < 1 or log_every < 1 or normalize_batches < 1:
        raise UserInputError("steps, checkpoint_every, log_every, normalize_batches must be >= 1")
    device = torch.device(device)
    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    state = _load_checkpoint(path, specs, source) if path and resume and path.is_file() else None

    stream = _Stream(source, state["stream"]["pending"] if state else [])
    if state:
        widths, scales, start = state["d_in"], state["scales"], state["step"]
    else:
        normalized = sorted({spec.key for spec in specs if spec.normalize})
        first = stream.peek(normalize_batches if normalized else 1)
        widths = _input_widths(first[0], specs, d_in)
        scales = {key: _activation_scale(first, key) for key in normalized}
        start = 0
    sites = site_names or {}
    indicators = _Indicators()
    members = [
        _Member(spec, widths[spec.key], sites.get(spec.key, spec.key), model, device, indicators)
        for spec in specs
    ]
    if state:
        for member, member_state in zip(members, state["members"], strict=True):
            member.load_state(member_state)

    done = start
    with _ProgressBar(progress, steps, start) as bar:
        for step in range(start, steps):
            batch = stream.next()
            if batch is None:
                warnings.warn(f"the stream ended after {step} of {steps} steps", stacklevel=2)
                break
            inputs: dict[tuple[str, bool], torch.Tensor] = {}
            for member in members:
                spec = member.spec
                if (spec.key, spec.normalize) not in inputs:
                    x = batch[spec.key].to(device, torch.float32)
                    inputs[spec.key, spec.normalize] = x * scales[spec.key] if spec.normalize else x
                x = inputs[spec.key, spec.normalize]
                member.step(x, learning_rate(spec, step, steps))
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
                _save_checkpoint(path, done, specs, widths, scales, stream, members)
    return [
        member.finish(done, scales[member.spec.key] if member.spec.normalize else None)
        for member in members
    ]


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
    """A dictionary in training with its optimizer, dead-feature counters and RNG."""

    def __init__(
        self,
        spec: TrainSpec,
        d_in: int,
        site: str,
        model: str | None,
        device: torch.device,
        indicators: _Indicators | None = None,
    ) -> None:
        self.spec = spec
        self.indicators = indicators or _Indicators()
        config = DictionaryConfig(
            kind=spec.kind, d_in=d_in, d_dict=spec.d_dict, site=site, model=model, k=spec.k
        )
        report = spec.recipe == "report"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.dictionary = Dictionary.from_config(config)
            if report:
                _orthogonal_init(self.dictionary)
        self.dictionary.to(device)
        params = [
            p for name, p in self.dictionary.named_parameters() if not (report and name == "b_dec")
        ]
        if report:
            self.dictionary.b_dec.requires_grad_(False)
        self.optimizer = torch.optim.Adam(params, lr=spec.lr)
        self.decoder: nn.Parameter | None = None if spec.kind == "tied" else self.dictionary.W_dec
        self.mse_scale = 1.0 / d_in if report else 1.0
        self.penalty = 0.0 if spec.sparsity == "topk" else spec.l1 / (spec.d_dict if report else 1)
        self.generator = torch.Generator(device).manual_seed(spec.seed)
        self.since_fired = torch.zeros(spec.d_dict, dtype=torch.long, device=device)
        # activations per latent since the last resampling (only kept when a rule needs them)
        self.fired = (
            torch.zeros(spec.d_dict, dtype=torch.long, device=device)
            if spec.resample_duplicates is not None or spec.resample_min_fires
            else None
        )
        # recent inputs for residual resampling: the last batches, at least RESAMPLE_POOL rows
        self.pool: deque[torch.Tensor] | None = (
            deque() if spec.resample_target == "residual" else None
        )
        self.totals = torch.zeros(
            3, device=device
        )  # sums of mse, sparsity, L0 since the last flush
        self.count = 0
        self.stats = torch.full((3,), math.nan)
        self.tokens = 0

    def step(self, x: torch.Tensor, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.spec.noise_std:
            noise = torch.randn(x.shape, generator=self.generator, device=x.device)
            x_hat, f = self.dictionary(x + self.spec.noise_std * noise)
        else:
            x_hat, f = self.dictionary(x)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        sparsity = _entropy(f) if self.spec.sparsity == "entropy" else f.sum(-1).mean()
        loss = (
            self.mse_scale * mse + self.penalty * sparsity if self.penalty else self.mse_scale * mse
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.decoder is not None:
            _remove_parallel_gradient(self.decoder)
        self.optimizer.step()
        if self.decoder is not None:
            self.dictionary.normalize_decoder()
        with torch.no_grad():
            active = self.indicators.of(f)
            self.since_fired.add_(1).masked_fill_(active.amax(0) > 0, 0)
            if self.fired is not None:
                self.fired += active.sum(0).long()
            self.totals += torch.stack([mse.detach(), sparsity.detach(), active.sum() / len(x)])
        self.count += 1
        self.tokens += len(x)
        if self.pool is not None:
            self.pool.append(x.detach())
            while (
                len(self.pool) > 1 and sum(map(len, self.pool)) - len(self.pool[0]) >= RESAMPLE_POOL
            ):
                self.pool.popleft()

    def flush_stats(self) -> None:
        if self.count:
            self.stats = (self.totals / self.count).cpu()
            self.totals.zero_()
            self.count = 0

    @property
    def dead(self) -> torch.Tensor:
        return self.since_fired >= self.spec.dead_window

    @torch.no_grad()
    def resample(self, x: torch.Tensor) -> int:
        """Re-initialise dead latents, and those the optional rules flag; returns how many.

        Targets: dead latents, with `resample_duplicates` the duplicates of more active latents,
        with `resample_min_fires` the latents that fired fewer times since the last resampling.
        `resample_target="input"`: directions are unit inputs of the batch `x` drawn ∝ squared
        reconstruction error (with replacement). `"residual"`: each input of the last
        RESAMPLE_POOL is refitted by least squares on the latents it activates, and the unit
        residuals with the largest norms are taken (what the active latents cannot express at any
        activation, e.g. a feature no latent covers); the encoder column gets the median norm of
        the live ones, the bias their median, and Adam's second moments their mean (zeros would
        make the first updates of a re-initialised latent tens of times larger than the LR).
        """
        targets = self.dead
        if self.fired is not None:
            if self.spec.resample_duplicates is not None:
                targets = targets | self.duplicates()
            if self.spec.resample_min_fires:
                targets = targets | (self.fired < self.spec.resample_min_fires)
            self.fired.zero_()
        dead = targets.nonzero().squeeze(1)
        if len(dead) == 0:
            return 0
        residual = self.spec.resample_target == "residual"
        if residual:
            pool = torch.cat(list(self.pool)) if self.pool else x
            errors = _least_squares_residuals(self.dictionary, pool)
            norms = errors.pow(2).sum(-1)
            if not norms.sum() > 0:
                return 0
            order = norms.argsort(descending=True)
            chosen = order[torch.arange(len(dead), device=order.device) % len(order)]
            directions = F.normalize(errors[chosen], dim=-1)
        else:
            losses = (self.dictionary(x)[0] - x).pow(2).sum(-1)
            if not losses.sum() > 0:
                return 0
            chosen = torch.multinomial(
                losses, len(dead), replacement=True, generator=self.generator
            )
            directions = F.normalize(x[chosen], dim=-1)
        d = self.dictionary
        alive = ~targets
        if self.spec.kind == "tied":
            if residual and alive.any():
                norm, bias = d.W[alive].norm(dim=1).median(), float(d.b[alive].median())
                slots = [(d.W, 0, norm * directions), (d.b, 0, bias)]
            else:
                slots = [(d.W, 0, directions), (d.b, 0, 0.0)]
        else:
            if residual and alive.any():
                enc, bias = d.W_enc[:, alive].norm(dim=0).median(), float(d.b_enc[alive].median())
            else:
                enc = d.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
                enc, bias = 0.2 * enc, 0.0
            slots = [
                (d.W_dec, 0, directions),
                (d.W_enc, 1, enc * directions.T),
                (d.b_enc, 0, bias),
            ]
        live = alive.nonzero().squeeze(1)
        for param, axis, value in slots:
            if isinstance(value, float):
                param.index_fill_(axis, dead, value)
            else:
                param.index_copy_(axis, dead, value)
            state = self.optimizer.state.get(param, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name not in state:
                    continue
                if residual and name == "exp_avg_sq" and len(live):
                    mean = state[name].index_select(axis, live).mean(axis, keepdim=True)
                    shape = list(state[name].shape)
                    shape[axis] = len(dead)
                    state[name].index_copy_(axis, dead, mean.expand(shape).contiguous())
                else:
                    state[name].index_fill_(axis, dead, 0.0)
        self.since_fired[dead] = 0
        return len(dead)

    @torch.no_grad()
    def duplicates(self, max_block: int = 1 << 24) -> torch.Tensor:
        """(d_dict,) bool: latents whose unit decoder direction has cosine >= `resample_duplicates`
        with a higher-ranked latent (more activations since the last resampling, then lower index).

        Each group of near-identical latents thus keeps its top-ranked member. The Gram matrix is
        computed in row blocks of at most `max_block` entries.
        """
        threshold, n = self.spec.resample_duplicates, self.spec.d_dict
        directions = F.normalize(self.dictionary.decoder_directions.detach().float(), dim=-1)
        index = torch.arange(n, device=directions.device)
        fired = self.fired if self.fired is not None else torch.zeros_like(index)
        # rank: more activations first, then the lower index (unique, so exactly one is on top)
        rank = fired.double() * n + (n - 1 - index).double()
        chunk = max(1, max_block // n)
        duplicate = torch.zeros(n, dtype=torch.bool, device=directions.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            cosines = directions[rows] @ directions.T
            higher = rank[None, :] > rank[rows, None]  # excludes the latent itself
            duplicate[rows] = ((cosines >= threshold) & higher).any(1)
        return duplicate

    def state(self) -> dict[str, Any]:
        return {
            "dictionary": self.dictionary.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "since_fired": self.since_fired,
            "generator": self.generator.get_state(),
            "totals": self.totals,
            "count": self.count,
            "stats": self.stats,
            "tokens": self.tokens,
            **({"fired": self.fired} if self.fired is not None else {}),
            **({"pool": list(self.pool)} if self.pool is not None else {}),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.dictionary.load_state_dict(state["dictionary"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.since_fired.copy_(state["since_fired"])
        self.generator.set_state(state["generator"])
        self.totals.copy_(state["totals"])
        self.count, self.stats, self.tokens = state["count"], state["stats"], state["tokens"]
        if self.fired is not None:
            self.fired.copy_(state["fired"])
        if self.pool is not None:
            self.pool = deque(state["pool"])

    @torch.no_grad()
    def finish(self, steps: int, scale: float | None) -> Dictionary:
        """The trained dictionary for raw activations, with its spec and training metrics recorded."""
        d = self.dictionary
        if scale is not None:  # trained on s·x: dividing the biases by s gives features f/s on x
            for bias in (d.b,) if self.spec.kind == "tied" else (d.b_enc, d.b_dec):
                bias.div_(scale)
        d.requires_grad_(True)
        mse, sparsity, l0 = (float(v) for v in self.stats)
        if scale is not None:  # metrics in raw units, like the weights
            mse /= scale**2
            sparsity /= 1.0 if self.spec.sparsity == "entropy" else scale
        dead = int(self.dead.sum())
        d.config.hyperparameters = {
            **asdict(self.spec),
            "steps": steps,
            "tokens": self.tokens,
            "activation_scale": scale,
        }
        d.config.metrics.update(
            train_mse=mse,
            train_sparsity=sparsity,
            train_l0=l0,
            train_dead=dead,
            train_dead_fraction=dead / d.d_dict,
        )
        return d


def _entropy(f: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the features normalised to sum 1 per input."""
    p = f / (f.sum(-1, keepdim=True) + _EPS)
    return -(p * torch.log(p + _EPS)).sum(-1).mean()


@torch.no_grad()
def _least_squares_residuals(
    dictionary: Dictionary, x: torch.Tensor, max_block: int = 1 << 24
) -> torch.Tensor:
    """(n, d) residuals of `x` after a least-squares fit on the decoder directions of the latents
    each input activates (at most d of them, the most active), plus the decoder bias.

    Unlike `x − x̂`, the residual does not contain the shrinkage of the active latents' activations
    (the L1 penalty's), so large residuals point at directions that no active latent covers.
    Works in blocks of at most `max_block` floats.
    """
    f = dictionary.encode(x)
    base = dictionary.decode(torch.zeros_like(f[:1]))
    target = x - base
    directions = dictionary.decoder_directions
    width = max(1, min(int((f > 0).sum(1).max()), directions.shape[1]))
    values, indices = f.topk(width, dim=1)
    residuals = torch.empty_like(target)
    chunk = max(1, max_block // (width * max(width, directions.shape[1])))
    eye = torch.eye(width, device=x.device, dtype=x.dtype)
    for start in range(0, len(x), chunk):
        rows = slice(start, start + chunk)
        basis = directions[indices[rows]] * (values[rows] > 0)[..., None]  # (m, width, d)
        gram = basis @ basis.transpose(1, 2) + 1e-4 * eye  # the ridge pins unused slots to 0
        coefficients = torch.linalg.solve(gram, basis @ target[rows, :, None])
        residuals[rows] = target[rows] - (coefficients.transpose(1, 2) @ basis).squeeze(1)
    return residuals


@torch.no_grad()
def _remove_parallel_gradient(weight: nn.Parameter) -> None:
    """Keep unit-norm rows on the sphere: drop each row's gradient component along the row."""
    grad = weight.grad
    grad.sub_((grad * weight).sum(1, keepdim=True) * weight)


@torch.no_grad()
def _orthogonal_init(dictionary: Dictionary) -> None:
    """Orthogonal decoder (unit rows), encoder its transpose, zero biases (the report's recipe)."""
    nn.init.orthogonal_(dictionary.W_dec)
    dictionary.normalize_decoder()
    dictionary.W_enc.copy_(dictionary.W_dec.T)
    dictionary.b_enc.zero_()
    dictionary.b_dec.zero_()


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
    for key in {spec.key for spec in specs}:
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


def _activation_scale(batches: list[Batch], key: str) -> float:
    """The factor s that makes the mean squared norm of s·x equal to d."""
    x = torch.cat([batch[key].float() for batch in batches])
    mean_square = x.pow(2).sum(-1).mean().item()
    if not mean_square > 0:
        raise UserInputError(f"cannot normalise {key!r}: its activations are all zero")
    return math.sqrt(x.shape[1] / mean_square)


def _save_checkpoint(
    path: Path,
    step: int,
    specs: list[TrainSpec],
    widths: dict[str, int],
    scales: dict[str, float],
    stream: _Stream,
    members: list[_Member],
) -> None:
    """Write the whole training state to a temporary file and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "version": 1,
        "step": step,
        "specs": [asdict(spec) for spec in specs],
        "d_in": widths,
        "scales": scales,
        "stream": stream.state(),
        "members": [member.state() for member in members],
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, specs: list[TrainSpec], source: Any) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise UserInputError(f"cannot read checkpoint {path}: {error}") from None
    # fields added since a checkpoint was written take their defaults
    defaults = {f.name: f.default for f in fields(TrainSpec) if f.default is not MISSING}
    saved = [{**defaults, **spec} for spec in state.get("specs", [])]
    if saved != [asdict(spec) for spec in specs]:
        raise UserInputError(
            f"checkpoint {path} was written for other TrainSpecs; use another directory"
        )
    if state["stream"]["source"] is not None and hasattr(source, "load_state_dict"):
        source.load_state_dict(state["stream"]["source"])
    else:
        warnings.warn("the stream has no saved state: resuming on a fresh stream", stacklevel=3)
    return state


class _ProgressBar:
    """A rich progress bar on stderr with mean MSE, L0 and dead fraction over the dictionaries."""

    def __init__(self, enabled: bool, steps: int, start: int) -> None:
        self.progress = new_progress("{task.fields[stats]}") if enabled else None
        self.steps, self.start = steps, start

    def __enter__(self) -> _ProgressBar:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(
                "training", total=self.steps, completed=self.start, stats=""
            )
        return self

    def update(self, done: int, members: list[_Member]) -> None:
        if self.progress is None:
            return
        stats = torch.stack([member.stats for member in members]).nanmean(0)
        dead = sum(float(member.dead.float().mean()) for member in members) / len(members)
        text = f"mse {stats[0]:.4g}  L0 {stats[2]:.1f}  dead {100 * dead:.1f}%"
        if len(members) > 1:
            text += f" (mean of {len(members)})"
        self.progress.update(self.task, completed=done, stats=text)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


__all__ = ["TrainSpec", "learning_rate", "train_dictionaries"]
