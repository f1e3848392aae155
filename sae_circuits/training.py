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
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from sae_circuits.dictionary import Dictionary, DictionaryConfig
from sae_circuits.errors import UserInputError
from sae_circuits.progress import new_progress
from sae_circuits.resampling import RESAMPLE_TARGETS, Resampler
from sae_circuits.sites import Site

Batch = dict[str, torch.Tensor]

KINDS = tuple(kind for kind, cls in Dictionary.registry.items() if cls.trainable)
TOP_K_KINDS = tuple(kind for kind in KINDS if Dictionary.registry[kind].top_k)
REPORT_KINDS = tuple(kind for kind in KINDS if Dictionary.registry[kind].decoder_bias)  # held at 0
SPARSITIES = ("l1", "entropy", "topk")
RECIPES = ("standard", "report")
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

    key: str = field(metadata={"help": "the entry of the stream's batches to train on"})
    kind: str = field(default="untied", metadata={"help": "dictionary kind", "choices": KINDS})
    d_dict: int = field(default=4096, metadata={"help": "dictionary size: number of features"})
    l1: float = field(default=1e-3, metadata={"help": "sparsity coefficient"})
    sparsity: str = field(
        default="l1",
        metadata={
            "help": "sparsity penalty: L1 norm or entropy of the features (kind topk: topk)",
            "choices": SPARSITIES,
        },
    )
    k: int | None = field(
        default=None, metadata={"help": "active features per input of a topk dictionary"}
    )
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    warmup_steps: int = field(default=1000, metadata={"help": "steps of linear LR warm-up"})
    decay_start: float | None = field(
        default=None,
        metadata={"help": "linear LR decay to 0 from this step (< 1: a fraction of the steps)"},
    )
    resample_every: int | None = field(
        default=None, metadata={"help": "re-initialise dead latents every N steps", "metavar": "N"}
    )
    dead_window: int = field(
        default=1000, metadata={"help": "a latent is dead if it did not fire in this many steps"}
    )
    # ties between duplicates: the lower index is kept
    resample_duplicates: float | None = field(
        default=None,
        metadata={
            "help": "at each resampling, also re-initialise latents whose decoder direction has "
            "cosine >= COS with a latent that fired more since the previous one",
            "metavar": "COS",
        },
    )
    resample_min_fires: int = field(
        default=0,
        metadata={
            "help": "at each resampling, also re-initialise latents that fired fewer than N times "
            "since the previous one; 0: off",
            "metavar": "N",
        },
    )
    # "input": unit inputs drawn ∝ squared reconstruction error from the current batch, encoder
    # 0.2 × the mean live norm, bias 0, Adam moments 0 (Anthropic 2023); "residual": the largest
    # least-squares residuals of the last RESAMPLE_POOL inputs, encoder at the median live norm and
    # bias, Adam second moments at the live mean (see `sae_circuits.resampling`)
    resample_target: str = field(
        default="input",
        metadata={
            "help": "re-initialise towards badly reconstructed inputs (input) or towards "
            "least-squares residuals of recent inputs (residual)",
            "choices": RESAMPLE_TARGETS,
        },
    )
    noise_std: float = field(
        default=0.0,
        metadata={"help": "denoising: std of Gaussian noise added to the input, not the target"},
    )
    normalize: bool = field(
        default=False,
        metadata={"help": "scale activations to mean squared norm d (folded into the weights)"},
    )
    recipe: str = field(
        default="standard",
        metadata={
            "help": "losses and initialisation: standard, or as in Sharkey et al. (report)",
            "choices": RECIPES,
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        top_k = self.kind in TOP_K_KINDS
        if top_k and self.sparsity == "l1":
            self.sparsity = "topk"
        checks = [
            (self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}"),
            (self.sparsity in SPARSITIES, f"sparsity must be one of {', '.join(SPARSITIES)}"),
            (
                top_k == (self.sparsity == "topk"),
                f'sparsity="topk" ⇔ a top-k kind ({", ".join(TOP_K_KINDS)})',
            ),
            (not top_k or (self.k or 0) >= 1, f"a {self.kind} dictionary needs k >= 1"),
            (self.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}"),
            (
                self.recipe != "report" or self.kind in REPORT_KINDS,
                f"the report recipe needs a kind with a decoder bias ({', '.join(REPORT_KINDS)})",
            ),
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
    site_names: Mapping[str, str | Site] | None = None,
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
    configs (default: the key, if it names a site). Each dictionary's config records its spec,
    `steps` and `tokens`, and `metrics` gets `train_mse`, `train_sparsity`, `train_l0` (means over
    the last `log_every` steps), `train_dead` and `train_dead_fraction`.
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
    sites = {key: _config_site(key, site_names or {}) for key in {spec.key for spec in specs}}
    indicators = _Indicators()
    members = [
        _Member(spec, widths[spec.key], sites[spec.key], model, device, indicators)
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
                    member.resampler.resample(x)
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
    """A dictionary in training with its optimizer, resampler, statistics and RNG."""

    def __init__(
        self,
        spec: TrainSpec,
        d_in: int,
        site: Site | None,
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
                self.dictionary.orthogonal_init()
        self.dictionary.to(device)
        frozen = self.dictionary.decoder_bias if report else None  # the report recipe: held at 0
        params = [p for name, p in self.dictionary.named_parameters() if name != frozen]
        if frozen is not None:
            getattr(self.dictionary, frozen).requires_grad_(False)
        self.optimizer = torch.optim.Adam(params, lr=spec.lr)
        self.mse_scale = 1.0 / d_in if report else 1.0
        self.penalty = 0.0 if spec.sparsity == "topk" else spec.l1 / (spec.d_dict if report else 1)
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
        self.dictionary.project_decoder_gradient()
        self.optimizer.step()
        self.dictionary.normalize_decoder()
        with torch.no_grad():
            active = self.indicators.of(f)
            self.resampler.observe(x, active)
            self.totals += torch.stack([mse.detach(), sparsity.detach(), active.sum() / len(x)])
        self.count += 1
        self.tokens += len(x)

    def flush_stats(self) -> None:
        if self.count:
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
            **self.resampler.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.dictionary.load_state_dict(state["dictionary"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.totals.copy_(state["totals"])
        self.count, self.stats, self.tokens = state["count"], state["stats"], state["tokens"]
        self.resampler.load_state(state)

    @torch.no_grad()
    def finish(self, steps: int, scale: float | None) -> Dictionary:
        """The trained dictionary for raw activations, with its spec and training metrics recorded."""
        d = self.dictionary
        if scale is not None:  # trained on s·x
            d.fold_activation_scale(scale)
        d.requires_grad_(True)
        mse, sparsity, l0 = (float(v) for v in self.stats)
        if scale is not None:  # metrics in raw units, like the weights
            mse /= scale**2
            sparsity /= 1.0 if self.spec.sparsity == "entropy" else scale
        dead = int(self.resampler.dead.sum())
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


def _config_site(key: str, site_names: Mapping[str, str | Site]) -> Site | None:
    """The site recorded for `key`'s dictionaries: `site_names[key]`, else the key if it names a
    site (a stream key may be any label)."""
    if key in site_names:
        return Site.parse(site_names[key])
    try:
        return Site.parse(key)
    except UserInputError:
        return None


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
        dead = sum(float(m.resampler.dead.float().mean()) for m in members) / len(members)
        text = f"mse {stats[0]:.4g}  L0 {stats[2]:.1f}  dead {100 * dead:.1f}%"
        if len(members) > 1:
            text += f" (mean of {len(members)})"
        self.progress.update(self.task, completed=done, stats=text)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


__all__ = ["TrainSpec", "learning_rate", "train_dictionaries"]
